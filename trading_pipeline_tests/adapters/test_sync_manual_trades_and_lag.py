"""The portfolio sync and trades made by hand in the pipeline's symbols (in its books, 'manual'), and
positions that lag fills: no second entry, no exit into the other side. Helpers: sync_world.py."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from sqlalchemy import select

from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.portfolio_sync import (
    ORPHAN_GRACE,
    record_executions,
    sync_portfolio,
    with_working_orders,
)
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import (
    ExecutionRow,
)
from trading_pipeline.core.analysis import OrderLeg
from trading_pipeline.core.orders import build_legs, client_order_id
from trading_pipeline.core.risk import entry_limits
from trading_pipeline.core.strategies import RiskSettings
from trading_pipeline_tests.adapters.sync_world import (
    WEDNESDAY_OPEN,
    BookBroker,
    closing,
    decision,
    earlier,
    exit_now,
    rows,
    sell_by_hand,
    send,
)

# --- 4c. trades made by hand in the symbols the pipeline trades: in its books, 'manual' ---------------

def executions_recorded(sessions) -> list[tuple[str, str, str, float, float, float]]:
    with sessions() as session:
        return [(e.client_order_id, e.symbol, e.side, e.quantity, e.price, e.commission)
                for e in session.scalars(select(ExecutionRow).order_by(ExecutionRow.executed_at))]


def test_a_position_sold_by_hand_closes_its_trade_manual_and_the_next_trade_is_its_own(memory_sessions):
    """Bought 50 by the pipeline, sold in TWS at 103 (commission 1.25) and its bracket cancelled there.
    Before: only the pipeline's own executions were recorded, so the books kept the trade open and every
    sync said 'broker holds 0, the pipeline's executions imply 50' for ever; the next trade was matched
    against the phantom shares."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("a"))
    broker.fill("tp-a", 50, 100.0, WEDNESDAY_OPEN, commission=1.0)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []
    sell_by_hand(broker, 50, price=103.0, commission=1.25)
    broker.cancel("tp-a-sl")  # the user cancels the bracket in TWS as well
    broker.cancel("tp-a-tp")

    report = sync_portfolio(memory_sessions, broker, {})
    assert report.drift == [] and report.new_executions == 1
    (trade,) = report.trades
    assert {k: trade[k] for k in ("decision_id", "status", "exit", "exit_reason", "commission", "realized_pnl")} == {
        "decision_id": "a", "status": "closed", "exit": 103.0, "exit_reason": "manual", "commission": 2.25,
        "realized_pnl": 147.75}
    assert executions_recorded(memory_sessions)[-1] == ("", "AAPL", "SELL", 50.0, 103.0, 1.25)
    assert sync_portfolio(memory_sessions, broker, {}).new_executions == 0  # each once

    send(memory_sessions, broker, decision("b"))
    broker.fill("tp-b", 50, 99.0, WEDNESDAY_OPEN + timedelta(days=2))
    report = sync_portfolio(memory_sessions, broker, {})
    assert report.drift == [] and report.unprotected == []
    assert [(t["decision_id"], t["status"], t["quantity"], t["entry"]) for t in report.trades] == [
        ("a", "closed", 50, 100.0), ("b", "open", 50, 99.0)]


