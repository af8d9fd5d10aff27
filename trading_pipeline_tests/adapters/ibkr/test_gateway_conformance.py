"""The client against IBKR's documented gateway behaviour where our emulator did not show it by
itself (shared/reference/ibkr-client-portal-api.md): reply chains and their end, question shapes,
placement acknowledgements, the order id -1, a session that ends and is opened again by a new
login, and the pre-flights that new session needs. Another implementation of the gateway must get
the same safe outcome: no duplicate or unintended order, and an error naming what happened."""

from datetime import UTC, datetime

import pytest

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.ibkr.errors import (
    IBKRNotLoggedIn,
    IBKROrderRejected,
    IBKRRequestError,
    IBKRSessionError,
)
from trading_pipeline.adapters.ibkr.market_data import IBKRMarketData
from trading_pipeline.core.strategies import TimeframeSettings
from trading_pipeline.errors import BarDataError
from trading_pipeline_tests.adapters.ibkr.test_orders_and_portfolio import ORDERS_POST, bracket

REPLY = "/iserver/reply/*"
AS_OF = datetime(2024, 3, 5, 16, 0, tzinfo=UTC)


@pytest.fixture
def broker(client) -> IBKRBroker:
    return IBKRBroker(client)


# ------------------------------------------------------------------------------------ reply chains

