"""Contracts, history (validation, paging, normalization, volume units), error bodies, 429 backoff,
pacing under concurrency, and the snapshot pre-flight, against the emulator over HTTP."""

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from trading_pipeline.adapters.ibkr import history as hist
from trading_pipeline.adapters.ibkr.client import parse_number
from trading_pipeline.adapters.ibkr.errors import (
    IBKRConfigError,
    IBKRContractError,
    IBKRHistoryRequestError,
    IBKRRateLimited,
    IBKRRequestError,
)
from trading_pipeline.adapters.ibkr.market_data import IBKRMarketData
from trading_pipeline.adapters.ibkr.pacing import Pacing
from trading_pipeline.core.market_calendar import bar_close_times, calendar
from trading_pipeline.core.strategies import TimeframeSettings
from trading_pipeline.errors import BarDataError

HISTORY = "/iserver/marketdata/history"


def session_opens(start, end) -> pd.DatetimeIndex:
    opens = pd.DatetimeIndex(calendar().schedule["open"]).tz_convert("UTC")
    return opens[(opens >= start) & (opens <= end)]


# ---------------------------------------------------------------------------------------- contracts

def test_symbol_resolves_to_its_us_listing_batched_and_cached(emulator, client, client_factory):
    aapl = client.resolve("AAPL")  # AAPL also lists on MEXI and as a CDR on AEQLIT
    assert (aapl.exchange, aapl.is_us, aapl.conid) == ("NASDAQ", True, emulator.state.conid_for("AAPL"))
    lookups = emulator.count("GET", "/trsrv/stocks")
    assert client_factory(emulator).resolve("AAPL") == aapl  # cached for the process
    client.resolve_many(["MSFT", "NVDA", "SPY"])
    assert emulator.count("GET", "/trsrv/stocks") == lookups + 1  # one batched lookup
    assert emulator.requests("GET", "/trsrv/stocks")[-1][4]["symbols"] == "MSFT,NVDA,SPY"


def test_ambiguous_and_unknown_symbols_name_the_candidates_and_the_fix(emulator, client):
    with pytest.raises(IBKRContractError) as raised:
        client.resolve("AMBIG")
    assert "matches 2 stock contracts" in raised.value.problem and "NASDAQ" in raised.value.problem \
        and "NYSE" in raised.value.problem
    assert "IBKR_CONIDS=AMBIG=<conid>" in raised.value.fix
    with pytest.raises(IBKRContractError) as raised:
        client.resolve("NOSUCH")
    assert "no stock contract for 'NOSUCH'" in raised.value.problem


def test_exchange_preference_override_and_share_class_symbols(emulator, client_factory):
    mexi = client_factory(emulator, exchanges=["MEXI"]).resolve("AAPL")
    assert (mexi.exchange, mexi.is_us) == ("MEXI", False)
    pinned = client_factory(emulator, conid_overrides={"AMBIG": 4242}).resolve("AMBIG")
    assert pinned.conid == 4242
    berkshire = client_factory(emulator).resolve("BRK.B")  # IBKR spells it 'BRK B'
    assert berkshire.conid == emulator.state.conid_for("BRK B")
    assert [r[4]["symbols"] for r in emulator.requests("GET", "/trsrv/stocks")][-2:] == ["BRK.B", "BRK B"]


# ------------------------------------------------------------------------------ period/bar planning

def test_period_and_bar_are_checked_against_ibkrs_table_before_any_call(emulator, client):
    conid = client.resolve("AAPL").conid
    sent = emulator.count("GET", HISTORY)
    with pytest.raises(IBKRHistoryRequestError) as raised:
        client.history(conid, "6y", "1d")
    assert "periods up to 15y take bars 1w to 1m" in raised.value.problem
    for period, bar in [("2Y", "1d"), ("16y", "1w"), ("1001d", "1d"), ("2y", "5s"), ("1d", "1d")]:
        with pytest.raises(IBKRHistoryRequestError):
            client.history(conid, period, bar)
    assert emulator.count("GET", HISTORY) == sent  # nothing IBKR would refuse was sent
    for period, bar in [("2y", "1d"), ("6y", "1w"), ("1000d", "1d"), ("15y", "1w"), ("30d", "1d")]:
        hist.validate_history_request(period, bar)


