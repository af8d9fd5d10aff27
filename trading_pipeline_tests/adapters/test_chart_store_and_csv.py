"""Chart stores against a real local folder and a real S3 server (moto in server mode on
loopback), and the CSV market data source."""

import hashlib
from datetime import UTC, datetime

import boto3
import pandas as pd
import pytest

from trading_pipeline.adapters.chart_store import LocalChartStore, chart_key
from trading_pipeline.adapters.market_data import CsvMarketData, marks_for
from trading_pipeline.core.strategies import TimeframeSettings
from trading_pipeline.errors import BarDataError

PNG = b"\x89PNG\r\n\x1a\n" + b"chart-bytes" * 100
AS_OF = datetime(2026, 11, 20, 21, 30, tzinfo=UTC)


def test_chart_key_is_stable_and_readable():
    assert chart_key("BRK.B", "1w", AS_OF) == "charts/BRK.B/1w/2026-11-20T213000Z.png"


def test_local_store_writes_atomically(tmp_path):
    stored = LocalChartStore(tmp_path).put_png(chart_key("AAPL", "1d", AS_OF), PNG)
    path = tmp_path / "charts/AAPL/1d/2026-11-20T213000Z.png"
    assert path.read_bytes() == PNG and stored.uri == path.resolve().as_uri()
    assert stored.sha256 == hashlib.sha256(PNG).hexdigest() and stored.size_bytes == len(PNG)
    assert not list(tmp_path.rglob("*.partial"))


def test_s3_store_creates_bucket_and_stores_png(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from trading_pipeline.graph.resources import ChartStoreResource

    store = ChartStoreResource(mode="s3", s3_bucket="charts-test", s3_prefix="prod",
                               s3_endpoint_url=s3_endpoint).store()
    stored = store.put_png(chart_key("AAPL", "1d", AS_OF), PNG)
    assert stored.uri == "s3://charts-test/prod/charts/AAPL/1d/2026-11-20T213000Z.png"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    head = client.head_object(Bucket="charts-test", Key="prod/charts/AAPL/1d/2026-11-20T213000Z.png")
    assert head["ContentType"] == "image/png" and head["Metadata"]["sha256"] == hashlib.sha256(PNG).hexdigest()
    assert store.get_png(stored.key) == PNG


def write_csv(folder, symbol, timeframe, rows):
    pd.DataFrame(rows, columns=["time", "open", "high", "low", "close", "volume"]).to_csv(
        folder / f"{symbol}_{timeframe}.csv", index=False)


def test_csv_source_drops_bars_not_closed_by_as_of(tmp_path):
    write_csv(tmp_path, "AAPL", "1d", [
        ("2026-11-18T14:30:00Z", 10, 11, 9, 10.5, 1000),
        ("2026-11-19T14:30:00Z", 10.5, 12, 10, 11.5, 1200),
        ("2026-11-20T14:30:00Z", 11.5, 12, 11, 11.8, 900),  # this session closes 21:00 UTC
        ("2026-11-23T14:30:00Z", 11.8, 12.5, 11.7, 12.2, 800),
    ])
    source = CsvMarketData(tmp_path)
    mid_session = source.fetch("AAPL", "1d", TimeframeSettings(period="1y"), datetime(2026, 11, 20, 18, 0, tzinfo=UTC))
    assert list(mid_session.index.strftime("%m-%d")) == ["11-18", "11-19"]
    after_close = source.fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert list(after_close["close"]) == [10.5, 11.5, 11.8]
    assert str(after_close.index.tz) == "UTC" and after_close.dtypes.unique().tolist() == ["float64"]


def test_csv_source_errors_name_the_file_and_fix(tmp_path):
    source = CsvMarketData(tmp_path)
    with pytest.raises(BarDataError, match="MSFT_1d.csv") as info:
        source.fetch("MSFT", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert "remove the symbol" in info.value.fix
    (tmp_path / "MSFT_1d.csv").write_text("date,o,h,l,c,v\n2026-01-02,1,1,1,1,1\n")
    with pytest.raises(BarDataError, match="lacks the column"):
        source.fetch("MSFT", "1d", TimeframeSettings(period="1y"), AS_OF)


def test_csv_date_only_rows_are_their_own_session_no_look_ahead(tmp_path):
    # Yahoo-style exports: a date, no time (00:00 UTC). Read naively, the bar of 11-20 would be
    # taken for the previous session's and used mid-session on 11-20, its final close included.
    write_csv(tmp_path, "AAPL", "1d", [("2026-11-18", 10, 11, 9, 10.5, 1000),
                                        ("2026-11-19", 10.5, 12, 10, 11.5, 1200),
                                        ("2026-11-20", 11.5, 12, 11, 11.8, 900)])
    source = CsvMarketData(tmp_path)
    mid_session = source.fetch("AAPL", "1d", TimeframeSettings(period="1y"),
                               datetime(2026, 11, 20, 15, 0, tzinfo=UTC))
    assert [str(t) for t in mid_session.index] == ["2026-11-18 14:30:00+00:00", "2026-11-19 14:30:00+00:00"]
    assert list(source.fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF)["close"]) == [10.5, 11.5, 11.8]


def test_csv_weekly_rows_anchor_at_the_weeks_first_session_and_wait_for_its_last(tmp_path):
    # 2026-11-23 is the Monday of Thanksgiving week: sessions Mon-Wed, Thu closed, Fri early close 18:00 UTC.
    write_csv(tmp_path, "AAPL", "1w", [("2026-11-16", 10, 11, 9, 10.5, 5000),
                                        ("2026-11-23", 10.5, 12, 10, 11.5, 4000)])
    source = CsvMarketData(tmp_path)
    during = source.fetch("AAPL", "1w", TimeframeSettings(period="2y"),
                          datetime(2026, 11, 27, 17, 59, tzinfo=UTC))
    assert [str(t) for t in during.index] == ["2026-11-16 14:30:00+00:00"]
    after = source.fetch("AAPL", "1w", TimeframeSettings(period="2y"),
                         datetime(2026, 11, 27, 18, 0, tzinfo=UTC))
    assert [str(t) for t in after.index] == ["2026-11-16 14:30:00+00:00", "2026-11-23 14:30:00+00:00"]


def test_csv_rows_on_days_without_a_session_are_named(tmp_path):
    write_csv(tmp_path, "AAPL", "1d", [("2026-11-25", 10, 11, 9, 10.5, 1000),
                                        ("2026-11-26", 10.5, 12, 10, 11.5, 1200)])  # Thanksgiving
    with pytest.raises(BarDataError, match=r"1 row\(s\) fall on no NYSE session \(2026-11-26\)") as info:
        CsvMarketData(tmp_path).fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF.replace(day=28))
    assert "holidays" in info.value.fix


