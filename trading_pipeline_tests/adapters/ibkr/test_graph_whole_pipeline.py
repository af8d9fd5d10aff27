"""The whole graph in the ibkr modes (market data and broker) against the gateway emulator: bars
come from /iserver/marketdata/history, the decision sizes from the IBKR account, an accepted
decision becomes one bracket at the emulator, and a re-run sends nothing new."""

from datetime import UTC, datetime

import dagster as dg
import sqlalchemy as sa

from trading_pipeline.core.analysis import Action
from trading_pipeline.core.strategies import parse_strategies
from trading_pipeline.definitions import build_definitions
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.resources import resources_from_env
from trading_pipeline_tests.adapters.ibkr.conftest import FAST

SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMZN"]
STRATEGIES = parse_strategies(f"""\
strategies:
  - name: ibkr_test
    symbols: [{", ".join(SYMBOLS)}]
    timeframes: {{1d: {{period: 2y}}, 1w: {{period: 6y}}}}
    orders: {{enabled: true}}
    risk: {{min_r: 0.1, min_profit_margin: 0.0, min_confidence: 0.0, allow_short: true}}  # let setups through
""")


def test_whole_graph_against_the_emulator(emulator_factory, fast_graph_pacing, tmp_path, monkeypatch):
    emulator = emulator_factory()
    environment = {"TRADING_DATA_DIR": str(tmp_path / "data"), "TRADING_MARKET_DATA": "ibkr",
                   "TRADING_BROKER": "ibkr", "TRADING_ORDERS_ENABLED": "yes", "IBKR_GATEWAY_URL": emulator.url,
                   "IBKR_STATE_DIR": str(emulator.pacing_dir)}
    for name, value in environment.items():  # the deployment's environment: switches are read from it when sending
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRADING_AS_OF", raising=False)
    resources = resources_from_env(environment)
    assert resources["ibkr"].client().pacing == FAST  # the runs' client paces as the emulator limits
    defs = build_definitions(STRATEGIES, resources)
    as_of = datetime.now(UTC).replace(microsecond=0).isoformat()
    outcomes, conids = {}, {}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        for symbol in SYMBOLS:
            for timeframe in ("1d", "1w"):
                result = defs.resolve_job_def("analyze_timeframe").execute_in_process(
                    partition_key=dg.MultiPartitionKey({"symbol": symbol, "timeframe": timeframe}),
                    instance=instance, tags={AS_OF_TAG: as_of})
                assert result.success
                bars = result.output_for_node("market_bars")
                assert bars.source == "ibkr" and len(bars.frame) >= 200
                assert bars.frame.index[-1] < datetime.fromisoformat(as_of)
                materialization = result.asset_materializations_for_node("market_bars")[0]
                conids[symbol] = materialization.metadata["conid"].value  # the contract the bars came from
                if timeframe == "1d":  # the market now is where the decision's bars end (no o163 gap)
                    emulator.set_price(symbol, bars.last_close)
            result = defs.resolve_job_def("decide_and_order").execute_in_process(
                partition_key=symbol, instance=instance, tags={AS_OF_TAG: as_of})
            assert result.success
            outcomes[symbol] = (result.output_for_node("trade_decisions"), result.output_for_node("orders"))

        sent = {s: (d, o) for s, (d, o) in outcomes.items() if d.actionable}
        assert sent, {s: (d.proposed_action.value, d.rationale) for s, (d, o) in outcomes.items()}
        for symbol, (decision, order) in outcomes.items():
            assert decision.account_equity and decision.account_equity > 0  # read from the IBKR account
            if decision.actionable:
                assert order.status in ("submitted", "filled") and order.broker == "ibkr"
                assert len(emulator.orders_with_coid(order.client_order_id)) == 1
            else:
                assert order.status == "not_sent" and decision.action in (Action.HOLD, Action.NO_TRADE)
                assert len(emulator.orders_with_coid(f"tp-{decision.decision_id}")) == 0
        with sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'trading.db'}").connect() as db:
            recorded = dict(db.execute(sa.text("SELECT symbol, conid FROM symbols")).all())
        assert recorded == conids and all(isinstance(c, int) and c > 0 for c in conids.values())
        for symbol, (decision, order) in sent.items():
            again = defs.resolve_job_def("decide_and_order").execute_in_process(
                partition_key=symbol, instance=instance, tags={AS_OF_TAG: as_of})
            shown = again.output_for_node("orders")  # what the order is now: sent earlier, maybe filled since
            assert shown.status in ("already_sent", "filled") and "sent earlier for this decision" in shown.reason
            assert len(emulator.orders_with_coid(order.client_order_id)) == 1


BATCH_SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "SPY"]


def test_a_batched_bars_run_fetches_concurrently_within_the_gateways_limits(emulator_factory, fast_graph_pacing,
                                                                            tmp_path, monkeypatch):
    """One run for every symbol of a timeframe (what the daily schedule launches) asks the gateway for
    its histories 4 at a time after one batched contract lookup, never more in flight than IBKR
    allows and with no 429, and each partition keeps the conid its bars came from."""
    from trading_pipeline.graph.assets.batch import range_tags

    emulator = emulator_factory(latency_ms=150)
    environment = {"TRADING_DATA_DIR": str(tmp_path / "data"), "TRADING_MARKET_DATA": "ibkr",
                   "IBKR_GATEWAY_URL": emulator.url, "IBKR_STATE_DIR": str(emulator.pacing_dir)}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    strategies = parse_strategies(f"strategies:\n  - name: batch\n    symbols: [{', '.join(BATCH_SYMBOLS)}]\n"
                                  "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n")
    defs = build_definitions(strategies, resources_from_env(environment))
    as_of = datetime.now(UTC).replace(microsecond=0).isoformat()
    tags = {**range_tags(f"{BATCH_SYMBOLS[0]}|1d", f"{BATCH_SYMBOLS[-1]}|1d"), AS_OF_TAG: as_of}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        emulator.reset_stats()
        result = defs.resolve_job_def("analyze_timeframe").execute_in_process(
            instance=instance, tags=tags, asset_selection=[dg.AssetKey("market_bars")])
        assert result.success
        values = result.output_for_node("market_bars")
        assert list(values) == [f"{s}|1d" for s in BATCH_SYMBOLS]
        assert all(v.source == "ibkr" and len(v.frame) >= 200 for v in values.values())
        conids = {record.event_log_entry.asset_materialization.partition:
                  record.event_log_entry.asset_materialization.metadata["conid"].value
                  for record in instance.fetch_materializations(dg.AssetKey("market_bars"), limit=100).records}
    assert sorted(conids) == sorted(values) and len(set(conids.values())) == len(BATCH_SYMBOLS)
    stats = emulator.stats()
    assert stats["peak_history_in_flight"] == 4  # the client's slots, all used: fetched 4 at a time
    assert stats["rate_limited"] == 0
    assert stats["counts"].get("GET /iserver/marketdata/history") == len(BATCH_SYMBOLS)
    lookups = sum(n for request, n in stats["counts"].items() if "secdef" in request or "trsrv" in request)
    assert lookups < len(BATCH_SYMBOLS)  # batched, not one search per symbol
