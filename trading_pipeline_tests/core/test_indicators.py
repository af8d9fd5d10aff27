"""Indicators: TA-Lib parity, SuperTrend = TradingView's ta.supertrend, and bar validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydantic
import pytest
import talib
from talib import abstract

from trading_pipeline.core.bars import validate_bars
from trading_pipeline.core.indicators import (
    IndicatorParams,
    _compiled_supertrend_kernel,
    compute_indicators,
    supertrend,
)
from trading_pipeline.errors import BarDataError

DEFAULT_COLUMNS = (
    "sma_20", "sma_50", "sma_200", "rsi_14", "macd", "macd_signal", "macd_hist",
    "bb_upper", "bb_middle", "bb_lower", "atr_14", "supertrend", "supertrend_direction",
)


def random_bars(n: int, seed: int = 7, start: str = "2020-01-02 14:30") -> pd.DataFrame:
    """A valid random-walk OHLCV frame with a UTC index (one bar per calendar day)."""
    rng = np.random.default_rng(seed)
    close = 50.0 * np.exp(np.cumsum(rng.normal(0.0, 0.02, n)))
    open_ = np.concatenate(([50.0], close[:-1])) * np.exp(rng.normal(0.0, 0.005, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0.0, 0.01, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0.0, 0.01, n)))
    volume = np.round(rng.lognormal(13.0, 0.4, n))
    index = pd.date_range(start, periods=n, freq="D", tz="UTC", name="time")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index)


# --------------------------------------------------------------------------- TA-Lib parity


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return random_bars(700)


@pytest.fixture(scope="module")
def enriched(bars: pd.DataFrame) -> pd.DataFrame:
    return compute_indicators(bars)


def test_adds_the_default_columns_to_a_copy(bars, enriched):
    assert tuple(enriched.columns) == (*bars.columns, *DEFAULT_COLUMNS)
    assert IndicatorParams().indicator_columns() == DEFAULT_COLUMNS
    pd.testing.assert_frame_equal(enriched[list(bars.columns)], bars)
    assert enriched is not bars and "sma_20" not in bars.columns


def test_talib_indicators_equal_talib_exactly(bars, enriched):
    close, high, low = (bars[c].to_numpy() for c in ("close", "high", "low"))
    for period in (20, 50, 200):
        np.testing.assert_array_equal(enriched[f"sma_{period}"], talib.SMA(close, timeperiod=period))
    np.testing.assert_array_equal(enriched["rsi_14"], talib.RSI(close, timeperiod=14))
    macd, signal, hist = talib.MACD(close, fastperiod=12, slowperiod=26, signalperiod=9)
    np.testing.assert_array_equal(enriched["macd"], macd)
    np.testing.assert_array_equal(enriched["macd_signal"], signal)
    np.testing.assert_array_equal(enriched["macd_hist"], hist)
    upper, middle, lower = talib.BBANDS(close, timeperiod=20, nbdevup=2.0, nbdevdn=2.0, matype=0)
    np.testing.assert_array_equal(enriched["bb_upper"], upper)
    np.testing.assert_array_equal(enriched["bb_middle"], middle)
    np.testing.assert_array_equal(enriched["bb_lower"], lower)
    np.testing.assert_array_equal(enriched["atr_14"], talib.ATR(high, low, close, timeperiod=14))


def test_talib_values_match_textbook_formulas(bars, enriched):
    """Independent of TA-Lib: the columns hold the indicators they are named after."""
    close = bars["close"]
    for period in (20, 50, 200):
        np.testing.assert_allclose(enriched[f"sma_{period}"], close.rolling(period).mean(), rtol=1e-10)
    # Bollinger: SMA 20 +- 2 population standard deviations (ddof=0).
    std = close.rolling(20).std(ddof=0)
    np.testing.assert_allclose(enriched["bb_middle"], enriched["sma_20"], rtol=1e-12)
    np.testing.assert_allclose(enriched["bb_upper"], close.rolling(20).mean() + 2 * std, rtol=1e-9)
    np.testing.assert_allclose(enriched["bb_lower"], close.rolling(20).mean() - 2 * std, rtol=1e-9)
    np.testing.assert_allclose(enriched["macd_hist"], enriched["macd"] - enriched["macd_signal"], atol=1e-12)

    # Wilder's RSI 14 and ATR 14, TA-Lib style: seeded with the mean of the first 14 changes/ranges.
    change = np.diff(close.to_numpy())
    gains, losses = np.maximum(change, 0), np.maximum(-change, 0)
    avg_gain, avg_loss = gains[:14].mean(), losses[:14].mean()
    expected_rsi = [100 * avg_gain / (avg_gain + avg_loss)]
    for gain, loss in zip(gains[14:], losses[14:], strict=True):
        avg_gain = (avg_gain * 13 + gain) / 14
        avg_loss = (avg_loss * 13 + loss) / 14
        expected_rsi.append(100 * avg_gain / (avg_gain + avg_loss))
    assert enriched["rsi_14"].iloc[:14].isna().all()
    np.testing.assert_allclose(enriched["rsi_14"].iloc[14:], expected_rsi, rtol=1e-9)

    high, low, prev_close = bars["high"].to_numpy()[1:], bars["low"].to_numpy()[1:], close.to_numpy()[:-1]
    true_range = np.maximum.reduce([high - low, np.abs(high - prev_close), np.abs(low - prev_close)])
    atr = true_range[:14].mean()
    expected_atr = [atr]
    for value in true_range[14:]:
        atr = (atr * 13 + value) / 14
        expected_atr.append(atr)
    assert enriched["atr_14"].iloc[:14].isna().all()
    np.testing.assert_allclose(enriched["atr_14"].iloc[14:], expected_atr, rtol=1e-9)


def test_column_names_follow_the_params():
    params = IndicatorParams(sma_periods=(10, 30), rsi_period=7, atr_period=10, bb_stddev=1.5)
    result = compute_indicators(random_bars(120), params)
    added = [c for c in result.columns if c not in ("open", "high", "low", "close", "volume")]
    assert added == [
        "sma_10", "sma_30", "rsi_7", "macd", "macd_signal", "macd_hist",
        "bb_upper", "bb_middle", "bb_lower", "atr_10", "supertrend", "supertrend_direction",
    ]
    close = result["close"].to_numpy()
    np.testing.assert_array_equal(result["rsi_7"], talib.RSI(close, timeperiod=7))
    np.testing.assert_array_equal(result["bb_upper"], talib.BBANDS(close, 20, 1.5, 1.5, 0)[0])


def test_recomputing_on_an_enriched_frame_replaces_the_columns(enriched):
    again = compute_indicators(enriched)
    assert list(again.columns) == list(enriched.columns)
    pd.testing.assert_frame_equal(again, enriched)


def test_integer_ohlcv_columns_are_accepted():
    bars = random_bars(60).round(0)
    bars["low"] = np.minimum(bars["low"], bars[["open", "close"]].min(axis=1))
    bars["high"] = np.maximum(bars["high"], bars[["open", "close"]].max(axis=1))
    as_ints = bars.astype("int64")
    pd.testing.assert_frame_equal(
        compute_indicators(as_ints).drop(columns=list(bars.columns)),
        compute_indicators(bars.astype(float)).drop(columns=list(bars.columns)),
    )


# --------------------------------------------------------------------------- params


def test_required_bars_defaults_to_200():
    assert IndicatorParams().required_bars() == 200


def _talib_lookback(name: str, **parameters) -> int:
    function = abstract.Function(name)
    function.set_parameters(parameters)
    return function.lookback


@pytest.mark.parametrize(
    "params",
    [
        IndicatorParams(),
        IndicatorParams(sma_periods=(5, 8)),  # MACD (26 + 9 - 1 = 34 bars) is the longest
        IndicatorParams(sma_periods=(5,), macd_slow=40, macd_signal=15),  # 54
        IndicatorParams(sma_periods=(5,), rsi_period=60),  # 61
        IndicatorParams(sma_periods=(5,), atr_period=70),  # 71
        IndicatorParams(sma_periods=(5,), supertrend_period=80),  # 80
        IndicatorParams(sma_periods=(5,), bb_period=90),  # 90
    ],
)
def test_required_bars_is_exactly_enough(params: IndicatorParams):
    lookbacks = [
        *(_talib_lookback("SMA", timeperiod=p) for p in params.sma_periods),
        _talib_lookback("RSI", timeperiod=params.rsi_period),
        _talib_lookback("MACD", fastperiod=params.macd_fast, slowperiod=params.macd_slow,
                        signalperiod=params.macd_signal),
        _talib_lookback("BBANDS", timeperiod=params.bb_period),
        _talib_lookback("ATR", timeperiod=params.atr_period),
        params.supertrend_period - 1,
    ]
    needed = params.required_bars()
    assert needed == max(lookbacks) + 1

    enough = compute_indicators(random_bars(needed), params)
    assert enough[list(params.indicator_columns())].iloc[-1].notna().all()
    one_short = compute_indicators(random_bars(needed - 1), params)
    assert one_short[list(params.indicator_columns())].iloc[-1].isna().any()


@pytest.mark.parametrize(
    "overrides",
    [
        {"macd_fast": 26, "macd_slow": 12},
        {"sma_periods": (20, 20)},
        {"sma_periods": ()},
        {"sma_periods": (1,)},
        {"rsi_period": 1},
        {"bb_stddev": 0},
        {"supertrend_multiplier": -1},
        {"supertrend_period": 0},
        {"unknown_field": 3},
    ],
)
def test_bad_params_are_rejected(overrides):
    with pytest.raises(pydantic.ValidationError):
        IndicatorParams(**overrides)


def test_params_are_frozen():
    with pytest.raises(pydantic.ValidationError):
        IndicatorParams().rsi_period = 7


# --------------------------------------------------------------------------- SuperTrend


def pine_supertrend(high, low, close, factor, atr_period):
    """Slow, literal transcription of TradingView's reference script for ta.supertrend, with Pine's
    na semantics (na = None: nz(na) = 0, any comparison with na is false):

        pine_supertrend(factor, atrPeriod) =>
            src = hl2
            atr = ta.atr(atrPeriod)                    // ta.rma(ta.tr(true), atrPeriod)
            upperBand = src + factor * atr
            lowerBand = src - factor * atr
            prevLowerBand = nz(lowerBand[1])
            prevUpperBand = nz(upperBand[1])
            lowerBand := lowerBand > prevLowerBand or close[1] < prevLowerBand ? lowerBand : prevLowerBand
            upperBand := upperBand < prevUpperBand or close[1] > prevUpperBand ? upperBand : prevUpperBand
            int _direction = na
            float superTrend = na
            prevSuperTrend = superTrend[1]
            if na(atr[1])
                _direction := 1
            else if prevSuperTrend == prevUpperBand
                _direction := close > upperBand ? -1 : 1
            else
                _direction := close < lowerBand ? 1 : -1
            superTrend := _direction == -1 ? lowerBand : upperBand
            [superTrend, _direction]

    Returns TradingView's raw per-bar series: (supertrend, direction, atr), direction -1 = up.
    """

    def nz(value):
        return 0.0 if value is None else value

    def greater(a, b):
        return a is not None and b is not None and a > b

    def less(a, b):
        return a is not None and b is not None and a < b

    def equal(a, b):
        return a is not None and b is not None and a == b

    def previous(history, bars_back=1):  # series[bars_back]; na before the first bar
        return history[-bars_back] if len(history) >= bars_back else None

    true_ranges, rma, lower_bands, upper_bands, supertrends, directions = [], [], [], [], [], []
    for bar in range(len(close)):
        previous_close = close[bar - 1] if bar else None
        # ta.tr(true): na(high[1]) ? high - low : max(high - low, |high - close[1]|, |low - close[1]|)
        if bar == 0:
            true_range = high[bar] - low[bar]
        else:
            true_range = max(max(high[bar] - low[bar], abs(high[bar] - previous_close)),
                             abs(low[bar] - previous_close))
        true_ranges.append(true_range)
        # ta.rma: sum := na(sum[1]) ? ta.sma(src, length) : alpha * src + (1 - alpha) * nz(sum[1])
        alpha = 1 / atr_period
        if previous(rma) is None:
            if len(true_ranges) < atr_period:
                atr = None
            else:  # pine_sma: sum := sum + x[i] / y for i = 0 .. y - 1
                atr = 0.0
                for value in reversed(true_ranges[-atr_period:]):
                    atr = atr + value / atr_period
        else:
            atr = alpha * true_range + (1 - alpha) * nz(previous(rma))

        src = (high[bar] + low[bar]) / 2
        upper_band = None if atr is None else src + factor * atr
        lower_band = None if atr is None else src - factor * atr
        previous_lower, previous_upper = nz(previous(lower_bands)), nz(previous(upper_bands))
        if not (greater(lower_band, previous_lower) or less(previous_close, previous_lower)):
            lower_band = previous_lower
        if not (less(upper_band, previous_upper) or greater(previous_close, previous_upper)):
            upper_band = previous_upper
        if previous(rma) is None:  # na(atr[1])
            direction = 1
        elif equal(previous(supertrends), previous_upper):
            direction = -1 if greater(close[bar], upper_band) else 1
        else:
            direction = 1 if less(close[bar], lower_band) else -1
        rma.append(atr)
        lower_bands.append(lower_band)
        upper_bands.append(upper_band)
        supertrends.append(lower_band if direction == -1 else upper_band)
        directions.append(direction)
    return supertrends, directions, rma


def pine_as_columns(high, low, close, factor, atr_period):
    """The reference in our convention: NaN until the ATR exists, direction +1 = up."""
    lines, directions, atrs = pine_supertrend(list(high), list(low), list(close), factor, atr_period)
    warm = [atr is None for atr in atrs]
    line = np.array([np.nan if w else v for v, w in zip(lines, warm, strict=True)], dtype=float)
    direction = np.array([np.nan if w else -d for d, w in zip(directions, warm, strict=True)], dtype=float)
    return line, direction


# 15 bars, ATR period 2 (alpha = 1/2) and multiplier 1: every number below is a binary fraction,
# so the expected values are exact in floating point.
HAND_HIGH = [11, 12, 14, 15, 15, 13, 11, 12, 11, 10, 12, 13, 14, 14, 12]
HAND_LOW = [9, 10, 12, 13, 12, 10, 9, 9, 9, 8, 9, 11, 12, 12, 10]
HAND_CLOSE = [10, 11.5, 13.5, 14.5, 13, 10.5, 9.5, 11, 9.5, 8.5, 11.5, 12.5, 13.5, 12.5, 10.5]
# TR = max(h-l, |h-prevC|, |l-prevC|), bar 0: h-l. ATR: bar 1 = mean(TR0, TR1), then ATR/2 + TR/2.
# basicUp = hl2 - ATR, basicDn = hl2 + ATR. TV dir 1 = down (ours -1), -1 = up (ours +1).
# bar 0: TR 2, no ATR yet                                   -> NaN (warm-up)
# bar 1: TR 2, ATR (2+2)/2 = 2, hl2 11: up 9, dn 13; prev bands are na -> nz = 0:
#        lower = 9 (9 > 0); upper = 13 (prevC 10 > 0). atr[1] is na -> TV dir 1 = DOWN -> ST = upper = 13
# bar 2: TR max(2, |14-11.5|, |12-11.5|) = 2.5, ATR 2.5/2 + 2/2 = 2.25, hl2 13: up 10.75, dn 15.25
#        lower = 10.75 (> 9); upper: 15.25 < 13? no, prevC 11.5 > 13? no -> keeps 13
#        prevST 13 == prevUpper 13 -> close 13.5 > 13 -> UP -> ST = lower = 10.75
# bar 3: TR max(2, 1.5, 0.5) = 2, ATR 2/2 + 2.25/2 = 2.125, hl2 14: up 11.875, dn 16.125
#        lower = 11.875 (> 10.75); upper: prevC 13.5 > 13 -> resets to 16.125
#        prevST 10.75 != prevUpper 13 -> close 14.5 < 11.875? no -> UP -> ST 11.875
# bar 4: TR max(3, 0.5, 2.5) = 3, ATR 1.5 + 1.0625 = 2.5625, hl2 13.5: up 10.9375, dn 16.0625
#        lower: 10.9375 > 11.875? no, prevC 14.5 < 11.875? no -> holds 11.875; upper 16.0625 < 16.125
#        close 13 < 11.875? no -> UP -> ST 11.875
# bar 5: TR max(3, 0, 3) = 3, ATR 1.5 + 1.28125 = 2.78125, hl2 11.5: up 8.71875, dn 14.28125
#        lower holds 11.875; upper 14.28125 (< 16.0625)
#        prevST 11.875 != prevUpper 16.0625 -> close 10.5 < 11.875 -> DOWN -> ST = upper = 14.28125
# bar 6: TR max(2, 0.5, 1.5) = 2, ATR 1 + 1.390625 = 2.390625, hl2 10: up 7.609375, dn 12.390625
#        lower: 7.609375 > 11.875? no, but prevC 10.5 < 11.875 -> resets to 7.609375; upper 12.390625
#        prevST == prevUpper 14.28125 -> close 9.5 > 12.390625? no -> DOWN -> ST 12.390625
# bar 7: TR max(3, 2.5, 0.5) = 3, ATR 1.5 + 1.1953125 = 2.6953125, hl2 10.5: up 7.8046875, dn 13.1953125
#        lower 7.8046875 (> 7.609375); upper: 13.1953125 < 12.390625? no, prevC 9.5 > it? no -> holds
#        close 11 > 12.390625? no -> DOWN -> ST 12.390625
# bar 8: TR max(2, 0, 2) = 2, ATR 1 + 1.34765625 = 2.34765625, hl2 10: up 7.65234375, dn 12.34765625
#        lower holds 7.8046875; upper 12.34765625 (< 12.390625) -> close 9.5: DOWN -> ST 12.34765625
# bar 9: TR max(2, 0.5, 1.5) = 2, ATR 1 + 1.173828125 = 2.173828125, hl2 9: up 6.826171875,
#        dn 11.173828125 -> lower holds 7.8046875; upper 11.173828125 -> close 8.5: DOWN -> ST 11.173828125
# bar 10: TR max(3, 3.5, 0.5) = 3.5, ATR 1.75 + 1.0869140625 = 2.8369140625, hl2 10.5:
#        up 7.6630859375, dn 13.3369140625 -> lower holds 7.8046875, upper holds 11.173828125
#        prevST == prevUpper -> close 11.5 > 11.173828125 -> UP -> ST = lower = 7.8046875
# bar 11: TR max(2, 1.5, 0.5) = 2, ATR 1 + 1.41845703125 = 2.41845703125, hl2 12:
#        up 9.58154296875, dn 14.41845703125 -> lower 9.58154296875; upper: prevC 11.5 > 11.173828125
#        -> resets to 14.41845703125. prevST 7.8046875 != prevUpper -> close 12.5 >= lower -> UP
# bar 12: TR 2, ATR 1 + 1.209228515625 = 2.209228515625, hl2 13: up 10.790771484375,
#        dn 15.209228515625 -> lower 10.790771484375, upper holds 14.41845703125 -> UP
# bar 13: TR max(2, 0.5, 1.5) = 2, ATR 1 + 1.1046142578125 = 2.1046142578125, hl2 13:
#        up 10.8953857421875 -> lower 10.8953857421875, upper holds -> close 12.5: UP
# bar 14: TR max(2, 0.5, 2.5) = 2.5, ATR 1.25 + 1.05230712890625 = 2.30230712890625, hl2 11:
#        up 8.69769287109375 -> lower holds 10.8953857421875; dn 13.30230712890625 -> upper
#        close 10.5 < 10.8953857421875 -> DOWN -> ST = upper = 13.30230712890625
HAND_SUPERTREND = [
    np.nan, 13.0, 10.75, 11.875, 11.875, 14.28125, 12.390625, 12.390625, 12.34765625,
    11.173828125, 7.8046875, 9.58154296875, 10.790771484375, 10.8953857421875, 13.30230712890625,
]
HAND_DIRECTION = [np.nan, -1, 1, 1, 1, -1, -1, -1, -1, -1, 1, 1, 1, 1, -1]


def hand_bars() -> pd.DataFrame:
    index = pd.date_range("2024-01-01 14:30", periods=15, freq="D", tz="UTC")
    return pd.DataFrame(
        {"open": HAND_CLOSE, "high": HAND_HIGH, "low": HAND_LOW, "close": HAND_CLOSE, "volume": 1000.0},
        index=index,
        dtype=float,
    )


def test_supertrend_matches_the_hand_computed_case():
    line, direction = supertrend(np.array(HAND_HIGH, float), np.array(HAND_LOW, float),
                                 np.array(HAND_CLOSE, float), period=2, multiplier=1.0)
    np.testing.assert_array_equal(line, HAND_SUPERTREND)
    np.testing.assert_array_equal(direction, HAND_DIRECTION)


def test_supertrend_columns_in_compute_indicators_match_the_hand_case():
    params = IndicatorParams(sma_periods=(2,), rsi_period=2, macd_fast=2, macd_slow=3, macd_signal=1,
                             bb_period=2, atr_period=2, supertrend_period=2, supertrend_multiplier=1.0)
    result = compute_indicators(hand_bars(), params)
    np.testing.assert_array_equal(result["supertrend"], HAND_SUPERTREND)
    np.testing.assert_array_equal(result["supertrend_direction"], HAND_DIRECTION)


def test_the_pine_transcription_agrees_with_the_hand_case():
    line, direction = pine_as_columns(HAND_HIGH, HAND_LOW, HAND_CLOSE, 1.0, 2)
    np.testing.assert_array_equal(line, HAND_SUPERTREND)
    np.testing.assert_array_equal(direction, HAND_DIRECTION)


def wild_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Absurdly volatile bars: the ATR exceeds the price, so basic lower bands go below zero."""
    rng = np.random.default_rng(seed)
    close = 20 * np.exp(np.cumsum(rng.normal(0, 0.4, n)))
    high = close * np.exp(np.abs(rng.normal(0, 0.8, n)))
    low = close * np.exp(-np.abs(rng.normal(0, 0.8, n)))
    return high, low, close


