"""A timeframe request's numeric context read from numbers made once per series.

`request.timeframe_context` assembles and snaps one position's numbers (a dozen small numpy steps
per call); a backtest asks at every session of a long series. Here the same numbers are made for
every position at once (`context_values`: the same float operations, element by element, so the
same bits; a test holds every position equal to `request.timeframe_context`) and a call reads one
row. The live analyst and the backtest both call `timeframe_context` here, so they key alike.

The response cache key hashes the context's fields and numbers by value, with
`request.CONTEXT_FORMAT_VERSION` (how the text is written): how the numbers are computed is not in
the key, so making them here changes no key as long as they are the same numbers.
"""

from __future__ import annotations

import functools
from datetime import datetime

import numpy as np

from trading_pipeline.adapters.llm import request
from trading_pipeline.core import chart_spec
from trading_pipeline.core.analysis_validation import NumericContext
from trading_pipeline.core.chart_spec import IDENTITY, Rebase, SeriesArrays
from trading_pipeline.core.market_calendar import isoformat
from trading_pipeline.core.risk import ENTRY_TOLERANCE_ATR, ENTRY_TOLERANCE_SHARE, RANGE_TOLERANCE_ATR


def timeframe_context(series: SeriesArrays, end: int, *, symbol: str, timeframe: str, last_bar_start: datetime,
                      rebase: Rebase = IDENTITY) -> tuple[NumericContext, request.RequestContext]:
    """`request.timeframe_context`, reading the numbers made once per series when the position has
    them (not anonymized, every indicator has a value, RECENT_CLOSES closes); else assembled there."""
    if not rebase.anonymized:
        names, rows, values, made = series.derived(("context values", timeframe), _maker(timeframe))
        if made[end - 1]:
            fields = (symbol, timeframe, isoformat(last_bar_start), end - chart_spec.shown_start(timeframe, end),
                      names)
            return (NumericContext(*rows[end - 1, :6].tolist()),
                    request.RequestContext(fields, values[end - 1], request._write_timeframe_context))
    return request.timeframe_context(series, end, symbol=symbol, timeframe=timeframe, last_bar_start=last_bar_start,
                                     rebase=rebase)


def context_values(series: SeriesArrays, timeframe: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """The snapped numbers `request.timeframe_context` sends (not anonymized) for every position,
    row `end - 1` for bars [0, end), in its order: the 6 numbers, the 5 bounds, the indicators, the
    RECENT_CLOSES last closes; and which rows are made (`made`: a value for every indicator,
    RECENT_CLOSES closes, a finite close and ATR). Each row reads only its bar and the bars before it.
    Returned with the indicators' names and `request.context_rows`' rows: (names, rows, values, made)."""
    names, rows, complete = series.derived(("context rows", timeframe),
                                           functools.partial(request.context_rows, timeframe=timeframe))
    recent = request.RECENT_CLOSES
    values = np.full((len(rows), 11 + len(names) + recent), np.nan)
    if len(rows) >= recent:
        shown = rows[recent - 1:]
        values[recent - 1:, :6] = shown[:, :6]
        values[recent - 1:, 6:11] = bounds_rows(shown)
        values[recent - 1:, 11:11 + len(names)] = shown[:, 6:]
        values[recent - 1:, 11 + len(names):] = np.lib.stride_tricks.sliding_window_view(series.columns["close"],
                                                                                         recent)
    made = complete & np.isfinite(values[:, 0]) & np.isfinite(values[:, 1])  # rows before `recent`: NaN
    return names, rows, snapped_rows(values, values[:, 0], request._timeframe_prices(names, recent)), made


@functools.cache
def _maker(timeframe: str) -> functools.partial:
    return functools.partial(context_values, timeframe=timeframe)


def bounds_rows(rows: np.ndarray) -> np.ndarray:
    """`request._bounds` (entry tolerance and range, stop and target range) of each row (last close,
    ATR, recent high, recent low, ...): the same operations on finite numbers, so the same floats."""
    close, atr, recent_high, recent_low = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    tolerance = np.maximum(ENTRY_TOLERANCE_ATR * atr, ENTRY_TOLERANCE_SHARE * close)
    return np.column_stack([tolerance, close - tolerance, close + tolerance, recent_low - RANGE_TOLERANCE_ATR * atr,
                            recent_high + RANGE_TOLERANCE_ATR * atr])


def snapped_rows(values: np.ndarray, prices: np.ndarray, is_price: np.ndarray) -> np.ndarray:
    """`request.snapped` of each row of `values` with its own price: the same operations element by
    element, so row i has the bits of `snapped(values[i], prices[i], is_price)`."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    relative = ((values.view(np.uint64) + request._HALF_DROPPED) & request._KEPT).view(np.float64)
    usable = np.isfinite(prices) & (prices > 0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        steps = np.ldexp(1.0, np.frexp(np.where(usable, prices, 1.0))[1] - 21)[:, None]
        gridded = np.round(values / steps) * steps
    return np.ascontiguousarray(np.where(is_price & usable[:, None], gridded, relative))
