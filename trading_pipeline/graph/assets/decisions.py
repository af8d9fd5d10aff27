"""Trade decisions: the daily analysis leads, the weekly confirms, the risk gates decide (per symbol;
a batched run decides every symbol of the run, in symbol order)."""

import dagster as dg

from trading_pipeline import config
from trading_pipeline.core.analysis import TradeDecision
from trading_pipeline.core.strategies import StrategiesFile, Strategy
from trading_pipeline.errors import UserError
from trading_pipeline.graph import checks
from trading_pipeline.graph.assets.analyses import analyst_for_run, model_call_metadata
from trading_pipeline.graph.assets.batch import (
    BATCH_POLICY,
    PartitionFailure,
    PartitionOutcome,
    materialize_partitions,
    partitioned_checks,
)
from trading_pipeline.graph.assets.common import fail, nan_if_none, run_as_of
from trading_pipeline.graph.assets.decision_chart import DecisionChart, render_decision_charts
from trading_pipeline.graph.resources import (
    AnalystResource,
    BrokerResource,
    ChartRendererResource,
    ChartStoreResource,
    MarketDataResource,
    TradingDatabaseResource,
)
from trading_pipeline.workers import worker_pool


def build_decision_assets(strategies_file: StrategiesFile, symbols) -> list:
    from_both_timeframes = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="symbol")

    @dg.asset(
        partitions_def=symbols,
        group_name="trading",
        ins={"ai_analyses": dg.AssetIn(partition_mapping=from_both_timeframes),
             "indicator_frames": dg.AssetIn(partition_mapping=from_both_timeframes)},
        deps=["strategies"],  # the strategy and limits it applied (lineage: strategies → trade_decisions)
        check_specs=partitioned_checks(checks.decision_check_specs("trade_decisions"), symbols),
        retry_policy=dg.RetryPolicy(max_retries=2, delay=5),
        # The OpenAI analyst's consolidation call; a pool of its own, so that decisions at the open
        # never wait for a slot held by analysis steps.
        pool="decisions",
        backfill_policy=BATCH_POLICY,
        description="Daily analysis leads, weekly confirms; deterministic risk gates decide BUY/SELL/HOLD/NO_TRADE.",
    )
    def trade_decisions(
        context: dg.AssetExecutionContext,
        ai_analyses: dict,  # {"SPY|1d": ..., "SPY|1w": ...}, all symbols of a batched run
        indicator_frames: dict,
        analyst: AnalystResource,
        broker: BrokerResource,
        market_data: MarketDataResource,
        chart_renderer: ChartRendererResource,
        chart_store: ChartStoreResource,
        trading_db: TradingDatabaseResource,
    ):
        from trading_pipeline.adapters.records import record_decision, record_strategy, sent_decision
        from trading_pipeline.core import market_calendar
        from trading_pipeline.core.decisions import decide

        by_symbol: dict[str, dict] = {}
        for inputs, name in ((ai_analyses, "analysis"), (indicator_frames, "frames")):
            for key, value in inputs.items():
                symbol, timeframe = key.split("|")  # symbol × timeframe keys: dimensions in name order
                by_symbol.setdefault(symbol, {}).setdefault(name, {})[timeframe] = value
        sessions = trading_db.sessions()
        decided_at = run_as_of(context)  # this run's point in time, not the analyses' (may be older)
        try:  # the broker's answers (a wrong account, a missing P&L) are the user's to fix: never retried
            the_broker = broker.broker(symbols=tuple(strategies_file.symbols()))
            # Read once for the run: deciding sends nothing, so the account is the same for every symbol.
            account = account_for_decisions(the_broker, market_data, sessions, decided_at)
        except UserError as error:
            raise fail(error) from None
        reader = analyst_for_run(context, analyst, sessions)
        market_open = market_calendar.is_open(decided_at)
        next_open = market_calendar.describe_next_open(decided_at)
        for strategy in {strategies_file.strategy_for(symbol).name: strategies_file.strategy_for(symbol)
                         for symbol in by_symbol}.values():
            record_strategy(sessions, strategy)  # the strategy and limits the decisions applied

        def decide_symbol(symbol: str, inputs: dict) -> tuple[TradeDecision, bool]:
            """The symbol's decision (recorded), and whether orders were already sent for it."""
            strategy = strategies_file.strategy_for(symbol)
            failed = [v for v in inputs["analysis"].values() if isinstance(v, PartitionFailure)]
            if failed:
                raise UserError(f"no analysis to decide {symbol} on: {failed[0].describe()}", failed[0].fix)
            daily, weekly = inputs["analysis"]["1d"], inputs["analysis"]["1w"]
            kill = config.KillSwitch.read()
            decision = decide(
                strategy, symbol, daily, weekly, account,
                market_open=market_open,
                next_open=next_open,
                kill_switch=(kill.engaged, kill.reason),
                consolidator=reader.consolidate,
                decided_at=decided_at,
                tick=the_broker.min_tick(symbol),
            )
            already = sent_decision(sessions, decision.decision_id)
            if already is not None:
                return already, True
            record_decision(sessions, decision)
            return decision, False

        def attempt(symbol: str) -> tuple[TradeDecision, bool] | Exception:
            try:
                return decide_symbol(symbol, by_symbol[symbol])
            except Exception as error:  # noqa: BLE001 - raised again for that symbol's partition
                return error

        # Every symbol decided first, then all decision charts drawn as one batch; a symbol's error is
        # kept and raised for its partition below. Each decision reads the one account snapshot, so
        # they do not depend on each other: with the openai analyst, whose consolidation call takes
        # seconds, a batch asks TRADING_LLM_CONCURRENCY at a time (the rules analyst, CPU-bound, one at
        # a time); the results are kept in symbol order either way.
        workers = getattr(getattr(reader, "settings", None), "concurrency", 1) if len(by_symbol) > 1 else 1
        try:
            with worker_pool(workers, "decisions") as pool:
                if pool is None:
                    decided = {symbol: attempt(symbol) for symbol in sorted(by_symbol)}
                else:
                    futures = {symbol: pool.submit(attempt, symbol) for symbol in sorted(by_symbol)}
                    decided = {symbol: future.result() for symbol, future in futures.items()}
        finally:
            reader.close()
        for result in decided.values():  # logged here: the event log is written from this thread only
            if not isinstance(result, Exception) and result[1]:
                context.log.info(f"decision {result[0].decision_id} already has orders; keeping it as it was")
        # Bars that failed in a batch: an unusable analysis, no chart.
        drawable = [symbol for symbol, result in decided.items() if not isinstance(result, Exception)
                    and not isinstance(by_symbol[symbol]["frames"]["1d"], PartitionFailure)]
        charts = dict(zip(drawable, render_decision_charts(
            [DecisionChart(decided[symbol][0], by_symbol[symbol]["frames"]["1d"].frame) for symbol in drawable],
            chart_renderer, chart_store, log=context.log), strict=True))
        store = chart_store.store()

        def decision_outcome(symbol: str, _inputs: dict) -> PartitionOutcome:
            result = decided[symbol]
            if isinstance(result, Exception):
                raise result
            decision, unchanged = result
            strategy = strategies_file.strategy_for(symbol)
            return PartitionOutcome(
                value=decision,
                metadata={**decision_metadata(decision, unchanged, strategy, store), **charts.get(symbol, {}),
                          **model_call_metadata(context, analyst, sessions, symbol, None, "consolidation")},
                check_results=checks.decision_checks(decision, strategy),
            )

        yield from materialize_partitions(context, decision_outcome, by_symbol, in_key_order=True)

    return [trade_decisions]


