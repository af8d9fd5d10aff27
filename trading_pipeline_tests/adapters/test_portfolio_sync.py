"""The portfolio sync (issue 12): books by position, what each order became, stops resized to their
position, marks, positions keyed by the strategy's symbol, and commissions. Against the paper
broker, and against `BookBroker` (sync_world.py). Crash leftovers and orders the broker does not
list: test_sync_unlisted_orders.py; protective orders whose position is gone:
test_sync_orphaned_protection.py; trades by hand and positions that lag fills:
test_sync_manual_trades_and_lag.py."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from trading_pipeline.adapters.broker import (
    PaperBroker,
)
from trading_pipeline.adapters.market_data import marks_from_daily_bars
from trading_pipeline.adapters.portfolio_sync import (
    sync_portfolio,
)
from trading_pipeline.adapters.trading_db import (
    ExecutionRow,
    OrderEventRow,
    OrderRow,
    PositionSnapshotRow,
)
from trading_pipeline.core.analysis import Action, OrderLeg
from trading_pipeline.core.risk import Mark
from trading_pipeline_tests.adapters.sync_world import (
    THURSDAY_AFTER_CLOSE,
    WEDNESDAY_OPEN,
    BookBroker,
    closing,
    daily_bars,
    decision,
    events,
    exit_now,
    rows,
    send,
)

# --- 1. books by position ---------------------------------------------------------------------------

def test_a_position_closed_by_a_later_decision_is_one_closed_trade(sessions):
    """Paper: Tuesday's BUY fills Wednesday at 97; Thursday's decision closes it, filled Friday at 98.
    Before: the closing order was a second 'open' trade and the first never realized anything."""
    broker = PaperBroker(sessions, 100_000.0)
    send(sessions, broker, decision("open"))
    broker.simulate_fills(daily_bars({"2026-09-02": (97.0, 99.0, 96.5, 98.5)}))
    sync_portfolio(sessions, broker, {"AAPL": Mark(98.5)})
    broker.cancel("tp-open-sl")  # (whatever the orders step does with the bracket's exits)
    broker.cancel("tp-open-tp")
    closing = decision("close", as_of=THURSDAY_AFTER_CLOSE, action=Action.SELL, entry=98.0, stop=101.0,
                       target=95.0)
    send(sessions, broker, closing, [OrderLeg(client_order_id="tp-close", role="exit", side="SELL",
                                              order_type="LMT", quantity=50, price=98.0, tif="DAY")])
    broker.simulate_fills(daily_bars({"2026-09-02": (97.0, 99.0, 96.5, 98.5), "2026-09-03": (98.0, 98.6, 97.5, 98.2),
                                      "2026-09-04": (98.5, 99.0, 97.8, 98.8)}))
    report = sync_portfolio(sessions, broker, {"AAPL": Mark(98.8, 98.2)}, as_of=datetime(2026, 9, 4, 21, tzinfo=UTC))
    (trade,) = report.trades
    assert {k: trade[k] for k in ("decision_id", "side", "quantity", "entry", "exit", "status", "exit_reason",
                                  "holding_time")} == {
        "decision_id": "open", "side": "BUY", "quantity": 50, "entry": 97.0, "exit": 98.5, "status": "closed",
        "exit_reason": "exit", "holding_time": "2d 0h"}
    net = 50 * (98.5 - 97.0) - trade["commission"]  # whatever the broker charged (none on a free paper broker)
    assert trade["realized_pnl"] == round(net, 2)
    assert trade["r_multiple"] == round(net / (50 * 1.0), 2)  # 1R: the 97 fill to the 96 stop
    assert report.account.positions == {} and report.drift == []


def test_a_stopped_out_bracket_reports_stop_loss_and_minus_one_r(memory_sessions):
    broker = PaperBroker(memory_sessions, 100_000.0)
    send(memory_sessions, broker, decision("stopped"))
    broker.simulate_fills(daily_bars({"2026-09-02": (100.5, 101.0, 99.0, 100.5),
                                      "2026-09-03": (99.0, 99.5, 95.0, 95.5)}))
    (trade,) = sync_portfolio(memory_sessions, broker, {"AAPL": Mark(95.5, 100.5)}).trades
    net = -200.0 - trade["commission"]
    assert (trade["exit"], trade["status"], trade["realized_pnl"], trade["r_multiple"], trade["exit_reason"]) == (
        96.0, "closed", round(net, 2), round(net / 200.0, 2), "stop_loss")
    assert trade["opened_at"] == "2026-09-02T13:30:00+00:00" and trade["holding_time"] == "1d 0h"


def test_partial_take_profit_then_stop_is_one_trade_with_both_exits(memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("tpsl"))
    broker.fill("tp-tpsl", 50, 100.0, WEDNESDAY_OPEN)
    broker.fill("tp-tpsl-tp", 20, 106.0, WEDNESDAY_OPEN + timedelta(days=1))
    sync_portfolio(memory_sessions, broker, {})  # resizes the stop to the 30 left
    broker.fill("tp-tpsl-sl", 30, 97.0, WEDNESDAY_OPEN + timedelta(days=2))
    report = sync_portfolio(memory_sessions, broker, {})
    (trade,) = report.trades
    assert (trade["quantity"], trade["exit"], trade["status"], trade["realized_pnl"], trade["exit_reason"]) == (
        50, 100.6, "closed", 30.0, "take_profit, stop_loss")
    assert trade["r_multiple"] == 0.15 and report.account.positions == {}


def test_a_stop_turned_into_an_exit_closes_the_trade_as_an_exit(memory_sessions):
    """The lead's exit: a later decision modifies the bracket's stop into a market order (role stays
    stop_loss, an order event says so); its fill is the trade's exit, not a stop-out."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("held"))
    broker.fill("tp-held", 50, 100.0, WEDNESDAY_OPEN)
    sync_portfolio(memory_sessions, broker, {})
    broker.modify("tp-held-sl", order_type="MKT")
    with memory_sessions() as session:  # what the orders step records when it converts the stop
        row = session.get(OrderRow, "tp-held-sl")
        row.order_type = "MKT"
        session.add(OrderEventRow(client_order_id="tp-held-sl", status="Submitted",
                                  detail="converted into a MKT exit of 50 by decision later"))
        session.commit()
    broker.fill("tp-held-sl", 50, 101.0, WEDNESDAY_OPEN + timedelta(days=1))
    report = sync_portfolio(memory_sessions, broker, {})
    (trade,) = report.trades
    assert (trade["status"], trade["exit"], trade["exit_reason"], trade["realized_pnl"]) == (
        "closed", 101.0, "exit", 50.0)
    (outcome,) = report.orders
    assert outcome["filled_child"] == "exit"