def random_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bars = random_bars(n, seed=seed)
    return tuple(bars[c].to_numpy() for c in ("high", "low", "close"))


@pytest.mark.parametrize(
    ("period", "multiplier", "make_arrays", "seed"),
    [
        (10, 3.0, random_arrays, 1),  # TradingView's default ta.supertrend(3, 10)
        (10, 3.0, random_arrays, 2),
        (7, 2.0, random_arrays, 3),
        (14, 1.5, random_arrays, 4),
        (3, 0.5, random_arrays, 5),  # narrow bands: many flips
        (1, 3.0, random_arrays, 6),  # bar 0 already has an ATR: Pine's nz(na) = 0 shows as its line
        (3, 2.0, wild_arrays, 1),  # negative basic lower bands: Pine's nz() floor holds them at 0
    ],
)
def test_supertrend_matches_the_pine_transcription_on_random_bars(period, multiplier, make_arrays, seed):
    high, low, close = make_arrays(3000, seed)
    expected_line, expected_direction = pine_as_columns(high, low, close, multiplier, period)
    line, direction = supertrend(high, low, close, period, multiplier)

    np.testing.assert_array_equal(np.isnan(line), np.isnan(expected_line))
    assert np.isnan(direction[: period - 1]).all() and not np.isnan(direction[period - 1:]).any()
    np.testing.assert_array_equal(direction, expected_direction)
    np.testing.assert_allclose(line, expected_line, rtol=1e-12, atol=0)
    assert {-1.0, 1.0} <= set(direction[period - 1:].tolist()), "test data should cover both trends"
    if make_arrays is wild_arrays:
        assert (line == 0).sum() > 100, "test data should reach the nz() floor"
    if period == 1:
        assert line[0] == 0.0 and direction[0] == -1


