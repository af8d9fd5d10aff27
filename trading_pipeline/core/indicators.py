"""Technical indicators on OHLCV bars: SMA, RSI, MACD, Bollinger Bands and ATR from TA-Lib, plus
SuperTrend computed exactly like TradingView's built-in `ta.supertrend`.

Pure: no I/O, no Dagster. `compute_indicators` validates the bars first (`validate_bars`), so bad
input fails with a `BarDataError` naming the rows instead of deep inside TA-Lib.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import talib
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trading_pipeline.core.bars import validate_bars

# From this many bars on, SuperTrend runs compiled by numba (imported only then). Below it the plain
# kernel (about 0.8 us per bar: 2.3 ms on 3,000 bars) takes under ~0.1 s, less than importing numba
# and loading the compiled kernel from its cache, 0.5-1 s in every new process (each Dagster run is
# one); it holds the GIL, so it never takes the second thread below.
_SUPERTREND_COMPILED_MIN_BARS = 100_000
# From this many bars on, SuperTrend runs on a second thread alongside TA-Lib: below it the kernel
# takes under a few milliseconds, not worth starting a thread for (a year of daily bars is ~250).
_SUPERTREND_THREAD_MIN_BARS = 100_000


class IndicatorParams(BaseModel):
    """Indicator settings. Column names carry the periods that vary (sma_20, rsi_14, atr_14).

    Period bounds follow TA-Lib's own limits, so a bad value fails here rather than in TA-Lib.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sma_periods: tuple[int, ...] = (20, 50, 200)
    rsi_period: int = Field(14, ge=2)
    macd_fast: int = Field(12, ge=2)
    macd_slow: int = Field(26, ge=2)
    macd_signal: int = Field(9, ge=1)
    bb_period: int = Field(20, ge=2)
    bb_stddev: float = Field(2.0, gt=0)
    atr_period: int = Field(14, ge=1)
    supertrend_period: int = Field(10, ge=1)
    supertrend_multiplier: float = Field(3.0, gt=0)

    @field_validator("sma_periods")
    @classmethod
    def _sma_periods_valid(cls, periods: tuple[int, ...]) -> tuple[int, ...]:
        if not periods:
            raise ValueError("give at least one SMA period")
        if any(period < 2 for period in periods):
            raise ValueError(f"SMA periods must be >= 2, got {periods}")
        if len(set(periods)) != len(periods):
            raise ValueError(f"SMA periods must be distinct (each becomes a column sma_N), got {periods}")
        return periods

    @model_validator(mode="after")
    def _macd_fast_below_slow(self) -> IndicatorParams:
        if self.macd_fast >= self.macd_slow:
            raise ValueError(f"macd_fast ({self.macd_fast}) must be below macd_slow ({self.macd_slow})")
        return self

    @property
    def sma_columns(self) -> tuple[str, ...]:
        return tuple(f"sma_{period}" for period in self.sma_periods)

    @property
    def rsi_column(self) -> str:
        return f"rsi_{self.rsi_period}"

    @property
    def atr_column(self) -> str:
        return f"atr_{self.atr_period}"

    def indicator_columns(self) -> tuple[str, ...]:
        """The columns `compute_indicators` adds, in order."""
        return (
            *self.sma_columns,
            self.rsi_column,
            "macd",
            "macd_signal",
            "macd_hist",
            "bb_upper",
            "bb_middle",
            "bb_lower",
            self.atr_column,
            "supertrend",
            "supertrend_direction",
        )

    def required_bars(self) -> int:
        """Bars needed before every indicator has a value on the last bar (200 with the defaults).

        Each term is the indicator's lookback (the index of its first value, as TA-Lib counts it) + 1.
        """
        return max(
            max(self.sma_periods),  # SMA(n): first value on bar n-1
            self.rsi_period + 1,  # RSI(n) needs n price changes
            self.macd_slow + self.macd_signal - 1,  # slow EMA, then the signal EMA of the MACD line
            self.bb_period,
            self.atr_period + 1,  # TA-Lib's ATR skips bar 0, which has no previous close
            self.supertrend_period,  # TradingView's ATR counts bar 0's high-low as a true range
        )


