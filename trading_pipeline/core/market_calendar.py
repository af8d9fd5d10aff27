"""Exchange hours (XNYS via exchange_calendars): is the market open, when does it next open."""

from __future__ import annotations

import functools
import warnings
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

EXCHANGE = "XNYS"
# Through the simulated market's last session (market_sim.LAST_SESSION), which uses this same
# calendar: one build per process (0.2-0.9 s each here), not two.
CALENDAR_START, CALENDAR_END = "2000-01-01", "2040-12-31"


@functools.lru_cache(maxsize=1)
def calendar():
    import exchange_calendars  # slow import: only when first needed

    with warnings.catch_warnings():
        # exchange_calendars' own use of a pandas API deprecated in pandas 3.1; not actionable here.
        warnings.filterwarnings("ignore", message="Series.values returning an ndarray")
        return exchange_calendars.get_calendar(EXCHANGE, start=CALENDAR_START, end=CALENDAR_END)


def _minute(ts: datetime) -> pd.Timestamp:
    return pd.Timestamp(ts).tz_convert("UTC").floor("min")


# is_open, next_open and the session lookups below are binary searches in the schedule's arrays
# (the decision step asks them per decision, the backtest per session: exchange_calendars' own
# methods cost 20-40 µs a call). Outside the schedule's range they defer to the calendar, which
# answers or raises as it always did; a test compares both over random and edge minutes.

def _in_schedule(moment_ns: int) -> bool:
    opens, closes, _, _ = _schedule_ns()
    return int(opens[0]) <= moment_ns < int(closes[-1])


def _last_open_at(moment_ns: int) -> int:
    """Index of the last session that opened at or before `moment_ns` (-1: none)."""
    return int(_schedule_ns()[0].searchsorted(moment_ns, side="right")) - 1


def is_open(ts: datetime) -> bool:
    minute = _ns(ts) // _NS_PER_MINUTE * _NS_PER_MINUTE
    if not _in_schedule(minute):
        return bool(calendar().is_open_on_minute(_minute(ts)))
    position = _last_open_at(minute)
    return position >= 0 and minute < int(_schedule_ns()[1][position])


def next_open(ts: datetime) -> pd.Timestamp:
    """The first session open after `ts`'s minute (the next session's when it is a trading minute)."""
    minute = _ns(ts) // _NS_PER_MINUTE * _NS_PER_MINUTE
    opens = _schedule_ns()[0]
    position = _last_open_at(minute) + 1
    if not _in_schedule(minute) or position >= len(opens):
        return calendar().next_open(_minute(ts))
    return pd.Timestamp(int(opens[position]), tz="UTC")


def describe_next_open(ts: datetime) -> str:
    moment = next_open(ts).to_pydatetime().astimezone(_NEW_YORK)  # zoneinfo: EDT/EST as pandas says
    return moment.strftime("%a %Y-%m-%d %H:%M %Z")


def bar_close_times(index: pd.DatetimeIndex, timeframe: str) -> pd.Series:
    """When each bar (by its start time) closed: its session's close for 1d, the close of the
    last session of its calendar week for 1w. Bars before the calendar's first session get NaT."""
    index = pd.DatetimeIndex(index).tz_convert("UTC")
    opens, closes, weeks, week_closes = _schedule_ns()
    if timeframe == "1d":
        position = np.searchsorted(opens, index.as_unit("ns").asi8, side="right") - 1
        values = np.where(position >= 0, closes[np.maximum(position, 0)], _NAT)
    elif timeframe == "1w":
        values = _lookup(weeks, week_closes, _week_numbers(index))
    else:
        raise ValueError(f"unknown timeframe {timeframe!r}")
    return pd.Series(pd.DatetimeIndex(values.view("M8[ns]"), tz="UTC"), index=index)


