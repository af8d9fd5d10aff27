"""Exchange hours (XNYS via exchange_calendars): is the market open, when does it next open."""

from __future__ import annotations

import functools
from datetime import datetime

import pandas as pd

EXCHANGE = "XNYS"


@functools.lru_cache(maxsize=1)
def calendar():
    import exchange_calendars  # slow import: only when first needed

    return exchange_calendars.get_calendar(EXCHANGE, start="2000-01-01")


def _minute(ts: datetime) -> pd.Timestamp:
    return pd.Timestamp(ts).tz_convert("UTC").floor("min")


def is_open(ts: datetime) -> bool:
    return bool(calendar().is_open_on_minute(_minute(ts)))


def next_open(ts: datetime) -> pd.Timestamp:
    return calendar().next_open(_minute(ts))


def describe_next_open(ts: datetime) -> str:
    return next_open(ts).tz_convert("America/New_York").strftime("%a %Y-%m-%d %H:%M %Z")


def bar_close_times(index: pd.DatetimeIndex, timeframe: str) -> pd.Series:
    """When each bar (by its start time) closed: its session's close for 1d, the close of the
    last session of its calendar week for 1w. Bars outside the calendar get NaT."""
    cal = calendar()
    closes = cal.schedule["close"]
    opens = cal.schedule["open"]
    session_of = pd.Series(closes.values, index=opens.values)
    if timeframe == "1d":
        position = session_of.index.searchsorted(index, side="right") - 1
        result = pd.Series(pd.NaT, index=index, dtype="datetime64[ns, UTC]")
        valid = position >= 0
        result[valid] = session_of.values[position[valid]]
        return result
    if timeframe == "1w":
        week_start = closes.index.to_period("W-SUN")
        last_close_of_week = pd.Series(closes.values, index=week_start).groupby(level=0).max()
        weeks = index.tz_convert("America/New_York").tz_localize(None).to_period("W-SUN")
        return pd.Series(last_close_of_week.reindex(weeks).values, index=index)
    raise ValueError(f"unknown timeframe {timeframe!r}")
