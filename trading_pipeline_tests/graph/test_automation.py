"""Schedules and sensors travel in time across a holiday, an early close and a DST change."""

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest

from trading_pipeline.core.strategies import parse_strategies
from trading_pipeline.definitions import build_definitions
from trading_pipeline.graph import automation
from trading_pipeline.graph.pools import POOL_LIMITS
from trading_pipeline.graph.resources import resources_from_env

STRATEGIES_TEXT = """\
strategies:
  - name: opener
    symbols: [SPY, AAPL]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
  - name: manual
    symbols: [MSFT]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
    trade_at_open: false
"""


@pytest.fixture
def defs(tmp_path):
    return build_definitions(parse_strategies(STRATEGIES_TEXT), resources_from_env({"TRADING_DATA_DIR": str(tmp_path)}))


def utc(text):
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def instance(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        yield instance


def evaluate_schedule(defs, name, when):
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                            repository_def=defs.get_repository_def())
        result = defs.get_schedule_def(name).evaluate_tick(context)
        return result.skip_message, [(r.run_key, r.partition_key, dict(r.tags)) for r in result.run_requests or []]


def covered_partitions(defs, tags, asset="market_bars"):
    """The partitions a run with these range tags materializes (what the daemon's run would see)."""
    partitions_def = defs.resolve_assets_def(asset).partitions_def
    return {str(k) for k in partitions_def.get_partition_keys_in_range(
        dg.PartitionKeyRange(tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]))}


@pytest.mark.parametrize("when, fires", [
    ("2024-11-27T21:15:00", True),    # Wednesday 16:15 New York (EST)
    ("2024-11-28T21:15:00", False),   # Thanksgiving: no session
    ("2024-11-29T21:15:00", True),    # early close (13:00) day: closed by 16:15
    ("2024-03-11T20:15:00", True),    # Monday after the DST change: 16:15 EDT = 20:15 UTC
    ("2024-03-29T20:15:00", False),   # Good Friday
])
def test_daily_close_schedule(defs, when, fires):
    skip, requests = evaluate_schedule(defs, "daily_close_schedule", utc(when))
    if not fires:
        assert not requests and "not a trading day" in skip
        return
    day = when[:10]
    (run_key, partition, tags), = requests  # one run for every symbol, not one per partition
    assert run_key == f"1d:{day}" and partition is None
    assert covered_partitions(defs, tags) == {"AAPL|1d", "MSFT|1d", "SPY|1d"}
    assert tags["trading/as_of"].startswith(day)


@pytest.mark.parametrize("when, fires", [
    ("2024-03-28T20:30:00", True),    # Thursday before Good Friday: last session of the week
    ("2024-03-29T20:30:00", False),   # Good Friday itself
    ("2024-11-27T21:30:00", False),   # Wednesday: the week goes on
    ("2024-11-29T21:30:00", True),    # Friday after Thanksgiving, an early close
])
def test_weekly_close_schedule(defs, when, fires):
    skip, requests = evaluate_schedule(defs, "weekly_close_schedule", utc(when))
    assert bool(requests) == fires
    if fires:
        (run_key, _, tags), = requests
        assert covered_partitions(defs, tags) == {"AAPL|1w", "MSFT|1w", "SPY|1w"}
        assert run_key == f"1w:{when[:10]}"
    else:
        assert "not the last session of its week" in skip


def test_market_open_sensor_once_per_session(defs, monkeypatch, instance):
    sensor = defs.get_sensor_def("market_open_sensor")

    def tick(when, cursor):
        monkeypatch.setattr(automation, "_now", lambda: utc(when))
        return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor,
                                                            repository_def=defs.get_repository_def()))

    before_open_est = tick("2024-03-08T14:25:00", None)  # 09:25 EST
    assert not before_open_est.run_requests and "market closed" in before_open_est.skip_message
    after_dst = tick("2024-03-11T13:35:00", None)  # 09:35 EDT, the first Monday after the DST change
    (request,) = after_dst.run_requests  # one run for the strategies that trade at the open
    assert request.run_key == "open:2024-03-11:SPY..AAPL"
    assert covered_partitions(defs, request.tags, "trade_decisions") == {"SPY", "AAPL"}
    assert request.tags["dagster/asset_partition_range_start"] == "SPY"
    assert after_dst.cursor == "2024-03-11"  # MSFT's strategy does not trade at the open
    again = tick("2024-03-11T15:00:00", after_dst.cursor)
    assert not again.run_requests and "already fired" in again.skip_message
    holiday = tick("2024-07-04T14:00:00", after_dst.cursor)
    assert not holiday.run_requests
    early_close_open = tick("2024-11-29T17:30:00", "2024-11-27")  # 12:30 EST, before the 13:00 close
    assert len(early_close_open.run_requests) == 1
    early_close_after = tick("2024-11-29T18:05:00", "2024-11-27")
    assert not early_close_after.run_requests


