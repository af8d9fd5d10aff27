"""The embedded analyst: the origin system's deterministic 3-of-4 technical rule.

Votes: SuperTrend direction, close vs SMA 20, MACD vs its signal, RSI vs 50. Three or four
bullish votes propose a BUY, three or four bearish a SELL, a 2-2 split a HOLD. The stop is
2×ATR from the entry; the first target is 3×ATR unless a recent level stands in the way (then
the level, which may make the trade too small for the risk gates), the second 5×ATR.
"""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import pandas as pd

from trading_pipeline.core.analysis import Action, ChartSource, IndicatorVote, TimeframeAnalysis, Trend
from trading_pipeline.core.frames import MarketFrame

ANALYST_NAME = "rules"
STOP_ATR = 2.0
TARGET1_ATR = 3.0
TARGET2_ATR = 5.0
LEVEL_LOOKBACKS = (20, 50)
# A level within this many ATRs of the entry is being broken through, not an obstacle.
BREAKOUT_ATR = 0.5
REQUIRED_COLUMNS = ("close", "high", "low", "sma_20", "sma_50", "sma_200", "rsi_14", "macd",
                    "macd_signal", "atr_14", "supertrend_direction")
# The window extremes the rule reads, in `Columns.rule_row`'s order: the levels of both lookbacks;
# the longest one's are also the recent range.
EXTREMES = tuple((column, n) for column in ("high", "low") for n in LEVEL_LOOKBACKS)


class Columns:
    """A frame's numeric columns as float arrays. The rule reads the bar at `end - 1` and the bars
    before it through this, without pandas: the live graph reads one frame once, the backtest one
    long series at every session (the same function on the same numbers, ~50x faster than pandas).
    Window extremes and the rule's row of inputs (with the extremes) are computed for all bars on
    first use: each bar's values depend only on it and the bars before it, so reading them at
    `end - 1` sees no later bar."""

    __slots__ = ("_extremes", "_inputs", "arrays", "index")

    def __init__(self, frame: pd.DataFrame):
        self.index = frame.index
        self.arrays = {column: frame[column].to_numpy(dtype=np.float64) for column in frame.columns
                       if pd.api.types.is_numeric_dtype(frame[column])}
        self._extremes: dict[tuple[str, int], np.ndarray] = {}
        self._inputs: tuple[list[str], np.ndarray] | None = None

    def __contains__(self, column: str) -> bool:
        return column in self.arrays

    def __getitem__(self, column: str) -> np.ndarray:
        return self.arrays[column]

    def window_extremes(self, column: str, lookback: int) -> np.ndarray:
        """At each position i, the highest "high" (or lowest "low") of bars [max(0, i + 1 - lookback),
        i + 1]: numpy's max or min of that slice, NaN included, computed for every position at once."""
        key = (column, lookback)
        if key not in self._extremes:
            reducer = np.maximum if column == "high" else np.minimum
            values = self.arrays[column]
            extremes = reducer.accumulate(values[:lookback])  # the first bars' windows are shorter
            if len(values) > lookback:
                windows = np.lib.stride_tricks.sliding_window_view(values, lookback)
                extremes = np.concatenate([extremes, reducer.reduce(windows[1:], axis=1)])
            self._extremes[key] = extremes
        return self._extremes[key]

    def rule_row(self, end: int) -> tuple[dict[str, float], list[float]]:
        """The rule's columns (those the frame has) at bar `end - 1`, and the EXTREMES there (of
        the bars up to it): one row of one matrix made on first use."""
        if self._inputs is None:
            names = [column for column in REQUIRED_COLUMNS if column in self.arrays]
            self._inputs = names, np.column_stack([self.arrays[c] for c in names]
                                                  + [self.window_extremes(c, n) for c, n in EXTREMES])
        names, matrix = self._inputs
        row = matrix[end - 1].tolist()
        return dict(zip(names, row)), row[len(names):]


def numeric_context(frame: pd.DataFrame) -> dict[str, float]:
    """Last close, ATR and the recent range: what analyses and plausibility checks are read against."""
    return numeric_context_at(Columns(frame), len(frame))


def numeric_context_at(columns: Columns, end: int) -> dict[str, float]:
    """`numeric_context` of the first `end` bars."""
    return _numeric_context(*columns.rule_row(end))


def _numeric_context(last: dict[str, float], extremes: list[float]) -> dict[str, float]:
    highs, lows = extremes[:len(LEVEL_LOOKBACKS)], extremes[len(LEVEL_LOOKBACKS):]
    return {"last_close": last["close"], "atr": last["atr_14"], "recent_high": highs[-1], "recent_low": lows[-1]}


def _levels(extremes: list[float]) -> tuple[list[float], list[float]]:
    """(support, resistance): the lowest lows and highest highs of the lookbacks, to the cent, each once."""
    highs, lows = extremes[:len(LEVEL_LOOKBACKS)], extremes[len(LEVEL_LOOKBACKS):]
    return sorted(set(map(round, lows, _CENTS))), sorted(set(map(round, highs, _CENTS)))


_CENTS = (2,) * len(LEVEL_LOOKBACKS)  # round(x, 2) for each lookback's extreme


def analyze(indicators: MarketFrame, chart: ChartSource | None = None) -> TimeframeAnalysis:
    return analyze_at(Columns(indicators.frame), len(indicators.frame), symbol=indicators.symbol,
                      timeframe=indicators.timeframe, as_of=indicators.as_of,
                      data_through=indicators.last_bar_start.to_pydatetime(), chart=chart)


