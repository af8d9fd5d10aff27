"""The market calendar's array lookups (is_open, next_open, opened_session, first_live_session)
answer exactly as exchange_calendars' own methods, on random instants and on every edge that
matters: opens, closes, early closes, holidays, weekends, DST changes, seconds inside a minute."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from trading_pipeline.core import fills, market_calendar


def calendar_answers(ts: datetime) -> tuple:
    """What the calendar says, through its own methods (the implementation before the arrays)."""
    cal = market_calendar.calendar()
    minute = pd.Timestamp(ts).tz_convert("UTC").floor("min")
    day = pd.Timestamp(pd.Timestamp(ts).tz_convert("America/New_York").date())
    session = day if cal.is_session(day) else None
    opened = session if session is not None and \
        cal.session_open(session) <= pd.Timestamp(ts) < cal.session_close(session) else None
    live = opened if opened is not None else \
        pd.Timestamp(cal.next_open(minute).tz_convert("America/New_York").date())
    return (bool(cal.is_open_on_minute(minute)), cal.next_open(minute), opened, live, cal.session_close(live))


def array_answers(ts: datetime) -> tuple:
    live, close = market_calendar.first_live_session(ts)
    assert fills.first_live_session(ts) == live and fills.expiry_of("DAY", ts) == close
    return (market_calendar.is_open(ts), market_calendar.next_open(ts), market_calendar.opened_session(ts),
            live, close)


def edge_instants() -> list[datetime]:
    schedule = market_calendar.calendar().schedule.loc["2019-01-01":"2026-06-30"]
    early_closes = schedule[(schedule["close"] - schedule["open"]) < pd.Timedelta(hours=6)]
    assert len(early_closes) >= 10  # the day after Thanksgiving, Christmas Eve, July 3rd...
    edges = []
    sampled = schedule.iloc[::37]
    for opens, closes in [*zip(sampled["open"], sampled["close"]), *zip(early_closes["open"], early_closes["close"])]:
        for moment in (opens, closes):
            moment = moment.to_pydatetime()
            edges += [moment + timedelta(seconds=s) for s in (-61, -60, -1, 0, 1, 59, 60)]
    # Weekends, holidays (Good Friday, Juneteenth, Christmas) and both DST changes of 2024.
    for day in ("2024-03-29", "2024-06-19", "2024-12-25", "2024-07-06", "2024-03-10", "2024-11-03",
                "2024-03-11", "2024-11-04"):
        edges += [pd.Timestamp(day, tz="America/New_York").to_pydatetime() + timedelta(hours=h) for h in range(24)]
    return edges


def test_lookups_equal_the_calendar_on_edges_and_random_instants():
    rng = np.random.default_rng(7)
    start = datetime(2005, 1, 1, tzinfo=UTC).timestamp()
    span = datetime(2026, 6, 30, tzinfo=UTC).timestamp() - start
    random = [datetime.fromtimestamp(start + span * x, UTC) for x in rng.random(1500)]
    instants = edge_instants() + random
    mismatches = [(ts, array_answers(ts), calendar_answers(ts)) for ts in instants
                  if array_answers(ts) != calendar_answers(ts)]
    assert not mismatches, mismatches[:3]


def test_pandas_timestamps_in_any_zone_are_the_same_instant():
    moment = pd.Timestamp("2024-07-03 16:59:30", tz="America/New_York")  # the early close is 13:00 ET
    assert array_answers(moment) == array_answers(moment.tz_convert("UTC").to_pydatetime()) \
        == calendar_answers(moment)
    assert market_calendar.is_open(pd.Timestamp("2024-07-03 12:59:59", tz="America/New_York"))
    assert not market_calendar.is_open(pd.Timestamp("2024-07-03 13:00:00", tz="America/New_York"))


def test_a_time_without_a_zone_is_refused():
    with pytest.raises(TypeError):
        market_calendar.is_open(datetime(2024, 7, 3, 15, 0))
    with pytest.raises(TypeError):
        market_calendar.is_open(pd.Timestamp("2024-07-03 15:00"))


def test_the_describe_text_of_the_next_open():
    assert market_calendar.describe_next_open(datetime(2024, 7, 3, 17, 30, tzinfo=UTC)) == "Fri 2024-07-05 09:30 EDT"


@pytest.mark.parametrize("moment, session", [
    (datetime(2024, 6, 5, 15, 0, tzinfo=UTC), "2024-06-04"),  # during a session: the one before
    (datetime(2024, 6, 5, 20, 0, tzinfo=UTC), "2024-06-05"),  # at its close
    (datetime(2024, 6, 9, 12, 0, tzinfo=UTC), "2024-06-07"),  # a Sunday: Friday
    (datetime(2024, 7, 3, 17, 0, tzinfo=UTC), "2024-07-03"),  # after an early close (13:00 in New York)
    (datetime(1999, 6, 1, tzinfo=UTC), None),  # before the calendar
])
def test_the_last_closed_session(moment, session):
    found = market_calendar.last_closed_session(moment)
    assert (found.date().isoformat() if found is not None else None) == session
