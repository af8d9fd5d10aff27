"""Bars for a backtest: the same market data sources as the live graph (simulated, csv, ibkr),
asked once per symbol and timeframe for the whole window plus its warm-up.

IBKR history is kept in a local cache (`HistoryCache`): a second backtest of the same window
reads the files and sends no history request. The simulated market and CSV files are local
already and are read directly.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from trading_pipeline.adapters.market_data import (
    CsvMarketData,
    MarketDataSource,
    SimulatedMarketData,
    fetch_concurrency,
    fetch_many,
)
from trading_pipeline.core import market_calendar
from trading_pipeline.core.frames import OHLCV_COLUMNS, TIMEFRAMES
from trading_pipeline.core.strategies import TimeframeSettings
from trading_pipeline.errors import BarDataError
from trading_pipeline.workers import worker_pool

# Calendar days per bar, generously: 252 sessions in 365 days, and holidays.
_DAYS_PER_BAR = {"1d": 1.6, "1w": 7.3}


@dataclass(frozen=True)
class Window:
    """The sessions a backtest decides on: from the first session on or after `start` to the last
    on or before `end`; `as_of` is the last session's close (no bar after it is read)."""

    first_session: pd.Timestamp
    last_session: pd.Timestamp
    first_open: pd.Timestamp
    as_of: pd.Timestamp

    @classmethod
    def of(cls, start: date, end: date) -> Window:
        calendar = market_calendar.calendar()
        sessions = calendar.sessions_in_range(pd.Timestamp(start), pd.Timestamp(end))
        if len(sessions) == 0:
            raise BarDataError(f"no NYSE session between {start} and {end}",
                               "choose a window that contains trading days")
        first, last = sessions[0], sessions[-1]
        return cls(first, last, calendar.session_open(first), calendar.session_close(last))


def history_settings(window: Window, start: date, timeframe: str, warmup_bars: int) -> TimeframeSettings:
    """A history period covering the window and its warm-up. The window may be longer than one
    strategy's period allows (IBKR's own limits still apply to an IBKR request)."""
    days = (window.as_of.date() - start).days + warmup_bars * _DAYS_PER_BAR[timeframe] + 30
    return TimeframeSettings.model_construct(period=f"{math.ceil(days / 365)}y")


def source_for(data: str, *, seed: int = 0, csv_dir: str | None = None) -> MarketDataSource:
    """The local sources by name; an IBKR source needs a gateway client and is passed in."""
    if data == "simulated":
        return SimulatedMarketData(seed=seed)
    if data == "csv":
        return CsvMarketData(Path(csv_dir or "."))
    raise ValueError(f"data source {data!r} is built by the caller (it needs a connection)")


def load_bars(source: MarketDataSource, symbols: list[str], start: date, window: Window,
              warmup_bars: int) -> dict[str, dict[str, pd.DataFrame]]:
    """By symbol and timeframe: `warmup_bars` bars before the window's first session, then every
    bar closed by the window's last close. Raises BarDataError when the warm-up is not there."""
    as_of = window.as_of.to_pydatetime()
    jobs = {f"{symbol}|{timeframe}": (symbol, timeframe, history_settings(window, start, timeframe, warmup_bars))
            for symbol in symbols for timeframe in TIMEFRAMES}
    # IBKR: its history requests in flight at once (a first backtest of 20 symbols over 10 years asks
    # ~100 pages); the local sources one after the other.
    with worker_pool(fetch_concurrency(source), "backtest-bars") as pool:
        fetched = fetch_many(source, jobs, as_of, pool) if pool is not None else {}
        bars: dict[str, dict[str, pd.DataFrame]] = {}
        for key, (symbol, timeframe, history) in jobs.items():
            frame = fetched[key].result() if key in fetched else source.fetch(symbol, timeframe, history, as_of)
            bars.setdefault(symbol, {})[timeframe] = _with_warmup(frame, symbol, timeframe, source.name, window,
                                                                  warmup_bars)
        return bars


