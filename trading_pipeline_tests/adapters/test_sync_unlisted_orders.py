"""The portfolio sync and orders the broker does not list: crash leftovers ('submitting', 'unknown')
reconciled by cOID, found by their executions, or closed as never reached once the broker's list is
complete (kept, holding their symbol, while it may miss working orders), and orders that ended
outside the pipeline (cancelled by hand before an unseen rollover). Helpers: sync_world.py."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from trading_pipeline.adapters.broker import (
    PaperBroker,
)
from trading_pipeline.adapters.portfolio_sync import (
    NEVER_REACHED,
    SUBMITTING_GRACE,
    sync_portfolio,
    with_working_orders,
)
from trading_pipeline.adapters.trading_db import (
    ExecutionRow,
    OrderEventRow,
)
from trading_pipeline.core.orders import build_legs
from trading_pipeline.core.risk import AccountState, Mark
from trading_pipeline_tests.adapters.sync_world import (
    WEDNESDAY_OPEN,
    BookBroker,
    age,
    daily_bars,
    decision,
    events,
    rows,
    send,
)

# --- 3. crash leftovers reconciled by the sync alone -----------------------------------------------


def test_a_crash_after_the_ack_is_reconciled_by_the_sync_alone(sessions):
    send(sessions, PaperBroker(sessions, 100_000.0), decision("acked"), crash="after_ack")
    coids = ("tp-acked", "tp-acked-sl", "tp-acked-tp")
    assert {row.status for row in rows(sessions, *coids).values()} == {"submitting"}
    broker = PaperBroker(sessions, 100_000.0)
    broker.simulate_fills(daily_bars({"2026-09-02": (99.0, 101.0, 98.5, 100.5)}))  # the entry fills at 99
    report = sync_portfolio(sessions, broker, {"AAPL": Mark(100.5)})  # no orders step re-run
    after = rows(sessions, *coids)
    assert (after["tp-acked"].status, after["tp-acked"].filled_quantity, after["tp-acked"].average_fill_price) == (
        "Filled", 50, 99.0)
    assert after["tp-acked-sl"].status == "Submitted" and after["tp-acked-tp"].status == "Submitted"
    assert all(after[c].broker_order_id == broker.find_order(c).broker_order_id for c in coids)
    assert events(sessions, "tp-acked")[-1] == "sync: reconciled by cOID, the broker has it (filled 50)"
    assert report.new_executions == 1 and report.drift == []
    assert report.account.positions["AAPL"].quantity == 50


def test_a_crash_before_the_send_is_closed_after_the_grace_period(sessions):
    send(sessions, PaperBroker(sessions, 100_000.0), decision("lost"), crash="before_send")
    broker = PaperBroker(sessions, 100_000.0)
    coids = ("tp-lost", "tp-lost-sl", "tp-lost-tp")

    young = sync_portfolio(sessions, broker, {})
    assert {row.status for row in rows(sessions, *coids).values()} == {"submitting"}  # may be in flight
    assert any(line.startswith("tp-lost: submitting for ") and "checked again by the next sync" in line
               for line in young.status_changes)
    assert "AAPL" in with_working_orders(AccountState(0.0, 0.0), sessions, broker).working_entries  # still counts against a second order

    age(sessions, "lost", SUBMITTING_GRACE + timedelta(seconds=1))
    with sessions() as session:  # an orders step re-running the old decision right now: in flight again
        session.add(OrderEventRow(client_order_id="tp-lost", status="submitting", detail="about to send"))
        session.commit()
    sync_portfolio(sessions, broker, {})
    assert rows(sessions, "tp-lost")["tp-lost"].status == "submitting"

    age(sessions, "lost", SUBMITTING_GRACE + timedelta(seconds=1))
    report = sync_portfolio(sessions, broker, {})
    assert {row.status for row in rows(sessions, *coids).values()} == {"Cancelled"}
    assert events(sessions, "tp-lost")[-1] == NEVER_REACHED
    assert f"tp-lost: submitting → Cancelled ({NEVER_REACHED})" in report.status_changes
    assert with_working_orders(AccountState(0.0, 0.0), sessions, broker).working_entries == {} and report.drift == []
    assert broker.find_order("tp-lost") is None  # and nothing was sent by the sync


def test_an_unconfirmed_order_no_longer_listed_is_found_by_its_executions(memory_sessions):
    """IBKR after a rollover: the acked entry filled yesterday and is no longer listed by cOID."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("rolled"), crash="after_ack")
    broker.fill("tp-rolled", 50, 99.5, WEDNESDAY_OPEN)
    broker.forgotten.add("tp-rolled")
    age(memory_sessions, "rolled", timedelta(days=1))
    sync_portfolio(memory_sessions, broker, {})
    entry = rows(memory_sessions, "tp-rolled")["tp-rolled"]
    assert (entry.status, entry.filled_quantity, entry.average_fill_price) == ("Filled", 50, 99.5)
    with memory_sessions() as session:
        assert [e.price for e in session.scalars(select(ExecutionRow))] == [99.5]


AFTER_HOURS = "IBKR outside the regular session; decided by the first sync in the next regular session"


