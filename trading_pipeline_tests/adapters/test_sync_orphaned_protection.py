"""The portfolio sync and protective orders whose position is gone (closed or flipped by hand) or
whose order the broker reports Inactive: cancelled after ORPHAN_GRACE, kept while the account
contradicts the positions answer or the position is held. Helpers: sync_world.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from trading_pipeline.adapters.portfolio_sync import (
    ORPHAN_GRACE,
    positions_contradicted,
    sync_portfolio,
)
from trading_pipeline.core.analysis import OrderLeg
from trading_pipeline.core.risk import AccountState, Position
from trading_pipeline.errors import OrderRejectedError
from trading_pipeline_tests.adapters.sync_world import (
    WEDNESDAY_OPEN,
    BookBroker,
    decision,
    earlier,
    events,
    rows,
    sell_by_hand,
    send,
)

# --- 4b. protective orders whose position is gone ---------------------------------------------------


def test_a_stop_and_target_whose_position_was_closed_by_hand_are_cancelled(memory_sessions):
    """Filled, either would open a position on the other side. One sync finding no position is not
    enough (the broker's list may lag); an earlier one, at least ORPHAN_GRACE before, must have too."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("orphan"))
    broker.fill("tp-orphan", 50, 100.0, WEDNESDAY_OPEN)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []  # held and protected
    sell_by_hand(broker, 50)

    first = sync_portfolio(memory_sessions, broker, {})
    assert broker.cancelled == []
    assert ("AAPL: the working stop-loss tp-orphan-sl (SELL 50) has no position at the broker: a sync 2 minutes "
            "or more after the first one finding none cancels it if it finds none either (a position just opened "
            "may not be listed yet); cancel it at the broker now if the position was closed by hand") in first.drift
    assert any(line.startswith("AAPL: the working take-profit tp-orphan-tp (SELL 50) has no position")
               for line in first.drift)
    assert sync_portfolio(memory_sessions, broker, {}).drift == first.drift  # seconds later: still only reported

    earlier(memory_sessions, ORPHAN_GRACE)
    report = sync_portfolio(memory_sessions, broker, {})
    assert broker.cancelled == ["tp-orphan-sl", "tp-orphan-tp"]
    assert {c: o.status for c, o in broker.orders.items() if c.startswith("tp-orphan-")} == {
        "tp-orphan-sl": "Cancelled", "tp-orphan-tp": "Cancelled"}
    assert {row.status for row in rows(memory_sessions, "tp-orphan-sl", "tp-orphan-tp").values()} == {"Cancelled"}
    change = next(line for line in report.status_changes if line.startswith("tp-orphan-sl:"))
    assert change.startswith("tp-orphan-sl: Submitted → Cancelled (cancelled by the sync: no AAPL position at "
                             "the broker in the syncs since ")
    assert change.endswith("filled, this stop-loss would have opened a position on the other side)")
    assert events(memory_sessions, "tp-orphan-sl")[-1].startswith("sync: cancelled by the sync: no AAPL position")
    assert report.drift == []  # the sale by hand is in the books: they agree with the broker again
    (trade,) = report.trades
    assert (trade["status"], trade["exit"], trade["exit_reason"]) == ("closed", 101.0, "manual")
    (outcome,) = report.orders  # shown on the `orders` asset
    assert {leg["role"]: leg["status"] for leg in outcome["legs"]} == {
        "entry": "Filled", "stop_loss": "Cancelled", "take_profit": "Cancelled"}
    assert sync_portfolio(memory_sessions, broker, {}).status_changes == []  # done once


def test_stops_are_kept_when_the_positions_answer_is_empty_but_the_account_values_positions(memory_sessions):
    """A gateway answering no positions at all for longer than the grace (a session just logged in
    again, say), while its summary still values them: cancelling would leave held positions with no stop."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("blank"))
    broker.fill("tp-blank", 50, 100.0, WEDNESDAY_OPEN)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []
    broker.positions_answer_empty = True
    for _ in range(3):
        report = sync_portfolio(memory_sessions, broker, {})
        earlier(memory_sessions, ORPHAN_GRACE * 2)
    assert broker.cancelled == []
    assert {broker.orders[c].status for c in ("tp-blank-sl", "tp-blank-tp")} == {"Submitted"}
    kept = next(line for line in report.drift if line.startswith("AAPL: the working stop-loss tp-blank-sl"))
    assert ("has no position in the broker's answer, but the broker lists no position at all, yet its equity "
            "100,000.00 and cash 95,000.00 differ by 5,000.00: its summary still values positions: it is kept") in kept

    broker.positions_answer_empty = False  # the answer is back: nothing to report, nothing was touched
    assert sync_portfolio(memory_sessions, broker, {}).drift == []


@pytest.mark.parametrize(("equity", "cash", "listed", "contradicted"), [
    (100_000.0, 100_000.0, False, False),  # flat: equity is the cash
    (100_000.0, 99_950.0, False, False),  # accrued interest or dividends: under 0.1 %
    (100_000.0, 95_000.0, False, True),  # the summary values 5,000 of positions the list lacks
    (100_000.0, 104_000.0, False, True),  # a short's proceeds in cash: the gap is negative
    (100_000.0, 95_000.0, True, False),  # a list with positions in it is an answer
    (0.5, 0.0, False, False),  # cents: the dollar floor
])
def test_positions_contradicted_by_the_account(equity, cash, listed, contradicted):
    positions = {"MSFT": Position(10, 400.0, 500.0)} if listed else {}
    account = AccountState(equity=equity, cash=cash, positions=positions)
    assert (positions_contradicted(account) is not None) is contradicted


def test_an_order_the_broker_reports_inactive_is_cancelled_so_that_it_stays_done(memory_sessions):
    """IBKR's Inactive is a rejection or an order held: the pipeline counts it as done, so the sync
    cancels it, or a held entry that became active again would fill beside the next decision's."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("held"))
    broker.orders["tp-held"].status = "Inactive"
    report = sync_portfolio(memory_sessions, broker, {})
    assert broker.cancelled == ["tp-held"] and broker.orders["tp-held"].status == "Cancelled"
    assert rows(memory_sessions, "tp-held")["tp-held"].status == "Cancelled"
    change = next(line for line in report.status_changes if line.startswith("tp-held:"))
    assert change == ("tp-held: Submitted → Cancelled (filled 0/50): Inactive at the broker (rejected or held); "
                      "cancelled so that it cannot become active again")
    assert sync_portfolio(memory_sessions, broker, {}).status_changes == []  # done: not asked again
    assert broker.cancelled == ["tp-held"]


def test_an_inactive_order_the_broker_will_not_cancel_is_final_and_says_so(memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("refused"))
    broker.orders["tp-refused"].status = "Inactive"

    def refuse(client_order_id):
        raise OrderRejectedError("the order cannot be cancelled", "check it in Client Portal")

    broker.cancel = refuse
    report = sync_portfolio(memory_sessions, broker, {})
    assert rows(memory_sessions, "tp-refused")["tp-refused"].status == "Inactive"
    change = next(line for line in report.status_changes if line.startswith("tp-refused:"))
    assert change.endswith("Inactive at the broker (rejected or held); cancelling it failed (the order cannot be "
                           "cancelled): check the order at the broker and cancel it there if it is held")


def test_an_inactive_entry_that_filled_in_part_is_never_cancelled_with_its_stop(memory_sessions):
    """Cancelling a bracket's entry cancels its children at IBKR, and those protect the part filled:
    an Inactive entry with a fill is cut to that fill; when the broker refuses, it is left as it is
    (never cancelled) and the line says what to do at the broker."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("held-part"))
    broker.fill("tp-held-part", 20, 100.0, WEDNESDAY_OPEN)
    broker.orders["tp-held-part"].status = "Inactive"
    broker.refuse_modify = "the order cannot be modified"
    report = sync_portfolio(memory_sessions, broker, {})
    assert broker.cancelled == [] and broker.orders["tp-held-part-sl"].status == "Submitted"
    assert rows(memory_sessions, "tp-held-part")["tp-held-part"].status == "Inactive"
    change = next(line for line in report.status_changes if line.startswith("tp-held-part:"))
    assert change.endswith("Inactive at the broker (rejected or held) after filling 20; cutting it to what it filled "
                           "failed (the order cannot be modified); NOT cancelled: that would cancel the stop-loss "
                           "protecting the 20 filled (a bracket is cancelled with its entry); reduce its quantity "
                           "to 20 at the broker so that its rest cannot become active again")
    assert report.unprotected == []


def test_a_stop_and_target_left_on_the_wrong_side_of_a_position_flipped_by_hand_are_cancelled(memory_sessions):
    """Long 50, then 100 sold in TWS: short 50. The long's stop (a SELL stop) and take-profit (a SELL
    limit) would now add to the short. Cancelled once a sync ORPHAN_GRACE later still finds it short."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("flip"))
    broker.fill("tp-flip", 50, 100.0, WEDNESDAY_OPEN)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []
    sell_by_hand(broker, 100)

    first = sync_portfolio(memory_sessions, broker, {})
    assert broker.cancelled == []
    assert ("AAPL: the working stop-loss tp-flip-sl (SELL 50) would add to the position of -50 shares instead of "
            "closing it (flipped by hand?): a sync 2 minutes or more after the first one finding it so cancels it if "
            "the position is still on that side; cancel it at the broker now and protect the position with a stop "
            "on the other side") in first.drift
    assert any(line.startswith("AAPL: the working take-profit tp-flip-tp (SELL 50) would add to the position")
               for line in first.drift)

    earlier(memory_sessions, ORPHAN_GRACE)
    report = sync_portfolio(memory_sessions, broker, {})
    assert broker.cancelled == ["tp-flip-sl", "tp-flip-tp"]
    assert {row.status for row in rows(memory_sessions, "tp-flip-sl", "tp-flip-tp").values()} == {"Cancelled"}
    change = next(line for line in report.status_changes if line.startswith("tp-flip-sl:"))
    assert change.startswith("tp-flip-sl: Submitted → Cancelled (cancelled by the sync: the AAPL position has been "
                             "-50 shares in the syncs since ")
    assert change.endswith("filled, this stop-loss would have added to it)")