def test_a_partial_sale_by_hand_resizes_the_stop_and_leaves_no_drift(memory_sessions):
    """50 held, 20 sold in TWS: the stop and take-profit are resized to the 30 left (from the broker's
    positions, as before), and now the books agree: the trade is partly closed 'manual' at the hand
    price, and no 'the pipeline's executions imply 50' drift follows."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("p"))
    broker.fill("tp-p", 50, 100.0, WEDNESDAY_OPEN)
    sync_portfolio(memory_sessions, broker, {})
    sell_by_hand(broker, 20, price=102.0, commission=1.0)

    report = sync_portfolio(memory_sessions, broker, {})
    assert report.drift == [] and report.unprotected == []
    assert ("tp-p-sl", {"quantity": 30}) in broker.modified and ("tp-p-tp", {"quantity": 30}) in broker.modified
    (trade,) = report.trades
    assert (trade["status"], trade["closed_quantity"], trade["exit"], trade["exit_reason"], trade["realized_pnl"]) == (
        "partly closed", 20, 102.0, "manual", 39.0)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []


def test_a_purchase_by_hand_beside_a_pipeline_position_is_a_manual_trade_of_its_own(memory_sessions):
    """30 bought in TWS beside the pipeline's 50: recorded, so no 'broker holds 80' drift; the books
    show it as a trade with no decision (opened by hand), not as more of the pipeline's trade. The
    pipeline's stop (50) then closes its own trade first (FIFO); the 30 left are the user's: not the
    pipeline's position, so no alarm that it has no stop."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("m"))
    broker.fill("tp-m", 50, 100.0, WEDNESDAY_OPEN)
    sync_portfolio(memory_sessions, broker, {})
    sell_by_hand(broker, 30, price=102.0, side="BUY")

    report = sync_portfolio(memory_sessions, broker, {})
    assert not any("broker holds" in line for line in report.drift), report.drift
    assert [(t["decision_id"], t["side"], t["quantity"], t["entry"], t["status"]) for t in report.trades] == [
        ("m", "BUY", 50, 100.0, "open"), ("", "BUY", 30, 102.0, "open")]

    broker.fill("tp-m-sl", 50, 96.0, WEDNESDAY_OPEN + timedelta(days=2))
    report = sync_portfolio(memory_sessions, broker, {})
    assert report.drift == [] and report.unprotected == []
    assert [(t["decision_id"], t["status"], t["exit_reason"]) for t in report.trades] == [
        ("m", "closed", "stop_loss"), ("", "open", None)]


def test_trades_by_hand_outside_the_pipelines_business_are_not_recorded(memory_sessions):
    """MSFT, which the pipeline never traded, and AAPL bought by hand before the pipeline's first order
    there: neither enters its books (the drift still says the broker holds more than the pipeline's
    executions imply). Only the AAPL sale by hand after the pipeline's entry is recorded."""
    broker = BookBroker()
    sell_by_hand(broker, 10, price=99.0, at=WEDNESDAY_OPEN - timedelta(days=1), side="BUY")  # before any order
    sell_by_hand(broker, 10, symbol="MSFT", side="BUY")
    send(memory_sessions, broker, decision("u"))
    broker.fill("tp-u", 50, 100.0, WEDNESDAY_OPEN)
    sell_by_hand(broker, 20, price=101.0)

    report = sync_portfolio(memory_sessions, broker, {})
    assert executions_recorded(memory_sessions) == [("tp-u", "AAPL", "BUY", 50.0, 100.0, 0.0),
                                                    ("", "AAPL", "SELL", 20.0, 101.0, 0.0)]
    assert "AAPL: broker holds 40, the pipeline's executions imply 30" in report.drift
    assert "MSFT: broker holds 10, the pipeline's executions imply 0" in report.drift