def test_csv_path_that_is_a_directory_is_named_not_a_crash(tmp_path):
    (tmp_path / "AAPL_1d.csv").mkdir()
    with pytest.raises(BarDataError, match=r"AAPL_1d.csv is not a file") as info:
        CsvMarketData(tmp_path).fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert "AAPL_1d.csv" in info.value.fix


def test_csv_row_without_a_time_is_named_not_dropped(tmp_path):
    # An empty time cell became NaT, which the history filter dropped without a word: the
    # session's bar was silently missing (the gap check tolerates a few).
    write_csv(tmp_path, "AAPL", "1d", [("2026-11-18", 10, 11, 9, 10.5, 1000),
                                        (None, 10.5, 12, 10, 11.5, 1200),
                                        ("2026-11-20", 11.5, 12, 11, 11.8, 900)])
    with pytest.raises(BarDataError, match=r"AAPL_1d.csv: 1 row\(s\) have no time: row 2\nFix") as info:
        CsvMarketData(tmp_path).fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert "time" in info.value.fix


def test_csv_rows_out_of_time_order_are_named_not_dropped_or_reordered(tmp_path):
    # A mistyped year: the 2027 row was dropped as "not closed yet" and the 11-19 bar silently missing.
    write_csv(tmp_path, "AAPL", "1d", [("2026-11-18", 10, 11, 9, 10.5, 1000),
                                        ("2027-11-19", 10.5, 12, 10, 11.5, 1200),
                                        ("2026-11-20", 11.5, 12, 11, 11.8, 900)])
    source = CsvMarketData(tmp_path)
    with pytest.raises(BarDataError, match=r"AAPL_1d.csv: 1 row\(s\) are not in time order.*row 3 \(2026-11-20\)") \
            as info:
        source.fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert "oldest first" in info.value.fix
    # Newest first: the mark (the account's valuation) was the oldest row's close.
    write_csv(tmp_path, "MSFT", "1d", [("2026-11-20", 11.5, 12, 11, 11.8, 900),
                                        ("2026-11-19", 10.5, 12, 10, 11.5, 1200)])
    with pytest.raises(BarDataError, match=r"MSFT_1d.csv: 1 row\(s\) are not in time order"):
        source.fetch("MSFT", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert marks_for(source, ["MSFT"], AS_OF) == {}


def test_csv_two_rows_for_one_bar_are_named(tmp_path):
    # Daily rows in a weekly file: both became the week's bar (same start).
    write_csv(tmp_path, "AAPL", "1w", [("2026-11-09", 10, 11, 9, 10.5, 5000),
                                        ("2026-11-16", 10, 11, 9, 10.5, 1000),
                                        ("2026-11-17", 10.5, 12, 10, 11.5, 1200)])
    with pytest.raises(BarDataError, match=r"AAPL_1w.csv: 1 row\(s\) fall in the week of the row above them: "
                                           r"row 3 \(2026-11-17\)") as info:
        CsvMarketData(tmp_path).fetch("AAPL", "1w", TimeframeSettings(period="2y"), AS_OF)
    assert "another timeframe" in info.value.fix
    # A date-only row and a timed row of the same session.
    write_csv(tmp_path, "AAPL", "1d", [("2026-11-18", 10, 11, 9, 10.5, 1000),
                                        ("2026-11-18T14:30:00Z", 10.5, 12, 10, 11.5, 1200)])
    with pytest.raises(BarDataError, match=r"fall in the session of the row above them: row 2"):
        CsvMarketData(tmp_path).fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF)


