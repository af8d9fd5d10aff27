"""The chart an analysis is made from, as data: what it shows, its hash, and its anonymized form.

A model's analysis of a chart is keyed in the response cache on `chart_spec_sha256`: a hash of
what the chart shows (symbol, timeframe, the bars, the code drawing them and their indicators),
never of the PNG's bytes. Equal specs draw equal charts, so a backtest (`llm_replay`) finds the
answer a live run got without rendering anything.

Anonymized (OPENAI_ANONYMIZE_CHARTS; the backtest's `anonymized_charts`), because a model may know
the history it is shown: no symbol (ANONYMOUS_SYMBOL), no dates (the bars are placed on a fixed
run of periods ending ANONYMOUS_LAST_START), no absolute prices or volumes (price-valued columns rebased
so the last close is 100, volume so its mean over the chart is VOLUME_MEAN). `Rebase` maps prices
both ways: the model reads and answers in rebased units, and its prices are mapped back to real
ones before anything checks or uses them.

Everything reads a series' arrays (`SeriesArrays`: `rules_analyst.Columns` and what is made once
from them) at a position `end` (bars [0, end) are seen): the live analyst calls it on a whole frame
(end = its length), the backtest on one long series at every session, so both compute the same key
the same way, with no pandas per call.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from trading_pipeline.core import chart_figure
from trading_pipeline.core.frames import OHLCV_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

    from trading_pipeline.core.rules_analyst import Columns

T = TypeVar("T")
CHART_SPEC_VERSION = 2
ANONYMOUS_SYMBOL = "ASSET"
ANONYMOUS_LAST_CLOSE = 100.0
VOLUME_MEAN = 1_000_000.0
# The anonymized chart's last bar starts here (a Monday, 09:30 in New York); the dates say nothing.
ANONYMOUS_LAST_START = datetime.fromisoformat("2001-01-01T14:30:00+00:00")
ANONYMOUS_AS_OF = datetime.fromisoformat("2001-01-01T21:00:00+00:00")
PRICE_COLUMNS = frozenset({"open", "high", "low", "close", "sma_20", "sma_50", "sma_200", "bb_upper", "bb_middle",
                           "bb_lower", "supertrend", "atr_14", "macd", "macd_signal", "macd_hist"})
VOLUME_COLUMN = "volume"
PRICE_DECIMALS = 6  # rebased values are rounded: the same shape at another price level is the same chart
REAL_PRICE_DECIMALS = 4  # a mapped-back price (the risk engine rounds it to the tick)


def bars_shown(timeframe: str) -> int:
    return chart_figure.DEFAULT_BARS_SHOWN.get(timeframe, chart_figure.FALLBACK_BARS_SHOWN)


def shown_start(timeframe: str, end: int) -> int:
    """The first bar the chart of bars [0, end) draws."""
    return max(0, end - bars_shown(timeframe))


@dataclass(frozen=True)
class Rebase:
    """shown = real × `price` (volume × `volume`); `anonymized` False is the identity."""

    price: float = 1.0
    volume: float = 1.0
    anonymized: bool = False

    def shown(self, real: float) -> float:
        return real * self.price if self.anonymized else real

    def real(self, shown: float | None) -> float | None:
        """A price the model gave (None: none given), in real units."""
        return round(shown / self.price, REAL_PRICE_DECIMALS) if self.anonymized and shown is not None else shown

    def reals(self, shown: Sequence[float]) -> list[float]:
        return [round(x / self.price, REAL_PRICE_DECIMALS) for x in shown] if self.anonymized else list(shown)

    def column(self, name: str, values: np.ndarray) -> np.ndarray:
        """A column's values as the chart shows them."""
        if not self.anonymized:
            return values
        if name in PRICE_COLUMNS:
            return np.round(values * self.price, PRICE_DECIMALS)
        if name == VOLUME_COLUMN:
            return np.round(values * self.volume)
        return values

    def factors(self, names: tuple[str, ...]) -> np.ndarray:
        """What each of these columns' values is multiplied by on the chart (unrounded)."""
        return np.array([self.price if name in PRICE_COLUMNS else self.volume if name == VOLUME_COLUMN else 1.0
                         for name in names])


IDENTITY = Rebase()


def anonymizing(columns: Columns, end: int, timeframe: str) -> Rebase:
    """The rebase of the chart of bars [0, end): last close 100, mean volume VOLUME_MEAN."""
    last_close = float(columns["close"][end - 1])
    if not (math.isfinite(last_close) and last_close > 0):
        raise ValueError(f"last close {last_close} is not a positive price: the chart cannot be anonymized")
    volume = 1.0
    if VOLUME_COLUMN in columns:
        mean = float(np.nanmean(columns[VOLUME_COLUMN][shown_start(timeframe, end):end]))
        volume = VOLUME_MEAN / mean if math.isfinite(mean) and mean > 0 else 1.0
    return Rebase(ANONYMOUS_LAST_CLOSE / last_close, volume, anonymized=True)


