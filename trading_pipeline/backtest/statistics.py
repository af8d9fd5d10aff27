"""What a backtest made, in the figures a quant expects and the pipeline's own.

Return statistics come from empyrical (daily simple returns of the equity curve, 252 sessions a
year, no risk-free rate); trade statistics are over closed trades, net of commissions, with R =
net P&L / the dollars at risk as sized (quantity × |planned entry − stop|); the pipeline's figures
count what each risk gate rejected and what the analyst could not answer.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import empyrical
import numpy as np
import pandas as pd

from trading_pipeline.backtest.engine import BacktestResult, Trade

R_BINS = (-math.inf, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, math.inf)
EQUAL_WEIGHT = "equal_weight"


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def returns_of(equity: pd.Series) -> pd.Series:
    return empyrical.simple_returns(equity).dropna()


def drawdown_duration(equity: pd.Series) -> int:
    """The longest run of sessions spent below an earlier peak (empyrical has no such figure)."""
    below = (equity < equity.cummax()).to_numpy()
    longest = current = 0
    for under in below:
        current = current + 1 if under else 0
        longest = max(longest, current)
    return longest


def buy_and_hold(closes: pd.DataFrame, initial_cash: float) -> pd.Series:
    """Equal dollars in each column at the first close, held: the value by session."""
    filled = closes.ffill().bfill()
    return (filled / filled.iloc[0]).mean(axis=1) * initial_cash


def equity_statistics(equity: pd.Series, benchmark: pd.Series | None = None,
                      gross_exposure: pd.Series | None = None) -> dict[str, float | int | None]:
    returns = returns_of(equity)
    stats: dict[str, float | int | None] = {
        "total_return": _finite(empyrical.cum_returns_final(returns)) if len(returns) else 0.0,
        "cagr": _finite(empyrical.annual_return(returns)),
        "volatility": _finite(empyrical.annual_volatility(returns)),
        "sharpe": _finite(empyrical.sharpe_ratio(returns)),
        "sortino": _finite(empyrical.sortino_ratio(returns)),
        "calmar": _finite(empyrical.calmar_ratio(returns)),
        "max_drawdown": _finite(empyrical.max_drawdown(returns)),
        "max_drawdown_sessions": drawdown_duration(equity),
        "final_equity": float(equity.iloc[-1]),
        "sessions": len(equity),
    }
    if gross_exposure is not None:
        stats["time_in_market"] = float((gross_exposure > 0).mean())
        stats["average_exposure"] = float((gross_exposure / equity).mean())
    if benchmark is not None:
        alpha, beta = empyrical.alpha_beta(returns, returns_of(benchmark).reindex(returns.index))
        stats["alpha"], stats["beta"] = _finite(alpha), _finite(beta)
    return stats


def trade_statistics(trades: list[Trade]) -> dict:
    closed = [t for t in trades if t.closed]
    still_open = [t for t in trades if not t.closed]
    pnl = np.array([t.pnl for t in closed])
    r = np.array([t.r_multiple for t in closed])
    wins, losses = pnl[pnl > 0], pnl[pnl <= 0]
    streak = longest = 0
    for value in pnl:
        streak = streak + 1 if value <= 0 else 0
        longest = max(longest, streak)
    counts, _ = np.histogram(np.clip(r, -1e9, 1e9), bins=np.array(R_BINS).clip(-1e9, 1e9)) if len(r) else \
        (np.zeros(len(R_BINS) - 1, dtype=int), None)
    labels = [f"{lo:g}..{hi:g}" for lo, hi in itertools.pairwise(R_BINS)]
    return {
        "trades": len(closed),
        "open_at_end": len(still_open),
        "win_rate": float(len(wins) / len(closed)) if closed else None,
        "average_win": float(wins.mean()) if len(wins) else None,
        "average_loss": float(losses.mean()) if len(losses) else None,
        "profit_factor": float(wins.sum() / -losses.sum()) if len(losses) and losses.sum() < 0 else None,
        "net_pnl": float(pnl.sum()),
        "expectancy": float(pnl.mean()) if len(pnl) else None,
        "expectancy_r": float(r.mean()) if len(r) else None,
        "sqn": float(math.sqrt(len(r)) * r.mean() / r.std(ddof=1)) if len(r) > 1 and r.std(ddof=1) > 0 else None,
        "r_median": float(np.median(r)) if len(r) else None,
        "r_best": float(r.max()) if len(r) else None,
        "r_worst": float(r.min()) if len(r) else None,
        "r_distribution": dict(zip(labels, (int(c) for c in counts), strict=True)),
        "planned_r_mean": float(np.mean([t.planned_r for t in closed])) if closed else None,
        "holding_sessions_mean": float(np.mean([t.sessions_held for t in closed])) if closed else None,
        "holding_sessions_max": int(max(t.sessions_held for t in closed)) if closed else None,
        "longest_losing_streak": longest,
        "exits": dict(Counter(t.exit_reason for t in closed)),
        "commissions": float(sum(t.commission for t in trades)),
    }


def pipeline_statistics(result: BacktestResult) -> dict:
    """Decisions by outcome, what each gate rejected, and what the analyst could not answer."""
    records = result.decisions
    proposals = [d for d in records if d.proposed in ("BUY", "SELL")]
    rejected = [d for d in proposals if d.action == "NO_TRADE"]
    gates = Counter(rule for d in rejected for rule in d.failed_gates)
    return {
        "decisions": len(records),
        "actions": dict(Counter(d.action for d in records)),
        "proposals": len(proposals),
        "proposals_rejected": len(rejected),
        "gate_rejections": dict(gates.most_common()),
        "analyst_no_trade": sum(d.proposed == "NO_TRADE" for d in records),
        "invalid_analyses": sum(d.invalid_analysis for d in records),
        "orders": sum(d.quantity > 0 and d.action in ("BUY", "SELL") for d in records),
        "entries_expired": result.entries_expired,
        **{f"analyst_{name}": value for name, value in result.analyst_counters.items()},
    }


def per_symbol(result: BacktestResult) -> list[dict]:
    rows = []
    for symbol in result.symbols:
        trades = [t for t in result.trades if t.symbol == symbol and t.closed]
        records = [d for d in result.decisions if d.symbol == symbol]
        closes = result.closes[symbol].dropna()
        r = [t.r_multiple for t in trades]
        rows.append({
            "symbol": symbol,
            "decisions": len(records),
            "proposals": sum(d.proposed in ("BUY", "SELL") for d in records),
            "trades": len(trades),
            "win_rate": sum(t.pnl > 0 for t in trades) / len(trades) if trades else None,
            "net_pnl": float(sum(t.pnl for t in trades)),
            "expectancy_r": float(np.mean(r)) if r else None,
            "buy_and_hold": float(closes.iloc[-1] / closes.iloc[0] - 1) if len(closes) else None,
        })
    return rows


def monthly_returns(equity: pd.Series) -> pd.DataFrame:
    """Compounded return of each month (rows: years, columns: 1-12), via empyrical."""
    monthly = empyrical.aggregate_returns(returns_of(equity), "monthly")
    table = monthly.unstack()
    table.index.name, table.columns.name = "year", "month"
    return table


def benchmarks(result: BacktestResult, extra: dict[str, pd.Series] | None = None) -> dict[str, pd.Series]:
    """Buy-and-hold curves: equal weight of the strategy's symbols, and each extra benchmark (SPY,
    when the data has it) scaled to the initial cash."""
    curves = {EQUAL_WEIGHT: buy_and_hold(result.closes, result.settings.initial_cash)}
    for name, closes in (extra or {}).items():
        # each session at the last close known by then (the series has the warm-up before the
        # window): a session without a bar, the first one included, keeps the close before it
        aligned = closes.reindex(closes.index.union(result.equity.index)).ffill().reindex(result.equity.index).bfill()
        curves[name] = aligned / aligned.iloc[0] * result.settings.initial_cash
    return curves


def summarize(result: BacktestResult, extra_benchmarks: dict[str, pd.Series] | None = None) -> dict:
    """Everything the report shows, as plain values."""
    curves = benchmarks(result, extra_benchmarks)
    chosen = result.settings.benchmark if result.settings.benchmark in curves else EQUAL_WEIGHT
    return {
        "run_key": result.run_key,
        "result_digest": result.result_digest(),
        "equity": equity_statistics(result.equity, curves[chosen], result.gross_exposure),
        "benchmark": chosen,
        "benchmarks": {name: equity_statistics(curve) for name, curve in curves.items()},
        "trades": trade_statistics(result.trades),
        "pipeline": pipeline_statistics(result),
        "symbols": per_symbol(result),
        "monthly": monthly_returns(result.equity),
        "warnings": list(result.warnings),
    }