def test_csv_bad_values_stop_the_source_itself_naming_the_file(tmp_path):
    # The bar checks run in the graph's market_bars and the backtest, but the account's marks and
    # the paper broker's fills read the source directly: a negative close became the mark.
    write_csv(tmp_path, "AAPL", "1d", [("2026-11-19", 10.5, 12, 10, 11.5, 1200),
                                        ("2026-11-20", 11.5, 12, 11, -11.8, 900)])
    source = CsvMarketData(tmp_path)
    with pytest.raises(BarDataError, match=r"AAPL_1d.csv: Price column 'close' is zero or negative") as info:
        source.fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert "AAPL_1d.csv" in info.value.fix
    assert marks_for(source, ["AAPL"], AS_OF) == {}
    # A thousands separator is text, not a missing value: name the cell as written.
    (tmp_path / "MSFT_1d.csv").write_text('time,open,high,low,close,volume\n2026-11-19,10,11,9,10.5,100\n'
                                          '2026-11-20,1000,"1,010.5",990,1000,100\n')
    with pytest.raises(BarDataError, match=r"MSFT_1d.csv: 1 cell\(s\) are not numbers: row 2 high '1,010.5'") \
            as info:
        source.fetch("MSFT", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert "thousands" in info.value.fix
    # Rows not closed by as_of are still dropped before the checks (an export of a session in progress).
    write_csv(tmp_path, "SPY", "1d", [("2026-11-19", 10.5, 12, 10, 11.5, 1200), ("2026-11-20", 11.5, 12, 11, None, 0)])
    assert len(source.fetch("SPY", "1d", TimeframeSettings(period="1y"), AS_OF.replace(hour=15))) == 1


def test_csv_rows_outside_the_exchange_calendar_say_so(tmp_path):
    # A backtest starting in 2001 reaches back into 1999 for its warm-up: those rows are not
    # weekends or holidays, as the message said, but before the calendar's first session.
    write_csv(tmp_path, "AAPL", "1d", [("1999-12-30", 10, 11, 9, 10.5, 1000),
                                        ("1999-12-31", 10, 11, 9, 10.5, 1000),
                                        ("2000-01-03", 10.5, 12, 10, 11.5, 1200)])
    with pytest.raises(BarDataError, match=r"2 row\(s\) fall outside the exchange calendar \(2000-01-01 to "
                                           r"2040-12-31\): row 1 \(1999-12-30\), row 2 \(1999-12-31\)") as info:
        CsvMarketData(tmp_path).fetch("AAPL", "1d", TimeframeSettings(period="2y"),
                                      datetime(2000, 6, 1, tzinfo=UTC))
    assert "start the backtest later" in info.value.fix
