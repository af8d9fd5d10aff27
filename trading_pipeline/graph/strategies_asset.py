"""The `strategies` asset: the strategies file as the code location loaded it, visible in the UI
(Catalog → strategies) with each strategy's symbols, risk limits and order settings, upstream of
trade_decisions in the lineage. A rejected edit of the file shows here, not only in a terminal."""

import os

import dagster as dg

from trading_pipeline.core.strategies import StrategiesFile, Strategy


def _strategy_table(strategy: Strategy) -> str:
    risk, orders = strategy.risk, strategy.orders
    rows = [
        ("symbols", ", ".join(strategy.symbols)),
        ("timeframes", ", ".join(f"{tf} {s.period}" for tf, s in strategy.timeframes.items())),
        ("orders enabled", "yes" if orders.enabled else "no (orders.enabled: false)"),
        ("time in force / market closed", f"{orders.tif} / {orders.when_market_closed}"),
        ("decided at the open", "yes" if strategy.trade_at_open else "no"),
        ("min R / min margin", f"{risk.min_r:g} / {risk.min_profit_margin:.1%}"),
        ("risk per trade / max position", f"{risk.risk_per_trade:.2%} / {risk.max_position_share:.0%} of equity"),
        ("max open positions / gross exposure", f"{risk.max_open_positions} / {risk.max_gross_exposure:.0%}"),
        ("daily loss limit / min confidence", f"{risk.daily_loss_limit:.1%} / {risk.min_confidence:.2f}"),
        ("min stop distance / shorts", f"{risk.min_stop_atr:g} × ATR / {'allowed' if risk.allow_short else 'no'}"),
    ]
    return f"**{strategy.name}**: {strategy.description or ''}\n\n| setting | value |\n|---|---|\n" + \
        "\n".join(f"| {name} | {value} |" for name, value in rows)


def strategies_spec(strategies_file: StrategiesFile, load_problem: str | None) -> dg.AssetSpec:
    metadata = {
        "strategies": dg.MetadataValue.md("\n\n".join(_strategy_table(s) for s in strategies_file.strategies)),
        "symbols": len(strategies_file.symbols()),
        "file": dg.MetadataValue.text(os.environ.get("TRADING_STRATEGIES_FILE")
                                      or "the packaged default (TRADING_STRATEGIES_FILE unset)"),
    }
    description = "The strategies file as loaded: symbols, timeframes, risk limits and order settings per strategy."
    if load_problem:
        metadata["rejected_edit"] = dg.MetadataValue.md(f"**The last edit was rejected**\n\n```\n{load_problem}\n```")
        description = ("⚠ THE LAST EDIT OF THE STRATEGIES FILE WAS REJECTED: the pipeline runs on the last good copy. "
                       "See rejected_edit below for the line and the fix. " + description)
    return dg.AssetSpec("strategies", group_name="strategies", description=description, metadata=metadata,
                        kinds={"yaml"})
