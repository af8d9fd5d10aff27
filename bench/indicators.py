"""All indicators on 1,000,000 bars: `compute_indicators` against raw TA-Lib.

Ours: `compute_indicators(bars)` with the default parameters, i.e. bar validation, SMA 20/50/200,
RSI 14, MACD 12/26/9, Bollinger 20/2, ATR 14, SuperTrend 10/3 (numba) and the result DataFrame.
TA-Lib: the same TA-Lib functions called directly on the numpy arrays (no validation, no
SuperTrend, no DataFrame). Target: ours <= 1.5 x TA-Lib.

Both are timed as the best of N runs after one untimed warm-up call, so numba's JIT compile or
cache load and first-touch costs are excluded. The runs of the two alternate, so load on the
machine hits both alike. Every timed call of ours gets a freshly built frame (new index object):
pandas caches facts such as "sorted" and "unique" on an index, and a reused frame would make
validation look cheaper than it is on new data.

Run: `.venv/bin/python bench/indicators.py [--bars N] [--repeats N]`. Exits 1 if the ratio is above
the target.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import numpy as np
import pandas as pd
import talib

from trading_pipeline.core.bars import validate_bars
from trading_pipeline.core.indicators import IndicatorParams, compute_indicators, supertrend

warnings.filterwarnings("ignore")

TARGET_RATIO = 1.5


def random_walk(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible OHLCV columns: a geometric random walk with overnight gaps and wicks."""
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))
    previous_close = np.concatenate(([100.0], close[:-1]))
    open_ = previous_close * np.exp(rng.normal(0.0, 0.003, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0.0, 0.005, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0.0, 0.005, n)))
    volume = np.round(rng.lognormal(13.0, 0.4, n))
    return {"open": open_, "high": high, "low": low, "close": close, "volume": volume}


def fresh_frame(columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """A new frame (new index object, copied columns) over the same values.

    One bar per minute from 2000-01-03: a million daily bars would run past pandas' last
    representable timestamp, and the indicators only need a sorted unique UTC index.
    """
    n = len(columns["close"])
    start = pd.Timestamp("2000-01-03 14:30", tz="UTC")
    nanoseconds = start.value + np.arange(n, dtype=np.int64) * 60_000_000_000
    index = pd.DatetimeIndex(nanoseconds.view("M8[ns]"), name="time").tz_localize("UTC")
    return pd.DataFrame({name: values.copy() for name, values in columns.items()}, index=index)


def talib_set(high: np.ndarray, low: np.ndarray, close: np.ndarray) -> list[np.ndarray]:
    """The TA-Lib part of `compute_indicators`, called directly."""
    return [
        talib.SMA(close, timeperiod=20),
        talib.SMA(close, timeperiod=50),
        talib.SMA(close, timeperiod=200),
        talib.RSI(close, timeperiod=14),
        *talib.MACD(close, fastperiod=12, slowperiod=26, signalperiod=9),
        *talib.BBANDS(close, timeperiod=20, nbdevup=2.0, nbdevdn=2.0, matype=0),
        talib.ATR(high, low, close, timeperiod=14),
    ]


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    columns = random_walk(args.bars)
    high, low, close = columns["high"], columns["low"], columns["close"]
    params = IndicatorParams()

    # Warm-up, untimed: numba JIT compile or on-disk cache load of the SuperTrend kernel, TA-Lib
    # and pandas first calls. Also a check that both sides compute the same TA-Lib values.
    ours = compute_indicators(fresh_frame(columns), params)
    raw = talib_set(high, low, close)
    talib_columns = [c for c in params.indicator_columns() if not c.startswith("supertrend")]
    for name, values in zip(talib_columns, raw, strict=True):
        np.testing.assert_array_equal(ours[name].to_numpy(), values, err_msg=name)
    del ours, raw

    ours_times, talib_times, validation_times, supertrend_times = [], [], [], []
    for _ in range(args.repeats):
        frame = fresh_frame(columns)
        ours_times.append(timed(compute_indicators, frame, params))
        talib_times.append(timed(talib_set, high, low, close))
        validation_times.append(timed(validate_bars, fresh_frame(columns)))
        supertrend_times.append(timed(supertrend, high, low, close, params.supertrend_period,
                                      params.supertrend_multiplier))
        del frame

    ours_best, talib_best = min(ours_times), min(talib_times)
    ratio = ours_best / talib_best
    met = ratio <= TARGET_RATIO
    milliseconds = lambda seconds: f"{seconds * 1000:8.1f} ms"  # noqa: E731

    print(f"bars                          {args.bars:,}")
    print(f"timing                        best of {args.repeats} runs each, after one untimed warm-up call "
          "(numba JIT/cache load excluded); fresh frame per run of ours")
    print(f"machine                       {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, numpy {np.__version__}, pandas {pd.__version__}, TA-Lib {talib.__version__}")
    print(f"ours: compute_indicators      {milliseconds(ours_best)}   (validation + TA-Lib + SuperTrend + DataFrame)")
    print(f"  of which validate_bars      {milliseconds(min(validation_times))}   (timed separately)")
    print(f"  of which SuperTrend 10/3    {milliseconds(min(supertrend_times))}   (timed separately)")
    print(f"TA-Lib raw, same set          {milliseconds(talib_best)}   "
          "(SMA 20/50/200, RSI 14, MACD 12/26/9, BBANDS 20/2, ATR 14 on numpy arrays)")
    print(f"ratio ours / TA-Lib           {ratio:8.2f} x   target <= {TARGET_RATIO} x: {'met' if met else 'NOT met'}")
    print(f"median of runs                ours {milliseconds(float(np.median(ours_times))).strip()}, "
          f"TA-Lib {milliseconds(float(np.median(talib_times))).strip()}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
