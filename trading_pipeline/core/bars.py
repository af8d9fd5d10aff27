"""Validation of OHLCV bar frames before anything computes on them.

Every check names the offending rows (their first few timestamps) and how to fix the data, so a
bad frame fails here with a readable `BarDataError` instead of deep inside TA-Lib or numpy.
"""

from __future__ import annotations

import datetime as dt
import functools

import numpy as np
import pandas as pd

from trading_pipeline.core.frames import OHLCV_COLUMNS
from trading_pipeline.errors import BarDataError

PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")

# How many offending rows a message lists before summarising the rest as "and N more".
_ROWS_SHOWN = 5

# From this many rows on, a compiled single pass first checks the whole frame (and imports numba
# for it); below it the detailed checks take under a millisecond anyway.
_COMPILED_CHECK_MIN_ROWS = 20_000

_NAT = np.iinfo(np.int64).min

_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Zulu", "Etc/Zulu"})


def validate_bars(bars: pd.DataFrame) -> None:
    """Raise `BarDataError` unless `bars` is a usable OHLCV frame; return None if it is.

    Usable means: a non-empty DataFrame with numeric columns open, high, low, close, volume (other
    columns are ignored); a timezone-aware UTC DatetimeIndex without NaT, sorted ascending, without
    duplicates; finite prices above zero; finite volume >= 0; and consistent bars:
    low <= open <= high, low <= close <= high (which implies low <= high).
    """
    if not isinstance(bars, pd.DataFrame):
        raise BarDataError(
            f"Bars must be a pandas DataFrame, got {type(bars).__name__}.",
            "Pass a DataFrame with columns open, high, low, close, volume indexed by bar start time (UTC).",
        )
    if len(bars.index) == 0:
        raise BarDataError(
            "The bar frame is empty: there are no bars to compute on.",
            "Check the symbol, timeframe and date range requested from the market data source.",
        )
    _check_columns(bars)
    if len(bars.index) >= _COMPILED_CHECK_MIN_ROWS and _plainly_valid(bars):
        return
    # Something is off: the detailed checks below find the first problem and name its rows.
    _check_index(bars.index)
    _check_numeric(bars)
    _check_values(bars)
    _check_ohlc_consistency(bars)


def _plainly_valid(bars: pd.DataFrame) -> bool:
    """True if `bars` certainly passes every detailed check below, decided in one compiled pass
    (a million bars in a few milliseconds, where the detailed checks take tens); False means "run
    the detailed checks", which then raise naming the offending rows. Only plain numpy number
    columns and a UTC DatetimeIndex take this path, and only when numba is installed.
    """
    clean_rows = _compiled_clean_rows()
    if clean_rows is None:
        return False
    index = bars.index
    if not (isinstance(index, pd.DatetimeIndex) and index.tz is not None and _is_utc(index.tz)):
        return False
    columns = [bars[column] for column in OHLCV_COLUMNS]
    if not all(
        isinstance(column, pd.Series) and isinstance(column.dtype, np.dtype) and column.dtype.kind in "iuf"
        for column in columns
    ):
        return False
    arrays = (np.ascontiguousarray(column.to_numpy(dtype=np.float64)) for column in columns)
    return bool(clean_rows(np.ascontiguousarray(index.asi8), *arrays))


@functools.lru_cache(maxsize=1)
def _compiled_clean_rows():
    """`_clean_rows` compiled by numba (imported only now: it is slow to import), or None without numba."""
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - without numba every frame takes the detailed checks
        return None
    return njit(cache=True, nogil=True)(_clean_rows)


def _clean_rows(times, open_, high, low, close, volume):  # pragma: no cover - runs compiled
    """Whether the rows pass every detailed check: times strictly increasing (so sorted and
    unique) without NaT; low > 0, high < inf, low <= open <= high and low <= close <= high (so all
    four prices are finite and > 0); 0 <= volume < inf. NaN fails every comparison, so any NaN
    makes this False. No early exit: clean frames, the case this is for, are read to the end anyway,
    and the loop without branches is the fast one."""
    n = times.shape[0]
    if n == 0 or times[0] == _NAT:  # NaT is the smallest int64: strictly increasing rules out any later one
        return False
    clean = True
    for i in range(n):
        o = open_[i]
        h = high[i]
        lo = low[i]
        c = close[i]
        v = volume[i]
        clean &= (lo > 0.0) & (h < np.inf) & (lo <= o) & (o <= h) & (lo <= c) & (c <= h) & (v >= 0.0) & (v < np.inf)
    for i in range(1, n):
        clean &= times[i] > times[i - 1]
    return clean


def _check_columns(bars: pd.DataFrame) -> None:
    missing = [column for column in OHLCV_COLUMNS if column not in bars.columns]
    if not missing:
        return
    present = ", ".join(map(str, bars.columns)) or "none"
    lowercase_names = {str(column).strip().lower(): column for column in bars.columns}
    misnamed = {lowercase_names[name]: name for name in missing if name in lowercase_names}
    if misnamed:
        renames = ", ".join(f"{old!r}: {new!r}" for old, new in misnamed.items())
        fix = f"Rename the columns to lower case, e.g. bars.rename(columns={{{renames}}})."
    else:
        fix = "Provide all of open, high, low, close, volume as columns (one row per bar)."
    raise BarDataError(f"Bars lack the column(s) {', '.join(missing)} (columns present: {present}).", fix)


