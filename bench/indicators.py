"""All indicators on 1,000,000 bars: `compute_indicators` against raw TA-Lib.

Ours: `compute_indicators(bars)` with the default parameters, i.e. bar validation, SMA 20/50/200,
RSI 14, MACD 12/26/9, Bollinger 20/2, ATR 14, SuperTrend 10/3 (numba) and the result DataFrame.
TA-Lib: the same TA-Lib functions called directly on the numpy arrays (no validation, no
SuperTrend, no DataFrame). Target: ours <= 1.5 x TA-Lib.

Both are timed as the best of N runs after one untimed warm-up call, so numba's JIT compile or
cache load is excluded. The runs alternate, so load on the machine hits both alike. Every timed
call of ours gets a freshly built frame (new index object): pandas caches facts such as "sorted"
and "unique" on an index, and a reused frame would make validation look cheaper than it is.

On frames this long compute_indicators runs SuperTrend on a second thread while TA-Lib computes
the rest; the line "SuperTrend on the calling thread" shows the one-core time as well.

Run: `.venv/bin/python bench/indicators.py [--bars N] [--repeats N]`. Exits 1 if the ratio is above
the target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import warnings

import numpy as np
import pandas as pd
import talib

from trading_pipeline.core import indicators as indicators_module
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
    """Wall time of function(*args); freeing its result happens after the clock stops."""
    started = time.perf_counter()
    result = function(*args)  # held, so that freeing it is not timed
    elapsed = time.perf_counter() - started
    del result
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
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

    # The runs alternate, so load on the machine hits every variant alike.
    times: dict[str, list[float]] = {"ours": [], "talib": [], "single": [], "validate": [], "supertrend": []}
    for _ in range(args.repeats):
        times["ours"].append(timed(compute_indicators, fresh_frame(columns), params))
        times["talib"].append(timed(talib_set, high, low, close))
        with supertrend_on_calling_thread():
            times["single"].append(timed(compute_indicators, fresh_frame(columns), params))
        times["validate"].append(timed(validate_bars, fresh_frame(columns)))
        times["supertrend"].append(timed(supertrend, high, low, close, params.supertrend_period,
                                         params.supertrend_multiplier))
    best = {name: min(values) for name, values in times.items()}
    ratio = best["ours"] / best["talib"]
    met = ratio <= TARGET_RATIO

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:7.1f} ms"

    print(f"bars                        {args.bars:,} (random walk, one bar a minute from 2000-01-03 UTC)")
    print(f"timing                      best of {args.repeats} runs each, after one untimed warm-up call, so numba's")
    print("                            JIT compile / cache load is excluded; a fresh frame for every call of ours")
    print(f"machine                     {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, numpy {np.__version__}, pandas {pd.__version__}, TA-Lib {talib.__version__}")
    print(f"ours: compute_indicators    {ms(best['ours'])}  validation + TA-Lib set + SuperTrend 10/3 + result frame")
    print(f"TA-Lib raw, same set        {ms(best['talib'])}  SMA 20/50/200, RSI 14, MACD 12/26/9, BBANDS 20/2, "
          "ATR 14 on numpy arrays")
    print(f"ratio ours / TA-Lib         {ratio:7.2f} x   target <= {TARGET_RATIO} x: {'met' if met else 'NOT met'}")
    print("parts, timed on their own:")
    print(f"  validate_bars             {ms(best['validate'])}")
    print(f"  SuperTrend 10/3           {ms(best['supertrend'])}  on a second thread beside TA-Lib from "
          f"{indicators_module._SUPERTREND_THREAD_MIN_BARS:,} bars (the numba kernel releases the GIL)")
    print(f"ours, SuperTrend on the calling thread  {ms(best['single']).strip()} = "
          f"{best['single'] / best['talib']:.2f} x TA-Lib (no second thread)")
    print(f"medians                     ours {ms(float(np.median(times['ours']))).strip()}, "
          f"TA-Lib {ms(float(np.median(times['talib']))).strip()}")
    return 0 if met else 1


@contextlib.contextmanager
def supertrend_on_calling_thread():
    """compute_indicators as on a single core: SuperTrend after TA-Lib, on the calling thread."""
    threshold = indicators_module._SUPERTREND_THREAD_MIN_BARS
    indicators_module._SUPERTREND_THREAD_MIN_BARS = sys.maxsize
    try:
        yield
    finally:
        indicators_module._SUPERTREND_THREAD_MIN_BARS = threshold


if __name__ == "__main__":
    sys.exit(main())