def test_supertrend_line_is_below_close_in_uptrends_and_above_in_downtrends():
    bars = random_bars(2000, seed=11)
    result = compute_indicators(bars)
    valid = result.dropna(subset=["supertrend"])
    up = valid["supertrend_direction"] == 1
    assert (valid.loc[up, "supertrend"] <= valid.loc[up, "close"]).all()
    assert (valid.loc[~up, "supertrend"] >= valid.loc[~up, "close"]).all()
    assert result["supertrend"].iloc[:9].isna().all() and result["supertrend"].iloc[9:].notna().all()


def test_pure_python_fallback_kernel_agrees_with_the_compiled_one():
    """Short frames take the plain kernel, long ones the compiled one (and all do without numba): both agree."""
    bars = random_bars(500, seed=21)
    arrays = [bars[c].to_numpy() for c in ("high", "low", "close")]
    compiled = _compiled_supertrend_kernel()(*arrays, 10, 3.0)
    interpreted = supertrend(*arrays, 10, 3.0)
    np.testing.assert_array_equal(compiled[0], interpreted[0])
    np.testing.assert_array_equal(compiled[1], interpreted[1])


def test_supertrend_with_fewer_bars_than_the_period_is_all_nan():
    line, direction = supertrend(np.array([2.0, 3.0]), np.array([1.0, 2.0]), np.array([1.5, 2.5]), 10, 3.0)
    assert np.isnan(line).all() and np.isnan(direction).all()


