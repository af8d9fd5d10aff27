"""The backtest report: plain text for the terminal, tables for Dagster, an equity/drawdown chart."""

from __future__ import annotations

import math
import textwrap

import pandas as pd

from trading_pipeline.backtest.engine import BacktestResult
from trading_pipeline.backtest.statistics import EQUAL_WEIGHT

EQUITY_ROWS = (
    ("total_return", "Total return", "pct"), ("cagr", "CAGR", "pct"), ("volatility", "Volatility (ann.)", "pct"),
    ("sharpe", "Sharpe", "num"), ("sortino", "Sortino", "num"), ("calmar", "Calmar", "num"),
    ("max_drawdown", "Max drawdown", "pct"), ("max_drawdown_sessions", "Longest drawdown (sessions)", "int"),
    ("time_in_market", "Time in market", "pct"), ("average_exposure", "Average exposure / equity", "pct"),
    ("alpha", "Alpha (ann.)", "pct"), ("beta", "Beta", "num"), ("final_equity", "Final equity", "usd"),
)
TRADE_ROWS = (
    ("trades", "Closed trades", "int"), ("open_at_end", "Open at the end", "int"), ("win_rate", "Win rate", "pct"),
    ("average_win", "Average win", "usd"), ("average_loss", "Average loss", "usd"),
    ("profit_factor", "Profit factor", "num"), ("expectancy", "Expectancy per trade", "usd"),
    ("expectancy_r", "Expectancy (R)", "num"), ("sqn", "SQN (over R)", "num"), ("r_median", "Median R", "num"),
    ("r_best", "Best R", "num"), ("r_worst", "Worst R", "num"), ("planned_r_mean", "Planned R (mean)", "num"),
    ("holding_sessions_mean", "Holding (sessions, mean)", "num"),
    ("holding_sessions_max", "Holding (sessions, max)", "int"),
    ("longest_losing_streak", "Longest losing streak", "int"), ("commissions", "Commissions paid", "usd"),
    ("net_pnl", "Net P&L (closed trades)", "usd"),
)


NOT_AVAILABLE_NOTE = (
    "n/a: the figure is not defined for this run: Sharpe and volatility need two or more daily returns "
    "that vary, Sortino a losing day, Calmar a drawdown, alpha and beta a benchmark that moved; the trade "
    "figures need closed trades (the average win a winner, the average loss a trade without a gain, "
    "the profit factor a losing trade, SQN two trades whose R differ).")


def fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if kind == "pct":
        return f"{value:.2%}"
    if kind == "usd":
        return f"${value:,.2f}"
    if kind == "int":
        return f"{int(value):,}"
    return f"{value:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    return [line(headers), "  ".join("-" * w for w in widths), *[line(r) for r in rows]]


def text_report(result: BacktestResult, summary: dict, walk=None) -> str:
    s = result.settings
    equity, trades, pipeline = summary["equity"], summary["trades"], summary["pipeline"]
    out = [
        (f"Backtest of strategy {s.strategy}: {result.equity.index[0].date()} .. {result.equity.index[-1].date()} "
        f"({len(result.equity)} sessions, {len(result.symbols)} symbols: {', '.join(result.symbols)})"),
        (f"analyst {result.analyst}, data {s.data}, commission {s.commission}, slippage {s.slippage_bps:g} bps, "
        f"initial cash ${s.initial_cash:,.0f}, benchmark {summary['benchmark']}"),
        (f"run key {summary['run_key']} (settings + code {result.code_version} + data {result.data_digest[:12]}); "
        f"result digest {summary['result_digest'][:16]}"),
        "",
    ]
    names = list(summary["benchmarks"])
    rows = []
    for key, label, kind in EQUITY_ROWS:
        rows.append([label, fmt(equity.get(key), kind)]
                    + [fmt(summary["benchmarks"][n].get(key), kind) if key in summary["benchmarks"][n] else ""
                       for n in names])
    out += _table(["Returns", "strategy", *[f"{n} buy&hold" if n != EQUAL_WEIGHT else "equal-weight buy&hold"
                                             for n in names]], rows)
    out += ["", *_table(["Trades", "value"], [[label, fmt(trades.get(key), kind)] for key, label, kind in TRADE_ROWS])]
    out += ["", "R distribution (closed trades, net R):"]
    biggest = max(trades["r_distribution"].values(), default=0) or 1
    for label, count in trades["r_distribution"].items():
        out.append(f"  {label:>10} R  {count:5d}  {'#' * round(40 * count / biggest)}")
    out.append("Exits: " + (", ".join(f"{k} {v}" for k, v in sorted(trades["exits"].items())) or "none"))
    out += ["", (f"Pipeline: {pipeline['decisions']:,} decisions "
                f"({', '.join(f'{k} {v:,}' for k, v in sorted(pipeline['actions'].items()))}); "
                f"{pipeline['proposals']:,} BUY/SELL proposals, {pipeline['proposals_rejected']:,} rejected by the "
                f"risk gates; {pipeline['orders']:,} orders, {pipeline['entries_expired']:,} DAY entries expired unfilled"),
            f"Analyst NO_TRADE (unusable analysis or out of date): {pipeline['analyst_no_trade']:,}"]
    extra = {k: v for k, v in pipeline.items() if k.startswith("analyst_") and k != "analyst_no_trade"}
    if extra:
        out.append("Analyst: " + ", ".join(f"{k.removeprefix('analyst_').replace('_', ' ')} {v:,}"
                                           for k, v in extra.items()))
    if pipeline["gate_rejections"]:
        out += ["", *_table(["Risk gate", "proposals rejected"],
                            [[gate, f"{n:,}"] for gate, n in pipeline["gate_rejections"].items()])]
    out += ["", *_table(["Symbol", "decisions", "proposals", "trades", "win rate", "net P&L", "exp. R", "buy&hold"],
                        [[r["symbol"], f"{r['decisions']:,}", f"{r['proposals']:,}", f"{r['trades']:,}",
                          fmt(r["win_rate"], "pct"), fmt(r["net_pnl"], "usd"), fmt(r["expectancy_r"], "num"),
                          fmt(r["buy_and_hold"], "pct")] for r in summary["symbols"]])]
    monthly: pd.DataFrame = summary["monthly"]
    if not monthly.empty:
        out += ["", *_table(["Monthly", *[f"{m:>2}" for m in monthly.columns], "year"],
                            [[str(year), *[fmt(v, "pct") if pd.notna(v) else "" for v in row],
                              fmt(float((1 + row.dropna()).prod() - 1), "pct")]
                             for year, row in monthly.iterrows()])]
    if walk is not None:
        out += ["", *walk_forward_lines(walk)]
    if any(" n/a" in line for line in out):
        out += ["", *textwrap.wrap(NOT_AVAILABLE_NOTE, 100)]
    if summary["warnings"]:
        out += ["", "Warnings:", *[f"  - {w}" for w in summary["warnings"]]]
    return "\n".join(out)


