"""Calendar gaps: XNYS sessions (1d) or weeks (1w) with no bar between the first and the last bar."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from trading_pipeline.core.market_calendar import calendar, calendar_gaps, describe_gaps
from trading_pipeline.core.market_sim import simulate_bars

# 2023-06-01 .. 2024-12-31 holds Juneteenth, July 4th, Thanksgiving, Christmas, New Year, MLK,
# Presidents' Day, Good Friday, Memorial Day and Labor Day, and the early closes of 2023-07-03,
# 2023-11-24, 2024-07-03, 2024-11-29 and 2024-12-24.
START, AS_OF = pd.Timestamp("2023-06-01", tz="UTC"), pd.Timestamp("2025-01-01", tz="UTC")


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def bars(timeframe: str, symbol: str = "SPY") -> pd.DataFrame:
    return simulate_bars(symbol, timeframe, START, AS_OF)


def without(frame: pd.DataFrame, first_day: str, last_day: str | None = None) -> pd.DataFrame:
    """`frame` without the bars whose UTC date lies in first_day .. last_day."""
    days = frame.index.tz_convert("UTC").tz_localize(None).normalize()
    drop = (days >= pd.Timestamp(first_day)) & (days <= pd.Timestamp(last_day or first_day))
    assert drop.any(), "the test should remove at least one bar"
    return frame[~drop]


def bars_at(times: list[pd.Timestamp]) -> pd.DataFrame:
    n = len(times)
    return pd.DataFrame(
        {"open": np.full(n, 10.0), "high": 11.0, "low": 9.0, "close": 10.5, "volume": 100.0},
        index=pd.DatetimeIndex(times, name="time"),
    )


@pytest.fixture(scope="module")
def schedule() -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Series.values returning an ndarray")  # in exchange_calendars
        return calendar().schedule


# --------------------------------------------------------------------------- complete data


@pytest.mark.parametrize("timeframe", ["1d", "1w"])
def test_simulated_bars_have_no_gaps_across_holidays_and_early_closes(timeframe, schedule):
    frame = bars(timeframe)
    span = schedule.loc[str(frame.index[0].date()):str(frame.index[-1].date())]
    session_days = set(span.index.date)
    assert pd.Timestamp("2024-07-04").date() not in session_days  # a holiday inside the span
    assert pd.Timestamp("2024-03-29").date() not in session_days  # Good Friday
    early = span[span["close"] - span["open"] < pd.Timedelta(hours=6, minutes=30)]
    assert pd.Timestamp("2024-07-03") in early.index and pd.Timestamp("2024-11-29") in early.index

    assert calendar_gaps(frame, timeframe) == []


@pytest.mark.parametrize("timeframe", ["1d", "1w"])
def test_holiday_2024_07_04_is_not_a_gap(timeframe):
    frame = bars(timeframe)
    around = frame[(frame.index >= utc("2024-07-01")) & (frame.index < utc("2024-07-13"))]
    assert utc("2024-07-04 13:30") not in frame.index
    assert calendar_gaps(around, timeframe) == []
    if timeframe == "1d":
        assert [time.day for time in around.index] == [1, 2, 3, 5, 8, 9, 10, 11, 12]


def test_a_week_of_four_holiday_shortened_sessions_is_complete(schedule):
    # Labor Day week 2024: Tuesday to Friday. Good Friday week 2024: Monday to Thursday.
    for monday, sessions in (("2024-09-02", 4), ("2024-03-25", 4)):
        week = schedule.loc[monday:str(pd.Timestamp(monday) + pd.Timedelta(days=6))]
        assert len(week) == sessions

    daily, weekly = bars("1d"), bars("1w")
    assert utc("2024-09-03 13:30") in weekly.index  # that week's bar starts at Tuesday's open
    assert calendar_gaps(daily[(daily.index >= utc("2024-08-26")) & (daily.index < utc("2024-09-14"))], "1d") == []
    assert calendar_gaps(weekly[(weekly.index >= utc("2024-08-26")) & (weekly.index < utc("2024-09-14"))], "1w") == []


def test_bars_stamped_at_midnight_or_at_the_close_count_for_their_session(schedule):
    span = schedule.loc["2024-06-24":"2024-07-12"]
    at_midnight = bars_at(list(span.index.tz_localize("UTC")))
    at_close = bars_at(list(span["close"]))
    assert calendar_gaps(at_midnight, "1d") == []
    assert calendar_gaps(at_close, "1d") == []


# --------------------------------------------------------------------------- missing data


def test_a_removed_day_is_found_as_its_session_open_in_utc():
    frame = bars("1d")
    # Summer (EDT): 09:30 New York is 13:30 UTC; winter (EST): 14:30 UTC.
    assert calendar_gaps(without(frame, "2024-03-13"), "1d") == [utc("2024-03-13 13:30")]
    assert calendar_gaps(without(frame, "2024-01-17"), "1d") == [utc("2024-01-17 14:30")]


def test_a_removed_early_close_session_is_found():
    assert calendar_gaps(without(bars("1d"), "2024-07-03"), "1d") == [utc("2024-07-03 13:30")]


def test_several_removed_days_are_all_found_in_order():
    frame = without(without(bars("1d"), "2024-02-05"), "2023-10-10")
    frame = without(frame, "2024-11-25", "2024-11-29")  # Thanksgiving week: Mon-Wed and Friday
    assert calendar_gaps(frame, "1d") == [
        utc("2023-10-10 13:30"),
        utc("2024-02-05 14:30"),
        utc("2024-11-25 14:30"),
        utc("2024-11-26 14:30"),
        utc("2024-11-27 14:30"),
        utc("2024-11-29 14:30"),
    ]


def test_a_removed_week_is_found_as_the_open_of_its_first_session():
    weekly = bars("1w")
    assert calendar_gaps(without(weekly, "2024-03-11", "2024-03-17"), "1w") == [utc("2024-03-11 13:30")]
    # A holiday-shortened week that is missing is named by its first session: the Tuesday.
    assert calendar_gaps(without(weekly, "2024-09-02", "2024-09-08"), "1w") == [utc("2024-09-03 13:30")]


def test_a_removed_week_of_daily_bars_is_found_day_by_day():
    gaps = calendar_gaps(without(bars("1d"), "2024-03-11", "2024-03-15"), "1d")
    assert gaps == [utc(f"2024-03-{day} 13:30") for day in (11, 12, 13, 14, 15)]


def test_only_the_span_between_the_first_and_the_last_bar_counts():
    frame = bars("1d")
    inside = frame[(frame.index >= utc("2024-05-01")) & (frame.index < utc("2024-06-01"))]
    assert calendar_gaps(inside, "1d") == []  # nothing before May or after May is "missing"
    assert calendar_gaps(inside.iloc[[0]], "1d") == []
    assert calendar_gaps(inside.iloc[[0, -1]], "1d") == list(inside.index[1:-1])


def test_a_weekly_frame_with_a_daily_bar_per_week_is_complete_but_not_as_daily():
    weekly = bars("1w")
    assert calendar_gaps(weekly, "1w") == []
    assert len(calendar_gaps(weekly, "1d")) > 300  # four of every five sessions have no bar


# --------------------------------------------------------------------------- edges and text


def test_empty_frame_has_no_gaps():
    assert calendar_gaps(bars("1d").iloc[:0], "1d") == []


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="timeframe"):
        calendar_gaps(bars("1d"), "1h")
    naive = bars("1d").tz_localize(None)
    with pytest.raises(ValueError, match="timezone-aware"):
        calendar_gaps(naive, "1d")


def test_describe_gaps():
    gaps = [utc("2024-07-03 13:30"), utc("2024-07-05 13:30")]
    assert describe_gaps([]) == "none"
    assert describe_gaps(gaps) == "2 missing: Wed 2024-07-03, Fri 2024-07-05"
    assert describe_gaps(gaps, limit=1) == "2 missing: Wed 2024-07-03 and 1 more"
    assert describe_gaps(gaps, limit=0) == "2 missing"
    assert describe_gaps([utc("2024-01-17 14:30")]) == "1 missing: Wed 2024-01-17"  # winter open
    many = calendar_gaps(without(bars("1d"), "2024-03-11", "2024-03-22"), "1d")
    assert describe_gaps(many) == (
        "10 missing: Mon 2024-03-11, Tue 2024-03-12, Wed 2024-03-13, Thu 2024-03-14, Fri 2024-03-15 and 5 more"
    )
