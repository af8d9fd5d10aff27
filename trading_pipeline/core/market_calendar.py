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
    last session of its calendar week for 1w. Bars before the calendar's first session get NaT."""
    schedule = calendar().schedule
    opens = pd.DatetimeIndex(schedule["open"]).tz_convert("UTC")
    closes = pd.DatetimeIndex(schedule["close"]).tz_convert("UTC")
    index = pd.DatetimeIndex(index).tz_convert("UTC")
    if timeframe == "1d":
        position = opens.searchsorted(index, side="right") - 1
        values = [closes[p] if p >= 0 else pd.NaT for p in position]
    elif timeframe == "1w":
        weeks = pd.Series(closes, index=schedule.index.to_period("W-SUN")).groupby(level=0).max()
        bar_weeks = index.tz_convert("America/New_York").tz_localize(None).to_period("W-SUN")
        values = [weeks.get(week, pd.NaT) for week in bar_weeks]
    else:
        raise ValueError(f"unknown timeframe {timeframe!r}")
    return pd.Series(pd.DatetimeIndex(values, tz="UTC"), index=index)


# --- When the automation fires (pure: give it a time, it says which session, if any) -------------

def session_on(ts: datetime) -> pd.Timestamp | None:
    """The XNYS session on the New York date of `ts`, or None on weekends and holidays."""
    day = pd.Timestamp(ts).tz_convert("America/New_York").date()
    label = pd.Timestamp(day)
    return label if calendar().is_session(label) else None


def closed_session(ts: datetime) -> pd.Timestamp | None:
    """The session of `ts`'s New York date if it has closed by `ts` (early closes included)."""
    session = session_on(ts)
    if session is None or pd.Timestamp(ts) < calendar().session_close(session):
        return None
    return session


def is_last_session_of_week(session: pd.Timestamp) -> bool:
    following = calendar().next_session(session)
    return following.isocalendar()[:2] != session.isocalendar()[:2]


def opened_session(ts: datetime) -> pd.Timestamp | None:
    """The session that is open at `ts`, or None when the market is closed."""
    session = session_on(ts)
    if session is None:
        return None
    cal = calendar()
    moment = pd.Timestamp(ts)
    return session if cal.session_open(session) <= moment < cal.session_close(session) else None
