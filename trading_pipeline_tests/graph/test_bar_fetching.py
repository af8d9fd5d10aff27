"""A batched run fetches its bar series as many at a time as the source serves (IBKR: its history
requests in flight), after one batched contract lookup, and still makes each partition in order
with its own failure; a source that serves one at a time is asked one at a time."""

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import dagster as dg
import pytest

from trading_pipeline.adapters.market_data import SimulatedMarketData, fetch_concurrency, fetch_many
from trading_pipeline.core.strategies import TimeframeSettings, parse_strategies
from trading_pipeline.definitions import build_definitions
from trading_pipeline.errors import BarDataError
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.assets.batch import PartitionFailure, range_tags
from trading_pipeline.graph.resources import MarketDataResource, resources_from_env

AS_OF = "2026-09-01T21:30:00+00:00"
SYMBOLS = ["SPY", "AAPL", "MSFT", "NOBARS", "QQQ", "IWM", "DIA"]
STRATEGIES = parse_strategies(f"""\
strategies:
  - name: fetch_test
    symbols: [{", ".join(SYMBOLS)}]
    timeframes: {{1d: {{period: 2y}}, 1w: {{period: 6y}}}}
""")
FETCH_S = 0.2  # each fetch waits this long, as a request to a remote source would (so fetches overlap)


class SlowSource:
    """The simulated market behind a source that takes FETCH_S per series (NOBARS has none) and
    records how many fetches were in flight at once and its batched contract lookups."""

    name = "slow"

    def __init__(self, concurrency: int | None, lookup_fails: bool = False):
        if concurrency is not None:
            self.fetch_concurrency = concurrency
        self.lookup_fails = lookup_fails
        self.real = SimulatedMarketData()
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0
        self.lookups: list[list[str]] = []
        self.fetched: list[str] = []

    def prefetch_contracts(self, symbols):
        self.lookups.append(list(symbols))
        if self.lookup_fails:
            raise RuntimeError("the contract search answered 503")

    def fetch(self, symbol, timeframe, history, as_of):
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(FETCH_S)
            if symbol == "NOBARS":
                raise BarDataError("the source has no bars for NOBARS", "check the symbol or remove it")
            return self.real.fetch(symbol, timeframe, history, as_of)
        finally:
            with self.lock:
                self.in_flight -= 1
                self.fetched.append(symbol)


def run_market_bars(tmp_path, source):
    class Resource(MarketDataResource):
        def source(self):
            return source

    resources = resources_from_env({"TRADING_DATA_DIR": str(tmp_path / "data")})
    resources["market_data"] = Resource(ibkr=resources["ibkr"])
    defs = build_definitions(STRATEGIES, resources)
    tags = {**range_tags(f"{SYMBOLS[0]}|1d", f"{SYMBOLS[-1]}|1d"), AS_OF_TAG: AS_OF}
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:  # the job resolved with it current
        result = defs.resolve_job_def("analyze_timeframe").execute_in_process(instance=instance, tags=tags, asset_selection=[dg.AssetKey("market_bars")])
        counts = {key: instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("market_bars"), asset_partitions=[key]), limit=1)
            .records[0].event_log_entry.asset_materialization.metadata["bars"].value
            for key in (f"{s}|1d" for s in SYMBOLS if s != "NOBARS")}
    return result, counts


@pytest.mark.parametrize("concurrency", [3, 4])
def test_a_batch_fetches_as_many_at_a_time_as_the_source_serves_and_keeps_each_partition_its_own(tmp_path, concurrency):
    source = SlowSource(concurrency)
    result, counts = run_market_bars(tmp_path, source)
    assert result.success
    assert source.peak == concurrency  # never more in flight than the source serves, and that many used
    assert source.lookups == [sorted(SYMBOLS)]  # one batched contract lookup for the whole batch
    assert sorted(source.fetched) == sorted(SYMBOLS)  # each series fetched once
    values = result.output_for_node("market_bars")
    assert list(values) == [f"{s}|1d" for s in SYMBOLS]  # made in partition order
    failure = values["NOBARS|1d"]
    assert isinstance(failure, PartitionFailure) and failure.problem == "the source has no bars for NOBARS"
    as_of = datetime.fromisoformat(AS_OF)
    for symbol in ("SPY", "DIA"):  # the frames are the source's, whatever order they arrived in
        expected = SimulatedMarketData().fetch(symbol, "1d", TimeframeSettings(period="2y"), as_of)
        assert values[f"{symbol}|1d"].frame.equals(expected)
        assert counts[f"{symbol}|1d"] == len(expected)


def test_a_source_that_serves_one_at_a_time_is_asked_one_at_a_time(tmp_path):
    source = SlowSource(None)
    assert fetch_concurrency(source) == 1
    result, counts = run_market_bars(tmp_path, source)
    assert result.success and source.peak == 1
    assert source.lookups == []  # fetched inside each partition's step, as a single run does
    assert isinstance(result.output_for_node("market_bars")["NOBARS|1d"], PartitionFailure)
    assert len(counts) == len(SYMBOLS) - 1


def test_a_failed_batched_lookup_is_logged_and_each_fetch_goes_on(caplog):
    source = SlowSource(2, lookup_fails=True)
    jobs = {f"{s}|1w": (s, "1w", TimeframeSettings(period="6y")) for s in ("SPY", "NOBARS", "AAPL")}
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(2) as pool:
        futures = fetch_many(source, jobs, datetime.fromisoformat(AS_OF), pool)
        assert list(futures) == list(jobs)
        assert len(futures["SPY|1w"].result()) > 200 and len(futures["AAPL|1w"].result()) > 200
        with pytest.raises(BarDataError, match="no bars for NOBARS"):
            futures["NOBARS|1w"].result()
    assert "batched contract lookup failed (the contract search answered 503)" in caplog.text
    assert source.peak == 2


def test_a_stopped_step_starts_no_more_calls_and_does_not_wait_for_those_in_flight():
    """A Dagster termination (or any error) closes the step: the pool returns at once, the calls not
    yet started never start, and the two in flight end on their own."""
    from trading_pipeline.workers import worker_pool

    release, running = threading.Event(), threading.Semaphore(0)

    def slow(i):
        running.release()
        release.wait(30)
        return i

    try:
        with pytest.raises(KeyboardInterrupt), worker_pool(2, "test") as pool:
            futures = [pool.submit(slow, i) for i in range(6)]
            assert running.acquire(timeout=30) and running.acquire(timeout=30)  # two calls in flight
            raise KeyboardInterrupt  # what Dagster's termination raises in a run
        assert not futures[0].done() and not futures[1].done()  # returned without waiting for them
        assert all(future.cancelled() for future in futures[2:])  # the rest never started
    finally:
        release.set()
    assert futures[0].result(timeout=30) == 0 and futures[1].result(timeout=30) == 1


def test_a_finished_pool_has_waited_for_every_call():
    from trading_pipeline.workers import worker_pool

    with worker_pool(3, "test") as pool:
        futures = [pool.submit(time.sleep, 0.05) for _ in range(6)]
    assert all(future.done() and not future.cancelled() for future in futures)
    with worker_pool(1, "test") as pool:
        assert pool is None  # one at a time: the caller makes each call itself