def test_a_fill_of_the_pipeline_is_never_booked_outside_while_its_order_is_ahead_of_its_executions(
        memory_sessions):
    """The broker's order states say the stop filled before its executions are attributed to it (IBKR's
    trades list is read at most every 5 s; a bracket child is known by an order id learnt later): the
    symbol's outside executions wait for the next sync, and one booked outside before the broker tied
    it to the pipeline's order is given to that order once it does."""

    class UntiedStop(BookBroker):
        tied = False

        def executions(self, client_order_id):
            return [] if client_order_id == "tp-t-sl" and not self.tied else super().executions(client_order_id)

        def outside_executions(self, symbols, own_client_order_ids):
            found = super().outside_executions(symbols, own_client_order_ids)
            if not self.tied:
                found += [dataclasses.replace(f, client_order_id="") for f in self.fills if f.client_order_id == "tp-t-sl"]
            return found

    broker = UntiedStop()
    send(memory_sessions, broker, decision("t"))
    broker.fill("tp-t", 50, 100.0, WEDNESDAY_OPEN)
    sync_portfolio(memory_sessions, broker, {})
    broker.fill("tp-t-sl", 50, 96.0, WEDNESDAY_OPEN + timedelta(days=1))
    sync_portfolio(memory_sessions, broker, {})
    assert [e[0] for e in executions_recorded(memory_sessions)] == ["tp-t"]  # the stop's 50 filled, none tied

    with memory_sessions() as session:  # had it been booked outside all the same (an order id learnt late)
        session.add(ExecutionRow(execution_id="x2", client_order_id="", symbol="AAPL", side="SELL", quantity=50,
                                 price=96.0, broker="book", executed_at=WEDNESDAY_OPEN + timedelta(days=1)))
        session.commit()
    broker.tied = True
    report = sync_portfolio(memory_sessions, broker, {})
    assert [e[0] for e in executions_recorded(memory_sessions)] == ["tp-t", "tp-t-sl"]
    assert [(t["status"], t["exit_reason"]) for t in report.trades] == [("closed", "stop_loss")]


# --- 4d. positions that lag fills: no second entry, no exit into the other side -----------------------

def entry_through_the_gates(sessions, broker, the_decision, risk: RiskSettings | None = None):
    """What the orders step does with an entry (graph/assets/orders.py `_send_entry`): the account's
    limits checked again under the account lock, on the account as the gates read it, then sent once."""
    record_decision(sessions, the_decision)

    def limits():
        account = with_working_orders(broker.account({}), sessions, broker)
        return entry_limits(the_decision.symbol, the_decision.entry, the_decision.stop, account,
                            risk or RiskSettings(), own_order=client_order_id(the_decision))

    return OrderDesk(sessions, broker).submit_once(the_decision, build_legs(the_decision, "DAY"), the_decision.entry,
                                                   limits=limits)


@pytest.mark.parametrize("crash", [None, "after_ack"], ids=["recorded", "crash-after-the-ack"])
def test_an_entry_that_filled_before_the_positions_list_it_blocks_a_second_entry(memory_sessions, crash):
    """A's entry fills; the broker's positions do not list it yet and no sync has run since (or the
    process died once the broker had taken A: its legs are still 'submitting'). Another decision for
    the symbol passed no_pyramiding (nothing listed) and order_working (A filled): a second entry,
    twice the risk. A's stop-loss, working, counts as the position."""
    broker = BookBroker()
    broker.unlisted.add("AAPL")
    send(memory_sessions, broker, decision("a"), crash=crash)
    broker.fill("tp-a", 50, 100.0, WEDNESDAY_OPEN)

    second = entry_through_the_gates(memory_sessions, broker, decision("b"))
    assert second.status == "not_sent" and "no_pyramiding" in second.reason, second.reason
    assert "stop-loss tp-a-sl (SELL 50 @ 96.00, Submitted) for AAPL is still working" in second.reason
    assert "tp-b" not in broker.orders
    assert rows(memory_sessions, "tp-a")["tp-a"].status == "Filled"  # learnt from the broker, not the books


def test_a_partly_filled_entry_whose_rest_expired_blocks_a_second_entry_and_an_unfilled_one_does_not(
        memory_sessions):
    """20 of A's 50 filled and the rest expired: A is done, its stop protects the 20, which the
    broker does not list yet. A bracket whose entry expired with no fill protects nothing: its
    children (left for the sync to cancel) do not count as a position."""
    broker = BookBroker()
    broker.unlisted.update({"AAPL", "MSFT"})
    send(memory_sessions, broker, decision("a"))
    broker.fill("tp-a", 20, 100.0, WEDNESDAY_OPEN)
    broker.cancel("tp-a")  # the DAY remainder expired
    send(memory_sessions, broker, decision("m", symbol="MSFT"))
    broker.cancel("tp-m")

    second = entry_through_the_gates(memory_sessions, broker, decision("b"))
    assert second.status == "not_sent" and "tp-a-sl" in second.reason and "tp-b" not in broker.orders
    other = entry_through_the_gates(memory_sessions, broker, decision("n", symbol="MSFT"))
    assert other.status == "submitted", other.reason