def test_supertrend_runs_compiled_on_long_series_and_plain_on_short_ones(monkeypatch):
    """Which kernel runs, not how long it takes (its speed is measured by bench/indicators.py): a
    million bars go to the numba kernel, a year of bars to the plain one (no numba import)."""
    from trading_pipeline.core import indicators

    compiled_kernel = indicators._compiled_supertrend_kernel()
    assert compiled_kernel is not None
    calls = []

    def counting(*args):
        calls.append(len(args[0]))
        return compiled_kernel(*args)

    monkeypatch.setattr(indicators, "_compiled_supertrend_kernel", lambda: counting)
    rng = np.random.default_rng(0)
    n = 1_000_000
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    high, low = close * 1.01, close * 0.99
    line, _ = supertrend(high, low, close)
    supertrend(high[:250], low[:250], close[:250])
    assert calls == [n]
    assert np.isfinite(line[9:]).all()
    plain_line, _ = indicators._supertrend_kernel(high[:30_000], low[:30_000], close[:30_000], 10, 3.0)
    np.testing.assert_array_equal(line[:30_000], plain_line)


# --------------------------------------------------------------------------- bad input


def _bad(mutate) -> pd.DataFrame:
    bars = random_bars(30, start="2024-03-01 14:30")
    return mutate(bars)


