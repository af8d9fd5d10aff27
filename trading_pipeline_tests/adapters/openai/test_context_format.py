"""The request contexts' written text is pinned to `request.CONTEXT_FORMAT_VERSION`.

A response cache key hashes a context's contents (its fields and snapped numbers) and
CONTEXT_FORMAT_VERSION, never the text sent (a backtest keys tens of thousands of contexts and
writes none). So a change in how a context is written (a key renamed, a number moved, another
rounding) must come with a new CONTEXT_FORMAT_VERSION, or a cached answer would be found for a
request the model never saw. Here the contexts of fixed bars and analyses are written, plain and
anonymized, and the sha256 of their text is pinned together with the version; their keys are
pinned too (a changed key makes every cached answer a miss).
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from trading_pipeline.adapters.llm import request, series_context
from trading_pipeline.core import chart_spec
from trading_pipeline.core.analysis import Action, IndicatorVote, TimeframeAnalysis, Trend
from trading_pipeline.core.chart_spec import IDENTITY, SeriesArrays
from trading_pipeline.core.rules_analyst import Columns

# (CONTEXT_FORMAT_VERSION, sha256 of the contexts' written text): change both together.
PINNED = ("a082384b1c35f604", "baff132105512afd4aded6cf33b69ad82e681c688d18363ec374917da736761a")
# sha256 of the contexts' cache keys (`RequestContext.sha256`).
PINNED_KEYS = "3e2314a42d146a9fc384df8824fa24ee30d6299090f0310644fd54841aa88b75"


def fixed_series(timeframe: str, bars: int) -> SeriesArrays:
    """Bars and indicator columns made by plain formulas (no indicator code: its changes move the
    numbers, which the keys already hash by value)."""
    i = np.arange(bars, dtype=np.float64)
    close = np.round(100 + 10 * np.sin(i / 7) + 0.05 * i, 2)
    frame = pd.DataFrame({
        "open": close - 0.3, "high": close + 1.1, "low": close - 1.2, "close": close,
        "volume": 1_000_000 + 1000 * (i % 13),
        "sma_20": close - 0.5, "sma_50": close - 1.5,
        "sma_200": np.where(i < 30, np.nan, close - 3.25),  # warm-up: no value before bar 30
        "rsi_14": 50 + 20 * np.sin(i / 5), "macd": 0.2 * np.cos(i / 9), "macd_signal": 0.15 * np.cos(i / 10),
        "macd_hist": 0.05 * np.sin(i / 3), "bb_upper": close + 4, "bb_middle": close - 0.5, "bb_lower": close - 5,
        "atr_14": 1.5 + 0.1 * np.cos(i / 11), "supertrend": close - 2.5,
        "supertrend_direction": np.where(np.sin(i / 7) > 0, 1.0, -1.0),
    }, index=pd.date_range("2020-01-06 14:30", periods=bars, freq="B" if timeframe == "1d" else "W-MON", tz=UTC,
                           name="time"))
    return SeriesArrays(Columns(frame))


def analysis(timeframe: str, signal: Action, **plan) -> TimeframeAnalysis:
    return TimeframeAnalysis(
        symbol="AAPL", timeframe=timeframe, as_of=datetime(2024, 5, 3, 20, 0, tzinfo=UTC),
        data_through=datetime(2024, 5, 3, 13, 30, tzinfo=UTC), analyst="openai:test", signal=signal,
        trend=Trend.UP, confidence=0.65, support=[171.25, 168.5], resistance=[180.125],
        votes=[IndicatorVote("supertrend", True, "SuperTrend up"), IndicatorVote("rsi_vs_50", False, "RSI 48.2 <= 50")],
        rationale="Higher lows above the 50-day average.", last_close=175.37, atr=3.1416, recent_high=181.0,
        recent_low=166.2, **plan)


def contexts() -> list[request.RequestContext]:
    written = []
    for timeframe, bars in (("1d", 260), ("1w", 120)):
        series = fixed_series(timeframe, bars)
        for end in (bars, 25):  # every indicator has a value; the warm-up (no SMA 200)
            last_start = series.columns.index[end - 1].to_pydatetime()
            for rebase in (IDENTITY, chart_spec.anonymizing(series.columns, end, timeframe)):
                written.append(series_context.timeframe_context(series, end, symbol="AAPL", timeframe=timeframe,
                                                                last_bar_start=last_start, rebase=rebase)[1])
    daily = analysis("1d", Action.BUY, entry=175.4, stop=169.1, targets=[184.9, 191.0])
    weekly = analysis("1w", Action.HOLD)
    for rebase in (IDENTITY, chart_spec.price_rebase(daily.last_close)):
        written.append(request.consolidation_context(daily, weekly, rebase)[1])
    return written


def sha256_of(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def test_the_written_contexts_are_the_ones_their_format_version_names():
    written = contexts()
    assert all(math.isfinite(x) for c in written for x in c.numbers)  # the fixed inputs reach every number
    version, digest = request.CONTEXT_FORMAT_VERSION, sha256_of([c.as_json() for c in written])
    if version == PINNED[0]:
        assert digest == PINNED[1], (
            f"The request contexts are written differently (text sha256 {digest}) while "
            f"request.CONTEXT_FORMAT_VERSION is still {version}: the response cache would give answers to requests "
            "the model never saw. Change request.CONTEXT_FORMAT_VERSION (every response cache key changes with it, "
            f"cached answers become misses) and pin the new pair here: PINNED = (<new version>, {digest!r}).")
    else:
        assert digest != PINNED[1], (
            f"request.CONTEXT_FORMAT_VERSION changed ({PINNED[0]} -> {version}) but the written contexts did not: "
            "every response cache key changed for nothing. Put the version back, or pin the pair if the text "
            "change is in contexts this test does not write.")
        raise AssertionError(f"request.CONTEXT_FORMAT_VERSION is new: pin PINNED = ({version!r}, {digest!r}) and "
                             "PINNED_KEYS after test_the_contexts_keys_are_pinned says them")


def test_the_contexts_keys_are_pinned():
    digest = sha256_of([c.sha256() for c in contexts()])
    assert digest == PINNED_KEYS, (
        f"The request contexts' cache keys changed (sha256 of the keys {digest}): every cached answer of a live run "
        "or a replay becomes a miss. If that is meant (a new CONTEXT_FORMAT_VERSION, or other numbers or fields in "
        f"the contexts), pin PINNED_KEYS = {digest!r}; if not, find what moved the keys.")
