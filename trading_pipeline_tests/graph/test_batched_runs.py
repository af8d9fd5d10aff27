"""One run over many partitions (what the schedules, the open sensor and backfills launch): every
partition gets its own materialization, metadata and checks, the values equal those of a run per
partition, and one symbol's failure stays that symbol's (NO_TRADE with the reason downstream)."""

from datetime import timedelta

import dagster as dg
import pytest

from trading_pipeline.core.analysis import Action
from trading_pipeline.core.strategies import parse_strategies
from trading_pipeline.definitions import build_definitions
from trading_pipeline.errors import BarDataError
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.assets.batch import PartitionFailure, range_tags
from trading_pipeline.graph.assets.orders import ORDER_SEQUENCE_LOG
from trading_pipeline.graph.resources import MarketDataResource, resources_from_env

AS_OF = "2026-09-01T21:30:00+00:00"  # the simulated market (seed 0) gives SPY an accepted BUY here
STRATEGIES = parse_strategies("""\
strategies:
  - name: batch_test
    symbols: [SPY, AAPL, NOBARS, STALE]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
    orders: {enabled: true}
""")
SYMBOLS = ["SPY", "AAPL", "NOBARS", "STALE"]


class NoBarsForOneSymbol(MarketDataResource):
    """The simulated market, except that NOBARS has no data (as a delisted symbol would) and STALE's
    last bars are two months old (its freshness check, a blocking one, fails)."""

    def source(self):
        real = super().source()

        class Source:
            name = real.name

            def fetch(self, symbol, timeframe, settings, as_of):
                if symbol == "NOBARS":
                    raise BarDataError("the source has no bars for NOBARS", "check the symbol or remove it")
                frame = real.fetch(symbol, timeframe, settings, as_of)
                return frame[frame.index < as_of - timedelta(days=60)] if symbol == "STALE" else frame

        return Source()


@pytest.fixture(autouse=True)
def paper_deployment_at_as_of(monkeypatch):
    """The deployment's switches and clock (read from the environment when an order is sent): orders
    on, and 'now' is AS_OF, so the decisions are current when their orders go out."""
    monkeypatch.setenv("TRADING_ORDERS_ENABLED", "yes")
    monkeypatch.setenv("TRADING_AS_OF", AS_OF)


def definitions(tmp_path, **environment):
    resources = resources_from_env({"TRADING_DATA_DIR": str(tmp_path / "data"), "TRADING_ORDERS_ENABLED": "yes",
                                    **environment})
    resources["market_data"] = NoBarsForOneSymbol(ibkr=resources["ibkr"])
    return build_definitions(STRATEGIES, resources)


def analyze_batch(defs, instance, timeframe):
    tags = {**range_tags(f"{SYMBOLS[0]}|{timeframe}", f"{SYMBOLS[-1]}|{timeframe}"), AS_OF_TAG: AS_OF}
    return defs.resolve_job_def("analyze_timeframe").execute_in_process(instance=instance, tags=tags)


def latest(instance, asset, partition):
    event = instance.get_latest_materialization_event(dg.AssetKey(asset)) if partition is None else None
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    return (event or records[0].event_log_entry).asset_materialization


def check_results(instance, run_id):
    return {(e.event_specific_data.asset_key.to_user_string(), e.event_specific_data.check_name,
             e.event_specific_data.partition): e.event_specific_data.passed
            for e in (r.dagster_event for r in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION))}


@pytest.fixture
def alerts(monkeypatch):
    sent = []
    from trading_pipeline.adapters import alerts as alerts_module

    monkeypatch.setattr(alerts_module, "send_alert", lambda text, logger=None, environ=None: sent.append(text))
    return sent


def test_one_run_per_timeframe_gives_every_partition_its_own_result_and_keeps_failures_apart(tmp_path, alerts):
    defs = definitions(tmp_path)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = analyze_batch(defs, instance, "1d")
        assert result.success  # NOBARS and STALE failed; the run and the other symbols did not
        analyses = result.output_for_node("ai_analyses")
        assert sorted(analyses) == sorted(f"{s}|1d" for s in SYMBOLS)

        # Each partition has its own materialization and metadata.
        for symbol in ("SPY", "AAPL"):
            chart = latest(instance, "chart_images", f"{symbol}|1d")
            assert chart.metadata["thumbnail"].value.startswith("![chart](data:image/png;base64,")
            assert f"/{symbol}/1d/" in chart.metadata["chart"].value
            assert latest(instance, "ai_analyses", f"{symbol}|1d").metadata["valid"].value is True
        bars = latest(instance, "market_bars", "NOBARS|1d")
        assert bars.metadata["status"].value == "FAILED"
        assert bars.metadata["problem"].value == "the source has no bars for NOBARS"
        assert bars.metadata["fix"].value == "check the symbol or remove it"

        # ... and its own check results: a failed blocking check stops only its partition.
        checks = check_results(instance, result.run_id)
        assert checks[("market_bars", "bars_valid", "SPY|1d")] is True
        assert checks[("market_bars", "fresh", "STALE|1d")] is False
        assert checks[("market_bars", "enough_history", "AAPL|1d")] is True
        assert checks[("market_bars", "bars_valid", "NOBARS|1d")] is False
        assert ("indicator_frames", "indicators_complete", "STALE|1d") not in checks  # not made: blocked
        assert checks[("indicator_frames", "indicators_complete", "SPY|1d")] is True
        assert latest(instance, "market_bars", "STALE|1d").metadata["status"].value == "BLOCKED"

        # The failed symbols reach the analysis as unusable: NO_TRADE, saying why.
        for symbol, words in (("NOBARS", "the source has no bars for NOBARS"), ("STALE", "fresh")):
            analysis = analyses[f"{symbol}|1d"]
            assert not analysis.valid and analysis.signal == Action.NO_TRADE and words in analysis.invalid_reason
            assert isinstance(result.output_for_node("chart_images")[f"{symbol}|1d"], PartitionFailure)
        (alert,) = alerts  # told once, for the step where each failure happened
        assert "market_bars failed for 2 of 4 partitions" in alert and "NOBARS|1d" in alert and "STALE|1d" in alert


