"""Materialize all six assets for two symbols × two timeframes and check what comes out against
the bars: entry = last daily close, stop = entry ∓ 2×ATR (TA-Lib on the same bars), R and size
recomputed, exactly one paper order for the accepted decision, none for the other."""

import hashlib
from datetime import datetime
import math
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg
import pytest
import talib
from sqlalchemy import func, select

from trading_pipeline.adapters.trading_db import (
    ChartRow,
    DecisionRow,
    PaperOrderRow,
    StrategyRow,
    SymbolRow,
    session_factory,
)
from trading_pipeline.core.analysis import Action
from trading_pipeline.core.strategies import parse_strategies
from trading_pipeline.definitions import build_definitions
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.resources import resources_from_env

# At this point in time the simulated market (seed 0) gives SPY an accepted BUY and AAPL none.
AS_OF = "2026-09-01T21:30:00+00:00"
STRATEGIES = parse_strategies("""\
strategies:
  - name: graph_test
    symbols: [SPY, AAPL]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
    orders: {enabled: true}
""")


def run_symbol(defs, instance, symbol):
    outputs = {}
    for timeframe in ("1d", "1w"):
        result = defs.resolve_job_def("analyze_timeframe").execute_in_process(
            partition_key=dg.MultiPartitionKey({"symbol": symbol, "timeframe": timeframe}),
            instance=instance, tags={AS_OF_TAG: AS_OF})
        assert result.success
        outputs[timeframe] = {name: result.output_for_node(name)
                              for name in ("market_bars", "indicator_frames", "chart_images", "ai_analyses")}
    result = defs.resolve_job_def("decide_and_order").execute_in_process(
        partition_key=symbol, instance=instance, tags={AS_OF_TAG: AS_OF})
    assert result.success
    return outputs, result.output_for_node("trade_decisions"), result.output_for_node("orders")


@pytest.fixture
def environment(tmp_path):
    return {"TRADING_DATA_DIR": str(tmp_path / "data"), "TRADING_ORDERS_ENABLED": "yes"}


def test_whole_graph_two_symbols(environment, tmp_path):
    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    sessions = session_factory(f"sqlite:///{tmp_path / 'data' / 'trading.db'}")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        results = {symbol: run_symbol(defs, instance, symbol) for symbol in ("SPY", "AAPL")}

        for symbol, (outputs, decision, order) in results.items():
            for timeframe, out in outputs.items():
                bars = out["market_bars"].frame
                assert str(bars.index[-1]) < AS_OF and bars.index.is_monotonic_increasing
                png_path = Path(urlparse(out["chart_images"].uri).path)
                assert hashlib.sha256(png_path.read_bytes()).hexdigest() == out["chart_images"].sha256
                assert out["ai_analyses"].chart.sha256 == out["chart_images"].sha256
            daily = outputs["1d"]["market_bars"].frame
            atr = talib.ATR(daily["high"].to_numpy(), daily["low"].to_numpy(), daily["close"].to_numpy(), 14)[-1]
            last_close = float(daily["close"].iloc[-1])
            assert decision.data_through == daily.index[-1].to_pydatetime()
            if decision.proposed_action in (Action.BUY, Action.SELL):
                direction = 1 if decision.proposed_action == Action.BUY else -1
                assert decision.entry == pytest.approx(last_close, abs=0.005)
                assert decision.stop == pytest.approx(last_close - direction * 2 * atr, abs=0.011)
                risk = abs(decision.entry - decision.stop)
                assert decision.r_multiple == pytest.approx(abs(decision.targets[0] - decision.entry) / risk, abs=1e-3)
            with sessions() as session:
                row = session.get(DecisionRow, decision.decision_id)
                assert row is not None and row.action == decision.action.value
                assert session.get(SymbolRow, symbol).strategy == "graph_test"
                for timeframe, out in outputs.items():
                    chart_row = session.get(ChartRow, out["chart_images"].key)
                    assert chart_row.sha256 == out["chart_images"].sha256 and chart_row.timeframe == timeframe
        with sessions() as session:
            assert session.get(StrategyRow, "graph_test").settings["risk"]["min_r"] == 1.0

        spy_outputs, spy, spy_order = results["SPY"]
        assert spy.action == Action.BUY
        risk = spy.entry - spy.stop
        expected_quantity = min(math.floor(100_000 * 0.01 / risk), math.floor(100_000 * 0.10 / spy.entry))
        assert spy.quantity == expected_quantity > 0
        assert spy_order.status == "filled" and spy_order.filled_quantity == spy.quantity
        assert [leg.role for leg in spy_order.legs] == ["entry", "stop_loss", "take_profit"]
        assert spy_order.legs[1].price == spy.stop and spy_order.legs[2].price == spy.targets[0]

        _, aapl, aapl_order = results["AAPL"]
        assert aapl.action != Action.BUY and aapl.quantity == 0
        assert aapl_order.status == "not_sent" and aapl.action.value in aapl_order.reason

        # Re-materializing the decision and order for SPY sends nothing new.
        _, spy_again, spy_order_again = run_symbol(defs, instance, "SPY")
        assert spy_again.decision_id == spy.decision_id
        assert spy_order_again.status == "already_sent"
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(PaperOrderRow)
                                  .where(PaperOrderRow.client_order_id == spy_order.client_order_id)) == 1
            assert session.scalar(select(func.count()).select_from(PaperOrderRow)) == 3  # one bracket

        # The UI shows a thumbnail on each chart materialization.
        event = instance.get_latest_materialization_event(dg.AssetKey("chart_images"))
        thumbnail = event.asset_materialization.metadata["thumbnail"].value
        assert thumbnail.startswith("![chart](data:image/png;base64,") and len(thumbnail) < 120_000


