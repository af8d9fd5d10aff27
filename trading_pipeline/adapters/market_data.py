"""Market data sources behind one interface: simulated (embedded), csv (a folder), ibkr.

Every source returns the same frame: UTC DatetimeIndex of bar starts named "time", float64
open/high/low/close/volume (shares), sorted, unique, only bars that had closed by `as_of`.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from trading_pipeline.core.frames import OHLCV_COLUMNS
from trading_pipeline.core.risk import Mark
from trading_pipeline.core.strategies import TimeframeSettings
from trading_pipeline.errors import BarDataError

logger = logging.getLogger(__name__)


class MarketDataSource(Protocol):
    """`fetch` must be safe to call from several threads when the source's `fetch_concurrency`
    (read with `fetch_concurrency(source)`; 1 when absent) is above 1. A source may also have
    `prefetch_contracts(symbols)`: one batched lookup before many fetches."""

    name: str

    def fetch(self, symbol: str, timeframe: str, history: TimeframeSettings, as_of: datetime) -> pd.DataFrame: ...


def fetch_concurrency(source: MarketDataSource) -> int:
    """How many fetches the source serves at once: 1 (one after the other) unless it says more."""
    return max(1, int(getattr(source, "fetch_concurrency", 1)))


def fetch_many(source: MarketDataSource, jobs: dict[str, tuple[str, str, TimeframeSettings]], as_of: datetime,
               pool: ThreadPoolExecutor) -> dict[str, Future]:
    """Start fetching every job {key: (symbol, timeframe, history)} on `pool` (sized by
    `fetch_concurrency`), after one batched contract lookup when the source has one; {key: Future}
    in `jobs` order, each giving that job's frame or raising its error. A failed batched lookup is
    only logged: each fetch then looks its contract up itself and fails, or not, on its own."""
    prefetch = getattr(source, "prefetch_contracts", None)
    if prefetch is not None:
        try:
            prefetch(sorted({symbol for symbol, _, _ in jobs.values()}))
        except Exception as error:  # noqa: BLE001 - each fetch reports its own contract's problem
            logger.warning("%s: the batched contract lookup failed (%s); each symbol is looked up on its own",
                           source.name, error)
    return {key: pool.submit(source.fetch, symbol, timeframe, history, as_of)
            for key, (symbol, timeframe, history) in jobs.items()}


def history_start(history: TimeframeSettings, as_of: datetime) -> pd.Timestamp:
    return pd.Timestamp(as_of).tz_convert("UTC") - timedelta(days=history.calendar_days())


class SimulatedMarketData:
    """Seeded, deterministic OHLCV on the NYSE calendar: no account, no network."""

    name = "simulated"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fetch(self, symbol: str, timeframe: str, history: TimeframeSettings, as_of: datetime) -> pd.DataFrame:
        from trading_pipeline.core.market_sim import simulate_bars

        return simulate_bars(symbol, timeframe, history_start(history, as_of), pd.Timestamp(as_of), seed=self.seed)


class CsvMarketData:
    """A folder of files named <SYMBOL>_<timeframe>.csv (e.g. AAPL_1d.csv) with a header row
    `time,open,high,low,close,volume`; `time` is the bar start (ISO 8601; naive means UTC; a
    date alone is fine), volume in shares. Bars are anchored like every source's (session open;
    a weekly bar at its week's first session open); a bar not closed by `as_of` is dropped."""

    name = "csv"

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def fetch(self, symbol: str, timeframe: str, history: TimeframeSettings, as_of: datetime) -> pd.DataFrame:
        from trading_pipeline.core.market_calendar import (
            CALENDAR_END,
            CALENDAR_START,
            bar_close_times,
            session_start_index,
        )

        path = self.folder / f"{symbol}_{timeframe}.csv"
        if not path.exists():
            raise BarDataError(
                f"no market data for {symbol} {timeframe}: {path} does not exist",
                f"add {path.name} to {self.folder} (columns time,open,high,low,close,volume), "
                "or remove the symbol from the strategies file",
            )
        if not path.is_file():
            raise BarDataError(f"{path} is not a file (a directory or a special file)",
                               f"replace {path.name} with the CSV file itself")
        try:
            raw = pd.read_csv(path)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise BarDataError(f"{path} is not a readable CSV ({exc})",
                               "export it again as comma-separated text with a header row") from None
        except OSError as exc:  # e.g. no permission to read it
            raise BarDataError(f"{path} cannot be read ({exc})",
                               f"make {path.name} readable by the user the pipeline runs as") from None
        missing = [c for c in ("time", *OHLCV_COLUMNS) if c not in raw.columns]
        if missing:
            raise BarDataError(f"{path} lacks the column(s) {', '.join(missing)}",
                               "the header must be time,open,high,low,close,volume")
        try:
            times = pd.to_datetime(raw["time"], utc=True, format="ISO8601")
        except (ValueError, TypeError) as exc:
            raise BarDataError(f"{path}: the time column has a value that is not an ISO time ({exc})",
                               "write times like 2026-11-20T14:30:00Z") from None
        no_time = np.flatnonzero(times.isna().to_numpy())
        if len(no_time):  # an empty cell: the row's bar cannot be placed, and must not vanish
            raise BarDataError(f"{path}: {len(no_time)} row(s) have no time: {_rows(no_time)}",
                               "fill in the time of those rows (counted from the first row after the header), "
                               "or remove them")
        labels = raw["time"].astype(str).to_numpy()
        stamps = pd.DatetimeIndex(times).asi8
        back = np.flatnonzero(stamps[1:] <= stamps[:-1]) + 1
        if len(back):  # sorting silently would hide a mistyped date; the history filter would drop it
            raise BarDataError(
                f"{path}: {len(back)} row(s) are not in time order (at or before the row above them): "
                f"{_rows(back, labels)}",
                "sort the rows by time, oldest first (some exports write newest first), with one row per bar, "
                "and check those rows for a mistyped date")
        frame = raw[list(OHLCV_COLUMNS)].apply(pd.to_numeric, errors="coerce").astype("float64")
        frame.index = pd.DatetimeIndex(times, name="time")
        kept = np.flatnonzero(frame.index >= history_start(history, as_of))
        frame = frame.iloc[kept]
        # One anchoring for every source: a date-only daily row (00:00 UTC) is that date's
        # session, not the previous one, so it is not used before its session has closed.
        starts = session_start_index(frame.index, timeframe)
        outside = np.flatnonzero((frame.index < pd.Timestamp(CALENDAR_START, tz="UTC"))
                                 | (frame.index >= pd.Timestamp(CALENDAR_END, tz="UTC") + timedelta(days=1)))
        if len(outside):
            raise BarDataError(
                f"{path}: {len(outside)} row(s) fall outside the exchange calendar ({CALENDAR_START} to "
                f"{CALENDAR_END}): {_rows(kept[outside], labels)}",
                f"remove those rows, or start the backtest later (its warm-up reaches that far back), or "
                f"shorten the strategy's {timeframe} period")
        unmatched = frame.index[starts.isna()]
        if len(unmatched):
            shown = ", ".join(str(t.date()) for t in unmatched[:5]) + (" …" if len(unmatched) > 5 else "")
            raise BarDataError(
                f"{path}: {len(unmatched)} row(s) fall on no NYSE session ({shown})",
                "remove rows for weekends and exchange holidays, or check the time column "
                "(a daily row's UTC date must be its session date)")
        same_bar = np.flatnonzero(starts.duplicated())  # rows are in order: the twin is the row above
        if len(same_bar):
            period = "session" if timeframe == "1d" else "week"
            raise BarDataError(
                f"{path}: {len(same_bar)} row(s) fall in the {period} of the row above them: "
                f"{_rows(kept[same_bar], labels)}",
                f"keep one row per {period} in a _{timeframe} file (is it a file of another timeframe, "
                "e.g. daily or intraday rows?)")
        frame.index = pd.DatetimeIndex(starts, name="time")
        closed = bar_close_times(frame.index, timeframe)
        as_of_ts = pd.Timestamp(as_of).tz_convert("UTC")
        is_closed = (closed <= as_of_ts).to_numpy()
        frame, rows = frame.loc[is_closed], kept[is_closed]
        # The bars are checked here too, not only by the graph's and the backtest's bar checks: the
        # account's marks and the paper broker's fills read this source directly.
        written = raw[list(OHLCV_COLUMNS)].iloc[rows]
        row_at, column_at = np.nonzero(frame.isna().to_numpy() & written.notna().to_numpy())
        if len(row_at):
            shown = ", ".join(f"row {rows[r] + 1} {OHLCV_COLUMNS[c]} {str(written.iat[r, c])!r}"
                              for r, c in zip(row_at[:5], column_at[:5], strict=True))
            raise BarDataError(
                f"{path}: {len(row_at)} cell(s) are not numbers: {shown}" + (" …" if len(row_at) > 5 else ""),
                "write plain numbers: a dot for decimals, no thousands separators or currency signs "
                "(e.g. 1010.5), in a comma-separated file")
        if len(frame):
            from trading_pipeline.core.bars import validate_bars

            try:
                validate_bars(frame)
            except BarDataError as error:
                raise BarDataError(f"{path}: {error.problem}",
                                   f"correct or remove those rows in {path.name} (times are bar starts in UTC): "
                                   f"{error.fix}") from None
        return frame


