"""The portfolio assets in the Dagster graph (issue 12 point 11, issue 14): they hang off `orders`
in the lineage; the sync records what each order became as an observation on the `orders`
partition; the positions and executions tables are readable (rounded, aligned, R and P&L shown)."""

from datetime import UTC, datetime

import dagster as dg
import pytest

from trading_pipeline.adapters.broker import PaperBroker
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import session_factory
from trading_pipeline.core.analysis import Action, TradeDecision
from trading_pipeline.core.orders import build_legs
from trading_pipeline.core.strategies import parse_strategies
from trading_pipeline.definitions import build_definitions
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.portfolio import TRADE_COLUMNS, _table
from trading_pipeline.graph.resources import resources_from_env

STRATEGIES = parse_strategies("""\
strategies:
  - name: books
    symbols: [AAPL, SPY]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
    orders: {enabled: true}
""")
TUESDAY_AFTER_CLOSE = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
# AAPL's sessions: Wednesday trades down to 99 (the 100 limit fills at the 99.50 open), Thursday
# falls through the 96 stop, Friday recovers (a mark, after the trade).
AAPL_1D = """time,open,high,low,close,volume
2026-08-31,98.0,100.5,97.5,100.0,1000000
2026-09-01,100.0,101.0,99.2,100.2,1000000
2026-09-02,99.5,101.0,99.0,100.5,1000000
2026-09-03,100.0,100.5,95.0,95.5,1000000
2026-09-04,95.5,97.0,95.0,96.8,1000000
"""


@pytest.fixture
def deployment(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "AAPL_1d.csv").write_text(AAPL_1D)
    environment = {"TRADING_DATA_DIR": str(tmp_path / "data"), "TRADING_MARKET_DATA": "csv",
                   "TRADING_CSV_DIR": str(tmp_path / "csv")}
    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    sessions = session_factory(f"sqlite:///{tmp_path / 'data' / 'trading.db'}")
    decision = TradeDecision(decision_id="g1", strategy="books", symbol="AAPL", as_of=TUESDAY_AFTER_CLOSE,
                             data_through=TUESDAY_AFTER_CLOSE, proposed_action=Action.BUY, action=Action.BUY,
                             entry=100.0, stop=96.0, targets=[106.0], quantity=50, rationale="t",
                             account_equity=100_000.0)
    record_decision(sessions, decision)
    # What the orders step does, placed at the decision's time so the paper broker fills it from
    # the bars after it: rows written 'submitting', the order placed, the broker's answer recorded.
    legs, desk = build_legs(decision, "DAY"), OrderDesk(sessions, PaperBroker(sessions, 100_000.0))
    desk._record(decision, legs, {}, "submitting", "about to send")
    answers = PaperBroker(sessions, 100_000.0).place("AAPL", legs, 100.0, placed_at=TUESDAY_AFTER_CLOSE)
    desk._record(decision, legs, {a.client_order_id: a for a in answers}, "unknown", "broker accepted")
    return defs


def sync(defs, instance, as_of: str):
    result = defs.resolve_job_def("sync_portfolio").execute_in_process(instance=instance, tags={AS_OF_TAG: as_of})
    assert result.success
    return result


def materialized(result, asset: str) -> dict:
    (event,) = [m for m in result.asset_materializations_for_node("portfolio_sync")
                if m.asset_key == dg.AssetKey(asset)]
    return event.metadata


def observations(instance) -> list:
    records = instance.fetch_observations(dg.AssetKey("orders"), limit=20).records
    return [(r.partition_key, r.asset_observation.metadata) for r in reversed(records)]


def test_the_portfolio_assets_hang_off_every_symbols_orders(deployment, tmp_path):
    # Resolved under a live instance: an instance an earlier test left behind is not consulted.
    with dg.instance_for_test(temp_dir=str(tmp_path)):
        graph = deployment.resolve_asset_graph()
    for asset in ("positions", "executions", "account_summary"):
        node = graph.get(dg.AssetKey(asset))
        assert dg.AssetKey("orders") in node.parent_keys
        assert isinstance(graph.get_partition_mapping(node.key, dg.AssetKey("orders")), dg.AllPartitionMapping)
    # the sync job still materializes only the portfolio (it never runs the orders step)
    job = deployment.resolve_job_def("sync_portfolio")
    assert {key.to_user_string() for key in job.asset_layer.selected_asset_keys} == {
        "positions", "executions", "account_summary"}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:  # before any fill: empty books
        executions = materialized(sync(deployment, instance, "2026-09-01T22:00:00+00:00"), "executions")
    assert (executions["trades"].value, executions["realized_pnl"].value) == ("_none_", 0.0)


def test_the_sync_observes_what_the_order_became_and_shows_readable_books(deployment, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        wednesday = sync(deployment, instance, "2026-09-02T21:00:00+00:00")
        (seen,) = observations(instance)
        partition, metadata = seen
        assert partition == "AAPL"
        assert (metadata["decision_id"].value, metadata["status"].value, metadata["filled"].value) == (
            "g1", "Filled", "50/50")
        assert metadata["average_fill_price"].value == 99.5 and metadata["filled_child"].value == "none"
        assert "| entry | BUY | LMT | 50 | 100.00 | Filled | 50 | 99.50 | " in metadata["legs"].value
        positions = materialized(wednesday, "positions")["positions"].value
        # marked at Wednesday's close; the stop that protects it is shown
        assert "| AAPL | 50 | 99.50 | 100.50 | +50.00 | 5,025.00 | 96.00 |" in positions
        summary = wednesday.output_for_node("portfolio_sync", "account_summary")
        assert summary["equity"] == pytest.approx(summary["cash"] + 50 * 100.5)  # valued at the mark

        thursday = sync(deployment, instance, "2026-09-03T21:00:00+00:00")
        partition, metadata = observations(instance)[-1]
        assert partition == "AAPL" and metadata["filled_child"].value == "stop_loss"
        assert "| stop_loss | SELL | STP | 50 | 96.00 | Filled | 50 | 96.00 |" in metadata["legs"].value
        assert "tp-g1-sl: Submitted → Filled (filled 50/50)" in metadata["changes"].value
        trades = materialized(thursday, "executions")["trades"].value
        header, alignment, row = trades.splitlines()
        assert header == ("| symbol | side | qty | entry | exit | P&L | R | status | exit by | comm. | held | "
                          "decision |")
        assert alignment == "|:---|:---|---:|---:|---:|---:|---:|:---|:---|---:|:---|:---|"
        (trade,) = thursday.output_for_node("portfolio_sync", "executions")
        net = -175.0 - trade["commission"]  # 1R: the 99.50 fill to the 96 stop
        assert row == (f"| AAPL | BUY | 50 | 99.50 | 96.00 | {net:+,.2f} | {net / 175.0:+.2f} | closed | stop_loss | "
                       f"{trade['commission']:,.2f} | 1d 0h | g1 |")
        assert materialized(thursday, "positions")["positions"].value == "_none_"

        sync(deployment, instance, "2026-09-04T21:00:00+00:00")  # nothing changed: no new observation
        assert len(observations(instance)) == 2


def test_tables_round_quantities_prices_pnl_and_r():
    table = _table([{"symbol": "SPY", "side": "BUY", "quantity": 204.0, "entry": 512.3456, "exit": None,
                     "realized_pnl": 1234.5, "r_multiple": 1.23456, "status": "open", "decision_id": "d"}],
                   TRADE_COLUMNS).value
    assert table.splitlines()[-1] == "| SPY | BUY | 204 | 512.35 |  | +1,234.50 | +1.23 | open |  |  |  | d |"