def test_orders_stay_off_without_opt_in(tmp_path):
    environment = {"TRADING_DATA_DIR": str(tmp_path / "data")}
    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        _, decision, order = run_symbol(defs, instance, "SPY")
    assert decision.action == Action.BUY
    assert order.status == "not_sent" and "TRADING_ORDERS_ENABLED=yes" in order.reason
    sessions = session_factory(f"sqlite:///{tmp_path / 'data' / 'trading.db'}")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(PaperOrderRow)) == 0


def test_portfolio_sync_advances_the_bracket_through_later_bars(environment, tmp_path):
    """After SPY's entry fills on 2026-09-01, syncing at a later as_of walks the daily bars: the
    first bar whose low reaches the stop (or high the target) fills that child, the sibling is
    cancelled, and the trade's realized R follows from the fills."""
    from trading_pipeline.adapters.market_data import SimulatedMarketData
    from trading_pipeline.core.strategies import TimeframeSettings

    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    later = "2026-11-20T22:00:00+00:00"
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        _, decision, order = run_symbol(defs, instance, "SPY")
        assert order.status == "filled"
        result = defs.resolve_job_def("sync_portfolio").execute_in_process(instance=instance, tags={AS_OF_TAG: later})
        assert result.success
        trades = result.output_for_node("portfolio_sync", "executions")
        positions = result.output_for_node("portfolio_sync", "positions")
        account = result.output_for_node("portfolio_sync", "account_summary")
        check = [e for e in result.get_asset_check_evaluations() if e.check_name == "no_drift"][0]
        assert check.passed

    bars = SimulatedMarketData().fetch("SPY", "1d", TimeframeSettings(period="1y"),
                                       datetime.fromisoformat(later))
    after = bars[bars.index > decision.as_of]
    hit = after[(after["low"] <= decision.stop) | (after["high"] >= decision.targets[0])]
    (trade,) = trades
    assert trade["decision_id"] == decision.decision_id and trade["entry"] == decision.entry
    if hit.empty:
        assert trade["status"] == "open" and positions[0]["quantity"] == decision.quantity
    else:
        bar = hit.iloc[0]
        stopped = bar["low"] <= decision.stop  # a bar reaching both counts as stopped (conservative)
        expected_exit = round(min(bar["open"], decision.stop), 2) if stopped else round(max(bar["open"], decision.targets[0]), 2)
        assert trade["status"] == "closed" and trade["exit"] == expected_exit
        expected_r = round((expected_exit - decision.entry) / (decision.entry - decision.stop), 2)
        assert trade["r_multiple"] == expected_r
        assert positions == [] and account["open_positions"] == 0
        assert account["equity"] == pytest.approx(100_000 + decision.quantity * (expected_exit - decision.entry), abs=0.01)