def _rows(positions, labels=None, shown: int = 5) -> str:
    """Data rows by their 1-based number after the header (blank lines not counted), each with
    its label (e.g. its time as written) when given: "row 2 (2026-11-19), row 5 and 3 more"."""
    parts = [f"row {position + 1}" + (f" ({labels[position]})" if labels is not None else "")
             for position in positions[:shown]]
    more = len(positions) - len(parts)
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


MARK_HISTORY = TimeframeSettings(period="1m")  # two closed sessions, even after a long holiday


def marks_from_daily_bars(bars: dict[str, pd.DataFrame], as_of: datetime) -> dict[str, Mark]:
    """Each symbol's mark at `as_of`: the close of its latest daily bar whose session had closed by
    then (a session in progress has no close yet), and the close of the session before it."""
    marks = {}
    for symbol, frame in bars.items():
        if frame.empty:
            continue
        from trading_pipeline.core import market_calendar  # exchange_calendars: only when used

        closes = market_calendar.bar_close_times(frame.index, "1d")
        closed = frame["close"][(pd.DatetimeIndex(closes) <= pd.Timestamp(as_of)).tolist()]
        if closed.empty:
            continue
        previous = float(closed.iloc[-2]) if len(closed) > 1 else None
        marks[symbol] = Mark(price=float(closed.iloc[-1]), previous_close=previous)
    return marks


def marks_for(source: MarketDataSource, symbols, as_of: datetime) -> dict[str, Mark]:
    """Each symbol's mark at `as_of`: the close of its latest daily bar closed by then and the
    close before it. A symbol whose data cannot be read (or has no bar) is left out and logged:
    the account then values that position at its average price and says so."""
    marks = {}
    for symbol in sorted(set(symbols)):
        try:
            frame = source.fetch(symbol, "1d", MARK_HISTORY, as_of)
        except Exception as error:  # noqa: BLE001 - one symbol's missing data must not hide the others' marks
            logger.warning("no mark for %s at %s: %s", symbol, as_of, error)
            continue
        mark = marks_from_daily_bars({symbol: frame}, as_of).get(symbol)
        if mark is None:
            logger.warning("no mark for %s at %s: no daily bar closed in the month before", symbol, as_of)
            continue
        marks[symbol] = mark
    return marks
