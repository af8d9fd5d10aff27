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
