"""Plausibility of a model's numbers against the bars: the model proposes, this code decides.

Pure and deterministic (no I/O, no model): given the numeric context computed from the real bars
(last close, ATR, recent range, the range of the bars shown in the chart), return the list of
reasons an analysis or a consolidated proposal cannot be used. An empty list means plausible.
The OpenAI analyst turns any reason into an invalid analysis (NO_TRADE with the reasons), before
anything downstream sees the numbers.

The tolerances are the risk engine's (core/risk.py), so an analysis that passes here is judged by
the same yardstick at the risk gates. R is recomputed here from the prices (`reward_risk`); a
model's own R is never used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from trading_pipeline.core.analysis import Action
from trading_pipeline.core.risk import ENTRY_TOLERANCE_ATR, ENTRY_TOLERANCE_SHARE, RANGE_TOLERANCE_ATR

MAX_TARGETS = 3
MAX_LEVELS = 8


@dataclass(frozen=True)
class NumericContext:
    """What the model's numbers are read against, all from the bars the analysis saw."""

    last_close: float
    atr: float
    recent_high: float  # highest high of the recent bars (rules_analyst.numeric_context)
    recent_low: float
    chart_high: float | None = None  # highest high of the bars shown in the chart (for key levels)
    chart_low: float | None = None

    def entry_tolerance(self) -> float:
        return max(ENTRY_TOLERANCE_ATR * self.atr, ENTRY_TOLERANCE_SHARE * self.last_close)

    def price_bounds(self) -> tuple[float, float]:
        """Where a stop or target may lie: the recent range ± RANGE_TOLERANCE_ATR × ATR."""
        return (self.recent_low - RANGE_TOLERANCE_ATR * self.atr, self.recent_high + RANGE_TOLERANCE_ATR * self.atr)

    def level_bounds(self) -> tuple[float, float]:
        """Where a key level may lie: the charted range (else the recent one) ± RANGE_TOLERANCE_ATR × ATR."""
        high = max(self.recent_high, self.chart_high if self.chart_high is not None else self.recent_high)
        low = min(self.recent_low, self.chart_low if self.chart_low is not None else self.recent_low)
        return (low - RANGE_TOLERANCE_ATR * self.atr, high + RANGE_TOLERANCE_ATR * self.atr)


def _action(x: Action | str) -> Action:
    return x if isinstance(x, Action) else Action(x)  # an Action already: no Enum lookup (a backtest asks often)


def _finite(x: float | None) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)  # None is neither


def _p(x: float) -> str:
    return f"{x:.4f}".rstrip("0").rstrip(".") if abs(x) < 1 else f"{x:.2f}"


def context_problems(context: NumericContext) -> list[str]:
    """The bars themselves must give something to check against."""
    problems = []
    if not (_finite(context.last_close) and context.last_close > 0):
        problems.append(f"last close {context.last_close} is not a positive price")
    if not (_finite(context.atr) and context.atr > 0):
        problems.append(f"ATR {context.atr} is not available (too little history?): prices cannot be checked")
    if not (_finite(context.recent_high) and _finite(context.recent_low) and context.recent_low <= context.recent_high):
        problems.append(f"recent range {context.recent_low}-{context.recent_high} is not usable")
    return problems


def reward_risk(entry: float, stop: float, target: float) -> float | None:
    """R = |target − entry| / |entry − stop|, recomputed from the prices; None when undefined."""
    if not (_finite(entry) and _finite(stop) and _finite(target)) or entry == stop:
        return None
    return round(abs(target - entry) / abs(entry - stop), 3)


