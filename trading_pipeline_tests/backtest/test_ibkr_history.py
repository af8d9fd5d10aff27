"""A backtest on IBKR history (the gateway emulator over HTTP): the first run fetches through the
Client Portal history endpoint, a second backtest of the window reads the local cache and sends
no history request."""

from __future__ import annotations

from datetime import date

from trading_pipeline.adapters.ibkr.market_data import IBKRMarketData
from trading_pipeline.backtest import runner
from trading_pipeline.backtest.data import HistoryCache
from trading_pipeline_tests.adapters.ibkr.conftest import (  # noqa: F401  (pytest fixtures)
    _default_safety_switches,
    _fresh_contract_cache,
    _running_emulators,
    client,
    client_factory,
    emulator,
    emulator_factory,
)
from trading_pipeline_tests.backtest.conftest import STRATEGIES, run, settings

HISTORY = "/iserver/marketdata/history"


def test_a_second_backtest_on_ibkr_history_sends_no_history_request(emulator, client, tmp_path):  # noqa: F811
    ibkr = settings(data="ibkr", symbols=("SPY", "AAPL"), start=date(2024, 1, 2), end=date(2024, 4, 30))
    first = runner.load(ibkr, strategies_file=STRATEGIES, source=HistoryCache(IBKRMarketData(client), tmp_path))
    sent = emulator.count("GET", HISTORY)
    assert sent >= 4  # both symbols, both timeframes (long windows are paged)
    again = HistoryCache(IBKRMarketData(client), tmp_path)
    second = runner.load(ibkr, strategies_file=STRATEGIES, source=again)
    assert emulator.count("GET", HISTORY) == sent and again.misses == 0
    result = run(ibkr, second)
    assert result.decisions and result.result_digest() == run(ibkr, first).result_digest()


def test_a_first_backtest_fetches_its_histories_several_at_a_time(emulator_factory, client_factory,  # noqa: F811
                                                                   tmp_path):
    """IBKR's history requests in flight at once (the client's 4), within the gateway's limits; the
    bars are the same as fetched one at a time."""
    gateway = emulator_factory(latency_ms=100)
    gateway_client = client_factory(gateway)
    ibkr = settings(data="ibkr", symbols=("SPY", "AAPL", "MSFT"), start=date(2024, 1, 2), end=date(2024, 4, 30))
    gateway.reset_stats()
    cache = HistoryCache(IBKRMarketData(gateway_client), tmp_path / "together")
    assert cache.fetch_concurrency == 4
    together = runner.load(ibkr, strategies_file=STRATEGIES, source=cache)
    stats = gateway.stats()
    assert stats["peak_history_in_flight"] == 4 and stats["rate_limited"] == 0
    assert cache.misses == 6 and cache.hits == 0

    class OneAtATime:  # the same source without its concurrency
        name = "ibkr"
        fetch = IBKRMarketData(gateway_client).fetch

    alone = runner.load(ibkr, strategies_file=STRATEGIES, source=HistoryCache(OneAtATime(), tmp_path / "alone"))
    assert list(together[1]) == list(alone[1]) == ["SPY", "AAPL", "MSFT"]
    for symbol in ("SPY", "AAPL", "MSFT"):
        for timeframe in ("1d", "1w"):
            assert together[1][symbol][timeframe].equals(alone[1][symbol][timeframe])


def test_kept_history_is_not_read_for_another_listing_or_volume_factor(emulator, client, client_factory,  # noqa: F811
                                                                       tmp_path):
    """The cache keeps IBKR's bars by symbol, timeframe, period and as_of: after IBKR_EXCHANGES,
    IBKR_CONIDS or IBKR_HISTORY_VOLUME_MULTIPLIER changed, the bars kept for the old listing (another
    contract's prices) or volume factor were read as the new one's, and the backtest decided on them."""
    from datetime import UTC, datetime

    from trading_pipeline.core.strategies import TimeframeSettings

    as_of, year = datetime(2024, 3, 5, 21, 0, tzinfo=UTC), TimeframeSettings(period="1y")
    us = HistoryCache(IBKRMarketData(client), tmp_path).fetch("AAPL", "1d", year, as_of)
    mexi_client = client_factory(emulator, exchanges=["MEXI"])
    mexi = HistoryCache(IBKRMarketData(mexi_client), tmp_path)
    assert not mexi.fetch("AAPL", "1d", year, as_of).equals(us) and mexi.misses == 1
    pinned = HistoryCache(IBKRMarketData(client_factory(emulator, conid_overrides={"AAPL": 1234})), tmp_path)
    assert pinned.path_for("AAPL", "1d", year, as_of) != mexi.path_for("AAPL", "1d", year, as_of)
    lots = HistoryCache(IBKRMarketData(client, volume_multiplier=1), tmp_path)
    assert lots.fetch("AAPL", "1d", year, as_of)["volume"].iloc[-1] * 100 == us["volume"].iloc[-1]
    assert lots.misses == 1
    again = HistoryCache(IBKRMarketData(client_factory(emulator)), tmp_path)
    assert again.fetch("AAPL", "1d", year, as_of).equals(us) and again.hits == 1