def compute_indicators(bars: pd.DataFrame, params: IndicatorParams | None = None) -> pd.DataFrame:
    """Return a copy of `bars` with the indicator columns of `params` (see `indicator_columns`).

    `bars`: float columns open, high, low, close, volume; sorted unique UTC DatetimeIndex (checked by
    `validate_bars`, which raises `BarDataError`). With fewer than `params.required_bars()` bars the
    longer indicators are NaN throughout; every indicator is NaN during its own warm-up.

    SMA, RSI, MACD, Bollinger Bands (population standard deviation) and ATR are TA-Lib's values;
    SuperTrend is TradingView's `ta.supertrend` (see `supertrend`), with `supertrend_direction`
    +1 for an uptrend and -1 for a downtrend.
    """
    params = params or IndicatorParams()
    validate_bars(bars)
    high, low, close = (
        np.ascontiguousarray(bars[column].to_numpy(dtype=np.float64)) for column in ("high", "low", "close")
    )

    supertrend_args = (high, low, close, params.supertrend_period, params.supertrend_multiplier)
    if len(close) < _SUPERTREND_THREAD_MIN_BARS:
        indicators = _talib_indicators(high, low, close, params)
        line_and_direction = supertrend(*supertrend_args)
    else:
        # SuperTrend's compiled kernel releases the GIL and TA-Lib does not: on long frames the
        # kernel runs on a second thread while TA-Lib computes the rest. Same calls, same results.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="supertrend") as second_thread:
            pending = second_thread.submit(supertrend, *supertrend_args)
            indicators = _talib_indicators(high, low, close, params)
            line_and_direction = pending.result()
    indicators["supertrend"], indicators["supertrend_direction"] = line_and_direction

    # Drop stale indicator columns (re-running on an already enriched frame) and add all at once.
    # copy=False keeps each freshly computed array as its own column block: building one 2-D block
    # would copy ~100 MB on a million bars for nothing (copy-on-write keeps `bars` itself untouched).
    result = bars.drop(columns=[column for column in indicators if column in bars.columns])
    return pd.concat([result, pd.DataFrame(indicators, index=result.index, copy=False)], axis=1)


def _talib_indicators(
    high: np.ndarray, low: np.ndarray, close: np.ndarray, params: IndicatorParams
) -> dict[str, np.ndarray]:
    indicators: dict[str, np.ndarray] = {}
    for period, column in zip(params.sma_periods, params.sma_columns, strict=True):
        indicators[column] = talib.SMA(close, timeperiod=period)
    indicators[params.rsi_column] = talib.RSI(close, timeperiod=params.rsi_period)
    indicators["macd"], indicators["macd_signal"], indicators["macd_hist"] = talib.MACD(
        close, fastperiod=params.macd_fast, slowperiod=params.macd_slow, signalperiod=params.macd_signal
    )
    indicators["bb_upper"], indicators["bb_middle"], indicators["bb_lower"] = talib.BBANDS(
        close, timeperiod=params.bb_period, nbdevup=params.bb_stddev, nbdevdn=params.bb_stddev, matype=0
    )
    indicators[params.atr_column] = talib.ATR(high, low, close, timeperiod=params.atr_period)
    return indicators