def test_an_unconfirmed_entry_missing_from_an_incomplete_list_is_kept_and_holds_its_symbol(memory_sessions):
    """An entry sent after hours whose answer was lost (no IBKR id, no acknowledgement); it works at
    the broker, but the broker's list after hours misses it. Two minutes on, the sync closed it as
    never reached: the symbol was free and the next decision sent a second entry beside it."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("night"), crash="after_ack")
    coids = ("tp-night", "tp-night-sl", "tp-night-tp")
    broker.forgotten.update(coids)  # working at the broker, missing from its after-hours list
    broker.list_incomplete = AFTER_HOURS
    age(memory_sessions, "night", SUBMITTING_GRACE + timedelta(minutes=1))
    events_before = events(memory_sessions, "tp-night")

    report = sync_portfolio(memory_sessions, broker, {})
    assert {row.status for row in rows(memory_sessions, *coids).values()} == {"submitting"}
    (line,) = [line for line in report.status_changes if line.startswith("tp-night:")]
    assert "not complete" in line and AFTER_HOURS in line and "holds AAPL" in line, line
    assert events(memory_sessions, "tp-night") == events_before  # looking does not restart the grace
    gated = with_working_orders(AccountState(0.0, 0.0), memory_sessions, broker)
    assert gated.working_entries["AAPL"].client_order_id == "tp-night"  # order_working refuses a second entry

    broker.list_incomplete = ""  # the session opens, hours after the grace: decided by the first sync
    broker.forgotten.clear()
    sync_portfolio(memory_sessions, broker, {})
    assert rows(memory_sessions, "tp-night")["tp-night"].status == "Submitted"


def test_an_unconfirmed_entry_absent_from_a_complete_list_is_closed_at_once_however_old(memory_sessions):
    """What was kept through the night is decided by the first complete list, its grace long past."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("never"), crash="before_send")
    broker.list_incomplete = AFTER_HOURS
    age(memory_sessions, "never", timedelta(hours=15))
    sync_portfolio(memory_sessions, broker, {})
    assert rows(memory_sessions, "tp-never")["tp-never"].status == "submitting"
    broker.list_incomplete = ""
    sync_portfolio(memory_sessions, broker, {})
    assert events(memory_sessions, "tp-never")[-1] == NEVER_REACHED
    assert with_working_orders(AccountState(0.0, 0.0), memory_sessions, broker).working_entries == {}


def cancelled_by_hand_before_an_unseen_rollover(broker: BookBroker, *coids: str) -> None:
    """Cancelled in TWS, then a day rollover no sync saw: listed nowhere any more, no execution."""
    for coid in coids:
        if broker.orders[coid].status not in ("Filled", "Cancelled"):
            broker.orders[coid].status = "Cancelled"
    broker.forgotten.update(coids)


def test_a_gtc_entry_cancelled_by_hand_and_no_longer_listed_is_recorded_cancelled(memory_sessions):
    """A GTC entry (Submitted, with its broker id) cancelled by hand before a rollover no sync saw
    stayed Submitted for ever: a working entry to `order_working`, so no entry in its symbol again."""
    broker = BookBroker()
    the_decision = decision("gtc")
    send(memory_sessions, broker, the_decision, build_legs(the_decision, "GTC"))
    assert rows(memory_sessions, "tp-gtc")["tp-gtc"].status == "Submitted"
    cancelled_by_hand_before_an_unseen_rollover(broker, "tp-gtc", "tp-gtc-sl", "tp-gtc-tp")

    young = sync_portfolio(memory_sessions, broker, {})  # placed a moment ago: may be in flight
    assert rows(memory_sessions, "tp-gtc")["tp-gtc"].status == "Submitted", young.status_changes
    age(memory_sessions, "gtc", SUBMITTING_GRACE + timedelta(minutes=1))
    broker.list_incomplete = AFTER_HOURS  # a list that may miss working orders proves nothing
    kept = sync_portfolio(memory_sessions, broker, {})
    assert rows(memory_sessions, "tp-gtc")["tp-gtc"].status == "Submitted"
    assert any(line.startswith("tp-gtc: Submitted") and AFTER_HOURS in line for line in kept.status_changes)

    broker.list_incomplete = ""
    report = sync_portfolio(memory_sessions, broker, {})
    assert {row.status for row in rows(memory_sessions, "tp-gtc", "tp-gtc-sl", "tp-gtc-tp").values()} == {"Cancelled"}
    assert "ended outside the pipeline" in events(memory_sessions, "tp-gtc")[-1]
    assert any(line.startswith("tp-gtc: Submitted → Cancelled") for line in report.status_changes)
    assert with_working_orders(AccountState(0.0, 0.0), memory_sessions, broker).working_entries == {}


def test_a_stop_cancelled_by_hand_and_no_longer_listed_is_closed_and_its_position_reported_unprotected(
        memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("held"))
    broker.fill("tp-held", 50, 100.0, WEDNESDAY_OPEN)
    assert sync_portfolio(memory_sessions, broker, {}).unprotected == []
    cancelled_by_hand_before_an_unseen_rollover(broker, "tp-held-sl", "tp-held-tp")  # the 50 are still held
    age(memory_sessions, "held", SUBMITTING_GRACE + timedelta(minutes=1))

    report = sync_portfolio(memory_sessions, broker, {})
    assert {row.status for row in rows(memory_sessions, "tp-held-sl", "tp-held-tp").values()} == {"Cancelled"}
    assert "no longer protects the AAPL position" in events(memory_sessions, "tp-held-sl")[-1]
    assert [line.split(":")[0] for line in report.unprotected] == ["AAPL"], report.drift
    assert "NO working stop-loss" in report.unprotected[0]