def _with_warmup(frame: pd.DataFrame, symbol: str, timeframe: str, source_name: str, window: Window,
                 warmup_bars: int) -> pd.DataFrame:
    """`frame` from `warmup_bars` bars before the window's first session on; BarDataError if it has fewer."""
    before = int((frame.index < window.first_open).sum())
    if before < warmup_bars:
        first = frame.index[0].date() if len(frame) else "none"
        raise BarDataError(
            f"{symbol} {timeframe}: only {before} bars before {window.first_session.date()} from "
            f"{source_name} (first bar {first}); the warm-up needs {warmup_bars}",
            "start the backtest later, or lower warmup_bars (at least 210: SMA 200 needs 200 bars)")
    return frame.iloc[before - warmup_bars:]


def data_digest(bars: dict[str, dict[str, pd.DataFrame]]) -> str:
    """sha256 over every bar (times and OHLCV) the backtest reads: part of the run's key."""
    digest = hashlib.sha256()
    for symbol in sorted(bars):
        for timeframe in sorted(bars[symbol]):
            frame = bars[symbol][timeframe]
            digest.update(f"{symbol}|{timeframe}|{len(frame)}|".encode())
            digest.update(np.ascontiguousarray(frame.index.as_unit("ns").asi8).tobytes())
            digest.update(np.ascontiguousarray(frame[list(OHLCV_COLUMNS)].to_numpy(np.float64)).tobytes())
    return digest.hexdigest()


class HistoryCache:
    """A market data source whose answers are kept as CSV files in `folder`, keyed by source,
    symbol, timeframe, period and as_of: asking again reads the file, not the source. Only
    windows that have fully closed are asked for (a backtest's as_of is a past close), so an
    answer never changes and is kept for good; delete the folder to fetch again."""

    def __init__(self, source: MarketDataSource, folder: Path):
        self.source = source
        self.folder = Path(folder)
        self.name = source.name
        self.fetch_concurrency = fetch_concurrency(source)  # reading a kept answer is as safe in threads
        self.hits = 0
        self.misses = 0
        self._count = threading.Lock()

    def path_for(self, symbol: str, timeframe: str, history: TimeframeSettings, as_of: datetime) -> Path:
        """The file of one answer. A source whose bars depend on more than these (IBKR: the listing
        and the volume factor its settings choose) says so with `cache_key(symbol)`, part of the name:
        after a change there, the answer kept for the old setting is not read as the new one's."""
        stamp = pd.Timestamp(as_of).tz_convert("UTC").strftime("%Y%m%dT%H%M%SZ")
        safe_symbol = re.sub(r"[^A-Za-z0-9.]", "_", symbol)
        key = getattr(self.source, "cache_key", None)
        setting = "" if key is None else "_" + re.sub(r"[^A-Za-z0-9.-]", "_", key(symbol))
        return self.folder / f"{self.source.name}_{safe_symbol}{setting}_{timeframe}_{history.period}_{stamp}.csv"

    def fetch(self, symbol: str, timeframe: str, history: TimeframeSettings, as_of: datetime) -> pd.DataFrame:
        path = self.path_for(symbol, timeframe, history, as_of)
        if path.exists():
            with self._count:
                self.hits += 1
            frame = pd.read_csv(path, index_col="time")
            frame.index = pd.DatetimeIndex(pd.to_datetime(frame.index, utc=True, format="ISO8601"), name="time")
            frame.index = frame.index.as_unit("ns")
            return frame[list(OHLCV_COLUMNS)].astype("float64")
        with self._count:
            self.misses += 1
        frame = self.source.fetch(symbol, timeframe, history, as_of)
        frame.index = frame.index.as_unit("ns")  # as a cached answer reads back
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        frame.to_csv(partial, index_label="time", float_format="%.17g")
        partial.replace(path)  # whole files only: a crash mid-write leaves no half answer
        return frame
