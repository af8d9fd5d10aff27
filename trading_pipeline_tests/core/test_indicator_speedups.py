"""The speed-ups of compute_indicators and validate_bars change no result.

- validate_bars: frames from `_COMPILED_CHECK_MIN_ROWS` rows on are first checked in one compiled
  pass (`_plainly_valid`); it may only accept frames the detailed checks accept, and a frame it
  rejects must fail with exactly the error the detailed checks give.
- compute_indicators: on long frames SuperTrend runs on a second thread; the frame is the same.
- the result frame is still a copy: changing it or the input does not touch the other.
- the SuperTrend kernel writes into arrays allocated by numpy, or allocates them itself.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import talib

from trading_pipeline.core import bars as bars_module
from trading_pipeline.core import indicators as indicators_module
from trading_pipeline.core.bars import validate_bars
from trading_pipeline.core.indicators import (
    IndicatorParams,
    _compiled_supertrend_kernel,
    _supertrend_kernel,
    compute_indicators,
    supertrend,
)
from trading_pipeline.errors import BarDataError
from trading_pipeline_tests.core.test_indicators import BAD_INPUTS, _bad, random_bars

LONG = 30_000  # long enough for the compiled validation pass
assert LONG >= bars_module._COMPILED_CHECK_MIN_ROWS


def detailed_error(frame: pd.DataFrame) -> str | None:
    """The message of the detailed checks alone, or None if they pass."""
    try:
        bars_module._check_index(frame.index)
        bars_module._check_numeric(frame)
        bars_module._check_values(frame)
        bars_module._check_ohlc_consistency(frame)
    except BarDataError as error:
        return str(error)
    return None


def validation_error(frame: pd.DataFrame, compiled: bool, monkeypatch) -> str | None:
    monkeypatch.setattr(bars_module, "_COMPILED_CHECK_MIN_ROWS", 1 if compiled else 10**12)
    try:
        validate_bars(frame)
    except BarDataError as error:
        return str(error)
    return None


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_the_compiled_pass_rejects_every_bad_input(case, monkeypatch):
    frame = _bad(BAD_INPUTS[case][0])
    with_pass = validation_error(frame, compiled=True, monkeypatch=monkeypatch)
    without_pass = validation_error(frame, compiled=False, monkeypatch=monkeypatch)
    assert with_pass is not None and with_pass == without_pass
    if isinstance(frame, pd.DataFrame) and len(frame) and {"open", "high", "low", "close", "volume"} <= set(frame):
        assert bars_module._plainly_valid(frame) is False


def corrupt(frame: pd.DataFrame, kind: str, row: int) -> pd.DataFrame:
    frame = frame.copy()
    times = frame.index
    position = {column: frame.columns.get_loc(column) for column in frame.columns}
    if " in " in kind:  # e.g. "nan in volume"
        value, column = kind.split(" in ")
        frame.iloc[row, position[column]] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "zero": 0.0,
                                             "negative": -1.0}[value]
        return frame
    match kind:
        case "high below open":
            frame.iloc[row, position["high"]] = frame["open"].iloc[row] * 0.999
            frame.iloc[row, position["low"]] = min(frame["low"].iloc[row], frame["high"].iloc[row])
        case "low above close":
            frame.iloc[row, position["low"]] = frame["close"].iloc[row] * 1.001
        case "duplicate time":
            frame.index = times.delete(row).insert(row, times[row - 1])
        case "unsorted":
            order = np.arange(len(frame))
            order[[row, row + 1]] = order[[row + 1, row]]
            frame = frame.iloc[order]
        case "NaT":
            frame.index = times.delete(row).insert(row, pd.NaT)
        case "NaT first":
            frame.index = times.delete(0).insert(0, pd.NaT)
        case "int volume":
            frame["volume"] = frame["volume"].astype(np.int64)
        case "float32 prices":
            frame = frame.astype({"open": np.float32, "high": np.float32, "low": np.float32, "close": np.float32})
            frame["high"] = np.maximum(frame["high"], np.maximum(frame["open"], frame["close"]))
            frame["low"] = np.minimum(frame["low"], np.minimum(frame["open"], frame["close"]))
        case _:
            raise AssertionError(kind)
    return frame


KINDS = [
    *(f"{value} in {column}" for value in ("nan", "inf", "-inf", "zero", "negative")
      for column in ("open", "high", "low", "close", "volume")),
    "high below open", "low above close", "duplicate time", "unsorted", "NaT", "NaT first",
    "int volume", "float32 prices",
]


@pytest.fixture(scope="module")
def long_bars() -> pd.DataFrame:
    return random_bars(LONG, seed=11, start="1950-01-02 14:30")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("row", [1, 2_345, LONG - 2])
def test_long_frames_fail_exactly_as_the_detailed_checks_say(long_bars, kind, row, monkeypatch):
    frame = corrupt(long_bars, kind, row)
    expected = detailed_error(frame)
    assert bars_module._plainly_valid(frame) is (expected is None)
    assert validation_error(frame, compiled=True, monkeypatch=monkeypatch) == expected
    # Zero volume is allowed; other number types are fine and take the compiled pass too.
    assert (expected is None) is (kind in ("zero in volume", "int volume", "float32 prices"))


def test_clean_frames_take_the_compiled_pass(long_bars):
    assert bars_module._plainly_valid(long_bars) is True
    assert bars_module._plainly_valid(long_bars.iloc[:1]) is True
    assert bars_module._plainly_valid(long_bars.iloc[:2]) is True
    # Only numpy number columns: text, booleans and nullable types go through the detailed checks.
    assert bars_module._plainly_valid(long_bars.astype({"volume": object})) is False
    assert bars_module._plainly_valid(long_bars.assign(volume=True)) is False
    assert bars_module._plainly_valid(long_bars.astype({"volume": "Float64"})) is False
    assert bars_module._plainly_valid(long_bars.tz_convert("America/New_York")) is False


def test_prices_equal_to_their_bounds_are_consistent(long_bars):
    frame = long_bars.copy()
    frame["open"] = frame["high"]
    frame["close"] = frame["low"]
    frame.iloc[5, frame.columns.get_loc("volume")] = 0.0
    assert detailed_error(frame) is None and bars_module._plainly_valid(frame) is True


# --------------------------------------------------------------------------- indicators


def test_long_frames_give_the_same_indicators_with_and_without_the_second_thread(long_bars, monkeypatch):
    threads = []

    def recording_supertrend(*args):
        threads.append(threading.current_thread().name)
        return supertrend(*args)

    monkeypatch.setattr(indicators_module, "supertrend", recording_supertrend)
    monkeypatch.setattr(indicators_module, "_SUPERTREND_THREAD_MIN_BARS", LONG)
    threaded = compute_indicators(long_bars)
    monkeypatch.setattr(indicators_module, "_SUPERTREND_THREAD_MIN_BARS", LONG + 1)
    single = compute_indicators(long_bars)
    assert threads[0].startswith("supertrend") and threads[1] == threading.main_thread().name
    pd.testing.assert_frame_equal(threaded, single, check_exact=True)

    high, low, close = (long_bars[c].to_numpy() for c in ("high", "low", "close"))
    line, direction = supertrend(high, low, close, 10, 3.0)
    np.testing.assert_array_equal(threaded["supertrend"], line)
    np.testing.assert_array_equal(threaded["supertrend_direction"], direction)
    np.testing.assert_array_equal(threaded["atr_14"], talib.ATR(high, low, close, timeperiod=14))
    np.testing.assert_array_equal(threaded["sma_200"], talib.SMA(close, timeperiod=200))
    assert list(threaded.columns) == [*long_bars.columns, *IndicatorParams().indicator_columns()]


def test_an_error_on_the_second_thread_reaches_the_caller(long_bars, monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(indicators_module, "_SUPERTREND_THREAD_MIN_BARS", 1_000)
    monkeypatch.setattr(indicators_module, "supertrend", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        compute_indicators(long_bars)


def test_the_result_is_independent_of_the_input_frame(long_bars):
    frame = long_bars.copy()
    result = compute_indicators(frame)
    result.iloc[0, result.columns.get_loc("close")] = -1.0
    result.iloc[300, result.columns.get_loc("sma_20")] = -1.0
    assert frame["close"].iloc[0] > 0
    frame.iloc[1, frame.columns.get_loc("close")] = 123.0
    assert result["close"].iloc[1] == long_bars["close"].iloc[1]


def test_the_kernel_fills_given_arrays_and_agrees_with_its_own_allocation():
    bars = random_bars(2_000, seed=5)
    high, low, close = (bars[c].to_numpy() for c in ("high", "low", "close"))
    line, direction = np.full(2_000, 7.0), np.full(2_000, 7.0)
    returned = _supertrend_kernel(high, low, close, 10, 3.0, line, direction)
    assert returned[0] is line and returned[1] is direction
    allocated = _supertrend_kernel(high, low, close, 10, 3.0)
    compiled = _compiled_supertrend_kernel()(high, low, close, 10, 3.0, np.empty(2_000), np.empty(2_000))
    for result in (allocated, compiled):
        np.testing.assert_array_equal(result[0], line)
        np.testing.assert_array_equal(result[1], direction)
    assert np.isnan(line[:9]).all() and np.isfinite(line[9:]).all()
    short = _supertrend_kernel(high[:5], low[:5], close[:5], 10, 3.0, np.zeros(5), np.zeros(5))
    assert np.isnan(short[0]).all() and np.isnan(short[1]).all()
