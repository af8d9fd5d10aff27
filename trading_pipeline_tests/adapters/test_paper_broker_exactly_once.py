"""Exactly once with the paper broker: re-runs, a crash between send and record, duplicate cOIDs.
The paper broker fills nothing at placement: an order is working until later bars fill it."""

import dataclasses
from datetime import UTC, datetime

import pandas as pd
import pytest
from sqlalchemy import func, select

from trading_pipeline.adapters import broker as broker_module
from trading_pipeline.adapters.broker import DuplicateOrderError, PaperBroker
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.portfolio_sync import sync_portfolio
from trading_pipeline.adapters.records import record_decision, sent_decision
from trading_pipeline.adapters.trading_db import ExecutionRow, OrderRow, PaperOrderRow, session_factory
from trading_pipeline.core.analysis import Action, TradeDecision
from trading_pipeline.core.orders import build_legs, client_order_id
from trading_pipeline.core.risk import Mark

AS_OF = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)  # a Tuesday, after the close
# Wednesday's session, stamped with its open as every source stamps daily bars: trades through 100.
WEDNESDAY = pd.DataFrame({"open": [100.5], "high": [101.0], "low": [99.0], "close": [100.8], "volume": [1e6]},
                         index=pd.DatetimeIndex([pd.Timestamp("2026-09-02T13:30:00Z")], name="time"))


def buy_decision(decision_id="d1", quantity=50, symbol="AAPL"):
    return TradeDecision(decision_id=decision_id, strategy="s", symbol=symbol, as_of=AS_OF, data_through=AS_OF,
                         proposed_action=Action.BUY, action=Action.BUY, entry=100.0, stop=96.0,
                         targets=[106.0, 110.0], r_multiple=1.5, profit_margin=0.06, confidence=0.7,
                         quantity=quantity, rationale="test", account_equity=100_000.0)


def broker_orders(sessions, coid):
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(PaperOrderRow)
                              .where(PaperOrderRow.client_order_id == coid))


def test_bracket_legs_derive_from_decision():
    legs = build_legs(buy_decision(), "DAY")
    assert [(leg.role, leg.side, leg.order_type, leg.price) for leg in legs] == [
        ("entry", "BUY", "LMT", 100.0), ("stop_loss", "SELL", "STP", 96.0), ("take_profit", "SELL", "LMT", 106.0)]
    assert legs[0].client_order_id == client_order_id(buy_decision()) == "tp-d1"
    assert {leg.quantity for leg in legs} == {50}


def test_submit_records_then_rerun_sends_nothing_and_later_bars_fill(database_url, monkeypatch):
    sessions = session_factory(database_url)
    broker = PaperBroker(sessions, 100_000.0)
    decision = buy_decision()
    record_decision(sessions, decision)
    legs = build_legs(decision, "DAY")
    first = OrderDesk(sessions, broker).submit_once(decision, legs, reference_price=100.0, placed_at=decision.as_of)
    assert first.status == "submitted" and first.filled_quantity == 0 and len(first.broker_order_ids) == 3
    again = OrderDesk(sessions, broker).submit_once(decision, legs, reference_price=100.0, placed_at=decision.as_of)
    assert again.status == "already_sent"
    assert broker_orders(sessions, "tp-d1") == 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ExecutionRow)) == 0
        assert session.get(OrderRow, "tp-d1").status == "Submitted"
        assert session.get(OrderRow, "tp-d1-sl").status == "PreSubmitted"  # waits for the entry to fill

    assert broker.simulate_fills({"AAPL": WEDNESDAY}) == ["tp-d1 BUY 50 AAPL filled at 100.00 on the bar of 2026-09-02"]
    report = sync_portfolio(sessions, broker, {"AAPL": Mark(100.8)})
    assert report.new_executions == 1 and report.drift == []
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ExecutionRow)) == 1
        assert session.get(OrderRow, "tp-d1").status == "Filled"
        assert session.get(OrderRow, "tp-d1-sl").status == "Submitted"  # the stop is working
    assert OrderDesk(sessions, broker).submit_once(decision, legs, reference_price=100.0).status == "already_sent"
    assert broker_orders(sessions, "tp-d1") == 1
    monkeypatch.setattr(broker_module, "_utcnow", lambda: datetime(2026, 9, 2, 21, 0, tzinfo=UTC))
    account = broker.account({"AAPL": Mark(103.0, 100.8)})  # on the evening of the fill: today's P&L
    assert account.positions["AAPL"].quantity == 50
    assert account.cash == pytest.approx(100_000 - 5_000 - 1.00)  # IBKR's $1.00 minimum commission
    assert account.equity == pytest.approx(100_000 + 150 - 1.00)
    assert account.daily_pnl == pytest.approx(150 - 1.00)  # opened today: from its fill, not the previous close
    assert sent_decision(sessions, "d1") == decision


