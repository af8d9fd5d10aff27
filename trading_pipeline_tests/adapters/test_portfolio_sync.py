"""The portfolio sync (issue 12): books by position, what each order became, crash leftovers
reconciled by cOID, stops resized to their position, marks, and positions keyed by the strategy's
symbol. Against the paper broker, and against `BookBroker` where the broker side needs what the
paper broker of this branch lacks (`modify`, commissions, partial fills): a small broker that
keeps its orders and fills in memory and implements the Broker protocol of issue 12."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from sqlalchemy import select

from trading_pipeline.adapters.broker import (
    BrokerExecution,
    BrokerOrder,
    OrderListCompleteness,
    PaperBroker,
    as_utc,
)
from trading_pipeline.adapters.market_data import marks_from_daily_bars
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.portfolio_sync import (
    NEVER_REACHED,
    ORPHAN_GRACE,
    SUBMITTING_GRACE,
    positions_contradicted,
    record_executions,
    sync_portfolio,
    with_working_orders,
)
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import (
    AccountSnapshotRow,
    ExecutionRow,
    OrderEventRow,
    OrderRow,
    PositionSnapshotRow,
    session_factory,
)
from trading_pipeline.core import market_calendar
from trading_pipeline.core.analysis import Action, OrderLeg, TradeDecision
from trading_pipeline.core.orders import build_legs, client_order_id
from trading_pipeline.core.risk import AccountState, Mark, Position, entry_limits
from trading_pipeline.core.strategies import RiskSettings
from trading_pipeline.errors import OrderRejectedError

TUESDAY_AFTER_CLOSE = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
THURSDAY_AFTER_CLOSE = datetime(2026, 9, 3, 21, 30, tzinfo=UTC)
WEDNESDAY_OPEN = datetime(2026, 9, 2, 13, 30, tzinfo=UTC)


def decision(decision_id, as_of=TUESDAY_AFTER_CLOSE, action=Action.BUY, entry=100.0, stop=96.0, target=106.0,
             symbol="AAPL", quantity=50):
    return TradeDecision(decision_id=decision_id, strategy="s", symbol=symbol, as_of=as_of, data_through=as_of,
                         proposed_action=action, action=action, entry=entry, stop=stop, targets=[target],
                         r_multiple=1.5, profit_margin=0.06, confidence=0.7, quantity=quantity, rationale="test",
                         account_equity=100_000.0)


def daily_bars(rows: dict[str, tuple[float, float, float, float]], symbol="AAPL") -> dict[str, pd.DataFrame]:
    cal = market_calendar.calendar()
    index = pd.DatetimeIndex([cal.session_open(pd.Timestamp(day)) for day in rows], name="time")
    frame = pd.DataFrame(list(rows.values()), index=index, columns=["open", "high", "low", "close"])
    frame["volume"] = 1_000_000.0
    return {symbol: frame}


def send(sessions, broker, the_decision, legs=None, *, crash: str | None = None):
    """Do what the orders step does, the sync's input: the legs written 'submitting', placed at the
    broker at the decision's time (the paper broker fills them from the bars after it), the
    broker's answer recorded. `crash` stops it 'before_send' or 'after_ack' (a killed process)."""
    record_decision(sessions, the_decision)
    legs = legs or build_legs(the_decision, "DAY")
    desk = OrderDesk(sessions, broker)
    desk._record(the_decision, legs, {}, "submitting", "about to send")
    if crash == "before_send":
        return
    answers = broker.place(the_decision.symbol, legs, the_decision.entry, placed_at=the_decision.as_of)
    if crash != "after_ack":
        desk._record(the_decision, legs, {a.client_order_id: a for a in answers}, "unknown", "broker accepted")


def rows(sessions, *coids) -> dict[str, OrderRow]:
    with sessions() as session:
        return {coid: session.get(OrderRow, coid) for coid in coids}


def events(sessions, coid) -> list[str]:
    with sessions() as session:
        return session.scalars(select(OrderEventRow.detail).where(OrderEventRow.client_order_id == coid)
                               .order_by(OrderEventRow.id)).all()


# --- a broker with modify, commissions and partial fills, in memory -----------------------------------

@dataclass
class HeldOrder:
    symbol: str
    leg: OrderLeg
    broker_order_id: str
    parent: str | None
    status: str
    filled: float = 0.0
    average: float | None = None


