"""Asset checks that act as gates. Blocking checks stop everything downstream in the run and
say why in the UI; each result carries the numbers it was decided on."""

from __future__ import annotations

import math

import dagster as dg

from trading_pipeline.core.analysis import Action, TimeframeAnalysis, TradeDecision
from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.core.strategies import Strategy
from trading_pipeline.errors import BarDataError

# Freshness: how many closed periods the last bar may lag behind as_of.
MAX_STALE_PERIODS = {"1d": 2, "1w": 1}
# Gaps: how many XNYS sessions (1d) or weeks (1w) may lack a bar between the first and the last bar.
# IBKR's history sometimes lacks the bar of a half day, so a few are tolerated.
MAX_GAPS = {"1d": 3, "1w": 1}


def bar_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec("bars_valid", asset=asset, blocking=True,
                          description="Prices finite and positive, low ≤ open/close ≤ high, volume ≥ 0, sorted unique UTC times."),
        dg.AssetCheckSpec("enough_history", asset=asset, blocking=True,
                          description="Enough bars for the slowest indicator (SMA 200) on the last bar."),
        dg.AssetCheckSpec("fresh", asset=asset, blocking=True,
                          description="The last bar is the latest closed period before as_of (small tolerance)."),
        dg.AssetCheckSpec("no_gaps", asset=asset, blocking=True,
                          description="No XNYS session (1d) or week (1w) lacks a bar between the first and the last "
                                      f"bar, up to a small tolerance (1d: {MAX_GAPS['1d']}, 1w: {MAX_GAPS['1w']}): "
                                      "IBKR sometimes lacks a half day."),
    ]


def _periods_behind(bars: MarketFrame) -> int:
    """Closed periods on the exchange calendar between the last bar and as_of."""
    import pandas as pd

    from trading_pipeline.core.market_calendar import calendar

    cal = calendar()
    as_of = pd.Timestamp(bars.as_of).tz_convert("UTC")
    closes = cal.schedule["close"]
    closed = closes[(closes > bars.last_bar_start) & (closes <= as_of)]
    if bars.timeframe == "1d":
        return max(0, len(closed) - 1)  # the last bar's own session closes after its start
    weeks = closed.index.to_period("W-SUN").unique()
    return max(0, len(weeks) - 1)


def bar_checks(bars: MarketFrame, period: str) -> list[dg.AssetCheckResult]:
    from trading_pipeline.core.bars import validate_bars
    from trading_pipeline.core.indicators import IndicatorParams

    results = []
    try:
        validate_bars(bars.frame)
        results.append(dg.AssetCheckResult(check_name="bars_valid", passed=True, metadata={"bars": len(bars.frame)}))
    except BarDataError as error:
        results.append(dg.AssetCheckResult(check_name="bars_valid", passed=False,
                                           metadata={"problem": error.problem, "fix": error.fix}))
    needed = IndicatorParams().required_bars()
    results.append(dg.AssetCheckResult(
        check_name="enough_history", passed=len(bars.frame) >= needed,
        metadata={"bars": len(bars.frame), "needed": needed, "period": period,
                  "fix": "" if len(bars.frame) >= needed else
                  f"lengthen the {bars.timeframe} period in the strategies file (now {period})"}))
    if len(bars.frame) and getattr(bars.frame.index, "tz", None) is None:
        results.append(dg.AssetCheckResult(check_name="fresh", passed=False, metadata={
            "problem": "bar times carry no time zone, so freshness cannot be judged",
            "fix": "the market data source must return UTC bar start times"}))
    elif len(bars.frame):
        behind = _periods_behind(bars)
        results.append(dg.AssetCheckResult(
            check_name="fresh", passed=behind <= MAX_STALE_PERIODS[bars.timeframe],
            metadata={"last_bar": str(bars.last_bar_start), "as_of": bars.as_of.isoformat(),
                      "closed_periods_missing": behind, "tolerance": MAX_STALE_PERIODS[bars.timeframe]}))
    else:
        results.append(dg.AssetCheckResult(check_name="fresh", passed=False,
                                           metadata={"problem": "no bars at all before as_of"}))
    results.append(_gap_check(bars))
    return results


def _gap_check(bars: MarketFrame) -> dg.AssetCheckResult:
    from trading_pipeline.core.market_calendar import calendar_gaps, describe_gaps

    tolerance = MAX_GAPS[bars.timeframe]
    try:
        gaps = calendar_gaps(bars.frame, bars.timeframe)
    except (ValueError, TypeError) as error:  # e.g. a timezone-naive index, which bars_valid names too
        return dg.AssetCheckResult(check_name="no_gaps", passed=False,
                                   metadata={"problem": f"the bars cannot be placed on the XNYS calendar: {error}",
                                             "tolerance": tolerance})
    passed = len(gaps) <= tolerance
    unit = "sessions" if bars.timeframe == "1d" else "weeks"
    return dg.AssetCheckResult(
        check_name="no_gaps", passed=passed,
        metadata={"missing_periods": len(gaps), "tolerance": tolerance, "missing": describe_gaps(gaps),
                  "fix": "" if passed else
                  f"{len(gaps)} XNYS {unit} have no {bars.timeframe} bar, more than the {tolerance} tolerated: "
                  f"re-request the {bars.timeframe} history from the {bars.source} source and check it is complete"})