def test_order_step_failing_after_send_then_rerun_sends_once(environment, tmp_path):
    """The orders step dies between the broker's acceptance and the record; re-executing the
    job (what a user does after a failure) reconciles instead of sending a second order."""
    from trading_pipeline.adapters.broker import PaperBroker
    from trading_pipeline.graph.resources import BrokerResource

    class FlakyPaperBroker(PaperBroker):
        calls = 0

        def place(self, *args, **kwargs):
            answer = super().place(*args, **kwargs)
            FlakyPaperBroker.calls += 1
            if FlakyPaperBroker.calls == 1:
                raise ConnectionResetError("connection lost after the broker accepted the order")
            return answer

    class FlakyBrokerResource(BrokerResource):
        def broker(self):
            return FlakyPaperBroker(self.database.sessions(), self.paper_equity)

    resources = resources_from_env(environment)
    resources["broker"] = FlakyBrokerResource(orders_enabled=True, database=resources["trading_db"],
                                              ibkr=resources["ibkr"])
    defs = build_definitions(STRATEGIES, resources)
    sessions = session_factory(f"sqlite:///{tmp_path / 'data' / 'trading.db'}")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        for timeframe in ("1d", "1w"):
            assert defs.resolve_job_def("analyze_timeframe").execute_in_process(
                partition_key=dg.MultiPartitionKey({"symbol": "SPY", "timeframe": timeframe}),
                instance=instance, tags={AS_OF_TAG: AS_OF}).success
        job = defs.resolve_job_def("decide_and_order")
        first = job.execute_in_process(partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF},
                                       raise_on_error=False)
        assert not first.success
        second = job.execute_in_process(partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF})
        order = second.output_for_node("orders")
    assert order.status == "already_sent" and FlakyPaperBroker.calls == 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(PaperOrderRow)
                              .where(PaperOrderRow.client_order_id == order.client_order_id)) == 1


def test_s3_io_manager_and_chart_store_for_several_machines(tmp_path, s3_endpoint, monkeypatch):
    """TRADING_IO_MANAGER=s3 keeps asset values in the bucket (what runs on other machines read)."""
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="io-test")
    environment = {"TRADING_DATA_DIR": str(tmp_path / "data"), "TRADING_IO_MANAGER": "s3",
                   "TRADING_CHART_STORE": "s3", "TRADING_S3_BUCKET": "io-test", "AWS_ENDPOINT_URL": s3_endpoint}
    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = defs.resolve_job_def("analyze_timeframe").execute_in_process(
            partition_key=dg.MultiPartitionKey({"symbol": "SPY", "timeframe": "1d"}), instance=instance,
            tags={AS_OF_TAG: AS_OF})
        assert result.success
        chart = result.output_for_node("chart_images")
    keys = {item["Key"] for item in client.list_objects_v2(Bucket="io-test")["Contents"]}
    assert {"dagster/market_bars/SPY/1d", "dagster/indicator_frames/SPY/1d", "dagster/ai_analyses/SPY/1d"} <= keys
    assert chart.uri == f"s3://io-test/{chart.key}" and chart.key in keys
    assert not (tmp_path / "storage" / "market_bars").exists()  # nothing went to the local fs IO manager
