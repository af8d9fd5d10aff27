"""The remembered ISO text of a time is the time's own, also for equal instants written differently."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pandas as pd

from trading_pipeline.core.market_calendar import isoformat


def test_each_time_keeps_its_own_text():
    utc = datetime(2024, 1, 2, 21, tzinfo=UTC)
    times = [utc, utc.astimezone(ZoneInfo("America/New_York")), utc.astimezone(ZoneInfo("UTC")), pd.Timestamp(utc),
             pd.Timestamp(utc) + pd.Timedelta(1, "ns")]
    ambiguous = datetime(2024, 11, 3, 1, 30, tzinfo=ZoneInfo("America/New_York"))  # equal, an hour apart
    times += [ambiguous, ambiguous.replace(fold=1)]
    for _ in range(2):  # written, then remembered
        assert [isoformat(t) for t in times] == [t.isoformat() for t in times]