def test_a_stop_whose_position_flipped_back_before_the_grace_is_kept(memory_sessions):
    """Short for one sync only (a wrong answer, or bought back at once): the stop protects the long again."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("back"))
    broker.fill("tp-back", 50, 100.0, WEDNESDAY_OPEN)
    sync_portfolio(memory_sessions, broker, {})
    sell_by_hand(broker, 100)
    sync_portfolio(memory_sessions, broker, {})
    earlier(memory_sessions, ORPHAN_GRACE)
    buy_back = OrderLeg(client_order_id="bought-back", role="entry", side="BUY", order_type="MKT", quantity=100,
                        price=None, tif="DAY")
    broker.place("AAPL", [buy_back], 100.0)
    broker.fill("bought-back", 100, 100.0, WEDNESDAY_OPEN + timedelta(days=1))
    report = sync_portfolio(memory_sessions, broker, {})
    earlier(memory_sessions, ORPHAN_GRACE)
    sync_portfolio(memory_sessions, broker, {})
    assert broker.cancelled == [] and broker.orders["tp-back-sl"].status == "Submitted"
    assert not any("would add to" in line for line in report.drift)


def test_a_stop_whose_position_is_held_is_kept(memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("kept"))
    broker.fill("tp-kept", 50, 100.0, WEDNESDAY_OPEN)
    for _ in range(2):
        report = sync_portfolio(memory_sessions, broker, {})
        earlier(memory_sessions, ORPHAN_GRACE * 2)
    assert broker.cancelled == [] and report.drift == []
    assert broker.orders["tp-kept-sl"].status == "Submitted"


def test_a_stop_whose_entry_just_filled_is_kept_while_the_position_is_not_listed_yet(memory_sessions):
    """The entry fills; the broker's positions do not show it yet. Earlier syncs found no position
    too, but before the fill: they say nothing about this position."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("lag"))
    sync_portfolio(memory_sessions, broker, {})  # the entry works, nothing held
    earlier(memory_sessions, ORPHAN_GRACE * 5)
    broker.unlisted.add("AAPL")
    broker.fill("tp-lag", 50, 100.0, WEDNESDAY_OPEN)

    for _ in range(2):  # the fill is learnt by the first; a second sync moments later
        report = sync_portfolio(memory_sessions, broker, {})
        assert broker.cancelled == [] and broker.orders["tp-lag-sl"].status == "Submitted"
    assert any(line.startswith("AAPL: the working stop-loss tp-lag-sl (SELL 50) has no position at the broker")
               for line in report.drift)

    broker.unlisted.clear()  # listed at last: the syncs that missed it say nothing any more
    assert sync_portfolio(memory_sessions, broker, {}).drift == []
    earlier(memory_sessions, ORPHAN_GRACE * 5)
    broker.unlisted.add("AAPL")  # missing from one answer again
    sync_portfolio(memory_sessions, broker, {})
    assert broker.cancelled == []