class Webhook:
    def __init__(self):
        self.posts = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def webhook(monkeypatch):
    hook = Webhook()
    monkeypatch.setenv("TRADING_ALERT_WEBHOOK_URL", hook.url)
    yield hook
    hook.close()


def test_run_failure_alert_says_what_failed_and_what_to_do(tmp_path, webhook):
    environment = {"TRADING_DATA_DIR": str(tmp_path), "TRADING_MARKET_DATA": "csv", "TRADING_CSV_DIR": str(tmp_path)}
    defs = build_definitions(parse_strategies(STRATEGIES_TEXT), resources_from_env(environment))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = defs.resolve_job_def("analyze_timeframe").execute_in_process(
            partition_key=dg.MultiPartitionKey({"symbol": "SPY", "timeframe": "1d"}), instance=instance,
            raise_on_error=False)
        assert not result.success
        (record,) = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        failure = record.dagster_event
        context = dg.build_run_status_sensor_context(
            sensor_name="run_failure_alert_sensor", dagster_event=failure, dagster_instance=instance,
            dagster_run=result.dagster_run).for_run_failure()
        defs.get_sensor_def("run_failure_alert_sensor")(context)
    (post,) = webhook.posts
    assert "analyze_timeframe" in post["text"] and "SPY|1d" in post["text"] and "market_bars" in post["text"]
    assert "SPY_1d.csv" in post["text"] and "Fix:" in post["text"]


def test_strategies_file_sensor_reports_bad_edit_and_needed_reload(tmp_path, monkeypatch, webhook, instance):
    path = tmp_path / "strategies.yaml"
    path.write_text(STRATEGIES_TEXT)
    monkeypatch.setenv("TRADING_STRATEGIES_FILE", str(path))
    defs = build_definitions(parse_strategies(STRATEGIES_TEXT), resources_from_env({"TRADING_DATA_DIR": str(tmp_path)}))
    sensor = defs.get_sensor_def("strategies_file_sensor")
    if True:
        unchanged = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
        assert "unchanged and valid" in unchanged.skip_message
        path.write_text(STRATEGIES_TEXT.replace("[SPY, AAPL]", "[SPY, AAPL, NVDA]"))
        added = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
        assert "added: NVDA" in added.skip_message and "reload" in added.skip_message
        path.write_text(STRATEGIES_TEXT.replace("[SPY, AAPL]", "[SPY, aapl]"))
        bad = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
        assert f"{path}:3" in bad.skip_message and "code location unchanged" in bad.skip_message
        again = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=bad.cursor))
        assert again.skip_message == bad.skip_message
    assert len(webhook.posts) == 1 and "last good" in webhook.posts[0]["text"]  # alerted once, not every tick


def test_bad_edit_after_a_good_load_keeps_the_last_good_file(tmp_path, monkeypatch):
    from trading_pipeline.graph import partitions

    path = tmp_path / "strategies.yaml"
    path.write_text(STRATEGIES_TEXT)
    monkeypatch.setenv("TRADING_DATA_DIR", str(tmp_path / "data"))
    partitions._load.cache_clear()
    assert partitions._load(str(path)).symbols() == ["SPY", "AAPL", "MSFT"]
    path.write_text("strategies: [")
    partitions._load.cache_clear()
    assert partitions._load(str(path)).symbols() == ["SPY", "AAPL", "MSFT"]  # reload keeps the location up
    # ... and the UI says so: the strategies asset carries the rejection with its line and fix.
    # (under a live instance: an earlier test leaves a disposed one's storage in Dagster's context)
    with dg.instance_for_test():
        monkeypatch.setenv("TRADING_STRATEGIES_FILE", str(path))
        defs = build_definitions(partitions.strategies(), resources_from_env({"TRADING_DATA_DIR": str(tmp_path)}))
        spec = defs.resolve_assets_def("strategies").specs_by_key[dg.AssetKey("strategies")]
        assert spec.description.startswith("⚠ THE LAST EDIT OF THE STRATEGIES FILE WAS REJECTED")
        assert f"{path}:1" in spec.metadata["rejected_edit"].value and "Fix:" in spec.metadata["rejected_edit"].value
        assert "| max open positions / gross exposure |" in spec.metadata["strategies"].value
        path.write_text(STRATEGIES_TEXT)  # fixed: the warning goes away on the next reload
        partitions._load.cache_clear()
        defs = build_definitions(partitions.strategies(), resources_from_env({"TRADING_DATA_DIR": str(tmp_path)}))
        spec = defs.resolve_assets_def("strategies").specs_by_key[dg.AssetKey("strategies")]
        assert "rejected_edit" not in spec.metadata and not spec.description.startswith("⚠")
    partitions._load.cache_clear()