def test_an_entry_filled_at_once_whose_children_the_broker_has_not_confirmed_yet_counts_for_the_limits(
        memory_sessions):
    """A batched run at the open: A's entry fills as it is placed, and the broker's acknowledgement
    names only the entry (IBKR's bracket answer shape is not documented: only the first answer is
    paired), so A's stop-loss and take-profit are recorded 'unknown'; the broker's orders list does
    not show them yet, nor its positions A's fill. A is done (not working), not listed, and its
    unconfirmed stop was not counted: MSFT's entry went past max_open_positions (1). A stop whose
    state is unknown may be working, as an entry whose state is unknown counts as working."""
    broker = BookBroker()
    broker.unlisted.add("AAPL")
    the_decision = decision("a")
    record_decision(memory_sessions, the_decision)
    legs = build_legs(the_decision, "DAY")
    desk = OrderDesk(memory_sessions, broker)
    desk._record(the_decision, legs, {}, "submitting", "about to send")
    answers = broker.place("AAPL", legs, 100.0)
    broker.fill("tp-a", 50, 100.0, WEDNESDAY_OPEN)
    desk._record(the_decision, legs, {"tp-a": broker.find_order("tp-a")}, "unknown", "broker accepted")
    broker.forgotten.update({"tp-a-sl", "tp-a-tp"})  # not in the broker's orders list yet
    assert len(answers) == 3 and rows(memory_sessions, "tp-a-sl")["tp-a-sl"].status == "unknown"

    other = entry_through_the_gates(memory_sessions, broker, decision("m", symbol="MSFT"),
                                    RiskSettings(max_open_positions=1))
    assert other.status == "not_sent" and "max_open_positions" in other.reason, other.reason
    assert "tp-m" not in broker.orders
    same = entry_through_the_gates(memory_sessions, broker, decision("b"))
    assert same.status == "not_sent" and "tp-a-sl" in same.reason and "tp-b" not in broker.orders, same.reason


def test_entries_resume_once_the_sync_cancels_the_stop_of_a_position_closed_by_hand(memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("a"))
    broker.fill("tp-a", 50, 100.0, WEDNESDAY_OPEN)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []
    sell_by_hand(broker, 50)

    refused = entry_through_the_gates(memory_sessions, broker, decision("b"))
    assert refused.status == "not_sent" and "tp-a-sl" in refused.reason and "tp-b" not in broker.orders
    sync_portfolio(memory_sessions, broker, {})
    earlier(memory_sessions, ORPHAN_GRACE)
    sync_portfolio(memory_sessions, broker, {})
    assert (broker.orders["tp-a-sl"].status, broker.orders["tp-a-tp"].status) == ("Cancelled", "Cancelled")
    resumed = entry_through_the_gates(memory_sessions, broker, decision("b"))
    assert resumed.status == "submitted", resumed.reason