class CrashAfterSend(PaperBroker):
    """The broker accepts the order, then the process dies before the answer is recorded."""

    def place(self, symbol, legs, reference_price, placed_at=None):
        super().place(symbol, legs, reference_price, placed_at)
        raise ConnectionError("process died after the broker accepted the order")


def test_crash_between_send_and_record_is_reconciled_not_resent(database_url):
    sessions = session_factory(database_url)
    decision = buy_decision("d2")
    record_decision(sessions, decision)
    legs = build_legs(decision, "DAY")
    with pytest.raises(ConnectionError):
        OrderDesk(sessions, CrashAfterSend(sessions, 100_000.0)).submit_once(decision, legs, 100.0)
    with sessions() as session:
        assert session.get(OrderRow, "tp-d2").status == "submitting"  # the marker the crash left
    # a restarted process (new desk, new broker object) retries the step
    retry = OrderDesk(sessions, PaperBroker(sessions, 100_000.0)).submit_once(decision, legs, 100.0)
    assert retry.status == "already_sent" and "broker already had" in retry.reason
    assert broker_orders(sessions, "tp-d2") == 1
    with sessions() as session:  # the broker's state, recorded: working, not "submitting"
        assert session.get(OrderRow, "tp-d2").status == "Submitted"
        assert session.get(OrderRow, "tp-d2-tp").status == "PreSubmitted"



def test_a_crash_after_sending_a_smaller_order_than_decided_is_recorded_at_the_size_sent(database_url):
    """The account's limits, checked again before sending, cut the order from 50 to 30; the process
    died after the broker accepted it. The re-run found it at the broker and recorded its legs at
    the decision's 50: the books said 50 of an order of 30, and its stop covering 50."""
    sessions = session_factory(database_url)
    decision = buy_decision("d9")
    record_decision(sessions, decision)
    legs = build_legs(decision, "DAY")
    room_for_30 = lambda: (30, [])  # the limits, checked again, leave room for 30
    with pytest.raises(ConnectionError):
        OrderDesk(sessions, CrashAfterSend(sessions, 100_000.0)).submit_once(decision, legs, 100.0,
                                                                             limits=room_for_30)
    retry = OrderDesk(sessions, PaperBroker(sessions, 100_000.0)).submit_once(decision, legs, 100.0,
                                                                              limits=room_for_30)
    assert retry.status == "already_sent" and [leg.quantity for leg in retry.legs] == [30, 30, 30]
    with sessions() as session:
        assert [session.get(OrderRow, f"tp-d9{s}").quantity for s in ("", "-sl", "-tp")] == [30, 30, 30]
        assert session.scalar(select(PaperOrderRow.quantity).where(PaperOrderRow.client_order_id == "tp-d9")) == 30

class ForgetfulLookup(PaperBroker):
    """A broker whose live-orders lookup misses the order (IBKR's empty first answer)."""

    def find_order(self, client_order_id):
        return None


def test_duplicate_coid_answer_counts_as_already_sent(database_url):
    sessions = session_factory(database_url)
    decision = buy_decision("d3")
    record_decision(sessions, decision)
    legs = build_legs(decision, "DAY")
    PaperBroker(sessions, 100_000.0).place("AAPL", legs, 100.0)  # sent by an earlier, unrecorded attempt
    with pytest.raises(DuplicateOrderError):
        PaperBroker(sessions, 100_000.0).place("AAPL", legs, 100.0)
    result = OrderDesk(sessions, ForgetfulLookup(sessions, 100_000.0)).submit_once(decision, legs, 100.0)
    assert result.status == "already_sent" and "duplicate" in result.reason or "exists" in result.reason
    assert broker_orders(sessions, "tp-d3") == 1


@pytest.mark.parametrize("reference_price", [101.0, 99.0])  # limit 100 below / above the last price
def test_limit_entry_stays_working_whatever_the_last_price(database_url, reference_price):
    sessions = session_factory(database_url)
    decision = buy_decision("d4")
    record_decision(sessions, decision)
    result = OrderDesk(sessions, PaperBroker(sessions, 100_000.0)).submit_once(
        decision, build_legs(decision, "DAY"), reference_price=reference_price)
    assert result.status == "submitted" and result.filled_quantity == 0
    assert PaperBroker(sessions, 100_000.0).executions("tp-d4") == []


