"""Changing working orders in place (issue 12, points 2 and 7): a bracket's stop made a market exit
that stays in the one-cancels-other group, resizes, refusals that leave the order as it was, and
the emulator's market orders (executed while its market is open, else at the next open)."""

import pytest

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.ibkr.errors import IBKROrderRejected
from trading_pipeline.core.analysis import OrderLeg
from trading_pipeline.errors import OrderRejectedError
from trading_pipeline_tests.adapters.ibkr.test_orders_and_portfolio import bracket

MODIFY_POST = "/iserver/account/*/order/*"


@pytest.fixture
def open_market(emulator_factory, client_factory):
    emulator = emulator_factory(market_hours="open")
    return emulator, IBKRBroker(client_factory(emulator), order_cache_seconds=0)


def test_stop_made_market_exit_fills_at_the_market_and_cancels_the_take_profit(open_market):
    emulator, broker = open_market
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="mx-1", entry=100.5), 100.5)  # the entry fills at 100
    emulator.set_price("MSFT", 101.0)
    exit_order = broker.modify("mx-1-sl", order_type="MKT")
    assert (exit_order.status, exit_order.filled_quantity, exit_order.average_fill_price) == ("Filled", 10, 101.0)
    assert emulator.count("POST", MODIFY_POST) == 1 and emulator.count("POST", "/iserver/account/*/orders") == 1
    stop = next(o for o in emulator.children_of(emulator.orders_with_coid("mx-1")[0].order_id)
                if o.side == "SELL" and o.order_type == "MKT")
    assert str(stop.order_id) == exit_order.broker_order_id  # the same order, changed in place
    assert broker.find_order("mx-1-tp").status == "Cancelled"  # still one-cancels-other: never both
    assert "MSFT" not in broker.account({}).positions


def test_market_exit_waits_for_the_next_open_while_the_market_is_closed(emulator_factory, client_factory):
    emulator = emulator_factory(market_hours="closed")
    broker = IBKRBroker(client_factory(emulator), order_cache_seconds=0)
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="mx-2", entry=100.5), 100.5)
    exit_order = broker.modify("mx-2-sl", order_type="MKT")
    assert (exit_order.status, exit_order.filled_quantity) == ("Submitted", 0)
    emulator.set_price("MSFT", 97.0)  # the next session opens lower
    emulator.set_market_open(True)
    filled = broker.find_order("mx-2-sl")
    assert (filled.status, filled.filled_quantity, filled.average_fill_price) == ("Filled", 10, 97.0)
    assert broker.find_order("mx-2-tp").status == "Cancelled"


def test_a_standalone_market_exit_closes_a_position_opened_by_hand(open_market):
    emulator, broker = open_market
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="mx-hand", entry=100.5)[:1], 100.5)  # a position without a stop
    emulator.set_price("MSFT", 99.0)
    exit_leg = OrderLeg.model_construct(client_order_id="mx-exit", role="exit", side="SELL", order_type="MKT",
                                        quantity=10, price=None, tif="DAY")  # market orders carry no price
    (placed,) = broker.place("MSFT", [exit_leg], 99.0)
    assert (placed.client_order_id, placed.status, placed.average_fill_price) == ("mx-exit", "Filled", 99.0)
    assert "MSFT" not in broker.account({}).positions
    assert [(e.side, e.quantity) for e in broker.executions("mx-exit")] == [("SELL", 10)]


def test_resize_and_partial_take_profit_reduce_the_other_leg(open_market):
    emulator, broker = open_market
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="mx-3", entry=100.5), 100.5)
    resized = broker.modify("mx-3-sl", quantity=8)
    assert resized.status == "Submitted" and broker.client.order_status(resized.broker_order_id)["total_size"] == "8.0"
    take_profit = broker.find_order("mx-3-tp")
    emulator.fill_partially(int(take_profit.broker_order_id), 3, price=106.0)
    stop = broker.client.order_status(resized.broker_order_id)
    assert (stop["total_size"], stop["order_status"]) == ("5.0", "Submitted")  # OCA with reduction
    assert broker.find_order("mx-3-tp").filled_quantity == 3


def test_refused_or_declined_modification_leaves_the_order_as_it_was(open_market):
    emulator, broker = open_market
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="mx-4", entry=99.0, stop=95.0, target=105.0), 99.0)  # works, unfilled
    emulator.inject(MODIFY_POST, method="POST", body={"error": "Order cannot be modified at this time"})
    with pytest.raises(OrderRejectedError) as raised:
        broker.modify("mx-4-sl", price=94.0)
    assert "Order cannot be modified at this time" in str(raised.value)
    entry_id = broker.find_order("mx-4").broker_order_id
    assert broker.client.order_status(broker.find_order("mx-4-sl").broker_order_id)["stop_price"] == "95.00"
    with pytest.raises(IBKROrderRejected) as declined:
        broker.modify("mx-4", price=90.0)  # >3% from the market: IBKR asks o163, not on the allow-list
    assert declined.value.message_ids == ("o163",)
    assert "keeps working as it was" in declined.value.problem and "rejected" not in declined.value.fix
    assert broker.client.order_status(entry_id)["limit_price"] == "99.00"
    assert broker.modify("mx-never-sent", order_type="MKT") is None  # unknown to IBKR


def test_a_final_order_is_returned_unchanged_without_a_request(open_market):
    emulator, broker = open_market
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="mx-5", entry=100.5), 100.5)
    unchanged = broker.modify("mx-5", price=100.0)
    assert (unchanged.status, unchanged.filled_quantity, unchanged.average_fill_price) == ("Filled", 10, 100.0)
    assert emulator.count("POST", MODIFY_POST) == 0