def _set(bars: pd.DataFrame, row: int, column: str, value) -> pd.DataFrame:
    bars = bars.copy()
    if not isinstance(value, float | int):
        bars[column] = bars[column].astype(object)
    bars.iloc[row, bars.columns.get_loc(column)] = value
    return bars


def _reindexed(bars: pd.DataFrame, index: pd.Index) -> pd.DataFrame:
    return bars.set_axis(index, axis=0)


BAD_INPUTS = {
    "empty": (
        lambda b: b.iloc[:0],
        ["empty"],
    ),
    "not a frame": (
        lambda b: b["close"],
        ["DataFrame", "Series"],
    ),
    "missing columns": (
        lambda b: b.drop(columns=["volume", "low"]),
        ["low, volume", "columns present: open, high, close"],
    ),
    "capitalised columns": (
        lambda b: b.rename(columns=str.capitalize),
        ["open, high, low, close, volume", "rename", "'Close': 'close'"],
    ),
    "text prices": (
        lambda b: _set(b, 3, "close", "n/a"),
        ["'close'", "non-numeric", "'n/a'", "2024-03-04T14:30:00+00:00", "astype(float)"],
    ),
    "NaN price": (
        lambda b: _set(_set(b, 5, "high", np.nan), 7, "high", np.nan),
        ["'high'", "NaN", "2 bar(s)", "2024-03-06T14:30:00+00:00", "2024-03-08T14:30:00+00:00"],
    ),
    "infinite price": (
        lambda b: _set(b, 2, "open", np.inf),
        ["'open'", "infinite", "2024-03-03T14:30:00+00:00"],
    ),
    "zero price": (
        lambda b: _set(b, 4, "low", 0.0),
        ["'low'", "zero or negative", "2024-03-05T14:30:00+00:00", "> 0"],
    ),
    "negative volume": (
        lambda b: _set(b, 9, "volume", -1.0),
        ["Volume is negative", "2024-03-10T14:30:00+00:00 (-1)", ">= 0"],
    ),
    "duplicated timestamps": (
        lambda b: _reindexed(b, b.index.delete(11).insert(11, b.index[10])),
        ["more than once", "2024-03-11T14:30:00+00:00", "duplicated"],
    ),
    "unsorted": (
        lambda b: b.iloc[[0, 1, 2, 4, 3, *range(5, 30)]],
        ["not sorted", "2024-03-04T14:30:00+00:00", "sort_index"],
    ),
    "naive index": (
        lambda b: _reindexed(b, b.index.tz_localize(None)),
        ["timezone-naive", "2024-03-01T14:30:00", "tz_localize"],
    ),
    "non-UTC index": (
        lambda b: _reindexed(b, b.index.tz_convert("America/New_York")),
        ["America/New_York", "not UTC", "tz_convert('UTC')"],
    ),
    "no DatetimeIndex": (
        lambda b: b.reset_index(drop=True),
        ["DatetimeIndex", "RangeIndex"],
    ),
    "NaT in index": (
        lambda b: _reindexed(b, b.index.delete(6).insert(6, pd.NaT)),
        ["no timestamp", "NaT", "position(s) 6"],
    ),
    "low above high": (
        lambda b: _set(_set(b, 12, "low", 1000.0), 12, "open", 1000.0),
        ["inconsistent", "2024-03-13T14:30:00+00:00", "low 1000"],
    ),
    "close above high": (
        lambda b: _set(b, 13, "close", 1000.0),
        ["inconsistent", "2024-03-14T14:30:00+00:00", "close 1000"],
    ),
    "open below low": (
        lambda b: _set(b, 14, "open", 0.01),
        ["inconsistent", "2024-03-15T14:30:00+00:00", "open 0.01"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_bars_raise_a_bar_data_error_naming_rows_and_fix(case):
    mutate, expected_fragments = BAD_INPUTS[case]
    bars = _bad(mutate)
    for call in (validate_bars, compute_indicators):
        with pytest.raises(BarDataError) as raised:
            call(bars)
        message = str(raised.value)
        for fragment in expected_fragments:
            assert fragment in message, f"{fragment!r} not in: {message}"
        assert raised.value.fix and "\nFix: " in message


def test_long_lists_of_bad_rows_are_summarised():
    bars = random_bars(30, start="2024-03-01 14:30")
    bars.loc[bars.index[10:20], "volume"] = -5.0
    with pytest.raises(BarDataError) as raised:
        validate_bars(bars)
    message = str(raised.value)
    assert "10 bar(s)" in message and "and 5 more" in message
    assert "2024-03-11T14:30:00+00:00" in message and "2024-03-16T14:30:00+00:00" not in message


def test_valid_bars_pass_validation():
    assert validate_bars(random_bars(300)) is None