def test_several_allowed_questions_in_a_row_are_each_confirmed_then_the_order_is_placed(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    emulator.add_question("o403", "This order will most likely trigger and fill immediately.\nAre you sure?")
    emulator.add_question("p12", "If your order is not immediately executable, our systems may ...")
    placed = broker.place("MSFT", bracket(coid="cf-chain", entry=100.5), 100.5)
    assert emulator.answers() == [("place", "o10331", True), ("place", "o403", True), ("place", "p12", True)]
    assert len(placed) == 3 and len(emulator.orders_with_coid("cf-chain")) == 1


@pytest.mark.parametrize("extra", [0, 1, 5])
def test_a_question_chain_longer_than_the_limit_is_declined_not_confirmed_and_reported_as_refused(emulator, broker,
                                                                                                   extra):
    emulator.set_price("MSFT", 100.0)
    rounds = broker.client.pacing.reply_rounds
    for _ in range(rounds + extra):  # a limit order near the market: IBKR asks only these
        emulator.add_question("p12", "The price-management notice, again.")
    if extra == 0:  # every question answered within the limit: the answer after the last reply is the order
        assert len(broker.place("MSFT", bracket(coid="cf-long", entry=99.5)[:1], 99.5)) == 1
        assert len(emulator.orders_with_coid("cf-long")) == 1 and len(emulator.answers()) == rounds
        return
    with pytest.raises(IBKROrderRejected) as raised:
        broker.place("MSFT", bracket(coid="cf-long", entry=99.5)[:1], 99.5)
    # never confirmed past the limit, and declined (IBKR: confirmed:false throws the order away) rather than left
    # open for the next request to void: a rejection must mean nothing is working at IBKR
    assert emulator.orders_with_coid("cf-long") == []
    assert emulator.answers() == [("place", "p12", True)] * rounds + [("place", "p12", False)]
    assert emulator.count("POST", ORDERS_POST) == 1
    assert f"kept asking questions about order cf-long after {rounds} confirmed replies" in raised.value.problem
    assert "by hand" in raised.value.fix


def test_a_question_without_message_ids_is_declined(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    emulator.inject(ORDERS_POST, method="POST",
                    transform=lambda answer: [{k: v for k, v in q.items() if k != "messageIds"} for q in answer])
    with pytest.raises(IBKROrderRejected) as raised:  # an unnamed question is never confirmed blindly
        broker.place("MSFT", bracket(coid="cf-noid", entry=99.5), 99.5)
    assert raised.value.message_ids == () and "(no id)" in raised.value.problem
    assert "You are about to submit a stop order" in raised.value.ibkr_text
    assert emulator.answers() == [("place", "o10331", False)] and emulator.orders_with_coid("cf-noid") == []


def test_an_error_object_with_http_200_after_a_confirmation_is_a_rejection(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    emulator.inject(REPLY, method="POST", body={"error": "We cannot accept an order at the limit price you selected."})
    with pytest.raises(IBKROrderRejected) as raised:
        broker.place("MSFT", bracket(coid="cf-err", entry=99.5), 99.5)
    assert "We cannot accept an order at the limit price" in raised.value.problem
    assert emulator.count("POST", ORDERS_POST) == 1 and emulator.count("POST", REPLY) == 1


# ------------------------------------------------------------------------------ acknowledgements

def test_a_bracket_acknowledged_out_of_order_pairs_only_the_leg_it_names(emulator, broker):
    emulator.set_price("MSFT", 100.0)

    def rotated(answer):  # [parent, stop, take-profit] -> [stop, take-profit, parent naming its cOID]
        return [answer[1], answer[2], {**answer[0], "local_order_id": "cf-rot"}]

    emulator.inject(REPLY, method="POST", transform=rotated)  # the bracket is accepted after o10331
    placed = broker.place("MSFT", bracket(coid="cf-rot", entry=98.5, stop=95.0, target=105.0), 98.5)
    parent = emulator.orders_with_coid("cf-rot")[0]
    children = {c.order_type: str(c.order_id) for c in emulator.children_of(parent.order_id)}
    assert [(o.client_order_id, o.broker_order_id) for o in placed] == [("cf-rot", str(parent.order_id))]
    # the children are found through their parent, not by a guessed pairing that would name the other leg
    assert broker.find_order("cf-rot-sl").broker_order_id == children["STP"]
    assert broker.find_order("cf-rot-tp").broker_order_id == children["LMT"]



@pytest.mark.parametrize("order", [(1, 2, 0), (2, 1, 0), (0, 2, 1)], ids=["stop-first", "target-first", "children-swapped"])
def test_a_bracket_acknowledged_in_another_order_without_naming_a_leg_is_paired_by_what_each_order_is(
        emulator, broker, order):
    """IBKR's bracket acknowledgement is one answer per order, in an order the reference leaves
    unconfirmed, and without local_order_id nothing in it names a leg. Paired by position, a stop's
    IBKR id went to the entry or the take-profit: the stop's later fill was counted as the entry's,
    and an exit or a resize changed the wrong order. Each answer's order status says its side and
    type, which tell the three legs apart."""
    emulator.set_price("MSFT", 100.0)
    emulator.inject(REPLY, method="POST", transform=lambda answer: [answer[i] for i in order])
    placed = broker.place("MSFT", bracket(coid="cf-any", entry=98.5, stop=95.0, target=105.0), 98.5)
    parent = emulator.orders_with_coid("cf-any")[0]
    children = {c.order_type: str(c.order_id) for c in emulator.children_of(parent.order_id)}
    assert {o.client_order_id: o.broker_order_id for o in placed} == {
        "cf-any": str(parent.order_id), "cf-any-sl": children["STP"], "cf-any-tp": children["LMT"]}
    assert placed[0].client_order_id == "cf-any"  # the entry's answer first, as the order desk reads it
    assert [broker.order_id_for(f"cf-any{s}") for s in ("", "-sl", "-tp")] == [
        str(parent.order_id), children["STP"], children["LMT"]]

def test_placement_answers_in_documented_shapes(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    emulator.inject(ORDERS_POST, method="POST",  # local_order_id echoing the cOID, order_status PreSubmitted
                    transform=lambda answer: [{**a, "local_order_id": "cf-shape", "order_status": "PreSubmitted"}
                                              for a in answer])
    placed = broker.place("MSFT", bracket(coid="cf-shape", entry=99.5)[:1], 99.5)
    assert [(o.client_order_id, o.broker_order_id) for o in placed] == [
        ("cf-shape", str(emulator.orders_with_coid("cf-shape")[0].order_id))]


# ------------------------------------------------------------------------------- order ids and -1

@pytest.mark.parametrize("order_id", [-1, "-1", 0, "", "None", "12a"])
def test_cancel_and_modify_never_send_an_order_id_that_is_not_an_order(emulator, client, broker, order_id):
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="cf-keep", entry=98.5, stop=95.0, target=105.0), 98.5)
    with pytest.raises(IBKRRequestError) as raised:  # IBKR: DELETE .../order/-1 cancels every open order
        client.cancel_order(order_id)
    assert "not an IBKR order id" in raised.value.problem and "nothing was sent" in raised.value.problem
    with pytest.raises(IBKRRequestError):
        client.modify_order(order_id, {"conid": 1, "orderType": "LMT", "side": "BUY", "quantity": 1, "tif": "DAY",
                                       "price": 1.0}, price=2.0)
    assert emulator.count("DELETE", "/iserver/account/*/order/*") == 0
    assert emulator.count("POST", "/iserver/account/*/order/*") == 0
    assert {o.status for o in emulator.state.orders.values()} == {"Submitted", "PreSubmitted"}


# ------------------------------------------------------------------------- a session ended mid-batch

@pytest.mark.parametrize("ending", ["401", "no bridge"])
def test_a_session_ended_mid_batch_and_opened_by_a_new_login_gets_every_preflight_again(emulator, client, broker,
                                                                                        ending):
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="cf-working", entry=98.5, stop=95.0, target=105.0), 98.5)
    client.positions(fresh=False)
    assert emulator.count("GET", "/iserver/accounts") == 1 and emulator.count("GET", "/portfolio/accounts") == 1
    if ending == "401":
        emulator.set_auth_state("logged_out")
        with pytest.raises(IBKRNotLoggedIn):
            client.trades(days=1)
        emulator.set_auth_state("authenticated")  # the user logs in again: a new brokerage session
    else:  # the brokerage session dropped and was reopened meanwhile (e.g. by IBeam): 'no bridge' once
        emulator.set_auth_state("authenticated")
        emulator.inject("/iserver/account/trades", method="GET", status=400,
                        body={"error": "Bad Request: no bridge", "statusCode": 400})
        assert client.trades(days=1) == []
    # the new session's first live-orders answer is empty: the working order must still be found
    working = broker.find_order("cf-working")
    assert working is not None and working.status == "Submitted"
    assert emulator.count("GET", "/iserver/accounts") == 2  # IBKR: once per session, before orders
    client.positions(fresh=False)
    assert emulator.count("GET", "/portfolio/accounts") == 2  # and /portfolio/accounts before /portfolio/*
    assert len(broker.place("MSFT", bracket(coid="cf-after", entry=98.5, stop=95.0, target=105.0), 98.5)) == 3
    assert [o.coid for o in emulator.state.orders.values() if o.coid] == ["cf-working", "cf-after"]