def test_batched_values_equal_a_run_per_partition_and_single_runs_read_them(tmp_path, alerts):
    for name in ("batch", "single"):
        (tmp_path / name).mkdir()
    batch_defs = definitions(tmp_path / "batch")
    single_defs = definitions(tmp_path / "single")
    with dg.instance_for_test(temp_dir=str(tmp_path / "batch")) as instance:
        for timeframe in ("1d", "1w"):
            batched = analyze_batch(batch_defs, instance, timeframe).output_for_node("ai_analyses")
            with dg.instance_for_test(temp_dir=str(tmp_path / "single")) as single_instance:
                for symbol in ("SPY", "AAPL"):
                    single = single_defs.resolve_job_def("analyze_timeframe").execute_in_process(
                        partition_key=dg.MultiPartitionKey({"symbol": symbol, "timeframe": timeframe}),
                        instance=single_instance, tags={AS_OF_TAG: AS_OF}).output_for_node("ai_analyses")
                    same = {"chart"}  # the chart's location differs by data folder only
                    assert batched[f"{symbol}|{timeframe}"].model_dump(exclude=same) == single.model_dump(exclude=same)
        # A single-partition decision run reads what the batched runs stored, one value per partition.
        result = batch_defs.resolve_job_def("decide_and_order").execute_in_process(
            partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF})
        decision = result.output_for_node("trade_decisions")
        assert decision.action == Action.BUY and result.output_for_node("orders").status == "submitted"


def test_batched_run_with_values_in_s3(tmp_path, s3_endpoint, monkeypatch, alerts):
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="batch-io-test")
    defs = definitions(tmp_path, TRADING_IO_MANAGER="s3", TRADING_S3_BUCKET="batch-io-test",
                       AWS_ENDPOINT_URL=s3_endpoint)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert analyze_batch(defs, instance, "1w").success
    keys = {item["Key"] for item in client.list_objects_v2(Bucket="batch-io-test")["Contents"]}
    assert {f"dagster/{asset}/{symbol}/1w" for asset in ("market_bars", "ai_analyses") for symbol in SYMBOLS} <= keys


def test_one_decision_run_at_the_open_orders_in_symbol_order_and_fails_closed(tmp_path, alerts):
    from sqlalchemy import func, select

    from trading_pipeline.adapters.trading_db import PaperOrderRow, session_factory

    defs = definitions(tmp_path)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        for timeframe in ("1d", "1w"):
            assert analyze_batch(defs, instance, timeframe).success
        tags = {**range_tags(SYMBOLS[0], SYMBOLS[-1]), AS_OF_TAG: AS_OF}
        result = defs.resolve_job_def("decide_and_order").execute_in_process(instance=instance, tags=tags)
        assert result.success
        decisions, orders = result.output_for_node("trade_decisions"), result.output_for_node("orders")
        assert decisions["SPY"].action == Action.BUY and orders["SPY"].status == "submitted"
        assert orders["AAPL"].status == "not_sent"
        for symbol in ("NOBARS", "STALE"):  # their analyses were unusable: NO_TRADE saying why, nothing sent
            assert decisions[symbol].action == Action.NO_TRADE and orders[symbol].status == "not_sent"
        assert "no bars for NOBARS" in decisions["NOBARS"].rationale
        metadata = latest(instance, "orders", "SPY").metadata
        assert metadata["status"].value == "submitted" and metadata["decision_id"].value == decisions["SPY"].decision_id
        checks = check_results(instance, result.run_id)
        assert {checks[("trade_decisions", "risk_limits", s)] for s in SYMBOLS} == {True}

        # Orders go out in symbol order, whatever the order of the strategies file.
        [order_log] = [r.user_message.removeprefix(ORDER_SEQUENCE_LOG) for r in instance.all_logs(result.run_id)
                       if r.step_key == "orders" and r.user_message.startswith(ORDER_SEQUENCE_LOG)]
        assert [entry.split()[0] for entry in order_log.split(", ")] == sorted(SYMBOLS) != SYMBOLS
        assert "SPY submitted" in order_log

        # Re-running the batch (what a retry does) sends nothing again.
        again = defs.resolve_job_def("decide_and_order").execute_in_process(instance=instance, tags=tags)
        assert again.output_for_node("orders")["SPY"].status == "already_sent"
    sessions = session_factory(f"sqlite:///{tmp_path / 'data' / 'trading.db'}")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(PaperOrderRow)) == 3  # SPY's one bracket