def supertrend(
    high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int = 10, multiplier: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """TradingView's `ta.supertrend(multiplier, period)`: returns (line, direction) as float arrays.

    direction is +1 in an uptrend (line = lower band) and -1 in a downtrend (line = upper band), the
    opposite sign of TradingView's own direction output. Both are NaN before the ATR exists, i.e. on
    bars 0 .. period-2 (with period 1, bar 0's line is 0: Pine's nz() of the missing previous band,
    as on TradingView). The inputs must be clean (see `validate_bars`); this does not check them.
    """
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    close = np.ascontiguousarray(close, dtype=np.float64)
    # The outputs are allocated here by numpy, not inside the kernel: numpy asks Linux for
    # transparent huge pages on large arrays and numba's allocator does not, so a million-bar
    # output allocated in the kernel costs several milliseconds more in page faults.
    kernel = (_compiled_supertrend_kernel() if close.shape[0] >= _SUPERTREND_COMPILED_MIN_BARS else None
              ) or _supertrend_kernel
    high = np.ascontiguousarray(high, dtype=np.float64)
    low = np.ascontiguousarray(low, dtype=np.float64)
    if kernel is _supertrend_kernel:
        # Plain Python: on lists of Python floats, 5x faster than on numpy arrays, whose every
        # element read makes a numpy scalar (slow arithmetic, slow isnan).
        n = close.shape[0]
        line, direction = _supertrend_kernel(high.tolist(), low.tolist(), close.tolist(), int(period),
                                             float(multiplier), [0.0] * n, [0.0] * n)
        return np.array(line, dtype=np.float64), np.array(direction, dtype=np.float64)
    return kernel(high, low, close, int(period), float(multiplier), np.empty(close.shape[0]), np.empty(close.shape[0]))


@functools.lru_cache(maxsize=1)
def _compiled_supertrend_kernel():
    """`_supertrend_kernel` compiled by numba (imported only now: it is slow to import), or None without numba."""
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - without numba every frame takes the plain kernel
        return None
    return njit(cache=True, nogil=True)(_supertrend_kernel)


def _supertrend_kernel(high, low, close, period, multiplier, line=None, direction=None):
    """Bar-by-bar transcription of TradingView's reference Pine script for ta.supertrend:

        src = hl2, atr = ta.atr(period) = ta.rma(ta.tr(true), period)
        upperBand = src + factor * atr, lowerBand = src - factor * atr
        prevLowerBand = nz(lowerBand[1]), prevUpperBand = nz(upperBand[1])
        lowerBand := lowerBand > prevLowerBand or close[1] < prevLowerBand ? lowerBand : prevLowerBand
        upperBand := upperBand < prevUpperBand or close[1] > prevUpperBand ? upperBand : prevUpperBand
        direction = na(atr[1]) ? 1 : superTrend[1] == prevUpperBand ? (close > upperBand ? -1 : 1)
                                                                    : (close < lowerBand ? 1 : -1)
        superTrend := direction == -1 ? lowerBand : upperBand

    Pine's na semantics are kept: nz() turns a missing band into 0 and any comparison with na is
    false, so the first bands and the band ratchet match TradingView even in edge cases.

    One pass: the ATR (Wilder's RMA of the true range, seeded with the simple mean of the first
    `period` ranges; bar 0 has no previous close, so its true range is high - low, as ta.tr(true))
    is carried along in a scalar instead of a third array, with the same arithmetic in the same order.

    The inputs are float arrays (compiled) or lists of floats (plain: see `supertrend`). `line` and
    `direction`, if given, are arrays or lists as long as `close` to write the result into;
    otherwise the kernel allocates them. Either way it returns (line, direction).
    """
    n = len(close)
    if line is None:
        line = np.empty(n)
    if direction is None:
        direction = np.empty(n)
    if n < period:
        for i in range(n):
            line[i] = np.nan
            direction[i] = np.nan
        return line, direction

    alpha = 1.0 / period
    seed_sum = 0.0
    atr = np.nan  # atr of bar i (NaN until bar period-1)
    previous_atr = np.nan  # atr[i - 1]
    previous_close = np.nan  # close[i - 1]
    lower_band = np.nan
    upper_band = np.nan
    previous_line = np.nan
    for i in range(n):
        bar_high = high[i]
        bar_low = low[i]
        bar_close = close[i]
        if i == 0:
            true_range = bar_high - bar_low
        else:
            true_range = max(bar_high - bar_low, abs(bar_high - previous_close), abs(bar_low - previous_close))
        if i < period:
            seed_sum += true_range
            if i == period - 1:
                atr = seed_sum / period
        else:
            atr = alpha * true_range + (1.0 - alpha) * atr

        previous_lower = 0.0 if math.isnan(lower_band) else lower_band  # nz(lowerBand[1])
        previous_upper = 0.0 if math.isnan(upper_band) else upper_band  # nz(upperBand[1])
        hl2 = (bar_high + bar_low) / 2.0
        basic_lower = hl2 - multiplier * atr
        basic_upper = hl2 + multiplier * atr
        # NaN comparisons are False, as na comparisons are in Pine. The conditions combine with
        # & and | rather than and/or, so the compiled loop selects instead of branching on price
        # data (unpredictable branches cost more than the whole bar's arithmetic).
        take_lower = (basic_lower > previous_lower) | (previous_close < previous_lower)
        lower_band = basic_lower if take_lower else previous_lower
        take_upper = (basic_upper < previous_upper) | (previous_close > previous_upper)
        upper_band = basic_upper if take_upper else previous_upper

        # TradingView's direction is -1 (up) when
        #   superTrend[1] == prevUpperBand and close > upperBand, or
        #   superTrend[1] != prevUpperBand and not close < lowerBand,
        # and always 1 (down) while atr[1] is na (bar 0 included).
        was_upper = previous_line == previous_upper
        up = (was_upper & (bar_close > upper_band)) | ((not was_upper) & (not (bar_close < lower_band)))
        up = up & (not math.isnan(previous_atr))
        previous_line = lower_band if up else upper_band

        if math.isnan(atr):
            line[i] = np.nan
            direction[i] = np.nan
        else:
            line[i] = previous_line
            direction[i] = 1.0 if up else -1.0  # ours: +1 = up (TradingView's -1)
        previous_atr = atr
        previous_close = bar_close
    return line, direction
