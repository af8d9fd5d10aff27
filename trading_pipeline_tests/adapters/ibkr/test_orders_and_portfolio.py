"""Orders (bracket, reply-loop policy, duplicates, never-retried POSTs, live orders, cancel, modify,
live-account refusal, executions) and the portfolio (paging, cache invalidation, AccountState)."""

import threading
import time
from datetime import UTC, datetime

import pytest

from trading_pipeline.adapters.broker import DuplicateOrderError
from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.ibkr.errors import (
    IBKRLiveAccountRefused,
    IBKROrderRejected,
    IBKROrderStateUnknown,
    IBKRRateLimited,
    IBKRRequestError,
)
from trading_pipeline.adapters.ibkr.market_data import IBKRMarketData
from trading_pipeline.core.analysis import OrderLeg
from trading_pipeline.core.risk import Mark
from trading_pipeline.core.strategies import TimeframeSettings

ORDERS_POST = "/iserver/account/*/orders"


def bracket(coid="tp-d1", entry=100.0, stop=96.0, target=106.0, quantity=10, side="BUY"):
    exit_side = "SELL" if side == "BUY" else "BUY"
    return [OrderLeg(client_order_id=coid, role="entry", side=side, order_type="LMT", quantity=quantity,
                     price=entry, tif="DAY"),
            OrderLeg(client_order_id=f"{coid}-sl", role="stop_loss", side=exit_side, order_type="STP",
                     quantity=quantity, price=stop, tif="GTC"),
            OrderLeg(client_order_id=f"{coid}-tp", role="take_profit", side=exit_side, order_type="LMT",
                     quantity=quantity, price=target, tif="GTC")]


@pytest.fixture
def broker(client) -> IBKRBroker:
    return IBKRBroker(client)


def test_bracket_is_one_request_children_by_parent_id_stop_warning_auto_confirmed(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    answers = broker.place("MSFT", bracket(entry=100.5), reference_price=100.5)
    assert emulator.count("POST", ORDERS_POST) == 1
    body_orders = [o for o in emulator.state.orders.values()]
    parent = next(o for o in body_orders if o.coid == "tp-d1")
    children = emulator.children_of(parent.order_id)
    assert sorted((c.order_type, c.side, c.price, c.coid) for c in children) == [
        ("LMT", "SELL", 106.0, None), ("STP", "SELL", 96.0, None)]  # no cOID on children (IBKR's rule)
    replies = emulator.requests("POST", "/iserver/reply/*")
    assert len(replies) == 1  # o10331, the stop-order warning, is on the allow-list
    assert [(a.client_order_id, a.status) for a in answers] == [
        ("tp-d1", "Filled"), ("tp-d1-sl", "Submitted"), ("tp-d1-tp", "Submitted")]
    assert answers[0].filled_quantity == 10 and answers[0].average_fill_price == 100.0
    assert answers[0].broker_order_id == str(parent.order_id)
    single = broker.place("MSFT", bracket(coid="tp-single", entry=99.5)[:1], 99.5)  # closing trade: one leg
    assert [(o.client_order_id, o.status) for o in single] == [("tp-single", "Submitted")]
    assert len(emulator.requests("POST", "/iserver/reply/*")) == 1  # no stop order, no question


def test_unknown_question_is_declined_with_ibkrs_text(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    emulator.add_question("o999", "This order exceeds your unusual-activity threshold.\nAre you sure?")
    with pytest.raises(IBKROrderRejected) as raised:
        broker.place("MSFT", bracket(coid="tp-q1", entry=100.5), 100.5)
    message = str(raised.value)
    assert "o999" in message and "This order exceeds your unusual-activity threshold. Are you sure?" in message
    assert "IBKR_AUTO_CONFIRM" in raised.value.fix and raised.value.message_ids == ("o999",)
    assert emulator.orders_with_coid("tp-q1") == []  # declined: nothing placed
    declined = emulator.requests("POST", "/iserver/reply/*")[-1]
    assert declined[3] == 200


def test_price_far_from_market_question_is_declined_by_default(emulator, broker, client_factory, monkeypatch):
    emulator.set_price("MSFT", 100.0)
    with pytest.raises(IBKROrderRejected) as raised:
        broker.place("MSFT", bracket(coid="tp-far", entry=110.0, stop=105.0, target=120.0), 110.0)
    assert raised.value.message_ids == ("o163",) and "Percentage constraint of 3%" in raised.value.ibkr_text
    assert emulator.orders_with_coid("tp-far") == []
    monkeypatch.setenv("IBKR_AUTO_CONFIRM", "o10331,o163")
    allowing = IBKRBroker(client_factory(emulator))
    placed = allowing.place("MSFT", bracket(coid="tp-far", entry=110.0, stop=105.0, target=120.0), 110.0)
    assert len(placed) == 3 and len(emulator.orders_with_coid("tp-far")) == 1


@pytest.mark.parametrize("status", [400, 200])
def test_duplicate_coid_raises_duplicate_order_error(emulator_factory, client_factory, status):
    emulator = emulator_factory(duplicate_status=status)
    broker = IBKRBroker(client_factory(emulator))
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="tp-dup", entry=99.0), 99.0)
    with pytest.raises(DuplicateOrderError) as raised:
        broker.place("MSFT", bracket(coid="tp-dup", entry=99.0), 99.0)
    assert str(raised.value) == "tp-dup"
    assert len(emulator.orders_with_coid("tp-dup")) == 1 and emulator.count("POST", ORDERS_POST) == 2