def analyze_at(columns: Columns, end: int, *, symbol: str, timeframe: str, as_of: datetime,
               data_through: datetime, chart: ChartSource | None = None) -> TimeframeAnalysis:
    """The analysis of the first `end` bars of `columns` (bar `end - 1` is the last one seen),
    `data_through` being that bar's start. `analyze` is this on a whole frame."""
    context = {
        "symbol": symbol,
        "timeframe": timeframe,
        "as_of": as_of,
        "data_through": data_through,
        "analyst": ANALYST_NAME,
        "chart": chart,
    }
    last, extremes = columns.rule_row(end)
    # A NaN anywhere makes the sum NaN: the per-column search runs only when something is missing.
    complete = len(last) == len(REQUIRED_COLUMNS) and not math.isnan(sum(last.values()))
    missing = [] if complete else [c for c in REQUIRED_COLUMNS if c not in last or math.isnan(last[c])]
    if missing:
        return TimeframeAnalysis.invalid(
            reason=f"no value on the last bar for {', '.join(missing)} (too little history?)",
            last_close=float(last["close"]), atr=0.0,
            recent_high=float(columns["high"][:end].max()), recent_low=float(columns["low"][:end].min()),
            **context,
        )
    numbers = _numeric_context(last, extremes)
    close, atr = numbers["last_close"], numbers["atr"]
    votes = [
        IndicatorVote(name="supertrend", bullish=last["supertrend_direction"] > 0,
                      detail=f"SuperTrend {'up' if last['supertrend_direction'] > 0 else 'down'}"),
        IndicatorVote(name="close_vs_sma20", bullish=close > last["sma_20"],
                      detail=f"close {close:.2f} {'>' if close > last['sma_20'] else '<='} SMA20 {last['sma_20']:.2f}"),
        IndicatorVote(name="macd_vs_signal", bullish=last["macd"] > last["macd_signal"],
                      detail=f"MACD {last['macd']:.3f} {'>' if last['macd'] > last['macd_signal'] else '<='} signal {last['macd_signal']:.3f}"),
        IndicatorVote(name="rsi_vs_50", bullish=last["rsi_14"] > 50,
                      detail=f"RSI {last['rsi_14']:.1f} {'>' if last['rsi_14'] > 50 else '<='} 50"),
    ]
    bullish = sum(v.bullish for v in votes)
    if close > last["sma_50"] > last["sma_200"]:
        trend = Trend.UP
    elif close < last["sma_50"] < last["sma_200"]:
        trend = Trend.DOWN
    else:
        trend = Trend.SIDEWAYS
    support, resistance = _levels(extremes)

    if bullish >= 3:
        signal, direction = Action.BUY, 1
    elif bullish <= 1:
        signal, direction = Action.SELL, -1
    else:
        signal, direction = Action.HOLD, 0

    entry = stop = None
    targets: list[float] = []
    notes = []
    if direction and atr > 0 and math.isfinite(atr):
        entry = round(close, 2)
        stop = round(entry - direction * STOP_ATR * atr, 2)
        target1 = entry + direction * TARGET1_ATR * atr
        obstacles = resistance if direction > 0 else support
        in_the_way = [lvl for lvl in obstacles
                      if direction * (lvl - entry) > BREAKOUT_ATR * atr
                      and direction * (lvl - target1) < 0]
        if in_the_way:
            level = min(in_the_way, key=lambda lvl: abs(lvl - entry))
            notes.append(f"first target capped at the recent {'high' if direction > 0 else 'low'} {level:.2f}")
            target1 = level
        target2 = entry + direction * TARGET2_ATR * atr
        targets = [round(target1, 2), round(target2, 2)]

    agreeing = bullish if direction >= 0 else 4 - bullish
    confidence = {4: 0.8, 3: 0.6}.get(agreeing, 0.5) if direction else 0.5
    if direction and trend == (Trend.UP if direction > 0 else Trend.DOWN):
        confidence += 0.1
    rationale = (
        f"{bullish} of 4 indicators bullish ({'; '.join(v.detail for v in votes)}); trend {trend.value}"
        + (f"; entry {entry:.2f}, stop {stop:.2f} (2×ATR {atr:.2f}), targets {targets[0]:.2f}/{targets[1]:.2f}"
           if entry is not None else "; no setup")
        + ("; " + "; ".join(notes) if notes else "")
    )
    # model_validate of one dict: the same validation as the constructor's, without repacking
    # two dozen keyword arguments (a backtest makes one analysis per symbol and session).
    return TimeframeAnalysis.model_validate(dict(
        signal=signal, trend=trend, confidence=round(min(confidence, 0.9), 2),
        entry=entry, stop=stop, targets=targets, support=support, resistance=resistance,
        votes=votes, rationale=rationale, **numbers, **context,
    ))


class RulesAnalyst:
    """The rule-based analyst behind the same interface as the OpenAI one."""

    name = ANALYST_NAME

    def analyze(self, indicators: MarketFrame, chart: ChartSource | None = None, png: bytes | None = None) -> TimeframeAnalysis:
        return analyze(indicators, chart)  # reads the numbers, not the picture

    def consolidate(self, daily: TimeframeAnalysis, weekly: TimeframeAnalysis):
        from trading_pipeline.core.decisions import consolidate

        return consolidate(daily, weekly)

    def close(self) -> None:
        pass