def test_a_bad_edit_of_the_packaged_default_keeps_the_last_good_file_too(tmp_path, monkeypatch):
    from trading_pipeline.core import strategies as strategies_module
    from trading_pipeline.errors import StrategiesFileError
    from trading_pipeline.graph import partitions

    default = tmp_path / "packaged.yaml"  # stands in for trading_pipeline/data/strategies.yaml
    monkeypatch.setattr(strategies_module, "DEFAULT_STRATEGIES_FILE", default)
    monkeypatch.setenv("TRADING_DATA_DIR", str(tmp_path / "data"))
    default.write_text("strategies: [")
    partitions._load.cache_clear()
    with pytest.raises(StrategiesFileError):  # never loaded: nothing to fall back on
        partitions._load(None)
    default.write_text(STRATEGIES_TEXT)
    partitions._load.cache_clear()
    assert partitions._load(None).symbols() == ["SPY", "AAPL", "MSFT"]
    default.write_text(STRATEGIES_TEXT.replace("[SPY, AAPL]", "[SPY, aapl]"))
    partitions._load.cache_clear()
    assert partitions._load(None).symbols() == ["SPY", "AAPL", "MSFT"]
    partitions._load.cache_clear()


def test_order_step_never_retries(defs, instance):
    job = defs.resolve_job_def("decide_and_order")
    assert job.tags.get("dagster/max_retries") == "0"
    orders_node = job.graph.node_named("orders")
    assert orders_node.definition.retry_policy is None
    assert defs.resolve_job_def("analyze_timeframe").graph.node_named("market_bars").definition.retry_policy.max_retries == 3


def test_steps_that_call_a_limited_service_sit_in_its_pool(defs, instance):
    nodes = {job: defs.resolve_job_def(job).graph for job in ("analyze_timeframe", "decide_and_order")}
    pools = {key: nodes[job].node_named(key).definition.pool for job, keys in (
        ("analyze_timeframe", ("market_bars", "indicator_frames", "ai_analyses")),
        ("decide_and_order", ("trade_decisions", "orders"))) for key in keys}
    assert pools == {"market_bars": "market_data", "indicator_frames": None, "ai_analyses": "llm",
                     "trade_decisions": "decisions", "orders": "broker_orders"}
    assert POOL_LIMITS["broker_orders"] == 1  # one order placement at a time, across runs


def test_open_sensor_covers_symbols_apart_in_the_file_with_one_run_per_stretch(tmp_path, monkeypatch, instance):
    text = STRATEGIES_TEXT + """\
  - name: late_opener
    symbols: [NVDA, TSLA]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
"""
    defs = build_definitions(parse_strategies(text), resources_from_env({"TRADING_DATA_DIR": str(tmp_path)}))
    monkeypatch.setattr(automation, "_now", lambda: utc("2024-03-11T13:35:00"))
    result = defs.get_sensor_def("market_open_sensor").evaluate_tick(
        dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()))
    covered = [covered_partitions(defs, r.tags, "trade_decisions") for r in result.run_requests]
    assert covered == [{"SPY", "AAPL"}, {"NVDA", "TSLA"}]  # MSFT (not at the open) sits between them


def test_decisions_jump_the_run_queue_and_runs_say_their_phase(defs, instance):
    decide = defs.resolve_job_def("decide_and_order").tags
    analyze = defs.resolve_job_def("analyze_timeframe").tags
    assert int(decide["dagster/priority"]) > int(analyze.get("dagster/priority", 0))
    assert decide["trading/phase"] == "decide" and analyze["trading/phase"] == "analyze"


def test_contiguous_ranges():
    from trading_pipeline.graph.assets.batch import contiguous_ranges

    assert contiguous_ranges(["A", "B", "C", "D", "E"], ["A", "B", "D"]) == [("A", "B"), ("D", "D")]
    assert contiguous_ranges(["A", "B"], []) == []
    assert contiguous_ranges(["A", "B", "C"], ["C", "A", "B"]) == [("A", "C")]