# --- 2. what each order became, for the `orders` asset ---------------------------------------------

def test_the_sync_reports_what_each_changed_order_became(sessions):
    broker = PaperBroker(sessions, 100_000.0)
    send(sessions, broker, decision("story"))
    (placed,) = sync_portfolio(sessions, broker, {}).orders  # sent since the last sync: observed once
    assert (placed["status"], placed["filled_quantity"], placed["filled_child"]) == ("Submitted", 0, None)
    assert [line for line in placed["changes"] if line.startswith("tp-story:")] == [
        "tp-story: submitting (about to send)", "tp-story: Submitted (broker accepted)"]
    assert "tp-story-sl: PreSubmitted (broker accepted)" in placed["changes"]
    assert sync_portfolio(sessions, broker, {}).orders == []  # nothing changed: nothing to observe
    broker.simulate_fills(daily_bars({"2026-09-02": (100.5, 101.0, 99.0, 100.5),
                                      "2026-09-03": (101.0, 107.0, 100.8, 106.5)}))
    report = sync_portfolio(sessions, broker, {"AAPL": Mark(106.5, 100.5)})
    (outcome,) = report.orders
    assert {k: outcome[k] for k in ("symbol", "decision_id", "client_order_id", "status", "filled_quantity",
                                    "average_fill_price", "filled_child")} == {
        "symbol": "AAPL", "decision_id": "story", "client_order_id": "tp-story", "status": "Filled",
        "filled_quantity": 50, "average_fill_price": 100.0, "filled_child": "take_profit"}
    legs = {leg["role"]: leg for leg in outcome["legs"]}
    assert outcome["commission"] == round(sum(leg["commission"] for leg in outcome["legs"]), 2)
    assert (legs["take_profit"]["status"], legs["take_profit"]["average_fill_price"]) == ("Filled", 106.0)
    assert legs["stop_loss"]["status"] == "Cancelled"
    assert any(line.startswith("tp-story-tp: PreSubmitted → Filled") for line in outcome["changes"])
    assert any(line.startswith("tp-story-sl: PreSubmitted → Cancelled") for line in outcome["changes"])



