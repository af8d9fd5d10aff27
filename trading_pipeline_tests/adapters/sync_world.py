"""What the portfolio sync's tests share: the decisions they send and how (`send`, as the orders step
does, with its crashes), the rows they read, time moved back (`age`, `earlier`), trades by hand, and
`BookBroker`, a small broker that keeps its orders and fills in memory and implements the Broker
protocol where the paper broker lacks what a test needs (`modify`, commissions, partial fills, an
orders list that misses orders). The `sessions` and `memory_sessions` fixtures are in conftest.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pandas as pd
from sqlalchemy import select

from trading_pipeline.adapters.broker import (
    BrokerExecution,
    BrokerOrder,
    OrderListCompleteness,
    as_utc,
)
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import (
    AccountSnapshotRow,
    OrderEventRow,
    OrderRow,
    PositionSnapshotRow,
)
from trading_pipeline.core import market_calendar
from trading_pipeline.core.analysis import Action, OrderLeg, TradeDecision
from trading_pipeline.core.orders import build_legs
from trading_pipeline.core.risk import AccountState, Mark, Position
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
    account_id = None

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

    def order_list_completeness(self, client_order_id=None):
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


def age(sessions, decision_id, by: timedelta):
    """Move the decision's rows and their events `by` into the past."""
    with sessions() as session:
        for row in session.scalars(select(OrderRow).where(OrderRow.decision_id == decision_id)):
            row.created_at = datetime.now(UTC) - by
            for event in session.scalars(select(OrderEventRow).where(
                    OrderEventRow.client_order_id == row.client_order_id)):
                event.at = datetime.now(UTC) - by
        session.commit()


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


def closing(decision_id, quantity=50, symbol="AAPL"):
    """What the risk engine makes of a SELL against a long: closes_position, sized by the position."""
    return TradeDecision(decision_id=decision_id, strategy="s", symbol=symbol, as_of=THURSDAY_AFTER_CLOSE,
                         data_through=THURSDAY_AFTER_CLOSE, proposed_action=Action.SELL, action=Action.SELL,
                         entry=100.0, quantity=quantity, confidence=0.7, closes_position=True, rationale="test exit")


def exit_now(sessions, broker, the_decision):
    record_decision(sessions, the_decision)
    return OrderDesk(sessions, broker).exit_once(the_decision)
