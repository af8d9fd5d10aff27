"""Materialize all six assets for two symbols × two timeframes and check what comes out against
the bars: entry = last daily close, stop = entry ∓ 2×ATR (TA-Lib on the same bars), R and size
recomputed, exactly one paper order for the accepted decision (working, not filled, when it is
placed), none for the other; the portfolio sync then fills it from the later bars."""

import hashlib
import math
import os
import socket
from datetime import datetime
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
from trading_pipeline.core import costs
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
def environment(tmp_path, monkeypatch):
    """A paper deployment with orders on whose clock is AS_OF (the switches and the clock are read
    from the environment when an order is sent, so they are set there, not only in the resources)."""
    monkeypatch.setenv("TRADING_ORDERS_ENABLED", "yes")
    monkeypatch.setenv("TRADING_AS_OF", AS_OF)
    monkeypatch.delenv("TRADING_KILL_SWITCH", raising=False)
    return {"TRADING_DATA_DIR": str(tmp_path / "data"), "TRADING_ORDERS_ENABLED": "yes", "TRADING_AS_OF": AS_OF}


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

        _, spy, spy_order = results["SPY"]
        assert spy.action == Action.BUY
        risk = spy.entry - spy.stop
        expected_quantity = min(math.floor(100_000 * 0.01 / risk), math.floor(100_000 * 0.10 / spy.entry))
        assert spy.quantity == expected_quantity > 0
        # Placed after Tuesday's close: working until Wednesday's session says whether it fills.
        assert spy_order.status == "submitted" and spy_order.filled_quantity == 0
        assert spy_order.average_fill_price is None
        assert [leg.role for leg in spy_order.legs] == ["entry", "stop_loss", "take_profit"]
        assert spy_order.legs[1].price == spy.stop and spy_order.legs[2].price == spy.targets[0]
        with sessions() as session:
            assert [row.status for row in session.scalars(select(PaperOrderRow).order_by(
                PaperOrderRow.broker_order_id))] == ["Submitted", "PreSubmitted", "PreSubmitted"]

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
    """SPY's entry is placed after Tuesday 2026-09-01's close. Syncing at a later as_of walks the
    daily bars: Wednesday's session trades through the limit and fills the entry (at the open had
    it gapped below); from the next bar on, the first bar whose low reaches the stop (or high the
    target) fills that child, the sibling is cancelled, and the trade's realized R follows from
    the fills."""
    from trading_pipeline.adapters.market_data import SimulatedMarketData
    from trading_pipeline.core.strategies import TimeframeSettings

    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    later = "2026-11-20T22:00:00+00:00"
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        _, decision, order = run_symbol(defs, instance, "SPY")
        assert order.status == "submitted"
        result = defs.resolve_job_def("sync_portfolio").execute_in_process(instance=instance, tags={AS_OF_TAG: later})
        assert result.success
        trades = result.output_for_node("portfolio_sync", "executions")
        positions = result.output_for_node("portfolio_sync", "positions")
        account = result.output_for_node("portfolio_sync", "account_summary")
        check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "no_drift")
        assert check.passed
        # The decision's chart is drawn again with the fills the sync saw, at the same link.
        redrawn = [e.event_specific_data.asset_observation for e in result.all_events
                   if e.event_type_value == "ASSET_OBSERVATION"
                   and e.event_specific_data.asset_observation.asset_key == dg.AssetKey("trade_decisions")]
        (observation,) = redrawn
        assert observation.partition == "SPY" and observation.metadata["fills_drawn"].value >= 1
        link = observation.metadata["decision_chart"].value
        assert link.startswith("http://127.0.0.1:") and decision.decision_id in link
        key = link.split(":3001/", 1)[1]
        assert (tmp_path / "data" / key).stat().st_size > 10_000  # the PNG behind the link, redrawn

    bars = SimulatedMarketData().fetch("SPY", "1d", TimeframeSettings(period="1y"),
                                       datetime.fromisoformat(later))
    wednesday = bars[bars.index > decision.as_of].iloc[0]
    assert wednesday.name.date().isoformat() == "2026-09-02"
    assert wednesday["low"] <= decision.entry  # the simulated market (seed 0) fills the entry on Wednesday
    entry_fill = round(min(wednesday["open"], decision.entry), 2)
    # The stop counts on the entry's own bar too (core/fills.py); on this market Wednesday stays above it,
    # and the entry filled inside the bar, so the target works from the next bar on.
    assert wednesday["low"] > decision.stop
    after = bars[bars.index > wednesday.name]
    hit = after[(after["low"] <= decision.stop) | (after["high"] >= decision.targets[0])]
    (trade,) = trades
    assert trade["decision_id"] == decision.decision_id and trade["entry"] == entry_fill
    if hit.empty:
        assert trade["status"] == "open" and positions[0]["quantity"] == decision.quantity
    else:
        bar = hit.iloc[0]
        stopped = bar["low"] <= decision.stop  # a bar reaching both counts as stopped (conservative)
        expected_exit = round(min(bar["open"], decision.stop), 2) if stopped else round(max(bar["open"], decision.targets[0]), 2)
        assert trade["status"] == "closed" and trade["exit"] == expected_exit
        # Realized R is net of what IBKR's fixed pricing charges on both fills (SEC and FINRA fees on the sale).
        charged = (costs.commission("ibkr_fixed", "BUY", decision.quantity, entry_fill)
                   + costs.commission("ibkr_fixed", "SELL", decision.quantity, expected_exit))
        net = decision.quantity * (expected_exit - entry_fill) - charged
        expected_r = round(net / (decision.quantity * (entry_fill - decision.stop)), 2)
        assert trade["r_multiple"] == expected_r
        assert positions == [] and account["open_positions"] == 0
        assert account["equity"] == pytest.approx(100_000 + net, abs=0.01)


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
        def broker(self, symbols=()):
            return FlakyPaperBroker(self.database.sessions(), self.paper_equity)

    resources = resources_from_env(environment)
    resources["broker"] = FlakyBrokerResource(database=resources["trading_db"],
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


@pytest.fixture
def demo_environment(tmp_path, monkeypatch):
    """What `make demo` runs in, in a temporary Dagster home (the demo turns paper orders on)."""
    monkeypatch.chdir(tmp_path)  # no .env of the checkout is read
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TRADING_ORDERS_ENABLED", "yes")
    for name in ("TRADING_DATA_DIR", "TRADING_AS_OF", "TRADING_BROKER", "TRADING_MARKET_DATA", "TRADING_ANALYST",
                 "TRADING_DATABASE_URL", "TRADING_STRATEGIES_FILE", "TRADING_PAPER_EQUITY", "TRADING_SIM_SEED",
                 "TRADING_KILL_SWITCH", "TRADING_CHART_STORE", "TRADING_IO_MANAGER"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def test_demo_replays_the_story_by_default_and_tells_what_became_of_the_order(demo_environment, capsys):
    from trading_pipeline import demo

    assert demo.STORY_AS_OF == AS_OF
    assert demo.main(["--symbols", "SPY,AAPL"]) == 0  # no --as-of: the story's point in time, stated as such
    out = capsys.readouterr().out
    assert "demo: replaying Tue 2026-09-01 21:30 UTC, after that session's close, on the simulated market" in out
    assert "`make demo DEMO_ARGS=--now` runs at the current time" in out
    spy_row = next(line for line in out.splitlines() if line.startswith("SPY ") and "BUY→BUY" in line)
    assert " submitted " in spy_row  # placed, not filled
    # the chart link is one the browser opens: the chart server `make dev` starts
    assert spy_row.rstrip().endswith("http://127.0.0.1:3001/charts/SPY/1d/2026-09-01T213000Z.png")
    assert "What became of the paper orders (daily bars from the session of 2026-09-02 up to now" in out
    # SPY's limit 825.71 was traded on Wednesday and the target 876.96 on 2026-10-26; IBKR's fixed
    # commission ($1.00 minimum a side, plus SEC and FINRA fees on the sale) comes off the P&L and R.
    story = next(line for line in out.splitlines() if line.startswith("SPY ") and "filled" in line)
    charged = costs.commission("ibkr_fixed", "BUY", 12, 825.71) + costs.commission("ibkr_fixed", "SELL", 12, 876.96)
    pnl = round(12 * (876.96 - 825.71) - charged, 2)
    assert story.split() == ["SPY", "BUY", "12", "filled", "@", "825.71", "on", "2026-09-02", "target", "hit", "@",
                             "876.96", "on", "2026-10-26", f"{pnl / (12 * (825.71 - 791.54)):.2f}", f"+{pnl:,.2f}"]
    assert f"Paper account: equity {100_000 + pnl:,.2f}, cash {100_000 + pnl:,.2f}, 0 open position(s)." in out
    # docs/getting-started.md shows this story as the demo prints it (it showed the P&L before commissions)
    page = (Path(__file__).resolve().parents[2] / "docs" / "getting-started.md").read_text().splitlines()
    assert next(line for line in page if line.startswith("SPY ") and "filled" in line).split() == story.split()
    assert next(line for line in page if line.startswith("Paper account:")) in out
    assert "TRADING_AS_OF" not in os.environ  # the replay's clock is gone once the demo is done


def test_demo_says_why_an_accepted_decision_was_not_sent(demo_environment, capsys, monkeypatch):
    from trading_pipeline import demo

    monkeypatch.setenv("TRADING_ORDERS_ENABLED", "no")
    assert demo.main(["--symbols", "SPY"]) == 0
    out = capsys.readouterr().out
    assert "SPY: orders are off: the deployment sets TRADING_ORDERS_ENABLED=yes" in out


def test_demo_prints_a_failed_blocking_check_as_its_problem_and_fix(demo_environment, capsys):
    from trading_pipeline import demo

    demo.main(["--as-of", "1990-01-02T21:30:00Z", "--symbols", "SPY"])  # before the simulated market's first bar
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "blocking check bars_valid failed: The bar frame is empty" in out
    assert "\nFix: Check the symbol, timeframe and date range" in out
    assert "MetadataValue" not in out  # was: {'problem': TextMetadataValue(text='...'), 'fix': ...}


@pytest.mark.parametrize("symbols", [",", " , ", ""])
def test_demo_with_symbols_naming_none_says_so(demo_environment, capsys, symbols):
    from trading_pipeline import demo

    assert demo.main(["--symbols", symbols]) == 2  # it printed "0 of 0 symbols done"
    assert "names no symbol; give some of" in capsys.readouterr().err


def test_demo_before_the_first_session_closed_says_how_to_see_the_fills(demo_environment, capsys, monkeypatch):
    from trading_pipeline import demo

    monkeypatch.setattr(demo, "_now", lambda: datetime.fromisoformat("2026-09-02T15:00:00+00:00"))
    assert demo.main(["--as-of", AS_OF, "--symbols", "SPY"]) == 0
    out = capsys.readouterr().out
    assert ("Paper orders are working, not filled: they can fill from the session of 2026-09-02 on. After its "
            "close (Wed 2026-09-02 16:00 EDT), run the sync_portfolio job") in out
    assert "What became of" not in out


def test_demo_prints_a_user_error_once_as_problem_and_fix_without_dagsters_stack_traces(demo_environment, capsys,
                                                                                       monkeypatch):
    # TRADING_MARKET_DATA=ibkr with no gateway: the problem and fix came after two stack traces through
    # Dagster's internals (its STEP_FAILURE and RUN_FAILURE logs), ~60 lines.
    from trading_pipeline import demo

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing answers there
    monkeypatch.setenv("TRADING_MARKET_DATA", "ibkr")
    monkeypatch.setenv("IBKR_GATEWAY_URL", f"https://127.0.0.1:{port}/v1/api")
    assert demo.main(["--now", "--symbols", "SPY"]) == 1
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert f"SPY failed at 1d:\nIBKR history for SPY 1d: nothing answers at https://127.0.0.1:{port}/v1/api" in out
    assert "\nFix: start the gateway" in out
    assert "Stack Trace" not in out and "Traceback" not in out
    assert out.count("nothing answers at") == 1


def test_demo_keeps_the_stack_trace_of_an_unexpected_error(demo_environment, capsys, monkeypatch):
    from trading_pipeline import demo
    from trading_pipeline.graph.assets import market

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(market, "materialize_partitions", broken)
    monkeypatch.setattr(market, "READ_RETRY", None)  # the bars' retries (5 + 10 + 20 s) would only repeat it
    assert demo.main(["--now", "--symbols", "SPY"]) == 1
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "Stack Trace" in out and "a bug, not a user error" in out


def test_demo_story_of_an_expired_and_of_an_open_order(tmp_path):
    """The demo's words for a DAY entry that expired unfilled and for a filled entry still open."""
    import pandas as pd

    from trading_pipeline.adapters.broker import PaperBroker
    from trading_pipeline.adapters.order_desk import OrderDesk
    from trading_pipeline.adapters.portfolio_sync import sync_portfolio
    from trading_pipeline.adapters.records import record_decision
    from trading_pipeline.core.analysis import TradeDecision
    from trading_pipeline.core.orders import build_legs
    from trading_pipeline.core.risk import Mark
    from trading_pipeline.demo import _order_story

    sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
    placed_at = datetime.fromisoformat(AS_OF)
    for decision_id, symbol in (("expired", "AAPL"), ("open", "SPY")):
        decision = TradeDecision(decision_id=decision_id, strategy="s", symbol=symbol, as_of=placed_at,
                                 data_through=placed_at, proposed_action=Action.BUY, action=Action.BUY, entry=100.0,
                                 stop=96.0, targets=[106.0], quantity=10, rationale="t", account_equity=1e5)
        record_decision(sessions, decision)
        OrderDesk(sessions, PaperBroker(sessions, 1e5)).submit_once(decision, build_legs(decision, "DAY"), 100.0,
                                                                    placed_at=placed_at)
    wednesday = pd.DatetimeIndex([pd.Timestamp("2026-09-02T13:30:00Z")], name="time")
    bars = {"AAPL": pd.DataFrame({"open": [103.0], "high": [104.0], "low": [101.0], "close": [102.0]}, index=wednesday),
            "SPY": pd.DataFrame({"open": [99.0], "high": [101.0], "low": [98.5], "close": [100.5]}, index=wednesday)}
    broker = PaperBroker(sessions, 1e5)
    broker.simulate_fills(bars)
    report = sync_portfolio(sessions, broker, {"AAPL": Mark(102.0), "SPY": Mark(100.5)})
    (trade,) = report.trades
    (position,) = report.positions
    assert _order_story(sessions, "expired", None, None) == [
        "DAY order expired unfilled at the close of 2026-09-02", "-", "-", "-"]
    assert _order_story(sessions, "open", trade, position) == [
        "BUY 10 filled @ 99.00 on 2026-09-02", "open: stop 96.00 and target 106.00 working", "-", "+15.00 unrealized"]


def test_a_later_decision_never_doubles_a_working_entry(environment, tmp_path):
    """SPY's BUY of Tuesday is working (not yet synced); Thursday's analyses propose BUY again.
    The working entry counts as a position: nothing new is sent until the broker says it is done."""
    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    sessions = session_factory(f"sqlite:///{tmp_path / 'data' / 'trading.db'}")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        _, first, first_order = run_symbol(defs, instance, "SPY")
        assert first.action == Action.BUY and first_order.status == "submitted"
        thursday = "2026-09-03T21:30:00+00:00"
        for timeframe in ("1d", "1w"):
            assert defs.resolve_job_def("analyze_timeframe").execute_in_process(
                partition_key=dg.MultiPartitionKey({"symbol": "SPY", "timeframe": timeframe}),
                instance=instance, tags={AS_OF_TAG: thursday}).success
        result = defs.resolve_job_def("decide_and_order").execute_in_process(
            partition_key="SPY", instance=instance, tags={AS_OF_TAG: thursday})
        second, second_order = result.output_for_node("trade_decisions"), result.output_for_node("orders")
    assert second.decision_id != first.decision_id and second.proposed_action == Action.BUY
    assert second.action == Action.NO_TRADE and second_order.status == "not_sent"
    blocked = next(c for c in second.checks if not c.passed)
    assert blocked.rule == "order_working" and first_order.client_order_id in blocked.detail
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(PaperOrderRow)) == 3  # one bracket only