def account_for_decisions(the_broker, market_data: MarketDataResource, sessions, decided_at):
    """The account as the risk gates see it at the decisions' point in time: every position marked
    to its latest closed price (unrealized losses count for equity, size and the loss breaker) and
    the orders that may still fill."""
    from trading_pipeline.adapters.market_data import marks_for
    from trading_pipeline.adapters.portfolio_sync import with_working_orders

    held = the_broker.account({}, as_of=decided_at).positions
    marks = marks_for(market_data.source(), held, decided_at)
    return with_working_orders(the_broker.account(marks, as_of=decided_at), sessions, the_broker)


def _number(value, pattern="{:,.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def decision_metadata(decision: TradeDecision, unchanged: bool, strategy: Strategy, store) -> dict:
    gates = "\n".join(f"| {c.rule} | {'yes' if c.passed else '**no**'} | {c.detail.replace('|', '¦')} |"
                       for c in decision.checks)
    risk, orders = strategy.risk, strategy.orders
    limits = (
        "| limit | value |\n|---|---:|\n"
        f"| min R | {risk.min_r:g} |\n| min profit margin | {risk.min_profit_margin:.1%} |\n"
        f"| risk per trade | {risk.risk_per_trade:.2%} |\n| max position share | {risk.max_position_share:.0%} |\n"
        f"| max open positions | {risk.max_open_positions} |\n| max gross exposure | {risk.max_gross_exposure:.0%} |\n"
        f"| daily loss limit | {risk.daily_loss_limit:.1%} |\n| min confidence | {risk.min_confidence:.2f} |\n"
        f"| min stop distance | {risk.min_stop_atr:g} × ATR |\n| shorts allowed | {'yes' if risk.allow_short else 'no'} |\n"
        f"| orders enabled (strategy) | {'yes' if orders.enabled else 'no'} |\n| time in force | {orders.tif} |\n"
        f"| market closed | {orders.when_market_closed} |")
    levels = (
        "| level | price |\n|---|---:|\n"
        f"| entry | {_number(decision.entry)} |\n| stop | {_number(decision.stop)} |\n"
        + "".join(f"| target {i} | {_number(t)} |\n" for i, t in enumerate(decision.targets, 1))
        + f"| R multiple | {_number(decision.r_multiple)} |\n| profit margin | {_number(decision.profit_margin, '{:.2%}')} |\n"
        f"| quantity | {decision.quantity:,} |\n| equity sized on | {_number(decision.account_equity)} |")
    metadata = {
        "decision_id": decision.decision_id,
        "strategy": decision.strategy,
        "action": decision.action.value,
        "proposed_action": decision.proposed_action.value,
        "closes_position": decision.closes_position,
        "confirmation": decision.confirmation,
        "levels": dg.MetadataValue.md(levels),
        "entry": nan_if_none(decision.entry),
        "stop": nan_if_none(decision.stop),
        "r_multiple": nan_if_none(decision.r_multiple),
        "confidence": round(decision.confidence, 2),
        "quantity": decision.quantity,
        "rationale": dg.MetadataValue.text(decision.rationale),  # holds the model's words: never markdown
        "risk_gates": dg.MetadataValue.md("| gate | passed | numbers |\n|---|---|---|\n" + gates) if decision.checks
        else dg.MetadataValue.text("no gates run: nothing to trade"),
        "strategy_limits": dg.MetadataValue.md(limits),
        "charts": dg.MetadataValue.json({tf: c.uri for tf, c in decision.charts.items()}),  # the analyses' charts
        # the same charts as links a browser opens (object keys start at charts/ in every store)
        "chart_links": dg.MetadataValue.md("\n".join(
            f"- [{tf} chart]({store.public_url(c.uri[c.uri.index('charts/'):])})"
            for tf, c in decision.charts.items() if "charts/" in c.uri) or "none"),
        "data_through": decision.data_through.isoformat(),
        "decided_at": decision.as_of.isoformat(),  # the run's point in time: when the order goes out
    }
    if unchanged:
        metadata["note"] = "orders were already sent for this decision; the stored decision is kept unchanged"
    return metadata
