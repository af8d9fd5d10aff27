"""Orders IBKR does not list (the emulator over real HTTP): after hours its live orders can miss
working orders (ibind #43), they cover the current session and day only, and an order's own status
answers 503 for one that ended before this session. An order it does not list is taken for gone
only from a list read in the regular session (`order_list_completeness`); otherwise it is kept, and
keeps holding its symbol. World and decisions: lifecycle_world.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trading_pipeline.adapters.ibkr import order_lookup
from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.ibkr.errors import IBKROrderStateUnknown
from trading_pipeline.adapters.portfolio_sync import (
    ORPHAN_GRACE,
    SUBMITTING_GRACE,
    UNCONFIRMED,
    sync_portfolio,
)
from trading_pipeline.adapters.portfolio_sync.order_states import ENDED_OUTSIDE
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.core.analysis import TradeDecision
from trading_pipeline.core.orders import build_legs
from trading_pipeline.core.strategies import RiskSettings
from trading_pipeline_tests.adapters.ibkr.lifecycle_world import (
    World,
    entry_decision,
    exit_decision,
    limits_now,
)
from trading_pipeline_tests.adapters.sync_world import earlier

# ---------------------------------------------------------------------------------------------- 11
# IBKR answers a real gateway gives by its documented behaviour (the reference) and the emulator does
# not by itself: injected.
LIVE_ORDERS = "/iserver/account/orders"
NOTHING_LISTED = {"orders": [], "snapshot": True}
# The clock IBKR's broker judges its live orders by (XNYS): a regular session, and after its close.
IN_SESSION = datetime(2026, 12, 8, 15, 0, tzinfo=UTC)  # Tuesday 10:00 New York
AFTER_HOURS = datetime(2026, 12, 7, 23, 0, tzinfo=UTC)  # Monday 18:00 New York
CLOCKS = {"in-session": IN_SESSION, "after-hours": AFTER_HOURS}


def ibkr_clock(monkeypatch, at: datetime) -> None:
    monkeypatch.setattr(order_lookup, "_utcnow", lambda: at)


def gates(w: World, decision: TradeDecision, risk: RiskSettings | None = None):
    """The entry gates of `decision` on the account as the orders step reads it."""
    return limits_now(w, decision, risk)()


@pytest.mark.parametrize("clock", sorted(CLOCKS))
def test_a_bracket_closed_by_hand_before_a_rollover_no_sync_saw_does_not_hold_the_limits_for_ever(
        world, monkeypatch, clock):
    """After the last sync of the day the position is sold in TWS and its stop and take-profit are
    cancelled there. The day rolls over: IBKR lists neither order any more, and with no execution
    there is nothing to find them by, so the books keep them as they were (Submitted; the sync says
    to check them at the broker, and cannot cancel what IBKR does not know). Counted as working
    protection, that stop held AAPL as a position for ever: no AAPL entry again (the reason saying
    the sync would cancel it and entries resume) and one open position of max_open_positions used
    up for every other symbol. IBKR lists every working order: one it no longer lists, placed long
    before, does not work. Read in the regular session, its list is complete: the two are recorded
    as Cancelled (they ended outside the pipeline); after hours they are kept as they were."""
    ibkr_clock(monkeypatch, CLOCKS[clock])
    w = world(symbols=("AAPL", "MSFT"))
    w.emulator.set_price("AAPL", 100.0)
    w.emulator.set_price("MSFT", 100.0)
    stop_id, take_profit_id = w.open_position(entry_decision("a"))
    assert sync_portfolio(w.sessions, w.broker, {}).drift == []
    w.close_by_hand_before_an_unseen_rollover(stop_id, take_profit_id)
    for _ in range(2):
        earlier(w.sessions, ORPHAN_GRACE * 2)
        report = sync_portfolio(w.sessions, w.broker, {})
    if clock == "in-session":
        assert (w.row("tp-a-sl").status, w.row("tp-a-tp").status) == ("Cancelled", "Cancelled")
        assert w.last_event("tp-a-sl").startswith(ENDED_OUTSIDE)
    else:  # a list that may miss working orders proves nothing: kept as they were
        assert w.row("tp-a-sl").status == "Submitted"
        assert any(line.startswith("tp-a-sl: Submitted") and "not complete now" in line
                   for line in report.status_changes), report.status_changes
    quantity, checks = gates(w, entry_decision("m", symbol="MSFT"), RiskSettings(max_open_positions=1))
    assert quantity > 0, [(c.rule, c.detail) for c in checks if not c.passed]
    quantity, checks = gates(w, entry_decision("b"))
    assert quantity > 0, [(c.rule, c.detail) for c in checks if not c.passed]


def test_an_exit_after_hours_turns_the_working_stop_into_it_though_ibkrs_live_orders_miss_it(world):
    """After hours IBKR's live orders can come back empty while orders work (ibind #43, in the
    reference). The stop taken for gone, the exit was a standalone market sale beside it: at a
    gap below the stop the next open filled both, selling the 50 held twice (short 50)."""
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    stop_id, take_profit_id = w.open_position(entry_decision("ah"))  # 50 @ 100, stop 85, target 120
    w.emulator.set_market_open(False)
    w.emulator.inject(LIVE_ORDERS, method="GET", body=NOTHING_LISTED, count=1000)

    result = w.restart().exit(exit_decision("ah-exit", 50))  # tonight's run: a new process, the saved ids
    assert result.status == "submitted" and result.client_order_id == "tp-ah-sl", result.reason
    assert w.requests_sent() == (1, 1, 0)  # the stop changed in place; no second order
    assert w.emulator.orders_with_coid("tp-ah-exit") == []
    assert w.order(stop_id).order_type == "MKT"

    w.emulator.set_price("AAPL", 80.0)  # the next session opens below the old stop
    w.emulator.set_market_open(True)
    assert w.position_path("AAPL") == [50, 0]  # sold once, never short
    assert w.order(take_profit_id).status == "Cancelled"


@pytest.mark.parametrize("clock", sorted(CLOCKS))
def test_a_stop_ibkr_no_longer_knows_never_passes_for_the_protection_of_a_later_position(world, monkeypatch, clock):
    """A bracket cancelled by hand before a rollover no sync saw stays Submitted in the books (IBKR
    lists it no more and it has no execution). The next position's own stop, cancelled in TWS, left
    that position without any stop at IBKR, yet the sync counted the old stop as covering it: no
    'NO working stop-loss' alarm for a position IBKR holds with nothing protecting it. (Read in the
    regular session, IBKR's list is complete, and the old bracket is recorded as Cancelled.)"""
    ibkr_clock(monkeypatch, CLOCKS[clock])
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    old_stop, old_take_profit = w.open_position(entry_decision("old"))
    w.close_by_hand_before_an_unseen_rollover(old_stop, old_take_profit)
    earlier(w.sessions, ORPHAN_GRACE * 2)
    sync_portfolio(w.sessions, w.broker, {})
    assert w.row("tp-old-sl").status == {"in-session": "Cancelled", "after-hours": "Submitted"}[clock]

    stop_id, _ = w.open_position(entry_decision("new"))
    assert sync_portfolio(w.sessions, w.broker, {}).unprotected == []
    w.broker.client.cancel_order(stop_id)  # cancelled in TWS: the take-profit alone works on

    report = sync_portfolio(w.sessions, w.broker, {})
    assert w.row("tp-new-sl").status == "Cancelled"
    assert [line.split(":")[0] for line in report.unprotected] == ["AAPL"], report.drift
    assert not any("cover" in line for line in report.drift), report.drift


def _whole_lists_again(w: World) -> None:
    """The next session: IBKR's live orders list every order again."""
    with w.emulator.state.lock:
        w.emulator.state.faults.clear()


def test_an_entry_ibkr_answered_as_a_duplicate_is_not_taken_for_never_placed_while_its_list_misses_it(world):
    """An entry sent after hours; IBKR placed it, but its answer was lost. The step run again finds
    it nowhere (the live orders miss it after hours) and IBKR answers 'duplicate cOID'. The sync,
    finding it unlisted two minutes on, closed the bracket as never placed: the entry's fill at the
    next open was never recorded, and an exit went out as a market sale beside the working stop
    (short 50 once the price fell through the stop)."""
    w = world(market_hours="closed")
    w.emulator.set_price("AAPL", 101.0)
    decision = entry_decision("dup")
    record_decision(w.sessions, decision)
    w.emulator.inject("/iserver/reply/*", method="POST", status=500, process=True)  # placed; the answer lost
    with pytest.raises(IBKROrderStateUnknown):
        w.desk.submit_once(decision, build_legs(decision, "DAY"), decision.entry)
    w.emulator.inject(LIVE_ORDERS, method="GET", body=NOTHING_LISTED, count=1000)
    later = w.restart()
    again = later.desk.submit_once(decision, build_legs(decision, "DAY"), decision.entry)
    assert again.status == "already_sent" and len(w.emulator.orders_with_coid("tp-dup")) == 1, again.reason

    earlier(w.sessions, SUBMITTING_GRACE)
    report = sync_portfolio(w.sessions, later.broker, {})
    assert [w.row(coid).status for coid in ("tp-dup", "tp-dup-sl", "tp-dup-tp")] == ["unknown"] * 3
    assert any("duplicate cOID" in line and "does not list it" in line for line in report.status_changes)

    _whole_lists_again(w)
    w.emulator.set_price("AAPL", 99.0)
    w.emulator.set_market_open(True)  # the entry fills at the open; its stop and take-profit work
    sync_portfolio(w.sessions, later.broker, {})
    assert (w.row("tp-dup").status, w.row("tp-dup-sl").status) == ("Filled", "Submitted")
    result = later.exit(exit_decision("dup-exit", 50))
    assert result.status == "submitted" and result.client_order_id == "tp-dup-sl", result.reason
    w.emulator.set_price("AAPL", 80.0)
    assert w.position_path("AAPL") == [50, 0]


def test_an_exit_after_hours_waits_for_a_stop_ibkr_acknowledged_only_through_its_entry(world):
    """IBKR's acknowledgement of a bracket named only the entry (its shape is undocumented), so the
    stop's IBKR id is learnt from the live orders; after hours they miss it. The sync closed the
    stop and take-profit as never placed, and the exit was a market sale beside them."""
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    decision = entry_decision("one")
    record_decision(w.sessions, decision)
    w.emulator.inject("/iserver/reply/*", method="POST", transform=lambda answer: answer[:1])
    assert w.desk.submit_once(decision, build_legs(decision, "DAY"), decision.entry).status == "filled"
    assert w.row("tp-one-sl").status == "unknown"
    w.emulator.set_market_open(False)
    w.emulator.inject(LIVE_ORDERS, method="GET", body=NOTHING_LISTED, count=1000)
    later = w.restart()
    earlier(w.sessions, SUBMITTING_GRACE)
    sync_portfolio(w.sessions, later.broker, {})
    assert (w.row("tp-one-sl").status, w.row("tp-one-tp").status) == ("unknown", "unknown")

    exit_now = exit_decision("one-exit", 50)
    waited = later.exit(exit_now)
    assert waited.status == "not_sent" and "tp-one-sl" in waited.reason and "sync_portfolio" in waited.reason
    assert w.requests_sent() == (1, 0, 0) and w.emulator.orders_with_coid("tp-one-exit") == []

    _whole_lists_again(w)  # the sync finds the stop, and the exit run again turns it into the exit
    sync_portfolio(w.sessions, later.broker, {})
    assert w.row("tp-one-sl").status == "Submitted"
    result = later.exit(exit_now)
    assert result.status == "submitted" and result.client_order_id == "tp-one-sl", result.reason
    w.emulator.set_price("AAPL", 80.0)
    w.emulator.set_market_open(True)
    assert w.position_path("AAPL") == [50, 0]


def test_an_acknowledged_entry_absent_through_a_whole_session_is_closed_and_no_longer_holds_its_symbol(
        world, monkeypatch):
    """What IBKR acknowledged but never lists is kept only until a whole session has closed since
    and a complete list (read in session) still lacks it: then it is gone, and the symbol is free
    again. A first look after hours, with no sync during that session, proves nothing."""
    ibkr_clock(monkeypatch, AFTER_HOURS)
    w = world(market_hours="closed")
    w.emulator.set_price("AAPL", 101.0)
    decision = entry_decision("gone")
    record_decision(w.sessions, decision)
    w.emulator.inject("/iserver/reply/*", method="POST", status=500, process=True)
    with pytest.raises(IBKROrderStateUnknown):
        w.desk.submit_once(decision, build_legs(decision, "DAY"), decision.entry)
    w.emulator.inject(LIVE_ORDERS, method="GET", body=NOTHING_LISTED, count=1000)
    assert w.restart().desk.submit_once(decision, build_legs(decision, "DAY"), decision.entry).status == "already_sent"
    (entry,) = w.emulator.orders_with_coid("tp-gone")
    w.broker.client.cancel_order(entry.order_id)  # cancelled in TWS before the next session
    w.emulator.new_day()
    _whole_lists_again(w)

    earlier(w.sessions, timedelta(days=7))
    later = w.restart()
    kept = sync_portfolio(w.sessions, later.broker, {})  # after hours: the first look since
    assert w.row("tp-gone").status != "Cancelled"
    assert any(line.startswith("tp-gone:") and "not complete now" in line for line in kept.status_changes), \
        kept.status_changes

    ibkr_clock(monkeypatch, IN_SESSION)
    w.emulator.set_market_open(True)
    sync_portfolio(w.sessions, later.broker, {})
    assert [w.row(coid).status for coid in ("tp-gone", "tp-gone-sl", "tp-gone-tp")] == ["Cancelled"] * 3
    assert "not listed it through a whole session" in w.last_event("tp-gone")


def test_unconfirmed_children_of_an_entry_cancelled_unfilled_are_cancelled_with_it(world):
    """Children IBKR acknowledged only through their entry, unlisted after hours, wait to be found;
    but once their entry is cancelled without a fill they can never work: they go with it at once."""
    w = world()
    w.emulator.set_price("AAPL", 101.0)  # above the BUY limit of 100: the entry works
    decision = entry_decision("off")
    record_decision(w.sessions, decision)
    w.emulator.inject("/iserver/reply/*", method="POST", transform=lambda answer: answer[:1])
    assert w.desk.submit_once(decision, build_legs(decision, "DAY"), decision.entry).status == "submitted"
    w.emulator.set_market_open(False)
    w.broker.client.cancel_order(w.emulator.orders_with_coid("tp-off")[0].order_id)  # cancelled in TWS
    w.emulator.inject(LIVE_ORDERS, method="GET", body=NOTHING_LISTED, count=1000)
    earlier(w.sessions, SUBMITTING_GRACE)
    sync_portfolio(w.sessions, w.restart().broker, {})
    assert [w.row(coid).status for coid in ("tp-off", "tp-off-sl", "tp-off-tp")] == ["Cancelled"] * 3
    assert "cancelled with its parent tp-off" in w.last_event("tp-off-sl")


def test_an_order_ibkr_no_longer_knows_is_asked_for_its_status_once_per_lookup(world):
    """IBKR answers 503 to the status of an order that ended before this session; asked again with
    backoff like a passing fault, each lookup of such an order (every sync, every entry's limits
    under the account lock) waited out the retries: seconds per order kept in the books."""
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    stop_id, take_profit_id = w.open_position(entry_decision("ended"))
    w.close_by_hand_before_an_unseen_rollover(stop_id, take_profit_id)
    later = w.restart()
    w.emulator.reset_stats()
    assert later.broker.find_order("tp-ended-sl") is None
    assert w.emulator.count("GET", f"/iserver/account/order/status/{stop_id}") == 1


# A gateway whose partitioned P&L fails while a position is open: answered 404 (a gateway that does


def test_an_entry_sent_after_hours_whose_answer_was_lost_holds_its_symbol_until_a_session_list_decides(
        world, monkeypatch):
    """A decision for the next session sends its entry after hours; IBKR places it, but the answer is
    lost (no IBKR id, no acknowledgement). Two minutes on, the sync found nothing in IBKR's after-hours
    live orders, which miss working orders, and closed the bracket as never reached: the symbol was
    free, and the next decision sent a second entry beside the first, working at IBKR (a doubled
    position once both fill)."""
    ibkr_clock(monkeypatch, AFTER_HOURS)
    w = world(market_hours="closed")
    w.emulator.config.after_hours_misses_working = True
    w.emulator.set_price("AAPL", 101.0)  # above the limit of 100: the entry works
    decision = entry_decision("night")
    record_decision(w.sessions, decision)
    w.emulator.inject("/iserver/reply/*", method="POST", status=500, process=True)  # placed; the answer lost
    with pytest.raises(IBKROrderStateUnknown):
        w.desk.submit_once(decision, build_legs(decision, "GTC"), decision.entry)
    (working,) = w.emulator.orders_with_coid("tp-night")
    assert w.row("tp-night").status in UNCONFIRMED and not w.row("tp-night").broker_order_id

    earlier(w.sessions, SUBMITTING_GRACE + timedelta(minutes=1))
    later = w.restart()
    report = sync_portfolio(w.sessions, later.broker, {})
    assert {w.row(c).status for c in ("tp-night", "tp-night-sl", "tp-night-tp")} <= set(UNCONFIRMED)
    (line,) = [line for line in report.status_changes if line.startswith("tp-night:")]
    assert "not complete now" in line and "next regular session" in line and "holds AAPL" in line, line
    quantity, checks = gates(later, entry_decision("next"))
    assert quantity == 0 and any(c.rule == "order_working" and "tp-night" in c.detail for c in checks), checks

    ibkr_clock(monkeypatch, IN_SESSION)  # the session opens, hours past the grace: the first sync decides
    w.emulator.set_market_open(True)
    sync_portfolio(w.sessions, later.broker, {})
    assert (w.row("tp-night").status, w.row("tp-night").broker_order_id) == ("Submitted", str(working.order_id))
    assert len(w.emulator.orders_with_coid("tp-night")) == 1 and w.emulator.orders_with_coid("tp-next") == []


def test_a_gtc_entry_cancelled_by_hand_before_an_unseen_rollover_is_recorded_cancelled_and_frees_its_symbol(
        world, monkeypatch):
    """A GTC entry, working (Submitted, with its IBKR id), is cancelled by hand in TWS and the day
    rolls over before any sync saw it: IBKR lists it no more, its status answers 503, and it has no
    execution. It stayed Submitted for ever, a working entry to `order_working`: no entry in AAPL
    again. Kept while IBKR's list may be incomplete; recorded as Cancelled by a sync in session."""
    ibkr_clock(monkeypatch, AFTER_HOURS)
    w = world()
    w.emulator.set_price("AAPL", 101.0)  # above the limit of 100: the entry works
    decision = entry_decision("gtc")
    record_decision(w.sessions, decision)
    assert w.desk.submit_once(decision, build_legs(decision, "GTC"), decision.entry).status == "submitted"
    (entry,) = w.emulator.orders_with_coid("tp-gtc")
    w.broker.client.cancel_order(entry.order_id)  # in TWS
    w.emulator.set_market_open(False)
    w.emulator.new_day()
    later = w.restart()
    w.emulator.reset_stats()
    assert later.broker.find_order("tp-gtc") is None
    assert [r[3] for r in w.emulator.requests("GET", f"/iserver/account/order/status/{entry.order_id}")] == [503]
    earlier(w.sessions, SUBMITTING_GRACE + timedelta(minutes=1))

    kept = sync_portfolio(w.sessions, later.broker, {})  # after hours: IBKR's list may miss it
    assert w.row("tp-gtc").status == "Submitted"
    assert any(line.startswith("tp-gtc: Submitted") and "not complete now" in line for line in kept.status_changes)

    ibkr_clock(monkeypatch, IN_SESSION)
    w.emulator.set_market_open(True)
    report = sync_portfolio(w.sessions, later.broker, {})
    assert [w.row(c).status for c in ("tp-gtc", "tp-gtc-sl", "tp-gtc-tp")] == ["Cancelled"] * 3
    assert w.last_event("tp-gtc") == ENDED_OUTSIDE
    assert any(line.startswith("tp-gtc: Submitted → Cancelled") for line in report.status_changes)
    quantity, checks = gates(later, entry_decision("again"))
    assert quantity > 0, [(c.rule, c.detail) for c in checks if not c.passed]


def test_a_stop_cancelled_by_hand_before_an_unseen_rollover_is_closed_and_its_held_position_reported_unprotected(
        world, monkeypatch):
    """The stop and take-profit of a position still held are cancelled in TWS before a rollover no sync
    saw. Recorded as Cancelled (they stayed Submitted for ever), the 'NO working stop-loss' alarm still
    fires for the position."""
    ibkr_clock(monkeypatch, IN_SESSION)
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    stop_id, take_profit_id = w.open_position(entry_decision("kept"))
    assert sync_portfolio(w.sessions, w.broker, {}).unprotected == []
    w.broker.client.cancel_order(stop_id)
    w.broker.client.cancel_order(take_profit_id)
    w.emulator.new_day()
    earlier(w.sessions, SUBMITTING_GRACE + timedelta(minutes=1))

    report = sync_portfolio(w.sessions, w.restart().broker, {})
    assert (w.row("tp-kept-sl").status, w.row("tp-kept-tp").status) == ("Cancelled", "Cancelled")
    assert "no longer protects the AAPL position" in w.last_event("tp-kept-sl")
    assert w.held("AAPL") == 50
    assert [line.split(":")[0] for line in report.unprotected] == ["AAPL"], report.drift


def test_a_stop_whose_own_status_cannot_be_read_is_never_taken_for_ended(world, monkeypatch):
    """In session, a working stop missing from the live orders and whose status lookup fails (a 500,
    not IBKR's 503 for an order that ended) may still be working: recorded as Cancelled, the
    position would count as unprotected and an exit would sell beside it (a short if both fill). It
    is kept until a sync reads its status; IBKR's 503 then closes it."""
    ibkr_clock(monkeypatch, IN_SESSION)
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    stop_id, take_profit_id = w.open_position(entry_decision("kept"))
    w.broker.client.cancel_order(stop_id)
    w.broker.client.cancel_order(take_profit_id)
    w.emulator.new_day()
    earlier(w.sessions, SUBMITTING_GRACE + timedelta(minutes=1))
    for order_id in (stop_id, take_profit_id):
        w.emulator.inject(f"/iserver/account/order/status/{order_id}", method="GET", status=500,
                          body={"error": "Service Unavailable"}, count=1)

    later = w.restart()
    kept = sync_portfolio(w.sessions, later.broker, {})
    assert (w.row("tp-kept-sl").status, w.row("tp-kept-tp").status) == ("Submitted", "Submitted")
    assert any(line.startswith("tp-kept-sl: Submitted") and "status of this order could not be read" in line
               for line in kept.status_changes), kept.status_changes

    report = sync_portfolio(w.sessions, later.broker, {})  # the status answers again: 503, it ended
    assert (w.row("tp-kept-sl").status, w.row("tp-kept-tp").status) == ("Cancelled", "Cancelled")
    assert [line.split(":")[0] for line in report.unprotected] == ["AAPL"], report.drift


def test_ibkrs_live_orders_are_complete_only_when_read_in_the_regular_session_past_their_preflight(
        emulator, client, monkeypatch):
    broker = IBKRBroker(client, order_cache_seconds=5)
    ibkr_clock(monkeypatch, IN_SESSION)
    first = broker.order_list_completeness()  # not read in this brokerage session yet
    assert not first.complete and "first answer" in first.why_not
    assert broker.find_order("tp-nothing") is None
    assert broker.order_list_completeness().complete
    ibkr_clock(monkeypatch, datetime(2026, 12, 8, 14, 30, 2, tzinfo=UTC))  # the answer reused may predate the open
    assert not broker.order_list_completeness().complete
    ibkr_clock(monkeypatch, AFTER_HOURS)
    after_hours = broker.order_list_completeness()
    assert not after_hours.complete and "Tue 2026-12-08 09:30" in after_hours.why_not, after_hours.why_not


@pytest.mark.parametrize(("answer", "said"), [
    ({"orders": [], "snapshot": False}, "snapshot=false"),  # still flagged incomplete after the re-asks
    ({"orders": [{"orderId": 9_000_000 + i, "order_ref": f"other-{i}", "status": "Submitted", "filledQuantity": 0}
                 for i in range(1000)], "snapshot": True}, "documented maximum of 1000"),
], ids=["flagged-incomplete", "at-the-1000-cap"])
def test_a_live_orders_answer_that_may_lack_orders_is_not_a_complete_list(emulator, client, monkeypatch, answer,
                                                                          said):
    """In session and past the pre-flight, a list IBKR itself marks incomplete, or one as long as the
    most it lists, may still lack working orders: absence from it proves nothing."""
    broker = IBKRBroker(client, order_cache_seconds=5)
    ibkr_clock(monkeypatch, IN_SESSION)
    emulator.inject(LIVE_ORDERS, method="GET", body=answer, count=10)
    assert broker.find_order("tp-nothing") is None
    verdict = broker.order_list_completeness()
    assert not verdict.complete and said in verdict.why_not, verdict.why_not
    with emulator.state.lock:  # the gateway answers whole lists again
        emulator.state.faults.clear()
    client.live_orders()
    assert broker.order_list_completeness().complete