def test_order_requests_are_never_retried(emulator_factory, client_factory):
    emulator = emulator_factory()
    emulator.set_price("MSFT", 100.0)
    slow = IBKRBroker(client_factory(emulator, read_timeout=0.3))
    slow.client.accounts()
    # the confirmation reaches IBKR, which accepts the bracket, but its answer is lost in transit
    emulator.inject("/iserver/reply/*", method="POST", delay=0.7, process=True)
    with pytest.raises(IBKROrderStateUnknown) as raised:
        slow.place("MSFT", bracket(coid="tp-lost", entry=99.0), 99.0)
    assert "not sent again" in raised.value.problem and "cOID" in raised.value.fix
    time.sleep(0.5)  # let the emulator finish the request it was holding
    assert emulator.count("POST", ORDERS_POST) == 1 and emulator.count("POST", "/iserver/reply/*") == 1
    assert len(emulator.orders_with_coid("tp-lost")) == 1  # it is at IBKR: reconciliation will find it
    # the placement's own answer lost: one POST, the unanswered question voids the order
    emulator.inject(ORDERS_POST, method="POST", delay=0.7, process=True)
    with pytest.raises(IBKROrderStateUnknown):
        slow.place("MSFT", bracket(coid="tp-lost2", entry=99.0), 99.0)
    time.sleep(0.5)
    assert emulator.count("POST", ORDERS_POST) == 2 and emulator.orders_with_coid("tp-lost2") == []
    emulator.inject(ORDERS_POST, method="POST", status=500, body={"error": "internal error"})
    with pytest.raises(IBKROrderRejected):
        slow.place("MSFT", bracket(coid="tp-500", entry=99.0), 99.0)
    emulator.inject(ORDERS_POST, method="POST", status=429)
    with pytest.raises(IBKRRateLimited):
        slow.place("MSFT", bracket(coid="tp-429", entry=99.0), 99.0)
    emulator.inject(ORDERS_POST, method="POST", status=503)  # no explanation: the outcome is unknown
    with pytest.raises(IBKROrderStateUnknown):
        slow.place("MSFT", bracket(coid="tp-503", entry=99.0), 99.0)
    assert emulator.count("POST", ORDERS_POST) == 5  # one POST per attempt, none repeated


def test_reply_loop_runs_alone_so_other_requests_cannot_void_it(emulator, client, broker):
    emulator.set_price("MSFT", 100.0)
    source = IBKRMarketData(client)
    symbols = [f"V{i}" for i in range(8)]
    source.prefetch_contracts(symbols)
    stop = threading.Event()

    def reader():
        index = 0
        while not stop.is_set():
            source.fetch(symbols[index % len(symbols)], "1d", TimeframeSettings(period="1y"),
                         datetime.now(UTC))
            index += 1

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        time.sleep(0.2)
        placed = broker.place("MSFT", bracket(coid="tp-busy", entry=99.0), 99.0)
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert len(placed) == 3 and emulator.state.voided == set()
    post, reply = emulator.requests("POST", ORDERS_POST)[-1], emulator.requests("POST", "/iserver/reply/*")[-1]
    between = [r for r in emulator.requests() if post[0] < r[0] < reply[0]]
    assert between == []  # nothing reached the gateway between the question and its reply


