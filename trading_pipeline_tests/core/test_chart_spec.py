"""The chart spec key names what a chart shows; the anonymized chart shows no symbol, date or price."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from trading_pipeline.core import chart_spec
from trading_pipeline.core.indicators import compute_indicators
from trading_pipeline.core.market_sim import simulate_bars
from trading_pipeline.core.rules_analyst import Columns


@functools.cache
def spy_daily() -> pd.DataFrame:
    return compute_indicators(simulate_bars("SPY", "1d", pd.Timestamp("2022-01-01", tz="UTC"),
                                            pd.Timestamp("2024-06-28", tz="UTC")))


def key(frame: pd.DataFrame, symbol: str = "SPY", end: int | None = None, **kwargs) -> str:
    series = chart_spec.SeriesArrays(Columns(frame))
    return chart_spec.chart_spec_sha256(series, len(frame) if end is None else end, symbol=symbol, timeframe="1d",
                                        **kwargs)


def test_the_key_changes_with_the_bars_and_the_symbol_and_reads_only_bars_before_end():
    frame = spy_daily()
    assert key(frame) != key(frame.iloc[:-1])
    assert key(frame) != key(frame, symbol="QQQ")
    # A position in a long series is the frame cut there (the backtest's and the live graph's key agree).
    for end in (220, 400, len(frame) - 1):
        assert key(frame, end=end) == key(frame.iloc[:end])
        assert key(frame, end=end, anonymize=True) == key(frame.iloc[:end], anonymize=True)
    # Indicator values moved in the 10th digit (another history before the chart) draw the same chart.
    warmed = frame.copy()
    warmed[["macd", "rsi_14", "atr_14"]] *= 1 + 1e-10
    assert key(warmed) == key(frame)
    later = frame.copy()
    later.iloc[400:, :] = later.iloc[400:, :] * 1.5
    assert key(later, end=400) == key(frame, end=400)


def test_the_anonymized_key_is_the_same_shape_at_another_price_level_symbol_and_date():
    frame = spy_daily()
    scaled = frame.copy()
    price_like = [c for c in frame.columns if c in chart_spec.PRICE_COLUMNS]
    scaled[price_like] = frame[price_like] * 3
    scaled["volume"] = frame["volume"] * 7
    scaled.index = scaled.index + (scaled.index[-1] - scaled.index[0])
    assert key(frame, anonymize=True) == key(scaled, symbol="QQQ", anonymize=True)
    assert key(frame, anonymize=True) != key(frame)


@pytest.mark.parametrize("timeframe", ["1d", "1w"])
def test_the_anonymized_frame_has_no_real_price_volume_or_date(timeframe):
    frame = compute_indicators(simulate_bars("AAPL", timeframe, pd.Timestamp("2018-01-01", tz="UTC"),
                                             pd.Timestamp("2024-06-28", tz="UTC")))
    shown = chart_spec.anonymized_frame(Columns(frame), len(frame), timeframe)
    assert len(shown) == chart_spec.bars_shown(timeframe)
    assert shown["close"].iloc[-1] == pytest.approx(chart_spec.ANONYMOUS_LAST_CLOSE)
    assert shown["volume"].mean() == pytest.approx(chart_spec.VOLUME_MEAN, rel=1e-6)
    factor = 100 / frame["close"].iloc[-1]
    tail = frame.tail(len(shown))
    np.testing.assert_allclose(shown["sma_50"].to_numpy(), tail["sma_50"].to_numpy() * factor, atol=1e-6)
    np.testing.assert_array_equal(shown["rsi_14"].to_numpy(), tail["rsi_14"].to_numpy())
    assert shown.index[-1] == chart_spec.ANONYMOUS_LAST_START and shown.index.is_monotonic_increasing
    assert not set(shown.index.date) & set(frame.index.date)


def test_rolling_reads_what_a_slice_reads():
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, np.nan, 2.0, 6.0, 5.0, 3.0, 5.0])
    for window in (1, 3, 4, 20):
        for reduce, read in ((np.maximum, np.max), (np.minimum, np.min)):
            expected = [read(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
            np.testing.assert_array_equal(chart_spec.rolling(values, window, reduce), expected)


def test_a_rebase_maps_prices_both_ways():
    rebase = chart_spec.price_rebase(250.0)
    assert rebase.shown(250.0) == 100.0 and rebase.real(102.0) == 255.0
    assert chart_spec.IDENTITY.shown(12.345) == 12.345 and chart_spec.IDENTITY.real(12.345) == 12.345