def price_rebase(last_close: float) -> Rebase:
    """Prices only, rebased so `last_close` shows as 100 (a consolidation's numbers)."""
    return Rebase(ANONYMOUS_LAST_CLOSE / last_close, 1.0, anonymized=True)


@functools.lru_cache(maxsize=16)
def anonymous_index(timeframe: str, n: int) -> pd.DatetimeIndex:
    """n bar starts ending ANONYMOUS_LAST_START: business days (daily) or Mondays (weekly and other)."""
    import pandas as pd

    return pd.date_range(end=ANONYMOUS_LAST_START, periods=n, freq="B" if timeframe == "1d" else "W-MON",
                         name="time").as_unit("ns")


class SeriesArrays:
    """A series' arrays as charts and model contexts read them at any position `end`: its Columns
    and, made once, the bar times in ns and the OHLCV rows contiguous (hashed per chart), and groups
    of columns stacked into one matrix (one row read per position). The live analyst makes one of
    a whole frame, the backtest one per series for its whole run."""

    def __init__(self, columns: Columns):
        self.columns = columns
        self.names = tuple(columns.arrays)
        index = columns.index
        self.times_ns = np.ascontiguousarray((index if getattr(index, "unit", "ns") == "ns"
                                              else index.as_unit("ns")).asi8)
        self.ohlcv_names = tuple(name for name in OHLCV_COLUMNS if name in columns)
        self.ohlcv = np.ascontiguousarray(np.column_stack([columns[name] for name in self.ohlcv_names]),
                                          dtype=np.float64)
        self._derived: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self.times_ns)

    def derived(self, key: Hashable, make: Callable[[SeriesArrays], T]) -> T:
        """`make(self)`, made once per key: what a reader of every position computes for all of them."""
        if key not in self._derived:
            self._derived[key] = make(self)
        return self._derived[key]


def rolling(values: np.ndarray, window: int, reduce: np.ufunc) -> np.ndarray:
    """At each position i, `reduce` (np.maximum, np.minimum) of values[max(0, i - window + 1):i + 1],
    as `values[start:end].max()` reads it (NaN in the window gives NaN)."""
    out = reduce.accumulate(values[:window - 1]) if window > 1 else values[:0]
    if len(values) >= window:
        windows = np.lib.stride_tricks.sliding_window_view(values, window)
        out = np.concatenate((out, windows.max(axis=1) if reduce is np.maximum else windows.min(axis=1)))
    return out


@functools.cache
def code_version() -> str:
    """The drawing and indicator code's version: changed code draws another chart."""
    from trading_pipeline.core import indicators

    digest = hashlib.sha256()
    for module in (chart_figure, indicators):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def chart_spec_sha256(series: SeriesArrays, end: int, *, symbol: str, timeframe: str, anonymize: bool = False) -> str:
    """sha256 of what the chart of bars [0, end) shows: symbol, timeframe, the columns drawn, the
    shown bars' times and OHLCV (anonymized: ANONYMOUS_SYMBOL, the anonymous times, rebased values)
    and the code that draws them and computes their indicators.

    The indicator values are not hashed: they are the code's function of the bars and of the
    history before them, which moves them in the 10th digit (the live graph reads two years, a
    backtest its whole window), invisible on a chart but enough to make every key differ. Their
    latest values are in the numeric context, which is part of the response cache key too."""
    start = shown_start(timeframe, end)
    digest = series.derived(("chart spec", symbol, timeframe, anonymize), lambda _: hashlib.sha256(repr((
        CHART_SPEC_VERSION, code_version(), ANONYMOUS_SYMBOL if anonymize else symbol, timeframe,
        series.names)).encode())).copy()
    if anonymize:
        rebase = anonymizing(series.columns, end, timeframe)
        digest.update(anonymous_index(timeframe, end - start).asi8.tobytes())
        digest.update(np.column_stack([rebase.column(name, series.ohlcv[start:end, i])
                                       for i, name in enumerate(series.ohlcv_names)]).tobytes())
    else:
        digest.update(series.times_ns[start:end])  # contiguous rows: hashed in place, the same bytes
        digest.update(series.ohlcv[start:end])
    return digest.hexdigest()


def anonymized_frame(columns: Columns, end: int, timeframe: str) -> pd.DataFrame:
    """The bars and indicators the anonymized chart of bars [0, end) draws (to render it)."""
    import pandas as pd

    start = shown_start(timeframe, end)
    rebase = anonymizing(columns, end, timeframe)
    return pd.DataFrame({name: rebase.column(name, columns[name][start:end]) for name in columns.arrays},
                        index=anonymous_index(timeframe, end - start))