# --- 4. stops resized after partial fills -------------------------------------------------------------

def test_a_partial_take_profit_resizes_the_stop_to_the_position(memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("ptp"))
    broker.fill("tp-ptp", 50, 100.0, WEDNESDAY_OPEN)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []
    broker.fill("tp-ptp-tp", 20, 106.0, WEDNESDAY_OPEN + timedelta(days=1))
    report = sync_portfolio(memory_sessions, broker, {})
    assert broker.modified == [("tp-ptp-sl", {"quantity": 30})]  # the take-profit has 30 left already
    assert rows(memory_sessions, "tp-ptp-sl")["tp-ptp-sl"].quantity == 30
    line = "resized from 50 to 30 shares to match the position (the position was reduced)"
    assert f"tp-ptp-sl: {line}" in report.status_changes
    assert events(memory_sessions, "tp-ptp-sl")[-1] == f"sync: {line}"
    assert report.drift == []
    assert "tp-ptp-sl" in {leg["client_order_id"] for o in report.orders for leg in o["legs"]}
    assert sync_portfolio(memory_sessions, broker, {}).status_changes == []  # done once


def test_a_partial_entry_whose_rest_expired_resizes_stop_and_target(memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("pentry"))
    broker.fill("tp-pentry", 20, 100.0, WEDNESDAY_OPEN)
    report = sync_portfolio(memory_sessions, broker, {})
    assert broker.modified == [] and report.drift == []  # the entry still works: children follow it
    broker.cancel("tp-pentry")  # its DAY ended with 20 of 50 filled
    report = sync_portfolio(memory_sessions, broker, {})
    assert broker.modified == [("tp-pentry-sl", {"quantity": 20}), ("tp-pentry-tp", {"quantity": 20})]
    why = "entry tp-pentry Cancelled with 20/50 filled"
    assert f"tp-pentry-tp: resized from 50 to 20 shares to match the position ({why})" in report.status_changes
    assert report.drift == []


def _stop_fills_when_the_positions_are_read(broker, stop: str, quantity: int, at) -> None:
    """The stop is elected while the sync runs: after it read the order states, as it reads the positions."""
    account = broker.account

    def stop_fills_meanwhile(marks, as_of=None):
        if not broker.orders[stop].filled:
            broker.fill(stop, quantity, 96.0, at)
        return account(marks, as_of)

    broker.account = stop_fills_meanwhile


def test_a_resize_counts_what_the_stop_filled_during_the_sync(memory_sessions):
    """A partial take-profit leaves 30 of 50 held; while the sync runs (after it read the order states),
    the stop is elected and sells 10 more. Resized to the 20 held from the books' 0 filled, the stop
    would keep 10 working: 10 shares unprotected once it completes. Its total is its fill (10, the
    broker's word) plus what is held (20)."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("race"))
    broker.fill("tp-race", 50, 100.0, WEDNESDAY_OPEN)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []
    broker.fill("tp-race-tp", 20, 106.0, WEDNESDAY_OPEN + timedelta(days=1))
    _stop_fills_when_the_positions_are_read(broker, "tp-race-sl", 10, WEDNESDAY_OPEN + timedelta(days=2))
    report = sync_portfolio(memory_sessions, broker, {})
    stop = broker.orders["tp-race-sl"]
    assert stop.leg.quantity - stop.filled == 20, broker.modified  # what is held: 50 - 20 - 10
    assert report.drift == ["AAPL: broker holds 20, the pipeline's executions imply 30"]  # its fill, seen late
    assert rows(memory_sessions, "tp-race-sl")["tp-race-sl"].quantity == 30
    assert sync_portfolio(memory_sessions, broker, {}).drift == []


def test_a_stop_that_filled_the_difference_during_the_sync_is_not_modified(memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("same"))
    broker.fill("tp-same", 50, 100.0, WEDNESDAY_OPEN)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []
    _stop_fills_when_the_positions_are_read(broker, "tp-same-sl", 10, WEDNESDAY_OPEN + timedelta(days=1))
    sync_portfolio(memory_sessions, broker, {})
    # 40 held, 40 left of the stop: nothing to change (the take-profit is cut to the 40, as IBKR's OCA does)
    assert broker.modified == [("tp-same-tp", {"quantity": 40})]


def test_a_resize_never_grows_the_stop_when_it_fills_after_the_positions_were_read(memory_sessions):
    """A take-profit sold 10 of 50: the stop (50) is to be cut to the 40 held. Its fill count, asked
    right before the cut, says it sold 15 since the positions were read: those 15 are also in the 40
    read as held. 15 + 40 = 55 would grow the stop past what was ever held; it is not grown."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("late"))
    broker.fill("tp-late", 50, 100.0, WEDNESDAY_OPEN)
    assert sync_portfolio(memory_sessions, broker, {}).drift == []
    broker.fill("tp-late-tp", 10, 106.0, WEDNESDAY_OPEN + timedelta(days=1))
    find_order, account, positions_read = broker.find_order, broker.account, []

    def reading_positions(marks, as_of=None):
        positions_read.append(True)
        return account(marks, as_of)

    def stop_fills_after_the_positions_were_read(client_order_id):
        if client_order_id == "tp-late-sl" and positions_read and not broker.orders["tp-late-sl"].filled:
            broker.fill("tp-late-sl", 15, 96.0, WEDNESDAY_OPEN + timedelta(days=2))
        return find_order(client_order_id)

    broker.account, broker.find_order = reading_positions, stop_fills_after_the_positions_were_read
    sync_portfolio(memory_sessions, broker, {})
    assert all(change.get("quantity", 0) <= 50 for key, change in broker.modified), broker.modified
    assert [key for key, _ in broker.modified if key == "tp-late-sl"] == [], broker.modified  # left to the next sync