def indicator_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec("indicators_complete", asset=asset, blocking=True,
                              description="Every indicator has a finite value on the last bar.")]


def indicator_checks(frames: MarketFrame) -> list[dg.AssetCheckResult]:
    from trading_pipeline.core.indicators import IndicatorParams

    last = frames.frame.iloc[-1]
    missing = [c for c in IndicatorParams().indicator_columns() if c not in last or not math.isfinite(last[c])]
    return [dg.AssetCheckResult(check_name="indicators_complete", passed=not missing,
                                metadata={"missing_on_last_bar": ", ".join(missing) or "none"})]


def analysis_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    # Not blocking: an unusable analysis must still reach trade_decisions and become a NO_TRADE there.
    return [dg.AssetCheckSpec("analysis_usable", asset=asset, blocking=False,
                              description="The analysis validated; a BUY or SELL has an entry, a stop and a target, "
                                          "the stop and the first target on their sides of the entry.")]


def analysis_checks(analysis: TimeframeAnalysis) -> list[dg.AssetCheckResult]:
    problems = []
    if not analysis.valid:
        problems.append(analysis.invalid_reason or "invalid")
    elif analysis.signal in (Action.BUY, Action.SELL):
        direction = 1 if analysis.signal == Action.BUY else -1
        if analysis.entry is None or analysis.stop is None or not analysis.targets:
            problems.append("a BUY/SELL without entry, stop and target")
        elif direction * (analysis.entry - analysis.stop) <= 0:
            problems.append(f"stop {analysis.stop} on the wrong side of entry {analysis.entry}")
        elif direction * (analysis.targets[0] - analysis.entry) <= 0:
            problems.append(f"first target {analysis.targets[0]} on the wrong side of entry {analysis.entry}")
    return [dg.AssetCheckResult(check_name="analysis_usable", passed=not problems,
                                severity=dg.AssetCheckSeverity.WARN,
                                metadata={"problems": "; ".join(problems) or "none", "signal": analysis.signal.value})]


def decision_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec("risk_limits", asset=asset, blocking=True,
                              description="Recomputes R, margin, stop side and size of a BUY/SELL against the "
                                          "strategy's limits, independently of the risk engine.")]


def decision_checks(decision: TradeDecision, strategy: Strategy) -> list[dg.AssetCheckResult]:
    """Defence in depth: a decision that would send an order must satisfy the limits again here."""
    if not decision.actionable:
        return [dg.AssetCheckResult(check_name="risk_limits", passed=True,
                                    metadata={"action": decision.action.value, "detail": "nothing to send"})]
    limits = strategy.risk
    direction = 1 if decision.action == Action.BUY else -1
    entry, stop = decision.entry, decision.stop
    target = decision.targets[0] if decision.targets else None
    failures = []
    if entry is None or stop is None or target is None:
        failures.append("entry, stop or target missing")
    else:
        if direction * (entry - stop) <= 0:
            failures.append(f"stop {stop} on the wrong side of entry {entry}")
        if direction * (target - entry) <= 0:
            failures.append(f"target {target} on the wrong side of entry {entry}")
        risk = abs(entry - stop)
        if risk > 0:
            r_multiple = abs(target - entry) / risk
            if r_multiple + 1e-9 < limits.min_r:
                failures.append(f"R {r_multiple:.2f} < {limits.min_r}")
            if abs(target - entry) / entry + 1e-9 < limits.min_profit_margin:
                failures.append(f"margin {abs(target - entry) / entry:.2%} < {limits.min_profit_margin:.2%}")
            equity = decision.account_equity or 0.0
            if not decision.closes_position:
                if decision.quantity * risk > equity * limits.risk_per_trade + 0.01:
                    failures.append(f"{decision.quantity} × risk {risk:.2f} exceeds {limits.risk_per_trade:.2%} "
                                    f"of equity {equity:.2f}")
                if decision.quantity * entry > equity * limits.max_position_share + 0.01:
                    failures.append(f"position {decision.quantity * entry:.2f} exceeds "
                                    f"{limits.max_position_share:.0%} of equity {equity:.2f}")
    return [dg.AssetCheckResult(check_name="risk_limits", passed=not failures,
                                metadata={"action": decision.action.value, "quantity": decision.quantity,
                                          "failures": "; ".join(failures) or "none"})]