class BookBroker:
    """Orders and fills in memory. Children work once their parent has a fill (IBKR sizes them to the
    parent); a child filled completely cancels its siblings (one-cancels-other). `fill` is what the
    market does; `refuse_modify` makes the next modify fail as a broker refusal does; positions of
    `unlisted` symbols are left out of the account, and after `lag_positions()` the positions stay
    as they were then whatever fills come, as IBKR's positions lag its fills."""

    name = "book"

    def __init__(self, starting_cash: float = 100_000.0):
        self.cash = starting_cash
        self.orders: dict[str, HeldOrder] = {}
        self.fills: list[BrokerExecution] = []
        self.forgotten: set[str] = set()  # orders the broker no longer lists (an IBKR day rollover)
        self.refuse_modify: str | None = None
        self.modified: list[tuple[str, dict]] = []
        self.account_calls: list[tuple[dict, datetime | None]] = []
        self.unlisted: set[str] = set()
        self.positions_answer_empty = False  # the positions list empty, the summary still valuing them
        self.cancelled: list[str] = []  # cancel requests, in order
        self.positions_through: int | None = None  # the positions answer shows the first n fills only
        self.list_incomplete = ""  # why its orders list may miss working orders now ("": it is complete)

    def lag_positions(self) -> None:
        """From now on the positions answer stays as it is now, whatever fills come."""
        self.positions_through = len(self.fills)

    def _answer(self, coid: str) -> BrokerOrder:
        order = self.orders[coid]
        return BrokerOrder(coid, order.broker_order_id, order.status, order.filled, order.average)

    def place(self, symbol, legs, reference_price, placed_at=None):
        parent = None
        for leg in legs:
            if leg.client_order_id in self.orders:
                from trading_pipeline.adapters.broker import DuplicateOrderError

                raise DuplicateOrderError(leg.client_order_id)
            self.orders[leg.client_order_id] = HeldOrder(symbol, leg, str(1000 + len(self.orders)), parent,
                                                         "PreSubmitted" if parent else "Submitted")
            parent = parent or leg.client_order_id
        return [self._answer(leg.client_order_id) for leg in legs]

    def find_order(self, client_order_id):
        if client_order_id not in self.orders or client_order_id in self.forgotten:
            return None
        return self._answer(client_order_id)

    def order_list_completeness(self):
        return OrderListCompleteness(not self.list_incomplete, self.list_incomplete)

    def executions(self, client_order_id):
        return [f for f in self.fills if f.client_order_id == client_order_id]

    def outside_executions(self, symbols, own_client_order_ids):
        """The fills of orders the pipeline did not send (`sell_by_hand`, 'bought-by-hand'), as a
        broker reports them: with no client order id of the pipeline's."""
        return [dataclasses.replace(f, client_order_id="") for f in self.fills
                if f.symbol in symbols and f.client_order_id not in own_client_order_ids]

    def open_orders(self):
        return [self._answer(c) for c, o in self.orders.items()
                if o.status not in ("Filled", "Cancelled") and c not in self.forgotten]

    def cancel(self, client_order_id):
        if client_order_id not in self.orders:
            return None
        self.cancelled.append(client_order_id)
        if self.orders[client_order_id].status not in ("Filled", "Cancelled"):
            self.orders[client_order_id].status = "Cancelled"
        return self._answer(client_order_id)

    def modify(self, client_order_id, *, order_type=None, price=None, quantity=None):
        if client_order_id not in self.orders:
            return None
        if self.refuse_modify:
            problem, self.refuse_modify = self.refuse_modify, None
            raise OrderRejectedError(problem, "answer the broker's question in Client Portal")
        order = self.orders[client_order_id]
        changes = {k: v for k, v in (("order_type", order_type), ("price", price), ("quantity", quantity)) if v}
        order.leg = order.leg.model_copy(update=changes)
        self.modified.append((client_order_id, changes))
        return self._answer(client_order_id)

    def min_tick(self, symbol):
        return 0.01

    def fill(self, client_order_id, quantity, price, at, commission=0.0):
        order = self.orders[client_order_id]
        self.fills.append(BrokerExecution(f"x{len(self.fills) + 1}", client_order_id, order.symbol, order.leg.side,
                                    quantity, price, at, commission))
        order.average = ((order.average or 0.0) * order.filled + price * quantity) / (order.filled + quantity)
        order.filled += quantity
        order.status = "Filled" if order.filled >= order.leg.quantity else "Submitted"
        signed = quantity if order.leg.side == "BUY" else -quantity
        self.cash -= signed * price + commission
        for coid, other in self.orders.items():
            if other.parent == client_order_id and other.status == "PreSubmitted":
                other.status = "Submitted"
            if (order.status == "Filled" and order.parent and other.parent == order.parent and coid != client_order_id
                    and other.status not in ("Filled", "Cancelled")):
                other.status = "Cancelled"

    def account(self, marks: dict[str, Mark], as_of: datetime | None = None) -> AccountState:
        self.account_calls.append((marks, as_of))
        held: dict[str, list[float]] = {}
        for f in self.fills[:self.positions_through]:
            quantity, cost = held.get(f.symbol, [0.0, 0.0])
            signed = f.quantity if f.side == "BUY" else -f.quantity
            held[f.symbol] = [quantity + signed, cost + signed * f.price]
        positions = {}
        for symbol, (quantity, cost) in held.items():
            if quantity and symbol not in self.unlisted:
                price = marks[symbol].price if symbol in marks else cost / quantity
                positions[symbol] = Position(quantity, round(cost / quantity, 4), price)
        equity = self.cash + sum(p.market_value for p in positions.values())
        if self.positions_answer_empty:
            positions = {}
        return AccountState(equity=round(equity, 2), cash=round(self.cash, 2), positions=positions)