def plausibility_problems(
    signal: Action | str,
    entry: float | None,
    stop: float | None,
    targets: Sequence[float],
    context: NumericContext,
    *,
    support: Sequence[float] = (),
    resistance: Sequence[float] = (),
) -> list[str]:
    """Every reason the proposal's numbers are implausible against the bars (empty = plausible).

    For BUY/SELL: entry, stop and at least one target are required; the entry lies within
    max(ENTRY_TOLERANCE_ATR × ATR, ENTRY_TOLERANCE_SHARE × close) of the last close; the stop lies
    below the entry for a BUY and above it for a SELL, the targets on the other side; stop and
    targets lie within the recent range ± RANGE_TOLERANCE_ATR × ATR. For any signal, key levels lie
    within the charted range ± RANGE_TOLERANCE_ATR × ATR. HOLD carries no plan to check.
    """
    action = _action(signal)
    problems = context_problems(context)
    if problems:
        return problems

    low_level, high_level = context.level_bounds()
    if len(support) + len(resistance) > MAX_LEVELS:
        problems.append(f"{len(support) + len(resistance)} key levels given, at most {MAX_LEVELS} expected")
    for kind, levels in (("support", support), ("resistance", resistance)):
        for level in levels:
            if not (_finite(level) and low_level <= level <= high_level):
                problems.append(f"{kind} level {level} is outside the charted range ± {RANGE_TOLERANCE_ATR:g}×ATR "
                                f"({_p(low_level)}-{_p(high_level)})")

    if action not in (Action.BUY, Action.SELL):
        return problems

    direction = 1 if action == Action.BUY else -1
    name = action.value
    if not _finite(entry):
        problems.append(f"{name} without a finite entry price (got {entry})")
    if not _finite(stop):
        problems.append(f"{name} without a finite stop price (got {stop})")
    if not targets:
        problems.append(f"{name} without a target")
    if len(targets) > MAX_TARGETS:
        problems.append(f"{len(targets)} targets given, at most {MAX_TARGETS} expected")
    bad_targets = [t for t in targets if not _finite(t)]
    if bad_targets:
        problems.append(f"targets {bad_targets} are not finite prices")
    if problems:
        return problems

    close, atr = context.last_close, context.atr
    tolerance = context.entry_tolerance()
    if entry <= 0 or abs(entry - close) > tolerance:
        problems.append(f"entry {_p(entry)} is {_p(abs(entry - close))} away from the last close {_p(close)} "
                        f"(tolerance ±{_p(tolerance)} = max({ENTRY_TOLERANCE_ATR:g}×ATR {_p(atr)}, "
                        f"{ENTRY_TOLERANCE_SHARE:.0%} of the close))")
    if direction * (entry - stop) <= 0:
        problems.append(f"{name} needs the stop {'below' if direction > 0 else 'above'} the entry {_p(entry)}; "
                        f"got stop {_p(stop)}")
    wrong_side = [t for t in targets if direction * (t - entry) <= 0]
    if wrong_side:
        problems.append(f"{name} needs targets {'above' if direction > 0 else 'below'} the entry {_p(entry)}; "
                        f"got {[_p(t) for t in wrong_side]}")
    low, high = context.price_bounds()
    outside = [p for p in (stop, *targets) if not (low <= p <= high)]
    if outside:
        problems.append(f"prices {[_p(p) for p in outside]} are outside the recent range "
                        f"{_p(context.recent_low)}-{_p(context.recent_high)} ± {RANGE_TOLERANCE_ATR:g}×ATR "
                        f"({_p(low)}-{_p(high)})")
    if min(stop, *targets) <= 0:  # all finite by now: the smallest says whether any is not positive
        problems.append("stop and targets must be positive prices")
    return problems


def consolidation_problems(action: Action | str, daily_signal: Action | str, weekly_signal: Action | str) -> list[str]:
    """The daily analysis leads and the weekly confirms: a consolidated BUY/SELL must be the daily
    signal, and must not be opposed by the weekly one. HOLD is always allowed (it sends nothing)."""
    action, daily, weekly = _action(action), _action(daily_signal), _action(weekly_signal)
    if action == Action.HOLD:
        return []
    if action not in (Action.BUY, Action.SELL):
        return [f"consolidated action {action.value} is not BUY, SELL or HOLD"]
    problems = []
    if action != daily:
        problems.append(f"consolidated {action.value} differs from the daily signal {daily.value} (the daily leads)")
    opposite = Action.SELL if action == Action.BUY else Action.BUY
    if weekly == opposite:
        problems.append(f"consolidated {action.value} is opposed by the weekly signal {weekly.value}")
    return problems