def test_live_orders_empty_first_answer_and_child_lookup(emulator_factory, client_factory):
    for with_parent_id in (True, False):
        emulator = emulator_factory(live_orders_parent_id=with_parent_id)
        emulator.set_price("MSFT", 100.0)
        IBKRBroker(client_factory(emulator)).place("MSFT", bracket(coid="tp-live", entry=98.0), 98.0)
        emulator.set_auth_state("connected")  # a gateway restart: a new brokerage session
        restarted = IBKRBroker(client_factory(emulator))  # and a new process
        entry = restarted.find_order("tp-live")
        calls = emulator.requests("GET", "/iserver/account/orders")
        assert len(calls) == 2 and all(c[4].get("accountId") == "DU1234567" for c in calls)
        assert entry is not None and entry.status == "Submitted"
        stop_loss, take_profit = restarted.find_order("tp-live-sl"), restarted.find_order("tp-live-tp")
        parent = emulator.orders_with_coid("tp-live")[0]
        children = {c.order_type: str(c.order_id) for c in emulator.children_of(parent.order_id)}
        assert (stop_loss.broker_order_id, take_profit.broker_order_id) == (children["STP"], children["LMT"])
        assert stop_loss.status == "PreSubmitted"  # not active until the entry fills
        assert restarted.find_order("tp-unknown") is None


def test_earlier_days_orders_and_child_fills_are_found_through_executions(emulator, client, client_factory,
                                                                           tmp_path):
    ids = tmp_path / "order-ids.json"
    broker = IBKRBroker(client, id_map_path=ids)
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="tp-old", entry=100.5), 100.5)
    emulator.set_price("MSFT", 95.0)  # the stop fires, the take-profit is cancelled (OCA)
    emulator.new_day()  # finished orders leave the live list
    later = IBKRBroker(client_factory(emulator), id_map_path=ids)  # a new process, same id map
    found = later.find_order("tp-old")
    assert (found.status, found.filled_quantity, found.average_fill_price) == ("Filled", 10, 100.0)
    executions = later.executions("tp-old")
    assert [(e.side, e.quantity, e.price) for e in executions] == [("BUY", 10, 100.0)]
    assert executions[0].executed_at.tzinfo is not None
    # the stop-loss child has no order_ref at IBKR: its fill is found by its IBKR order id
    assert [(e.side, e.quantity, e.price) for e in later.executions("tp-old-sl")] == [("SELL", 10, 95.0)]
    assert later.executions("tp-old-tp") == []
    assert later.account({}).positions.get("MSFT") is None  # closed by the stop
    assert IBKRBroker(client_factory(emulator)).executions("tp-old-sl") == []  # without the map: unknown


def test_open_orders_carry_the_pipelines_coids_and_flag_foreign_orders(emulator, client, broker):
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="tp-open", entry=98.5, stop=95.0, target=105.0), 98.5)
    client.place_orders([{"acctId": "DU1234567", "conid": client.resolve("MSFT").conid, "orderType": "LMT",
                          "price": 98.0, "side": "BUY", "quantity": 1, "tif": "DAY"}])  # placed "by hand"
    working = {(o.client_order_id, o.status) for o in IBKRBroker(client).open_orders()}
    assert working == {("tp-open", "Submitted"), ("tp-open-sl", "PreSubmitted"), ("tp-open-tp", "PreSubmitted"),
                       ("", "Submitted")}


def test_cancel_is_polled_until_cancelled(emulator, client, broker):
    emulator.set_price("MSFT", 100.0)
    placed = broker.place("MSFT", bracket(coid="tp-cxl", entry=98.5, stop=95.0, target=105.0), 98.5)
    final = client.cancel_order(placed[0].broker_order_id)
    assert final["order_status"] == "Cancelled"
    assert emulator.count("DELETE", "/iserver/account/*/order/*") == 1
    statuses = [r for r in emulator.requests("GET", f"/iserver/account/order/status/{placed[0].broker_order_id}")]
    assert len(statuses) >= 3  # PendingCancel twice, then Cancelled
    assert {o.status for o in emulator.children_of(int(placed[0].broker_order_id))} == {"Cancelled"}
    with pytest.raises(IBKRRequestError) as raised:
        client.cancel_order(1)
    assert "OrderID 1 doesn't exist" in str(raised.value)


def test_modify_repeats_every_field_and_follows_the_policy(emulator, client, broker):
    emulator.set_price("MSFT", 100.0)
    placed = broker.place("MSFT", bracket(coid="tp-mod", entry=98.5, stop=95.0, target=105.0), 98.5)
    order_id = placed[0].broker_order_id
    client.modify_order(order_id, price=98.75)
    assert client.order_status(order_id)["limit_price"] == "98.75"
    with pytest.raises(IBKROrderRejected) as raised:
        client.modify_order(order_id, price=80.0)  # >3% from the market: IBKR asks o163
    assert raised.value.message_ids == ("o163",)
    assert client.order_status(order_id)["limit_price"] == "98.75"