def test_a_refused_resize_is_drift_that_says_what_to_do(memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("refused"))
    broker.fill("tp-refused", 50, 100.0, WEDNESDAY_OPEN)
    broker.fill("tp-refused-tp", 20, 106.0, WEDNESDAY_OPEN + timedelta(days=1))
    broker.refuse_modify = "the order cannot be modified while it is being routed"
    report = sync_portfolio(memory_sessions, broker, {})
    assert rows(memory_sessions, "tp-refused-sl")["tp-refused-sl"].quantity == 50  # unchanged, still protecting
    assert report.drift == [(
        "AAPL: the position is 30 shares but the stop-loss tp-refused-sl is for 50, and the broker refused to "
        "resize it to 30 (the order cannot be modified while it is being routed): adjust its quantity at the "
        "broker by hand (or close the position); answer the broker's question in Client Portal")]


def test_a_pipeline_position_without_a_working_stop_is_flagged_loudly(memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("naked"))
    broker.fill("tp-naked", 50, 100.0, WEDNESDAY_OPEN)
    broker.cancel("tp-naked-sl")  # cancelled by hand at the broker
    report = sync_portfolio(memory_sessions, broker, {})
    problem = ("AAPL: the pipeline's position of 50 shares has NO working stop-loss: place a protective stop at "
               "the broker now (or close the position); the pipeline keeps a stop on every position it opened "
               "until it is flat")
    assert report.unprotected == [problem] and problem in report.drift



# --- 5. marks -------------------------------------------------------------------------------------------

def test_marks_are_the_latest_closed_close_and_the_close_before():
    bars = daily_bars({"2026-09-01": (99.0, 101.0, 98.0, 100.0), "2026-09-02": (100.0, 102.0, 99.0, 101.0),
                       "2026-09-03": (101.0, 103.0, 100.0, 102.5)})  # Thursday's bar is in progress at noon
    thursday_noon = datetime(2026, 9, 3, 16, 0, tzinfo=UTC)
    assert marks_from_daily_bars(bars, thursday_noon) == {"AAPL": Mark(101.0, 100.0)}
    assert marks_from_daily_bars(bars, THURSDAY_AFTER_CLOSE) == {"AAPL": Mark(102.5, 101.0)}
    first = daily_bars({"2026-09-01": (99.0, 101.0, 98.0, 100.0)})
    assert marks_from_daily_bars(first, THURSDAY_AFTER_CLOSE) == {"AAPL": Mark(100.0, None)}
    assert marks_from_daily_bars(first, datetime(2026, 9, 1, 15, tzinfo=UTC)) == {}  # nothing closed yet


def test_the_account_is_asked_with_the_marks_and_the_point_in_time(memory_sessions):
    broker = BookBroker()
    send(memory_sessions, broker, decision("marked"))
    broker.fill("tp-marked", 50, 100.0, WEDNESDAY_OPEN)
    marks = {"AAPL": Mark(95.0, 99.0)}
    report = sync_portfolio(memory_sessions, broker, marks, as_of=THURSDAY_AFTER_CLOSE)
    assert broker.account_calls == [(marks, THURSDAY_AFTER_CLOSE)]
    (position,) = report.positions
    assert (position["market_price"], position["unrealized_pnl"], position["stop"]) == (95.0, -250.0, 96.0)
    assert report.account.equity == 100_000.0 - 250.0