def test_strategy_periods_map_to_one_request_or_pages():
    now = datetime(2026, 11, 25, 12, tzinfo=UTC)
    assert (hist.plan_pages("1d", "2y", now, now).period, hist.plan_pages("1d", "2y", now, now).paged) == ("2y", False)
    assert (hist.plan_pages("1w", "6y", now, now).period, hist.plan_pages("1w", "6y", now, now).paged) == ("6y", False)
    paged = hist.plan_pages("1d", "6y", now, now)  # 6y allows only 1w-1m: pages of 3y daily bars
    assert (paged.period, paged.paged, paged.anchor) == ("3y", True, None)
    assert hist.plan_pages("1d", "15y", now, now).paged and not hist.plan_pages("1w", "15y", now, now).paged
    past = datetime(2024, 3, 1, tzinfo=UTC)
    assert hist.plan_pages("1d", "2y", past, now).anchor == past  # an earlier point in time anchors startTime
    assert hist.estimated_points("2y", "1d") <= 1000 < hist.estimated_points("6y", "1d")
    assert hist.format_start_time(past) == "20240301-00:00:00"


# ------------------------------------------------------------------------------------ history data

def test_daily_bars_normalized_volume_in_shares_and_only_closed_bars(emulator, client):
    as_of = datetime(2024, 3, 5, 16, 0, tzinfo=UTC)  # during the 2024-03-05 session
    frame = IBKRMarketData(client).fetch("AAPL", "1d", TimeframeSettings(period="2y"), as_of)
    assert frame.index.name == "time" and str(frame.index.tz) == "UTC"
    assert frame.index.is_monotonic_increasing and frame.index.is_unique
    assert list(frame.columns) == ["open", "high", "low", "close", "volume"]
    assert all(dtype == np.float64 for dtype in frame.dtypes)
    assert frame.index[-1] == pd.Timestamp("2024-03-04 14:30", tz="UTC")  # today's session has not closed
    assert frame.index[0] >= pd.Timestamp(as_of) - timedelta(days=732)
    assert frame.index.equals(session_opens(frame.index[0], frame.index[-1]))  # every session, at its open
    assert (bar_close_times(frame.index, "1d") <= pd.Timestamp(as_of)).all()
    request = emulator.requests("GET", HISTORY)[-1][4]
    assert (request["period"], request["bar"], request["startTime"]) == ("2y", "1d", "20240305-16:00:00")
    raw = client.history(client.resolve("AAPL").conid, "2y", "1d", start_time=as_of)
    raw_v = {pd.Timestamp(b["t"], unit="ms", tz="UTC"): b["v"] for b in raw["data"]}
    assert any(v != int(v) for v in raw_v.values())  # IBKR's lots of 100 carry two decimals
    for t, volume in frame["volume"].items():
        assert volume == pytest.approx(raw_v[t] * 100)  # in shares


def test_weekly_bars_map_to_the_weeks_first_session_whatever_ibkrs_anchor(emulator_factory, client_factory):
    as_of = datetime(2024, 2, 21, 22, 0, tzinfo=UTC)  # Wednesday of the Presidents' Day week
    frames = {}
    for anchor in ("monday", "sunday", "first_session"):
        emulator = emulator_factory(weekly_anchor=anchor)
        frames[anchor] = IBKRMarketData(client_factory(emulator)).fetch(
            "AAPL", "1w", TimeframeSettings(period="6y"), as_of)
    pd.testing.assert_frame_equal(frames["monday"], frames["first_session"])
    pd.testing.assert_frame_equal(frames["monday"], frames["sunday"])
    weekly = frames["monday"]
    assert weekly.index[-1] == pd.Timestamp("2024-02-12 14:30", tz="UTC")  # the running week is left out
    assert pd.Timestamp("2024-01-16 14:30", tz="UTC") in weekly.index  # MLK day: the week starts Tuesday
    assert len(weekly) >= 300
    friday_close = datetime(2024, 2, 16, 21, 5, tzinfo=UTC)
    emulator = emulator_factory()
    client = client_factory(emulator)
    source = IBKRMarketData(client)
    closed = source.fetch("AAPL", "1w", TimeframeSettings(period="1y"), friday_close)
    assert closed.index[-1] == pd.Timestamp("2024-02-12 14:30", tz="UTC")
    daily = source.fetch("AAPL", "1d", TimeframeSettings(period="1y"), friday_close)
    week = daily.loc["2024-02-12":"2024-02-16"]
    last = closed.iloc[-1]
    assert last["volume"] == pytest.approx(week["volume"].sum(), abs=5)  # shares, both ways
    assert (last["open"], last["close"]) == (week["open"].iloc[0], week["close"].iloc[-1])