@pytest.fixture
def sessions(database_url):
    """SQLite and PostgreSQL: for what stores or reads order times and states."""
    return session_factory(database_url)


@pytest.fixture
def memory_sessions(tmp_path):
    """SQLite only: for the sync's logic against BookBroker (keeps the suite fast)."""
    return session_factory(f"sqlite:///{tmp_path / 'trading.db'}")


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


# --- 3. crash leftovers reconciled by the sync alone -----------------------------------------------

def age(sessions, decision_id, by: timedelta):
    """Move the decision's rows and their events `by` into the past."""
    with sessions() as session:
        for row in session.scalars(select(OrderRow).where(OrderRow.decision_id == decision_id)):
            row.created_at = datetime.now(UTC) - by
            for event in session.scalars(select(OrderEventRow).where(
                    OrderEventRow.client_order_id == row.client_order_id)):
                event.at = datetime.now(UTC) - by
        session.commit()


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


# --- 4b. protective orders whose position is gone ---------------------------------------------------

def earlier(sessions, by: timedelta):
    """Everything recorded so far (orders, their events, the syncs' snapshots) happened `by` earlier."""
    with sessions() as session:
        for row in session.scalars(select(OrderRow)):
            row.created_at = as_utc(row.created_at) - by
        for event in session.scalars(select(OrderEventRow)):
            event.at = as_utc(event.at) - by
        for snapshot in [*session.scalars(select(AccountSnapshotRow)), *session.scalars(select(PositionSnapshotRow))]:
            snapshot.taken_at = as_utc(snapshot.taken_at) - by
        session.commit()


def sell_by_hand(broker: BookBroker, quantity: int, symbol: str = "AAPL", price: float = 101.0,
                 at: datetime = WEDNESDAY_OPEN + timedelta(days=1), commission: float = 0.0, side: str = "SELL"):
    """A sale (or with side BUY, a purchase) in TWS: an order the pipeline never sent, filled at once."""
    leg = OrderLeg(client_order_id=f"by-hand-{len(broker.orders)}", role="entry", side=side, order_type="MKT",
                   quantity=quantity, price=None, tif="DAY")
    broker.place(symbol, [leg], 100.0)
    broker.fill(leg.client_order_id, quantity, price, at, commission)


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


def closing(decision_id, quantity=50, symbol="AAPL"):
    """What the risk engine makes of a SELL against a long: closes_position, sized by the position."""
    return TradeDecision(decision_id=decision_id, strategy="s", symbol=symbol, as_of=THURSDAY_AFTER_CLOSE,
                         data_through=THURSDAY_AFTER_CLOSE, proposed_action=Action.SELL, action=Action.SELL,
                         entry=100.0, quantity=quantity, confidence=0.7, closes_position=True, rationale="test exit")


def exit_now(sessions, broker, the_decision):
    record_decision(sessions, the_decision)
    return OrderDesk(sessions, broker).exit_once(the_decision)


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