def test_positions_stay_keyed_by_the_strategy_symbol(memory_sessions):
    """The broker keys positions by the strategy's symbol (IBKR maps BRK B's conid back to BRK.B):
    executions, drift, protection and snapshots all use that key, nothing re-keys by ticker."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("brk", symbol="BRK.B", entry=480.0, stop=470.0, target=500.0, quantity=10))
    broker.fill("tp-brk", 10, 480.0, WEDNESDAY_OPEN)
    broker.fill("tp-brk-tp", 4, 500.0, WEDNESDAY_OPEN + timedelta(days=1))
    report = sync_portfolio(memory_sessions, broker, {"BRK.B": Mark(490.0, 485.0)})
    assert report.drift == []  # the broker's 6 BRK.B are the executions' 6 BRK.B
    assert broker.modified == [("tp-brk-sl", {"quantity": 6})]
    assert [p["symbol"] for p in report.positions] == ["BRK.B"] and report.positions[0]["market_price"] == 490.0
    assert [(t["symbol"], t["status"]) for t in report.trades] == [("BRK.B", "partly closed")]
    with memory_sessions() as session:
        assert set(session.scalars(select(PositionSnapshotRow.symbol))) == {"BRK.B"}
        assert set(session.scalars(select(ExecutionRow.symbol))) == {"BRK.B"}


# --- commissions of executions ------------------------------------------------------------------------

class FillsAtOnceBroker(BookBroker):
    """Fills a market exit as it is placed, charging `commission` (IBKR fills a market order at once)."""

    commission = 1.25

    def place(self, symbol, legs, reference_price, placed_at=None):
        answers = super().place(symbol, legs, reference_price, placed_at)
        if legs[0].order_type == "MKT":
            self.fill(legs[0].client_order_id, legs[0].quantity, 99.0, THURSDAY_AFTER_CLOSE, self.commission)
            return [self._answer(leg.client_order_id) for leg in legs]
        return answers


def executions_of(sessions, coid) -> list[ExecutionRow]:
    with sessions() as session:
        return session.scalars(select(ExecutionRow).where(ExecutionRow.client_order_id == coid)).all()


def test_an_exit_filled_as_it_is_placed_is_booked_with_its_commission(memory_sessions):
    """The desk records the executions of what filled at placement (a market exit, a marketable
    entry); the sync, finding them recorded, never wrote their commission: the books showed the
    trade without the $1.25 the broker charged."""
    broker = FillsAtOnceBroker()
    send(memory_sessions, broker, decision("a"))
    broker.fill("tp-a", 50, 100.0, WEDNESDAY_OPEN, commission=1.0)
    broker.cancel("tp-a-sl")
    broker.cancel("tp-a-tp")
    sync_portfolio(memory_sessions, broker, {})

    result = exit_now(memory_sessions, broker, closing("a-exit"))
    assert result.status == "filled", result.reason
    (execution,) = executions_of(memory_sessions, "tp-a-exit")
    assert (execution.quantity, execution.price, execution.commission) == (50, 99.0, 1.25)
    (trade,) = sync_portfolio(memory_sessions, broker, {}).trades
    assert trade["commission"] == 2.25
    assert trade["realized_pnl"] == round(50 * (99.0 - 100.0) - 2.25, 2)


def test_a_commission_the_broker_charges_after_the_fill_reaches_the_books(memory_sessions):
    """IBKR lists an execution before it charges it (commission 0 until then). The sync recorded
    the execution at 0 and never read it again: every such fill was booked free."""
    broker = BookBroker()
    send(memory_sessions, broker, decision("a"))
    broker.fill("tp-a", 50, 100.0, WEDNESDAY_OPEN, commission=0.0)
    sync_portfolio(memory_sessions, broker, {})
    assert [e.commission for e in executions_of(memory_sessions, "tp-a")] == [0.0]

    broker.fills[0] = dataclasses.replace(broker.fills[0], commission=1.02)  # IBKR has now charged it
    report = sync_portfolio(memory_sessions, broker, {"AAPL": Mark(101.0)})
    assert [e.commission for e in executions_of(memory_sessions, "tp-a")] == [1.02]
    (trade,) = report.trades
    assert trade["commission"] == 1.02