def walk_forward_lines(walk) -> list[str]:
    from trading_pipeline.backtest.statistics import equity_statistics, trade_statistics

    rows = []
    for fold in walk.folds:
        chosen = ", ".join(f"{k}={v:g}" for k, v in fold.chosen.items()) or "(strategy as is)"
        in_score = max(score for _, score in fold.scores)
        out_stats = equity_statistics(fold.out_of_sample_result.equity)
        rows.append([str(fold.number), f"{fold.in_sample[0]}..{fold.in_sample[1]}",
                     f"{fold.out_of_sample[0]}..{fold.out_of_sample[1]}", chosen, fmt(in_score, "num"),
                     fmt(out_stats.get(walk.metric) if walk.metric != "expectancy_r" else
                         trade_statistics(fold.out_of_sample_result.trades)["expectancy_r"], "num"),
                     fmt(out_stats["total_return"], "pct")])
    joined_in = equity_statistics(walk.in_sample_equity)
    joined_out = equity_statistics(walk.out_of_sample_equity)
    lines = [f"Walk-forward ({len(walk.folds)} folds, chosen by in-sample {walk.metric}):",
             *_table(["Fold", "in-sample", "out-of-sample", "chosen", f"IS {walk.metric}", f"OOS {walk.metric}",
                      "OOS return"], rows), ""]
    lines += _table(["Joined", "in-sample", "out-of-sample"],
                    [[label, fmt(joined_in.get(key), kind), fmt(joined_out.get(key), kind)]
                     for key, label, kind in EQUITY_ROWS if key in joined_out])
    return lines


def statistics_table(summary: dict) -> list[dict]:
    """Rows (figure, strategy, benchmark) for Dagster's table metadata."""
    chosen = summary["benchmarks"][summary["benchmark"]]
    rows = [{"figure": label, "strategy": fmt(summary["equity"].get(key), kind),
             "benchmark": fmt(chosen.get(key), kind) if key in chosen else ""} for key, label, kind in EQUITY_ROWS]
    rows += [{"figure": label, "strategy": fmt(summary["trades"].get(key), kind), "benchmark": ""}
             for key, label, kind in TRADE_ROWS]
    return rows


def equity_figure(result: BacktestResult, summary: dict, width: int = 1200, height: int = 700):
    """Equity (strategy and benchmark) above its drawdown: a plotly figure for the chart renderer."""
    from plotly.subplots import make_subplots

    from trading_pipeline.backtest.statistics import benchmarks

    equity = result.equity
    drawdown = equity / equity.cummax() - 1
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.04)
    figure.add_scatter(x=equity.index, y=equity, name="strategy", line={"width": 1.6, "color": "#1f77b4"}, row=1, col=1)
    for name, curve in benchmarks(result, result.extra_benchmarks).items():
        figure.add_scatter(x=curve.index, y=curve, name=f"{name} buy&hold", line={"width": 1, "dash": "dot"},
                           row=1, col=1)
    figure.add_scatter(x=drawdown.index, y=drawdown, name="drawdown", fill="tozeroy",
                       line={"width": 1, "color": "#d62728"}, row=2, col=1)
    figure.update_yaxes(title_text="equity ($)", row=1, col=1)
    figure.update_yaxes(title_text="drawdown", tickformat=".0%", row=2, col=1)
    figure.update_layout(width=width, height=height, template="plotly_white",
                         title=f"{result.settings.strategy}: equity and drawdown "
                               f"(Sharpe {fmt(summary['equity']['sharpe'], 'num')}, "
                               f"max DD {fmt(summary['equity']['max_drawdown'], 'pct')})",
                         legend={"orientation": "h", "y": 1.06}, margin={"l": 60, "r": 20, "t": 70, "b": 40})
    return figure