def test_non_us_listing_volume_is_not_multiplied(emulator, client_factory):
    client = client_factory(emulator, exchanges=["MEXI"])
    as_of = datetime(2024, 3, 5, 22, tzinfo=UTC)
    frame = IBKRMarketData(client).fetch("AAPL", "1d", TimeframeSettings(period="1y"), as_of)
    raw = client.history(client.resolve("AAPL").conid, "1y", "1d", start_time=as_of)
    assert frame["volume"].iloc[-1] == raw["data"][-1]["v"]


def test_a_period_the_table_refuses_for_the_bar_is_paged_with_start_time(emulator, client):
    now = datetime.now(UTC)
    frame = IBKRMarketData(client).fetch("AAPL", "1d", TimeframeSettings(period="6y"), now)
    requests = [r[4] for r in emulator.requests("GET", HISTORY)]
    assert len(requests) == 3 and {r["period"] for r in requests} == {"3y"}
    assert "startTime" not in requests[0] and all("startTime" in r for r in requests[1:])
    assert frame.index[0] <= pd.Timestamp(now) - timedelta(days=2190)
    assert frame.index.equals(session_opens(frame.index[0], frame.index[-1]))  # pages join without gaps


def test_error_bodies_with_status_200(emulator, client):
    source = IBKRMarketData(client)
    emulator.inject(HISTORY, status=200, body={"error": "Chart data is not available"})
    frame = source.fetch("AAPL", "1d", TimeframeSettings(period="1y"), datetime.now(UTC))
    assert len(frame) > 240 and emulator.count("GET", HISTORY) == 2  # transient: asked again once
    with pytest.raises(BarDataError) as raised:
        source.fetch("NODATA", "1d", TimeframeSettings(period="1y"), datetime.now(UTC))
    assert "NODATA 1d" in raised.value.problem and "'No data.'" in raised.value.problem
    account = client.account_id
    emulator.inject(f"/portfolio/{account}/summary", status=200, body={"error": "Service unavailable: try later"})
    with pytest.raises(IBKRRequestError) as raised:
        client.summary()
    assert raised.value.ibkr_text == "Service unavailable: try later" and "try later" in str(raised.value)


# ------------------------------------------------------------------------------------------ pacing

def test_429_backs_off_holds_every_thread_and_gives_up(emulator, client, monkeypatch):
    conid = client.resolve("AAPL").conid
    client.accounts()
    emulator.reset_stats()
    emulator.inject(HISTORY, status=429, count=1)
    other: list[float] = []
    # The other thread asks once the client has taken the 429 (the emulator recording the request is
    # too early: on a busy machine the other request could go out before the 429 was read).
    held = threading.Event()
    hold = client._pacer.hold
    monkeypatch.setattr(client._pacer, "hold", lambda seconds: (hold(seconds), held.set()))

    def other_thread():
        if held.wait(30):
            client.trades(days=1)
            other.append(emulator.requests("GET", "/iserver/account/trades")[-1][0])

    helper = threading.Thread(target=other_thread)
    helper.start()
    client.history(conid, "1y", "1d")
    helper.join()
    first_429 = emulator.requests("GET", HISTORY)[0]
    assert other, "the client did not hold after the 429"
    assert first_429[3] == 429 and other[0] - first_429[0] >= 0.15  # the other thread waited out the hold

    emulator.reset_stats()
    emulator.inject(HISTORY, status=429, count=2)
    client.history(conid, "1y", "1d")
    times = [r[0] for r in emulator.requests("GET", HISTORY)]
    assert len(times) == 3 and times[1] - times[0] >= 0.19 and times[2] - times[1] >= 0.39  # 0.2 s, then 0.4 s

    emulator.reset_stats()
    emulator.inject(HISTORY, status=429, count=50)
    with pytest.raises(IBKRRateLimited) as raised:
        client.history(conid, "1y", "1d")
    assert emulator.count("GET", HISTORY) == 4  # 1 + 3 retries, then it stops: no hammering
    assert "penalty box" in raised.value.fix