def test_an_exit_after_the_stop_filled_at_a_gap_never_sells_what_the_lagging_positions_still_list(memory_sessions):
    """The stop filled at the open, through a gap: it no longer works, so there is nothing to turn into
    the exit, and the broker's positions still list the 50 it sold. A market sale of the 50 listed
    would open a short of 50."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("a"))
    broker.fill("tp-a", 50, 100.0, WEDNESDAY_OPEN)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []
    broker.lag_positions()
    broker.fill("tp-a-sl", 50, 90.0, WEDNESDAY_OPEN + timedelta(days=1))  # its take-profit is cancelled with it
    assert broker.account({}).positions["AAPL"].quantity == 50

    result = exit_now(memory_sessions, broker, closing("a-exit"))
    assert result.status == "not_sent", result.reason
    assert ("the broker lists 50 AAPL to close, but the pipeline's own orders imply 0: tp-a-sl (stop-loss) SELL 50 "
            "filled, which the broker's positions may not show yet") in result.reason
    assert "a market SELL of 50 could then open a short position, so nothing was sent" in result.reason
    assert "tp-a-exit" not in broker.orders
    assert rows(memory_sessions, "tp-a-sl")["tp-a-sl"].status == "Filled"  # the books learnt the fill


def test_an_exit_after_the_pipeline_closed_part_of_the_position_closes_only_what_both_agree_is_held(
        memory_sessions):
    """The stop sold 20 of the 50, then the rest of the bracket was cancelled at the broker: nothing
    of the pipeline protects the 30 left, and the broker's positions still list 50. The exit sells
    the 30 (what the pipeline's fills and the broker both say is held), not 50."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("a"))
    broker.fill("tp-a", 50, 100.0, WEDNESDAY_OPEN)
    sync_portfolio(memory_sessions, broker, {})
    broker.lag_positions()
    broker.fill("tp-a-sl", 20, 95.0, WEDNESDAY_OPEN + timedelta(days=1))
    broker.cancel("tp-a-sl")
    broker.cancel("tp-a-tp")

    result = exit_now(memory_sessions, broker, closing("a-exit"))
    assert result.status == "submitted", result.reason
    assert [(leg.role, leg.side, leg.quantity) for leg in result.legs] == [("exit", "SELL", 30)]
    assert broker.orders["tp-a-exit"].leg.quantity == 30
    assert "sized to the 30 both agree is held: the broker lists 50 AAPL to close" in result.reason


def test_an_exit_still_closes_what_was_bought_by_hand_when_no_fill_of_the_pipeline_can_be_missing(
        memory_sessions):
    """Without a fill of its own closing orders, the pipeline has nothing the broker's list could lag
    behind: a position larger than the pipeline's (30 bought by hand beside its 50, whose stop was
    cancelled at the broker) is closed at the listed size, as before."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("a"))
    broker.fill("tp-a", 50, 100.0, WEDNESDAY_OPEN)
    by_hand = OrderLeg(client_order_id="bought-by-hand", role="entry", side="BUY", order_type="MKT", quantity=30,
                       price=None, tif="DAY")
    broker.place("AAPL", [by_hand], 100.0)
    broker.fill("bought-by-hand", 30, 100.0, WEDNESDAY_OPEN)
    broker.cancel("tp-a-sl")
    broker.cancel("tp-a-tp")

    result = exit_now(memory_sessions, broker, closing("a-exit", quantity=80))
    assert result.status == "submitted" and broker.orders["tp-a-exit"].leg.quantity == 80, result.reason


def test_an_exit_after_a_gap_stop_is_not_misled_by_an_earlier_trade_closed_by_hand(memory_sessions):
    """An earlier AAPL trade of the pipeline was closed by hand in TWS (its bracket cancelled there):
    its entry's +50 stays in the pipeline's fills for ever. The next trade's stop fills at a gap while
    the broker's positions still list its 50. Summed over all history, the pipeline's own fills imply
    50 (the old +50, this trade's +50 and -50), 'agreeing' with the stale list: a market sale of 50,
    a short of 50. Only the fills since the entry of the position held now say what the pipeline holds."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("old"))
    broker.fill("tp-old", 50, 100.0, WEDNESDAY_OPEN)
    sync_portfolio(memory_sessions, broker, {})
    sell_by_hand(broker, 50)
    broker.cancel("tp-old-sl")
    broker.cancel("tp-old-tp")
    sync_portfolio(memory_sessions, broker, {})

    send(memory_sessions, broker, decision("new"))
    broker.fill("tp-new", 50, 100.0, WEDNESDAY_OPEN + timedelta(days=2))
    assert sync_portfolio(memory_sessions, broker, {}).account.positions["AAPL"].quantity == 50
    broker.lag_positions()
    broker.fill("tp-new-sl", 50, 90.0, WEDNESDAY_OPEN + timedelta(days=3))

    result = exit_now(memory_sessions, broker, closing("new-exit"))
    assert result.status == "not_sent", result.reason
    assert "the pipeline's own orders imply 0: tp-new-sl (stop-loss) SELL 50 filled" in result.reason
    assert "tp-new-exit" not in broker.orders


def test_an_exit_of_an_unprotected_position_is_not_refused_because_of_an_earlier_manual_position(memory_sessions):
    """30 AAPL bought by hand were closed by a standalone exit of the pipeline (a sale of 30 in its
    fills). Its next trade: 50 bought, the stop sold 20 and the rest of the bracket was cancelled at
    the broker, leaving 30 held with no stop. Summed over all history its fills imply 0 (-30 +50
    -20), so the exit decision sent nothing ('could open a short'): an unprotected position kept."""
    broker = BookBroker()
    by_hand = OrderLeg(client_order_id="bought-by-hand", role="entry", side="BUY", order_type="MKT", quantity=30,
                       price=None, tif="DAY")
    broker.place("AAPL", [by_hand], 100.0)
    broker.fill("bought-by-hand", 30, 100.0, WEDNESDAY_OPEN)
    first = exit_now(memory_sessions, broker, closing("manual-exit", quantity=30))
    assert first.status == "submitted" and broker.orders["tp-manual-exit"].leg.quantity == 30, first.reason
    broker.fill("tp-manual-exit", 30, 101.0, WEDNESDAY_OPEN + timedelta(hours=1))
    sync_portfolio(memory_sessions, broker, {})

    send(memory_sessions, broker, decision("new"))
    broker.fill("tp-new", 50, 100.0, WEDNESDAY_OPEN + timedelta(days=1))
    broker.fill("tp-new-sl", 20, 96.0, WEDNESDAY_OPEN + timedelta(days=2))
    broker.cancel("tp-new-sl")
    broker.cancel("tp-new-tp")
    assert broker.account({}).positions["AAPL"].quantity == 30

    result = exit_now(memory_sessions, broker, closing("new-exit", quantity=30))
    assert result.status == "submitted", result.reason
    assert broker.orders["tp-new-exit"].leg.quantity == 30


def test_executions_the_sync_records_at_the_same_moment_do_not_stop_the_exit(memory_sessions):
    """The stop filled at a gap and no sync has recorded the fills yet. The exit brings the symbol's
    orders up to date with the broker (`own_fills`) while the sync, in its own process, records the
    same executions: the exit's write of an execution the sync wrote first failed on the execution
    id (IntegrityError), so the orders step failed for that symbol instead of saying why nothing is
    sent (and the sync's own recording fails the same way when the orders step is first)."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("a"))
    broker.fill("tp-a", 50, 100.0, WEDNESDAY_OPEN, commission=1.0)
    broker.lag_positions()
    broker.fill("tp-a-sl", 50, 90.0, WEDNESDAY_OPEN + timedelta(days=1), commission=1.0)
    executions = broker.executions

    def the_sync_records_them_meanwhile(coid):
        found = executions(coid)
        if coid == "tp-a-sl":
            broker.executions = executions
            try:
                record_executions(memory_sessions, broker)  # the sync's pass, committed first
            finally:
                broker.executions = the_sync_records_them_meanwhile
        return found

    broker.executions = the_sync_records_them_meanwhile
    result = exit_now(memory_sessions, broker, closing("a-exit"))
    assert result.status == "not_sent", result.reason
    assert "the pipeline's own orders imply 0: tp-a-sl (stop-loss) SELL 50 filled" in result.reason
    with memory_sessions() as session:
        assert sorted(e.execution_id for e in session.scalars(select(ExecutionRow))) == ["x1", "x2"]