CRASHING_PROCESS = """
import os, sys
import dataclasses
from datetime import datetime, timezone
from trading_pipeline.adapters.broker import PaperBroker
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import session_factory
from trading_pipeline.core.analysis import Action, TradeDecision
from trading_pipeline.core.orders import build_legs

class DiesAfterSend(PaperBroker):
    def place(self, *args, **kwargs):
        super().place(*args, **kwargs)
        os._exit(17)  # the process is killed right after the broker accepted the order

now = datetime.now(timezone.utc)
decision = TradeDecision(decision_id="restart", strategy="s", symbol="AAPL", as_of=now, data_through=now,
                         proposed_action=Action.BUY, action=Action.BUY, entry=100.0, stop=96.0, targets=[106.0],
                         quantity=10, rationale="t", account_equity=1e5)
sessions = session_factory(sys.argv[1])
record_decision(sessions, decision)
OrderDesk(sessions, DiesAfterSend(sessions, 1e5)).submit_once(decision, build_legs(decision, "DAY"), 100.0)
"""


def test_process_killed_after_send_then_restarted_sends_once(database_url):
    import subprocess
    import sys

    crashed = subprocess.run([sys.executable, "-c", CRASHING_PROCESS, database_url], check=False, capture_output=True,
                             text=True, timeout=120)
    assert crashed.returncode == 17, crashed.stderr
    sessions = session_factory(database_url)
    decision = TradeDecision(decision_id="restart", strategy="s", symbol="AAPL", as_of=AS_OF, data_through=AS_OF,
                             proposed_action=Action.BUY, action=Action.BUY, entry=100.0, stop=96.0, targets=[106.0],
                             quantity=10, rationale="t", account_equity=1e5)
    result = OrderDesk(sessions, PaperBroker(sessions, 1e5)).submit_once(decision, build_legs(decision, "DAY"), 100.0)
    assert result.status == "already_sent"
    assert broker_orders(sessions, "tp-restart") == 1
    with sessions() as session:
        assert session.get(OrderRow, "tp-restart").status == "Submitted"


class RefusingBroker(PaperBroker):
    def place(self, *args, **kwargs):
        from trading_pipeline.errors import OrderRejectedError

        raise OrderRejectedError("the broker declined: price more than 3% from market",
                                 "check the limit price against the market")


def test_rejected_order_is_recorded_and_not_resent(database_url):
    sessions = session_factory(database_url)
    decision = buy_decision("d5")
    record_decision(sessions, decision)
    legs = build_legs(decision, "DAY")
    first = OrderDesk(sessions, RefusingBroker(sessions, 1e5)).submit_once(decision, legs, 100.0)
    assert first.status == "rejected" and "3% from market" in first.reason
    again = OrderDesk(sessions, PaperBroker(sessions, 1e5)).submit_once(decision, legs, 100.0)
    assert again.status == "rejected" and "not sent again" in again.reason
    assert broker_orders(sessions, "tp-d5") == 0
    with sessions() as session:
        assert session.get(OrderRow, "tp-d5").status == "Rejected"


@pytest.mark.parametrize("answered", ["Inactive", "Cancelled", "Rejected"])
def test_an_order_the_broker_refuses_at_once_is_shown_as_rejected_not_submitted(database_url, answered):
    """IBKR may accept a placement and answer at once that the order is not working (a venue or
    account rejection): the orders asset must not show it as submitted, and nothing is sent again."""
    sessions = session_factory(database_url)

    cancelled: list[str] = []

    class RefusingAtOnce(PaperBroker):
        def place(self, symbol, legs, reference_price, placed_at=None):
            answers = super().place(symbol, legs, reference_price, placed_at=placed_at)
            return [dataclasses.replace(answers[0], status=answered), *answers[1:]]

        def cancel(self, client_order_id):
            cancelled.append(client_order_id)
            return super().cancel(client_order_id)

    broker = RefusingAtOnce(sessions, 100_000.0)
    decision = buy_decision()
    record_decision(sessions, decision)
    legs = build_legs(decision, "DAY")
    record = OrderDesk(sessions, broker).submit_once(decision, legs, reference_price=100.0, placed_at=decision.as_of)
    assert record.status == "rejected"
    assert f"the broker answered {answered} at once: it is not working" in record.reason
    again = OrderDesk(sessions, broker).submit_once(decision, legs, reference_price=100.0, placed_at=decision.as_of)
    assert again.status != "submitted" and broker_orders(sessions, "tp-d1") == 1  # never sent twice
    # Inactive may be an order held, not refused: it is cancelled, so that it cannot become active again.
    assert cancelled == (["tp-d1"] if answered == "Inactive" else [])
    if answered == "Inactive":
        assert record.reason.endswith("nothing more is sent for this decision (Inactive at the broker (rejected or held); "
                                      "cancelled so that it cannot become active again)")