# ------------------------------------------------------------------------------------ auth status

def test_logged_in_but_not_connected_says_ibkrs_servers_are_out_of_reach(emulator, client):
    emulator.inject("/iserver/auth/status", method="POST", count=10,
                    transform=lambda body: {**body, "authenticated": True, "connected": False})
    with pytest.raises(IBKRSessionError) as raised:
        client.accounts()
    assert "cannot reach IBKR's servers" in raised.value.problem and "connected=false" in raised.value.problem
    assert "nightly" in raised.value.fix and "log in" not in raised.value.fix  # a new login does not help
    assert emulator.count("POST", "/iserver/auth/ssodh/init") == 0 and emulator.count("GET", "/iserver/accounts") == 0


# -------------------------------------------------------------------- live orders, cancel, history

def test_live_orders_marked_incomplete_are_asked_again_and_never_filtered_or_forced(emulator, client, broker):
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="cf-snap", entry=98.5, stop=95.0, target=105.0), 98.5)
    client.live_orders()  # this session's pre-flight of the live orders is done
    emulator.inject("/iserver/account/orders", method="GET", body={"orders": [], "snapshot": False})
    listed = client.live_orders()  # the incomplete answer is not trusted
    assert [o.get("order_ref") for o in listed if o.get("order_ref")] == ["cf-snap"]
    calls = emulator.requests("GET", "/iserver/account/orders")
    assert len(calls) == 4 and all(set(c[4]) == {"accountId"} for c in calls)  # no filters, no force


@pytest.mark.parametrize("shape", [{"order_id": "{id}"}, {"order_id": "{id}", "msg": "Request was submitted"},
                                   {"msg": "Request was submitted", "order_id": -1, "conid": -1}])
def test_cancel_answers_in_any_documented_shape_are_confirmed_by_the_orders_status(emulator, client, broker, shape):
    emulator.set_price("MSFT", 100.0)
    placed = broker.place("MSFT", bracket(coid="cf-cxl", entry=98.5, stop=95.0, target=105.0), 98.5)
    order_id = placed[0].broker_order_id
    body = {k: (v.format(id=order_id) if isinstance(v, str) else v) for k, v in shape.items()}
    emulator.inject("/iserver/account/*/order/*", method="DELETE", process=True, body=body)
    assert client.cancel_order(order_id)["order_status"] == "Cancelled"  # the answer only says it arrived
    assert emulator.count("DELETE", "/iserver/account/*/order/*") == 1


def test_history_with_empty_data_is_no_bars_not_an_empty_success(emulator, client):
    emulator.inject("/iserver/marketdata/history", method="GET",
                    transform=lambda body: {**body, "data": [], "points": 0, "mdAvailability": "D"})
    with pytest.raises(BarDataError) as raised:
        IBKRMarketData(client).fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert "returned no 1d bars for AAPL" in raised.value.problem and raised.value.fix