def test_live_account_is_refused_without_the_opt_in(emulator_factory, client_factory, monkeypatch):
    emulator = emulator_factory(live=True)
    emulator.set_price("MSFT", 100.0)
    refused = IBKRBroker(client_factory(emulator))
    assert not refused.client.accounts().is_paper and refused.client.account_id == "U1234567"
    with pytest.raises(IBKRLiveAccountRefused) as raised:
        refused.place("MSFT", bracket(coid="tp-live-acct"), 100.0)
    assert "U1234567 is a live IBKR account" in raised.value.problem
    assert "TRADING_ALLOW_LIVE=yes" in raised.value.fix
    assert emulator.count("POST", ORDERS_POST) == 0
    assert refused.account({}).equity > 0  # reading a live account is fine
    monkeypatch.setenv("TRADING_ALLOW_LIVE", "yes")
    allowed = IBKRBroker(client_factory(emulator))
    assert len(allowed.place("MSFT", bracket(coid="tp-live-acct"), 100.0)) == 3


def test_paper_id_with_is_paper_false_counts_as_live(emulator_factory, client_factory):
    emulator = emulator_factory(live=True, account_id="DU5555555")  # isPaper=false wins over the prefix
    with pytest.raises(IBKRLiveAccountRefused):
        client_factory(emulator).check_may_trade()


def test_positions_all_pages_after_invalidating_the_cache(emulator_factory, client_factory):
    emulator = emulator_factory(positions=250)
    client = client_factory(emulator)
    rows = client.positions()
    assert len(rows) == 250 and len({r["conid"] for r in rows}) == 250
    pages = [r[2].rsplit("/", 1)[1] for r in emulator.requests("GET", "/portfolio/*/positions/*")]
    assert pages == ["0", "1", "2", "3"]  # until the empty page
    assert emulator.count("POST", "/portfolio/*/positions/invalidate") == 1
    assert emulator.count("GET", "/portfolio/accounts") == 1  # required before /portfolio/*
    broker = IBKRBroker(client)
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="tp-pos", entry=100.5), 100.5)
    stale = client.positions(fresh=False)
    assert all(r["ticker"] != "MSFT" for r in stale)  # the gateway's cached copy
    assert any(r["ticker"] == "MSFT" and r["position"] == 10 for r in client.positions(fresh=True))


def test_account_state_from_summary_positions_and_daily_pnl(emulator_factory, client_factory):
    emulator = emulator_factory(positions=2, daily_pnl=-125.5, cash=50_000.0)
    broker = IBKRBroker(client_factory(emulator))
    state = broker.account({"POS000": Mark(55.0)})
    assert state.cash == 50_000.0
    assert state.equity == pytest.approx(50_000 + 10 * 51 + 11 * 52)
    # IBKR's own prices (a mark is only for a position IBKR has no price for)
    assert state.positions["POS000"].market_price == 51.0 and state.positions["POS001"].market_price == 52.0
    assert state.positions["POS001"].quantity == 11 and state.positions["POS001"].average_price == 51.0
    assert state.daily_pnl == -125.5
    assert emulator.count("GET", "/iserver/account/pnl/partitioned") == 1


def test_daily_pnl_missing_is_unknown_with_open_positions(emulator_factory, client_factory):
    flat = emulator_factory(positions=0, pnl_available=False)
    assert IBKRBroker(client_factory(flat)).account({}).daily_pnl == 0.0  # no positions: ledger's realized P&L
    holding = emulator_factory(positions=2, pnl_available=False)
    account = IBKRBroker(client_factory(holding)).account({})  # never 0 (no loss today), never a failed read
    assert account.daily_pnl is None and len(account.positions) == 2
    assert "pnl/partitioned has no row) while positions are open" in account.daily_pnl_unknown
    assert "run again in a few seconds" in account.daily_pnl_unknown


def test_cancel_by_client_order_id_reaches_bracket_children(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="tp-exit", entry=100.5), reference_price=100.5)  # entry fills at once
    stop = broker.cancel("tp-exit-sl")  # a child has no cOID at IBKR: found through its parent
    assert (stop.client_order_id, stop.status) == ("tp-exit-sl", "Cancelled")
    assert emulator.count("DELETE", "/iserver/account/*/order/*") == 1
    assert broker.find_order("tp-exit-tp").status == "Submitted"  # only the one asked for
    assert broker.cancel("tp-exit").status == "Filled"  # a final order is left as it is, no DELETE
    assert emulator.count("DELETE", "/iserver/account/*/order/*") == 1
    assert broker.cancel("tp-never-sent") is None
