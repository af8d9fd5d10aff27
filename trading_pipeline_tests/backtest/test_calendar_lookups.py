"""The calendar lookups the decision step makes per decision (sped up for the backtest) answer as
the pandas forms do: one bar's close, and how many sessions or weeks closed in a window."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from trading_pipeline.core import market_calendar


def test_one_bars_close_and_periods_closed_match_the_pandas_answers():
    schedule = market_calendar.calendar().schedule
    closes = pd.DatetimeIndex(schedule["close"]).tz_convert("UTC")
    rng = np.random.default_rng(3)
    moments = pd.DatetimeIndex(pd.to_datetime(rng.integers(pd.Timestamp("1999-06-01").value,
                                                           pd.Timestamp("2027-06-01").value, 600), utc=True))
    moments = moments.floor("s").append(pd.DatetimeIndex(schedule["open"]).tz_convert("UTC")[::97])
    for timeframe in ("1d", "1w"):
        expected = market_calendar.bar_close_times(moments, timeframe)
        for moment, close in zip(moments, expected, strict=True):
            got = market_calendar.bar_close_time(moment.to_pydatetime(), timeframe)
            assert (got is None) if pd.isna(close) else got == close
    week_closes = pd.Series(closes, index=pd.DatetimeIndex(schedule.index).to_period("W-SUN")).groupby(level=0).max()
    for after, until in itertools.pairwise(moments[:201]):
        assert market_calendar.periods_closed_between(after, until, "1d") == int(((closes > after) & (closes <= until)).sum())
        assert market_calendar.periods_closed_between(after, until, "1w") == \
            int(((week_closes > after) & (week_closes <= until)).sum())
