"""Bracket children IBKR no longer lists after a day rollover (issue 12 point 7), and children whose
`parentId` is the parent's cOID after a reconciliation."""

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline_tests.adapters.ibkr.test_orders_and_portfolio import bracket


def test_a_fired_stop_is_found_after_the_rollover_by_its_saved_order_id(emulator, client, client_factory, tmp_path):
    ids = tmp_path / "order-ids.json"
    broker = IBKRBroker(client, id_map_path=ids, order_cache_seconds=0)
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="ro-1", entry=100.5), 100.5)
    emulator.set_price("MSFT", 95.0)  # the stop fires; the take-profit is cancelled (OCA)
    emulator.new_day()
    listed = client.live_orders()
    assert not any(o.get("order_ref") == "ro-1" for o in listed) and listed == []  # IBKR lists today only
    for reader in (broker, IBKRBroker(client_factory(emulator), id_map_path=ids)):  # also a new process
        stop = reader.find_order("ro-1-sl")
        assert (stop.status, stop.filled_quantity, stop.average_fill_price) == ("Filled", 10, 95.0)
        assert stop.broker_order_id == reader.order_id_for("ro-1-sl")
        assert [(e.side, e.quantity, e.price) for e in reader.executions("ro-1-sl")] == [("SELL", 10, 95.0)]
        take_profit = reader.find_order("ro-1-tp")
        assert (take_profit.status, take_profit.filled_quantity) == ("Cancelled", 0)
        assert "one-cancels-other: ro-1-sl filled" in take_profit.detail
        assert reader.find_order("ro-1").status == "Filled"


def test_children_learnt_from_the_live_list_are_found_after_the_rollover(emulator, client_factory, tmp_path):
    ids = tmp_path / "order-ids.json"
    emulator.set_price("MSFT", 100.0)
    IBKRBroker(client_factory(emulator)).place("MSFT", bracket(coid="ro-2", entry=100.5), 100.5)  # map not kept
    reconciling = IBKRBroker(client_factory(emulator), id_map_path=ids, order_cache_seconds=0)
    assert {o.client_order_id for o in reconciling.open_orders()} >= {"ro-2-sl", "ro-2-tp"}
    emulator.set_price("MSFT", 107.0)  # the take-profit fills
    emulator.new_day()
    later = IBKRBroker(client_factory(emulator), id_map_path=ids)
    assert later.find_order("ro-2-tp").status == "Filled"
    assert later.find_order("ro-2-sl").status == "Cancelled"


def test_children_whose_parent_id_is_the_parents_coid_are_matched(emulator_factory, client_factory):
    emulator = emulator_factory(parent_id_as_coid=True)
    emulator.set_price("MSFT", 100.0)
    IBKRBroker(client_factory(emulator)).place("MSFT", bracket(coid="pc-1", entry=98.0), 98.0)
    assert all(r.get("parentId") in (None, "pc-1") for r in client_factory(emulator).live_orders()
               if r.get("order_ref") != "pc-1")
    reconciled = IBKRBroker(client_factory(emulator))  # a new process: no saved ids
    parent = emulator.orders_with_coid("pc-1")[0]
    children = {c.order_type: str(c.order_id) for c in emulator.children_of(parent.order_id)}
    assert reconciled.find_order("pc-1-sl").broker_order_id == children["STP"]
    assert reconciled.find_order("pc-1-tp").broker_order_id == children["LMT"]
    working = {(o.client_order_id, o.broker_order_id) for o in reconciled.open_orders()}
    assert working == {("pc-1", str(parent.order_id)), ("pc-1-sl", children["STP"]), ("pc-1-tp", children["LMT"])}


def test_an_execution_listed_twice_counts_once(emulator, client, tmp_path):
    """A gateway that lists one execution twice (the same execution_id) must not double the fill of
    an order IBKR no longer lists: its filled quantity sizes what the sync does with the position."""
    broker = IBKRBroker(client, id_map_path=tmp_path / "order-ids.json", order_cache_seconds=0)
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="ro-3", entry=100.5), 100.5)
    emulator.set_price("MSFT", 95.0)  # the stop fires
    emulator.new_day()
    with emulator.state.lock:
        emulator.state.executions.extend(dict(e) for e in list(emulator.state.executions))  # every one twice
    stop = broker.find_order("ro-3-sl")
    assert (stop.status, stop.filled_quantity, stop.average_fill_price) == ("Filled", 10, 95.0)
    assert [(e.side, e.quantity) for e in broker.executions("ro-3-sl")] == [("SELL", 10)]
    assert broker.find_order("ro-3").filled_quantity == 10
