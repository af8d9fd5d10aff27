"""Exactly once through OrderDesk with the IBKR broker against the emulator: a re-submitted
decision, a crash between send and record, a restarted process, a duplicate-cOID answer; each
ends with exactly one order at the (emulated) broker."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import ExecutionRow, OrderRow, session_factory
from trading_pipeline.core.analysis import Action, TradeDecision
from trading_pipeline.core.orders import build_legs

AS_OF = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)
ORDERS_POST = "/iserver/account/*/orders"


def buy_decision(decision_id: str) -> TradeDecision:
    return TradeDecision(decision_id=decision_id, strategy="s", symbol="AAPL", as_of=AS_OF, data_through=AS_OF,
                         proposed_action=Action.BUY, action=Action.BUY, entry=100.0, stop=96.0,
                         targets=[106.0, 110.0], r_multiple=1.5, profit_margin=0.06, confidence=0.7,
                         quantity=50, rationale="test", account_equity=100_000.0)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """One trading database for the module (each test uses its own decision ids)."""
    return session_factory(f"sqlite:///{tmp_path_factory.mktemp('ibkr-exactly-once')}/t.db")


def prepared(sessions, emulator, decision_id):
    emulator.set_price("AAPL", 100.0)
    decision = buy_decision(decision_id)
    record_decision(sessions, decision)
    return decision, build_legs(decision, "DAY")


def test_resubmitting_the_same_decision_sends_one_order(emulator, client, client_factory, sessions):
    decision, legs = prepared(sessions, emulator, "e1")
    first = OrderDesk(sessions, IBKRBroker(client)).submit_once(decision, legs, 100.0)
    assert first.status == "filled" and first.filled_quantity == 50 and len(first.broker_order_ids) == 3
    again = OrderDesk(sessions, IBKRBroker(client)).submit_once(decision, legs, 100.0)
    restarted = OrderDesk(sessions, IBKRBroker(client_factory(emulator))).submit_once(decision, legs, 100.0)
    assert again.status == restarted.status == "already_sent"
    assert len(emulator.orders_with_coid("tp-e1")) == 1 and emulator.count("POST", ORDERS_POST) == 1
    with sessions() as session:
        executions = session.scalars(select(ExecutionRow).where(ExecutionRow.client_order_id.like("tp-e1%"))).all()
        assert len(executions) == 1
        execution = executions[0]
        assert (execution.client_order_id, execution.broker, execution.quantity) == ("tp-e1", "ibkr", 50)
        stop = session.get(OrderRow, "tp-e1-sl")
        assert stop.status == "Submitted" and stop.broker_order_id  # working at IBKR since the entry filled


class CrashAfterSend(IBKRBroker):
    """IBKR accepts the bracket, then the process dies before the answer is recorded."""

    def place(self, symbol, legs, reference_price, placed_at=None):
        super().place(symbol, legs, reference_price, placed_at)
        raise ConnectionError("process died after IBKR accepted the order")


def test_crash_between_send_and_record_then_restart_is_reconciled(emulator, client, client_factory, sessions):
    decision, legs = prepared(sessions, emulator, "e2")
    with pytest.raises(ConnectionError):
        OrderDesk(sessions, CrashAfterSend(client)).submit_once(decision, legs, 100.0)
    with sessions() as session:
        assert session.get(OrderRow, "tp-e2").status == "submitting"
    emulator.set_auth_state("connected")  # the gateway's brokerage session restarted as well
    looked_up = emulator.count("GET", "/iserver/account/orders")
    restarted = IBKRBroker(client_factory(emulator))  # a new process: new client, nothing cached
    retry = OrderDesk(sessions, restarted).submit_once(decision, legs, 100.0)
    assert retry.status == "already_sent" and "broker already had" in retry.reason
    assert len(emulator.orders_with_coid("tp-e2")) == 1 and emulator.count("POST", ORDERS_POST) == 1
    # the new session's first live-orders answer is empty: it was asked again, once for all three legs
    assert emulator.count("GET", "/iserver/account/orders") - looked_up == 2
    with sessions() as session:
        assert session.get(OrderRow, "tp-e2").status == "Filled"
        assert {session.get(OrderRow, c).status for c in ("tp-e2-sl", "tp-e2-tp")} == {"Submitted"}


class ForgetfulLookup(IBKRBroker):
    """A lookup that misses the order (e.g. the live list of an earlier session)."""

    def find_order(self, client_order_id):
        return None


def test_duplicate_coid_answer_counts_as_already_sent(emulator, client, sessions):
    decision, legs = prepared(sessions, emulator, "e3")
    IBKRBroker(client).place("AAPL", legs, 100.0)  # sent by an earlier attempt that recorded nothing
    result = OrderDesk(sessions, ForgetfulLookup(client)).submit_once(decision, legs, 100.0)
    assert result.status == "already_sent" and "exists" in result.reason
    assert len(emulator.orders_with_coid("tp-e3")) == 1
    assert [r[3] for r in emulator.requests("POST", ORDERS_POST)] == [200, 400]  # the second was refused


def test_a_day_entry_gone_from_the_broker_after_its_session_is_expired_not_working_for_ever(
        emulator, client, tmp_path):
    """IBKR lists only the current day's orders: yesterday's unfilled DAY entry is simply absent.
    The sync must close it, or order_working would hold the symbol's next order for ever."""
    from trading_pipeline.adapters.portfolio_sync import sync_portfolio, with_working_orders
    from trading_pipeline.core.risk import AccountState

    sessions = session_factory(f"sqlite:///{tmp_path / 't.db'}")  # only this test's orders
    emulator.set_price("AAPL", 100.0)
    decision = buy_decision("gone").model_copy(update={"entry": 98.5, "stop": 95.0, "targets": [104.0]})
    record_decision(sessions, decision)
    broker = IBKRBroker(client)
    sent = OrderDesk(sessions, broker).submit_once(decision, build_legs(decision, "DAY"), 98.5)
    assert sent.status == "submitted"  # 98.50 is below the market: working
    assert "AAPL" in with_working_orders(AccountState(0.0, 0.0), sessions, broker).working_entries
    assert broker.cancel("tp-gone").status == "Cancelled"  # what the end of its session does at IBKR
    emulator.new_day()  # ... and the next day it is no longer listed
    with sessions() as session:  # it was placed on 2026-11-20, a session long closed
        session.get(OrderRow, "tp-gone").created_at = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
        session.commit()
    assert broker.find_order("tp-gone") is None
    report = sync_portfolio(sessions, broker, {})
    assert any(change.startswith("tp-gone: Submitted → Cancelled") and "DAY order expired unfilled at the "
               "close of 2026-11-20" in change for change in report.status_changes)
    assert "AAPL" not in with_working_orders(AccountState(0.0, 0.0), sessions, broker).working_entries
    with sessions() as session:  # its children went with it, not left "PreSubmitted" for ever
        assert {session.get(OrderRow, c).status for c in ("tp-gone-sl", "tp-gone-tp")} == {"Cancelled"}
