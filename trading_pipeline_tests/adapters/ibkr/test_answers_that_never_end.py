"""Gateway answers that never end, on loopback: a body sent a byte at a time (each byte well within
the per-read timeout) and a body without end. IBKR_READ_TIMEOUT bounds a request's whole answer
and MAX_RESPONSE_BYTES its size: a read fails with the endpoint, what happened and the fix; an order
request (placement, reply) is an unknown outcome, never sent again and reconciled by its cOID; and
nothing stays held (the order gate every request of the gateway passes, the account lock)."""

import threading
import time
from datetime import UTC, datetime

import pytest

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.ibkr.errors import IBKRMalformedAnswer, IBKROrderStateUnknown, IBKRRequestError
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import OrderRow, session_factory
from trading_pipeline.core.analysis import Action, TradeDecision
from trading_pipeline.core.orders import build_legs
from trading_pipeline_tests.adapters.ibkr.test_orders_and_portfolio import bracket
from trading_pipeline_tests.emulators.ibkr_gateway_state import flood, trickle

DEADLINE = 0.5  # these clients' IBKR_READ_TIMEOUT (seconds): each read, and now the whole answer
TRADES = "/iserver/account/trades"
ORDERS_POST = "/iserver/account/*/orders"
REPLY_POST = "/iserver/reply/*"
AS_OF = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)


def slow_answer():
    """A byte every 0.05 s for 8 s, then `[]`: a client bounded per read only waits it out."""
    return trickle(b"[]", every=0.05, seconds=8.0)


def test_a_read_answer_trickling_in_is_cut_off_at_the_deadline(emulator, client_factory):
    client = client_factory(emulator, read_timeout=DEADLINE)
    client.accounts()
    emulator.inject(TRADES, method="GET", count=10, raw=slow_answer, content_type="application/json")
    started = time.monotonic()
    with pytest.raises(IBKRRequestError) as raised:
        client.trades(days=1)
    elapsed = time.monotonic() - started
    assert emulator.count("GET", TRADES) == 4  # asked again like any read failing in transit, then it stops
    assert elapsed < 4 * 2 * DEADLINE + 1  # each attempt ends within its deadline and one more read
    error = raised.value
    assert f"GET {TRADES}" in error.problem and "still arriving 0.5 s after the request" in error.problem
    assert "IBKR_READ_TIMEOUT" in error.fix and "0.5" in error.fix


def test_an_endless_read_answer_is_cut_off_unread_and_not_asked_again(emulator, client):
    client.accounts()
    emulator.inject(TRADES, method="GET", count=10, raw=lambda: flood(64), content_type="application/json")
    with pytest.raises(IBKRMalformedAnswer) as raised:
        client.trades(days=1)
    assert emulator.count("GET", TRADES) == 1  # the gateway answered: asking again gets the same
    error = raised.value
    assert f"GET {TRADES}" in error.problem and "larger than 8 MB" in error.problem and "HTTP 200" in error.problem
    assert "IBKR_GATEWAY_URL" in error.fix


def buy(decision_id: str) -> TradeDecision:
    return TradeDecision(decision_id=decision_id, strategy="s", symbol="AAPL", as_of=AS_OF, data_through=AS_OF,
                         proposed_action=Action.BUY, action=Action.BUY, entry=100.0, stop=96.0, targets=[106.0],
                         r_multiple=1.5, profit_margin=0.06, confidence=0.7, quantity=50, rationale="test",
                         account_equity=100_000.0)


@pytest.mark.parametrize("path", [ORDERS_POST, REPLY_POST], ids=["placement", "reply"])
def test_an_order_answer_trickling_in_is_an_unknown_outcome_and_frees_the_gate(emulator, client_factory, tmp_path,
                                                                              path):
    """IBKR takes the request (the placement, which IBKR answers with its stop-warning question, or
    the reply confirming it, which places the order), then its answer trickles in. The placement
    holds the order gate alone, so every other request of the gateway (other runs share it) waited
    as long as the answer took."""
    emulator.set_price("AAPL", 100.0)
    client = client_factory(emulator, read_timeout=DEADLINE)
    other_run = client_factory(emulator)  # another run on the same gateway: the same order gate
    client.accounts()
    other_run.accounts()
    sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
    decision = buy("slow")
    record_decision(sessions, decision)
    legs = build_legs(decision, "DAY")
    emulator.inject(path, method="POST", process=True, raw=slow_answer, content_type="application/json")
    outcome: dict = {}

    def place():
        try:
            OrderDesk(sessions, IBKRBroker(client)).submit_once(decision, legs, 100.0)
        except IBKROrderStateUnknown as error:
            outcome["error"] = error

    placing = threading.Thread(target=place)
    placing.start()
    deadline = time.monotonic() + 5
    while emulator.count("POST", path) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    other_run.summary()  # waits for the order gate
    waited = time.monotonic() - started
    placing.join(timeout=10)
    assert not placing.is_alive()
    assert waited < 2 * DEADLINE + 1  # not the 8 s the answer took

    error = outcome["error"]
    assert "still arriving 0.5 s after the request" in error.problem
    assert "may or may not have reached IBKR" in error.problem and "not sent again" in error.problem
    assert "cOID" in error.fix
    with sessions() as session:  # the outcome is unknown: left for reconciliation, not marked rejected
        assert session.get(OrderRow, "tp-slow").status == "submitting"
    placed = path == REPLY_POST  # the question cut off unanswered leaves nothing placed
    assert len(emulator.orders_with_coid("tp-slow")) == placed

    # The next run (the account lock free again) asks IBKR by cOID before anything is sent: it sends
    # nothing when IBKR has the order, and the order once when IBKR does not.
    again = OrderDesk(sessions, IBKRBroker(client_factory(emulator))).submit_once(decision, legs, 100.0)
    assert again.status == ("already_sent" if placed else "filled"), again.reason
    assert emulator.count("POST", ORDERS_POST) == 1 + (not placed)
    assert len(emulator.orders_with_coid("tp-slow")) == 1


def test_an_endless_order_answer_is_an_unknown_outcome_never_resent(emulator, client, client_factory):
    emulator.set_price("MSFT", 100.0)
    emulator.inject(ORDERS_POST, method="POST", process=True, raw=lambda: flood(64), content_type="application/json")
    with pytest.raises(IBKROrderStateUnknown) as raised:
        IBKRBroker(client).place("MSFT", bracket(coid="hg-flood", entry=99.5)[:1], 99.5)
    error = raised.value
    assert "larger than 8 MB" in error.problem and "may or may not have reached IBKR" in error.problem
    assert "cOID" in error.fix
    assert emulator.count("POST", ORDERS_POST) == 1  # never sent again
    assert IBKRBroker(client_factory(emulator)).find_order("hg-flood") is not None  # what the next run finds
