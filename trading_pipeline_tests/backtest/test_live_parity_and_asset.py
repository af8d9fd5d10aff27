"""The live graph's decision for a date equals the backtest's for that date (materialized in
process: bars -> indicators -> chart -> analysis -> decision), and the `backtest` asset shows its
statistics table and equity chart and stores the run."""

from __future__ import annotations

from datetime import date

import dagster as dg
from sqlalchemy import func, select

from trading_pipeline.adapters.trading_db import session_factory
from trading_pipeline.backtest import runner
from trading_pipeline.backtest.settings import BacktestSettings
from trading_pipeline.backtest.store import BacktestDecisionRow, BacktestEquityRow, BacktestRunRow
from trading_pipeline.core import market_calendar
from trading_pipeline.core.strategies import parse_strategies
from trading_pipeline.definitions import build_definitions
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.resources import resources_from_env

STRATEGIES = parse_strategies("""\
strategies:
  - name: parity
    symbols: [SPY]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
    orders: {enabled: true}
""")


def live_decision(defs, instance, as_of: str):
    """The decision and the bars the live graph read."""
    bars = {}
    for timeframe in ("1d", "1w"):
        result = defs.resolve_job_def("analyze_timeframe").execute_in_process(
            partition_key=dg.MultiPartitionKey({"symbol": "SPY", "timeframe": timeframe}),
            instance=instance, tags={AS_OF_TAG: as_of})
        assert result.success
        bars[timeframe] = result.output_for_node("market_bars").frame
    result = defs.resolve_job_def("decide_and_order").execute_in_process(
        partition_key="SPY", instance=instance, tags={AS_OF_TAG: as_of}, raise_on_error=False)
    # The decision is what is compared; steps after it (orders are off) do not matter here.
    assert not [e for e in result.all_node_events if e.step_key == "trade_decisions" and e.is_failure]
    return result.output_for_node("trade_decisions"), bars


def backtest_decision(session: date, bars=None):
    """The backtest's decision at `session`'s close: on the live graph's own bars when given, else
    on the backtest's usual history (a longer warm-up: indicators differ in the 11th digit)."""
    decisions = []
    settings = BacktestSettings(strategy="parity", start=session, end=session)
    strategy = STRATEGIES.strategies[0]
    runner.run_backtest(settings, strategies_file=STRATEGIES, on_decision=decisions.append,
                        loaded=(strategy, {"SPY": bars}, {"SPY": bars["1d"]["close"]}) if bars else None)
    assert len(decisions) == 1
    return decisions[0]


def test_the_live_graphs_decision_equals_the_backtests(tmp_path, monkeypatch):
    # Orders off, the real clock: nothing is sent (an order sent at the first session would hold
    # the symbol at the second, which the backtest, deciding each session alone, does not see).
    monkeypatch.delenv("TRADING_ORDERS_ENABLED", raising=False)
    monkeypatch.delenv("TRADING_AS_OF", raising=False)
    environment = {"TRADING_DATA_DIR": str(tmp_path / "data")}
    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    compared = []
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        for session in (date(2026, 9, 1), date(2026, 6, 16)):
            close = market_calendar.calendar().session_close(session)
            live, bars = live_decision(defs, instance, close.isoformat())
            same_bars = backtest_decision(session, bars)
            assert live.model_dump(exclude={"charts"}) == same_bars.model_dump(exclude={"charts"})
            own_history = backtest_decision(session)
            for field in ("decision_id", "proposed_action", "action", "entry", "stop", "targets", "r_multiple",
                          "profit_margin", "quantity", "confidence", "closes_position", "confirmation"):
                assert getattr(own_history, field) == getattr(live, field), field
            assert [(c.rule, c.passed) for c in own_history.checks] == [(c.rule, c.passed) for c in live.checks]
            compared.append(live.proposed_action.value)
    assert {"BUY", "SELL"} & set(compared)  # a proposal went through the risk gates in both


def test_backtest_asset_shows_statistics_and_chart_and_stores_the_run(tmp_path):
    environment = {"TRADING_DATA_DIR": str(tmp_path / "data")}
    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    config = {"ops": {"backtest": {"config": {"start": "2024-01-01", "end": "2024-06-28"}}}}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = defs.resolve_job_def("run_backtest").execute_in_process(
            partition_key="parity", instance=instance, run_config=config)
        assert result.success
        event = instance.get_latest_materialization_event(dg.AssetKey("backtest"))
        metadata = event.asset_materialization.metadata
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["after_knowledge_cutoff"].passed  # the rules analyst
        assert checks["enough_trades"].passed is (metadata["trades"].value >= 30)
    figures = {row.data["figure"]: row.data for row in metadata["statistics"].value.records}
    assert {"Sharpe", "Max drawdown", "Expectancy (R)", "SQN (over R)", "Commissions paid"} <= set(figures)
    assert metadata["equity_chart"].value.startswith("![chart](data:image/png;base64,")
    assert metadata["gate_rejections"].value.records
    run_key = metadata["run_key"].value
    sessions = session_factory(f"sqlite:///{tmp_path / 'data' / 'trading.db'}")
    with sessions() as session:
        assert session.get(BacktestRunRow, run_key).strategy == "parity"
        count = lambda table: session.scalar(select(func.count()).select_from(table)
                                             .where(table.run_key == run_key))
        assert count(BacktestEquityRow) == count(BacktestDecisionRow) == 124



def test_the_backtest_asset_refuses_an_end_after_the_runs_point_in_time(tmp_path):
    environment = {"TRADING_DATA_DIR": str(tmp_path / "data")}
    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    config = {"ops": {"backtest": {"config": {"start": "2024-01-01", "end": "2024-12-31"}}}}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = defs.resolve_job_def("run_backtest").execute_in_process(
            partition_key="parity", instance=instance, run_config=config, raise_on_error=False,
            tags={AS_OF_TAG: "2024-06-05T15:00:00+00:00"})
        assert not result.success
        [failure] = [e for e in result.all_node_events if e.is_failure]
        message = failure.step_failure_data.user_failure_data.description
        assert "after the last completed session 2024-06-04" in message and "set end to 2024-06-04" in message
        assert instance.get_latest_materialization_event(dg.AssetKey("backtest")) is None