def test_pacing_limits_hold_under_concurrency(emulator_factory, client_factory):
    emulator = emulator_factory(latency_ms=100)  # the emulator answers 429 above 10/s or 5 in flight
    client = client_factory(emulator)
    source = IBKRMarketData(client)
    symbols = [f"P{i:02d}" for i in range(18)]
    source.prefetch_contracts(symbols)
    now = datetime.now(UTC)
    with ThreadPoolExecutor(12) as pool:
        frames = list(pool.map(lambda s: source.fetch(s, "1d", TimeframeSettings(period="1y"), now), symbols))
    stats = emulator.stats()
    assert all(len(f) > 240 for f in frames)
    assert stats["rate_limited"] == 0
    assert stats["peak_history_in_flight"] <= 4
    assert 8 <= stats["peak_requests_per_second"] <= 10  # the limiter was what held it back


def test_history_concurrency_is_capped_at_ibkrs_five():
    assert Pacing(history_concurrency=5).history_concurrency == 5
    with pytest.raises(IBKRConfigError):
        Pacing(history_concurrency=6)


def test_slow_endpoints_are_spaced_and_the_defaults_are_ibkrs(emulator, client):
    client.live_orders()  # the first answer of a session is asked twice
    client.live_orders()
    calls = emulator.requests("GET", "/iserver/account/orders")
    assert len(calls) == 3 and all(b[0] - a[0] >= 0.3 for a, b in itertools.pairwise(calls))
    assert all(call[3] == 200 for call in calls) and emulator.stats()["rate_limited"] == 0
    defaults = Pacing()
    assert (defaults.requests_per_second, defaults.history_concurrency) == (10, 4)
    for path in ("/iserver/account/orders", "/iserver/account/trades", "/iserver/account/pnl/partitioned",
                 "/portfolio/accounts"):
        assert defaults.interval_for(path) == 5.0
    assert defaults.interval_for("/tickle") == 1.0 and defaults.interval_for("/sso/validate") == 60.0
    assert defaults.interval_for("/iserver/marketdata/history") == 0.0


# ---------------------------------------------------------------------------------------- snapshot

def test_snapshot_repolls_after_the_empty_first_answer_and_parses_strings(emulator_factory, client_factory):
    emulator = emulator_factory(prior_close_symbols=("MSFT",))
    client = client_factory(emulator)
    aapl, msft = client.resolve("AAPL"), client.resolve("MSFT")
    emulator.set_price("AAPL", 187.25)
    quotes = client.snapshot([aapl, msft])
    assert emulator.count("GET", "/iserver/marketdata/snapshot") == 2  # pre-flight answer, then data
    assert emulator.count("GET", "/iserver/accounts") == 1
    quote = quotes[aapl.conid]
    assert (quote.last, quote.bid, quote.ask) == (187.25, 187.24, 187.26)
    assert quote.bid_size == 130_000 and quote.ask_size == 60_000  # '1,300' lots of 100 -> shares
    assert quote.volume == 12_345_678 and quote.availability == "RpB" and not quote.last_is_prior_close
    assert quotes[msft.conid].last_is_prior_close and quotes[msft.conid].last is not None


def test_parse_number_handles_ibkr_strings():
    assert parse_number("1,300") == 1300
    assert parse_number("C168.42") == 168.42 and parse_number("H12.5") == 12.5
    assert parse_number("1.2M") == 1_200_000 and parse_number("35.5K") == 35_500
    assert parse_number("") is None and parse_number(None) is None and parse_number("n/a") is None
    assert parse_number(3) == 3.0