def _check_index(index: pd.Index) -> None:
    if not isinstance(index, pd.DatetimeIndex):
        raise BarDataError(
            f"Bars must be indexed by a DatetimeIndex of bar start times, got {type(index).__name__} "
            f"(first entries: {_format_list(list(index[:_ROWS_SHOWN]), len(index))}).",
            "Set the bar start time as the index: "
            "bars.index = pd.DatetimeIndex(pd.to_datetime(bars['time'], utc=True), name='time').",
        )
    if index.tz is None:
        raise BarDataError(
            "The bar index is timezone-naive, so its times are ambiguous (first entries: "
            f"{_format_times(index[:_ROWS_SHOWN], len(index))}).",
            "Localize it to the timezone it was recorded in, then convert: "
            "bars.index = bars.index.tz_localize('America/New_York').tz_convert('UTC') "
            "(or tz_localize('UTC') if the times already are UTC).",
        )
    if not _is_utc(index.tz):
        raise BarDataError(
            f"The bar index is in timezone {index.tz}, not UTC (first entries: "
            f"{_format_times(index[:_ROWS_SHOWN], len(index))}).",
            "Convert it: bars.index = bars.index.tz_convert('UTC').",
        )
    not_a_time = np.flatnonzero(index.isna())
    if len(not_a_time):
        raise BarDataError(
            f"{len(not_a_time)} bar(s) have no timestamp (NaT) at row position(s) "
            f"{_format_list(not_a_time[:_ROWS_SHOWN].tolist(), len(not_a_time))}.",
            "Drop the rows without a time or fill in their bar start time.",
        )
    duplicated = index[index.duplicated(keep=False)].unique()
    if len(duplicated):
        raise BarDataError(
            f"{len(duplicated)} timestamp(s) occur more than once: "
            f"{_format_times(duplicated[:_ROWS_SHOWN], len(duplicated))}.",
            "Keep one bar per start time, e.g. bars = bars[~bars.index.duplicated(keep='last')].",
        )
    if not index.is_monotonic_increasing:
        values = index.asi8
        out_of_order = index[1:][values[1:] < values[:-1]]
        raise BarDataError(
            f"Bars are not sorted by time: {len(out_of_order)} bar(s) start before the bar above them, "
            f"at {_format_times(out_of_order[:_ROWS_SHOWN], len(out_of_order))}.",
            "Sort them: bars = bars.sort_index().",
        )


def _check_numeric(bars: pd.DataFrame) -> None:
    for column in OHLCV_COLUMNS:
        series = bars[column]
        if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
            as_numbers = pd.to_numeric(series, errors="coerce")
            bad = series.index[as_numbers.isna() & series.notna()]
            if len(bad):
                examples = ", ".join(repr(series.loc[time]) for time in bad[:3])
                detail = f"non-numeric values (e.g. {examples}) at {_format_times(bad[:_ROWS_SHOWN], len(bad))}"
            else:
                detail = "values that are numbers but stored as text/objects"
            raise BarDataError(
                f"Column '{column}' has dtype {series.dtype}, not a number type: it holds {detail}.",
                f"Fix or drop those rows, then convert: bars['{column}'] = bars['{column}'].astype(float).",
            )


def _check_values(bars: pd.DataFrame) -> None:
    for column in OHLCV_COLUMNS:
        values = bars[column].to_numpy(dtype=np.float64)
        _raise_for_rows(
            bars.index,
            np.isnan(values),
            f"Column '{column}' is missing (NaN) on",
            "Drop or fill those bars (e.g. re-request them from the data source); "
            "indicators cannot be computed through gaps.",
        )
        _raise_for_rows(
            bars.index,
            np.isinf(values),
            f"Column '{column}' is infinite on",
            "Drop or correct those bars.",
        )
        if column == "volume":
            _raise_for_rows(
                bars.index,
                values < 0,
                "Volume is negative on",
                "Volume must be >= 0; some sources send -1 for 'unknown': replace it with 0 or drop those bars.",
                bars[column],
            )
        else:
            _raise_for_rows(
                bars.index,
                values <= 0,
                f"Price column '{column}' is zero or negative on",
                "Prices must be > 0: drop or correct those bars.",
                bars[column],
            )


def _check_ohlc_consistency(bars: pd.DataFrame) -> None:
    open_, high, low, close = (bars[column].to_numpy(dtype=np.float64) for column in PRICE_COLUMNS)
    inconsistent = (low > high) | (open_ < low) | (open_ > high) | (close < low) | (close > high)
    if not inconsistent.any():
        return
    rows = np.flatnonzero(inconsistent)
    shown = [
        f"{_format_time(bars.index[row])} (open {open_[row]:g}, high {high[row]:g}, "
        f"low {low[row]:g}, close {close[row]:g})"
        for row in rows[:_ROWS_SHOWN]
    ]
    raise BarDataError(
        f"{len(rows)} bar(s) are inconsistent (need low <= open, close <= high): {_format_list(shown, len(rows))}.",
        "Check the column order (open, high, low, close) and the data source; drop or correct those bars.",
    )


def _raise_for_rows(
    index: pd.DatetimeIndex,
    bad: np.ndarray,
    problem_prefix: str,
    fix: str,
    values: pd.Series | None = None,
) -> None:
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    if values is None:
        shown = [_format_time(index[row]) for row in rows[:_ROWS_SHOWN]]
    else:
        shown = [f"{_format_time(index[row])} ({values.iloc[row]:g})" for row in rows[:_ROWS_SHOWN]]
    raise BarDataError(f"{problem_prefix} {len(rows)} bar(s): {_format_list(shown, len(rows))}.", fix)


def _is_utc(tz: dt.tzinfo) -> bool:
    return tz == dt.UTC or str(tz) in _UTC_NAMES


def _format_time(time: pd.Timestamp) -> str:
    return time.isoformat()


def _format_times(times: pd.Index, total: int) -> str:
    return _format_list([_format_time(time) for time in times], total)


def _format_list(items: list, total: int) -> str:
    text = ", ".join(map(str, items))
    return f"{text} and {total - len(items)} more" if total > len(items) else text