@functools.lru_cache(maxsize=4096)  # pure; a backtest asks for the same bars once per symbol
def bar_close_time(start: datetime, timeframe: str) -> datetime | None:
    """`bar_close_times` of one bar start, without building pandas objects (the decision step
    asks this twice per decision; a backtest makes tens of thousands): None where that gives NaT."""
    opens, closes, weeks, week_closes = _schedule_ns()
    if timeframe == "1d":
        position = int(opens.searchsorted(_ns(start), side="right")) - 1
        value = int(closes[position]) if position >= 0 else _NAT
    elif timeframe == "1w":
        local_day = start.astimezone(_NEW_YORK).date().toordinal() - _EPOCH_ORDINAL
        week = (local_day + 3) // 7
        position = min(int(weeks.searchsorted(week)), len(weeks) - 1)
        value = int(week_closes[position]) if weeks[position] == week else _NAT
    else:
        raise ValueError(f"unknown timeframe {timeframe!r}")
    return None if value == _NAT else _EPOCH + timedelta(microseconds=value // 1000)


def isoformat(moment: datetime) -> str:
    """`moment.isoformat()`, remembered: a zoneinfo time writes its offset slowly (~2-4 µs) and a
    backtest writes each session's time for every symbol. Keyed by the time, its type, tzinfo and
    fold, so that equal instants written differently (another zone, a Timestamp) never share a text."""
    return _isoformat(moment, type(moment), moment.tzinfo, moment.fold)


@functools.lru_cache(maxsize=8192)
def _isoformat(moment: datetime, kind: type, tzinfo, fold: int) -> str:
    return moment.isoformat()


def _ns(moment: datetime) -> int:
    if isinstance(moment, pd.Timestamp):
        if moment.tzinfo is None:
            raise TypeError(f"a point in time needs a timezone: {moment}")
        return moment.value  # nanoseconds since the epoch (UTC), whatever the unit and zone
    return (moment - _EPOCH) // _MICROSECOND * 1000


_NAT = np.iinfo(np.int64).min
_NS_PER_DAY = 86_400 * 10**9
_NS_PER_MINUTE = 60 * 10**9
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NEW_YORK = ZoneInfo("America/New_York")


def _week_numbers(index: pd.DatetimeIndex) -> np.ndarray:
    """Monday-to-Sunday calendar week of each time's New York date (weeks since the one of 1970-01-01)."""
    local = index.tz_convert("America/New_York").tz_localize(None).as_unit("ns").asi8
    return (local // _NS_PER_DAY + 3) // 7  # 1970-01-01 was a Thursday: +3 starts weeks on Monday


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values[k] for each wanted key found in the sorted `keys`, NaT where absent."""
    position = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.where(keys[position] == wanted, values[position], _NAT)


@functools.lru_cache(maxsize=1)
def _schedule_ns() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """XNYS session opens and closes (UTC, int64 ns, ascending), the calendar weeks that have a
    session and each week's last close: plain arrays, so a lookup is a binary search (the
    backtest asks for every session of years of history)."""
    schedule = calendar().schedule
    opens = pd.DatetimeIndex(schedule["open"]).tz_convert("UTC").as_unit("ns").asi8
    closes = pd.DatetimeIndex(schedule["close"]).tz_convert("UTC").as_unit("ns").asi8
    session_days = pd.DatetimeIndex(schedule.index).tz_localize(None).as_unit("ns").asi8 // _NS_PER_DAY
    session_weeks = (session_days + 3) // 7
    last_of_week = np.flatnonzero(np.append(session_weeks[1:] != session_weeks[:-1], True))
    return opens, closes, session_weeks[last_of_week], closes[last_of_week]


@functools.lru_cache(maxsize=1)
def _session_opens() -> pd.Series:
    """XNYS session opens (UTC) by session date; computed once per process."""
    schedule = calendar().schedule
    opens = pd.DatetimeIndex(schedule["open"]).tz_convert("UTC")
    dates = pd.DatetimeIndex(schedule.index).tz_localize(None).normalize()
    return pd.Series(opens, index=dates)


@functools.lru_cache(maxsize=1)
def _week_first_opens() -> pd.Series:
    opens = _session_opens()
    return opens.groupby(opens.index.to_period("W-SUN")).min()


def session_start_index(index: pd.DatetimeIndex, timeframe: str) -> pd.DatetimeIndex:
    """Map a source's bar times to our bar starts: the XNYS session open (1d) or the open of
    the week's first session (1w). NaT where no session matches. Every source goes through
    this, so a bar's start (and hence when it closed) never depends on how a source stamps it.

    1d: the bar's UTC date is its session date, whatever time of day the source uses: IBKR
        stamps a daily RTH bar with the session open (e.g. 14:30 UTC); a CSV export often has
        the date only (00:00 UTC), which must not be read as the previous session's bar (that
        would let a bar be used before its session closed: look-ahead).
    1w: IBKR's anchor for weekly bars is not documented. Monthly bars carry 00:00 UTC of the
        period's first day (ibind's recorded fixture: t=1698796800000 = 2023-11-01T00:00Z), so a
        weekly `t` is expected at the week's start (Sunday or Monday 00:00 UTC) or at its first
        session's open. As `t` is a bar *start*, a weekend date begins the following trading
        week and any weekday belongs to its own Mon-Fri week; both map to that week's first
        session open, which is where the simulated market puts a weekly bar too.
    """
    opens = _session_opens()
    dates = pd.DatetimeIndex(index).tz_convert("UTC").tz_localize(None).normalize()
    if timeframe == "1d":
        return pd.DatetimeIndex(opens.reindex(dates).to_numpy(), tz="UTC") if len(dates) else \
            pd.DatetimeIndex([], tz="UTC")
    if timeframe != "1w":
        raise ValueError(f"unknown timeframe {timeframe!r}")
    weekend = dates.day_of_week >= 5
    rolled = dates + pd.to_timedelta((7 - dates.day_of_week) * weekend, unit="D")
    first_open = _week_first_opens()
    periods = rolled.to_period("W-SUN")
    return pd.DatetimeIndex([first_open.get(p, pd.NaT) for p in periods], tz="UTC")


@functools.lru_cache(maxsize=4096)  # pure; a backtest asks for the same window once per symbol
def periods_closed_between(after: datetime, until: datetime, timeframe: str) -> int:
    """How many sessions (1d) or trading weeks (1w, at their last session's close) closed in
    the window (after, until]."""
    _, closes, _, week_closes = _schedule_ns()
    if timeframe == "1w":
        closes = week_closes
    elif timeframe != "1d":
        raise ValueError(f"unknown timeframe {timeframe!r}")
    return max(0, int(closes.searchsorted(_ns(until), side="right") - closes.searchsorted(_ns(after), side="right")))


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


def last_closed_session(ts: datetime) -> pd.Timestamp | None:
    """The last session whose close is at or before `ts` (early closes included), or None before
    the calendar's first close."""
    position = int(_schedule_ns()[1].searchsorted(_ns(ts), side="right")) - 1
    return _session_label(position) if position >= 0 else None


def is_last_session_of_week(session: pd.Timestamp) -> bool:
    following = calendar().next_session(session)
    return following.isocalendar()[:2] != session.isocalendar()[:2]


def opened_session(ts: datetime) -> pd.Timestamp | None:
    """The session that is open at `ts`, or None when the market is closed."""
    moment = _ns(ts)
    if not _in_schedule(moment):
        session = session_on(ts)
        cal = calendar()
        return session if session is not None and \
            cal.session_open(session) <= pd.Timestamp(ts) < cal.session_close(session) else None
    position = _last_open_at(moment)
    return _session_label(position) if position >= 0 and moment < int(_schedule_ns()[1][position]) else None


def first_live_session(ts: datetime) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The session in progress at `ts`, else the next one (an order placed after Friday's close
    first works on Monday, or in the session after a holiday): its label and its close (UTC)."""
    moment = _ns(ts)
    if not _in_schedule(moment):
        session = opened_session(ts) or session_on(next_open(ts))
        return session, calendar().session_close(session)
    position = _last_open_at(moment)
    if position < 0 or moment >= int(_schedule_ns()[1][position]):
        position += 1
    return _session_label(position), pd.Timestamp(int(_schedule_ns()[1][position]), tz="UTC")


def _session_label(position: int) -> pd.Timestamp:
    return _session_labels()[position]


@functools.lru_cache(maxsize=1)
def _session_labels() -> list[pd.Timestamp]:
    return list(calendar().schedule.index)


GAP_TIMEFRAMES = ("1d", "1w")


def calendar_gaps(bars: pd.DataFrame, timeframe: str) -> list[pd.Timestamp]:
    """The XNYS periods between the first and the last bar (both included) that have no bar.

    "1d": every session is a period; a missing one is given as its open time in UTC, which is how
    daily bars are stamped (e.g. 2024-07-03 13:30 UTC; an early close does not change the open).
    "1w": every calendar week (Monday to Sunday) with at least one session is a period; a missing
    one is given as the open of its first session, as weekly bars are stamped (e.g. the Tuesday
    after Labor Day). Holidays and weekends are never gaps, and a week shortened by a holiday is
    complete with the bar of its remaining sessions.

    A bar counts for the session, or the week, of its UTC date: XNYS opens at 13:30 or 14:30 UTC,
    so bars stamped at the open, at the close or at midnight of the session date all match. Bars
    on days without a session are ignored. Periods outside the calendar's range (from 2000, to
    about a year ahead) are not judged. Returns the gaps sorted, [] for a frame without bars.
    Raises ValueError for an unknown timeframe or a timezone-naive index.
    """
    if timeframe not in GAP_TIMEFRAMES:
        raise ValueError(f"timeframe must be one of {GAP_TIMEFRAMES}, got {timeframe!r}")
    index = pd.DatetimeIndex(bars.index)
    if index.tz is None:
        raise ValueError("bars need a timezone-aware index (bar start times in UTC) to be placed on the calendar")
    if len(index) == 0:
        return []
    days = index.tz_convert("UTC").tz_localize(None).normalize()
    schedule = calendar().schedule
    sessions = pd.DatetimeIndex(schedule.index)  # session dates, tz-naive
    opens = pd.DatetimeIndex(schedule["open"]).tz_convert("UTC")
    if timeframe == "1d":
        expected = (sessions >= days.min()) & (sessions <= days.max())
        missing = expected & ~sessions.isin(days)
    else:
        weeks = sessions.to_period("W-SUN")
        bar_weeks = days.to_period("W-SUN")
        first_session_of_week = ~weeks.duplicated()  # sessions are sorted
        expected = first_session_of_week & (weeks >= bar_weeks.min()) & (weeks <= bar_weeks.max())
        missing = expected & ~weeks.isin(bar_weeks)
    return list(opens[missing])


def describe_gaps(gaps: list[pd.Timestamp], limit: int = 5) -> str:
    """One line for people: "none", or how many periods are missing and the first `limit` of them
    by their New York date, e.g. "2 missing: Wed 2024-07-03, Fri 2024-07-05"."""
    if not gaps:
        return "none"
    shown = [pd.Timestamp(gap).tz_convert("America/New_York").strftime("%a %Y-%m-%d") for gap in gaps[: max(limit, 0)]]
    text = f"{len(gaps)} missing"
    if shown:
        text += ": " + ", ".join(shown)
        if len(gaps) > len(shown):
            text += f" and {len(gaps) - len(shown)} more"
    return text
