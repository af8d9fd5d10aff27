"""Brokers behind one small interface: the embedded paper broker here, IBKR in adapters/ibkr.

The paper broker simulates the broker side in the trading database. It accepts orders (rejecting
a client order id it has seen, as IBKR does) and leaves them working: nothing fills when an order
is placed. Fills come later, from the daily bars the portfolio sync walks (`simulate_fills`): an
entry limit fills on a bar of a session in which it was live (at the open when the market gapped
through the limit), a DAY entry that did not fill expires at the close of its first session, and
the stop-loss and take-profit children go live once their parent has filled.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

import pandas as pd
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.trading_db import PaperFillRow, PaperOrderRow
from trading_pipeline.core import market_calendar
from trading_pipeline.core.analysis import OrderLeg
from trading_pipeline.core.risk import AccountState, Mark, Position
from trading_pipeline.errors import OrderRejectedError


class DuplicateOrderError(Exception):
    """The broker already has an order with this client order id."""


class PaperOrderRejected(OrderRejectedError):
    """The paper broker refused the order (it has no way to simulate it)."""


@dataclass(frozen=True)
class BrokerOrder:
    client_order_id: str
    broker_order_id: str
    status: str  # Submitted, PreSubmitted, Filled, Cancelled, Inactive
    filled_quantity: float
    average_fill_price: float | None
    detail: str = ""  # why the order is in its status, when the broker says (e.g. why it was cancelled)


@dataclass(frozen=True)
class BrokerExecution:
    execution_id: str
    client_order_id: str
    symbol: str
    side: str
    quantity: float
    price: float
    executed_at: datetime


class Broker(Protocol):
    name: str

    def account(self, marks: dict[str, Mark], as_of: datetime | None = None) -> AccountState:
        """Equity, cash, positions (valued at `marks`, the latest closed daily bars) and today's
        P&L. `as_of` is the decision's point in time: the paper broker leaves out later fills (a
        replay must not see its own future); a real broker only knows the present and ignores it."""
        ...

    def find_order(self, client_order_id: str) -> BrokerOrder | None: ...

    def place(self, symbol: str, legs: list[OrderLeg], reference_price: float,
              placed_at: datetime | None = None) -> list[BrokerOrder]:
        """Send the legs as one order (a bracket when there are children). `placed_at` is the
        decision's point in time; a real broker ignores it, the paper broker stamps with it."""
        ...

    def executions(self, client_order_id: str) -> list[BrokerExecution]: ...

    def open_orders(self) -> list[BrokerOrder]: ...

    def cancel(self, client_order_id: str) -> BrokerOrder | None:
        """Cancel a working order and return its final state (an order already final is left as
        it is); None when the broker does not know the id."""
        ...

    def modify(self, client_order_id: str, *, order_type: str | None = None, price: float | None = None,
               quantity: int | None = None) -> BrokerOrder | None:
        """Change a working order in place and return its state after the change (a final order
        is returned unchanged); None when the broker does not know the id. Raises
        OrderRejectedError when the broker refuses (the order stays as it was). order_type "MKT"
        with price None turns a stop into a market order."""
        ...

    def min_tick(self, symbol: str) -> float:
        """The contract's minimum price increment."""
        ...


FINAL_STATUSES = ("Filled", "Cancelled", "Inactive", "Rejected")
PAPER_TIME_IN_FORCE = ("DAY", "GTC")


def _utcnow() -> datetime:  # one place to travel in time in tests
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)  # SQLite drops the zone


# --- When and where a daily bar fills an order (pure: plain values in, plain values out) ----------

def first_live_session(placed_at: datetime) -> pd.Timestamp:
    """The XNYS session an order placed at `placed_at` first works in: the session in progress,
    else the next one (placed after Friday's close: Monday's, or the session after a holiday)."""
    in_progress = market_calendar.opened_session(placed_at)
    if in_progress is not None:
        return in_progress
    return market_calendar.session_on(market_calendar.next_open(placed_at))


def expiry_of(tif: str, placed_at: datetime) -> pd.Timestamp | None:
    """When an unfilled order stops working: a DAY order at the close of its first live session,
    a GTC order never."""
    if tif == "GTC":
        return None
    if tif == "DAY":
        return market_calendar.calendar().session_close(first_live_session(placed_at))
    raise ValueError(f"the paper broker knows the time in force {PAPER_TIME_IN_FORCE}, not {tif!r}")


def _executes_at_or_below(side: str, order_type: str) -> bool:
    """A buy limit and a sell stop execute once the market comes down to their price; a sell
    limit and a buy stop once it comes up to it."""
    return (side == "BUY") != (order_type == "STP")


def trades_through(side: str, order_type: str, price: float, bar) -> bool:
    """Whether the bar's range reaches the order's price from the side that executes it."""
    if _executes_at_or_below(side, order_type):
        return float(bar["low"]) <= price
    return float(bar["high"]) >= price


def fill_price(side: str, order_type: str, price: float, bar) -> float | None:
    """Where a daily bar that started while the order was working fills it, or None. A gap
    through the price fills at the open: better than a limit, worse than a stop."""
    if not trades_through(side, order_type, price, bar):
        return None
    open_ = float(bar["open"])
    return round(min(open_, price) if _executes_at_or_below(side, order_type) else max(open_, price), 2)


def entry_fill(side: str, order_type: str, price: float, placed_at: datetime, bar_start: pd.Timestamp,
               bar_close: pd.Timestamp, bar) -> tuple[float, datetime] | None:
    """Price and time at which a daily bar fills an entry placed at `placed_at`, or None.

    A bar that ended before the order existed cannot fill it. A bar already in progress at
    placement fills it only at its own price: the bar's open happened before the order existed,
    so the open's better price cannot be claimed. A bar that started at or after placement fills
    it as `fill_price` says. The fill is stamped at the bar's start, or at placement when later.
    """
    placed = pd.Timestamp(placed_at)
    if bar_close <= placed:
        return None
    if bar_start < placed:
        if not trades_through(side, order_type, price, bar):
            return None
        return round(price, 2), placed.to_pydatetime()
    price_filled = fill_price(side, order_type, price, bar)
    return None if price_filled is None else (price_filled, bar_start.to_pydatetime())


def describe_expiry(placed_at: datetime) -> str:
    return f"DAY order expired unfilled at the close of {first_live_session(placed_at).date()}"


# --- The paper broker -----------------------------------------------------------------------------

class PaperBroker:
    name = "paper"

    def __init__(self, sessions: sessionmaker[Session], starting_equity: float):
        self._sessions = sessions
        self._starting_equity = starting_equity

    @staticmethod
    def _status_detail(session: Session, row: PaperOrderRow) -> str:
        """Why a cancelled order was cancelled: an entry when its DAY expires unfilled, a child with
        its parent, because its sibling filled (one-cancels-other), or on request (`cancel`: the
        exits of a position being closed), so the reason follows from the orders themselves."""
        if row.status != "Cancelled":
            return ""
        if row.parent_broker_order_id is None:
            return describe_expiry(as_utc(row.created_at))
        parent = session.get(PaperOrderRow, row.parent_broker_order_id)
        if parent is not None and parent.status == "Cancelled":
            return f"cancelled with its parent {parent.client_order_id}: {describe_expiry(as_utc(parent.created_at))}"
        sibling = session.scalar(select(PaperOrderRow.client_order_id).where(
            PaperOrderRow.parent_broker_order_id == row.parent_broker_order_id,
            PaperOrderRow.broker_order_id != row.broker_order_id, PaperOrderRow.status == "Filled"))
        return f"one-cancels-other: {sibling} filled" if sibling else "cancelled on request"

    def _as_broker_order(self, session: Session, row: PaperOrderRow) -> BrokerOrder:
        return BrokerOrder(row.client_order_id, str(row.broker_order_id), row.status,
                           row.filled_quantity, row.average_fill_price, self._status_detail(session, row))

    def find_order(self, client_order_id: str) -> BrokerOrder | None:
        with self._sessions() as session:
            row = session.scalar(select(PaperOrderRow).where(PaperOrderRow.client_order_id == client_order_id))
            return self._as_broker_order(session, row) if row else None

    def cancel(self, client_order_id: str) -> BrokerOrder | None:
        with self._sessions() as session:
            row = session.scalar(select(PaperOrderRow).where(PaperOrderRow.client_order_id == client_order_id))
            if row is None:
                return None
            if row.status not in FINAL_STATUSES:
                row.status = "Cancelled"
                session.commit()
            return self._as_broker_order(session, row)

    def place(self, symbol: str, legs: list[OrderLeg], reference_price: float,
              placed_at: datetime | None = None) -> list[BrokerOrder]:
        """Accept the legs as working orders; nothing fills here (`simulate_fills` fills them on
        later bars). `reference_price` is not used: whether a limit is marketable is for the
        market after `placed_at` to say, not for the last close the decision was made from."""
        unsupported = sorted({leg.tif for leg in legs} - set(PAPER_TIME_IN_FORCE))
        if unsupported:
            raise PaperOrderRejected(f"the paper broker does not support time in force {', '.join(unsupported)}",
                                     f"use one of {', '.join(PAPER_TIME_IN_FORCE)} (orders.tif in the strategies file)")
        now = placed_at or _utcnow()
        with self._sessions() as session:
            try:
                parent_id = None
                rows = []
                for leg in legs:
                    row = PaperOrderRow(
                        client_order_id=leg.client_order_id, parent_broker_order_id=parent_id,
                        symbol=symbol, side=leg.side, order_type=leg.order_type, quantity=leg.quantity,
                        price=leg.price, tif=leg.tif, status="PreSubmitted" if parent_id else "Submitted",
                        filled_quantity=0.0, created_at=now)
                    session.add(row)
                    session.flush()
                    parent_id = parent_id or row.broker_order_id
                    rows.append(row)
                session.commit()
            except IntegrityError:
                session.rollback()
                raise DuplicateOrderError(legs[0].client_order_id) from None
            return [self._as_broker_order(session, row) for row in rows]

    def executions(self, client_order_id: str) -> list[BrokerExecution]:
        with self._sessions() as session:
            rows = session.execute(
                select(PaperFillRow, PaperOrderRow.client_order_id)
                .join(PaperOrderRow, PaperFillRow.broker_order_id == PaperOrderRow.broker_order_id)
                .where(PaperOrderRow.client_order_id == client_order_id)).all()
            return [BrokerExecution(f"paper-{fill.id}", coid, fill.symbol, fill.side, fill.quantity, fill.price,
                                    as_utc(fill.executed_at)) for fill, coid in rows]

    def open_orders(self) -> list[BrokerOrder]:
        with self._sessions() as session:
            rows = session.scalars(select(PaperOrderRow).where(PaperOrderRow.status.not_in(FINAL_STATUSES))
                                   .order_by(PaperOrderRow.broker_order_id)).all()
            return [self._as_broker_order(session, row) for row in rows]

    def working_symbols(self) -> list[str]:
        with self._sessions() as session:
            return sorted(set(session.scalars(select(PaperOrderRow.symbol).where(
                PaperOrderRow.status.not_in(FINAL_STATUSES)))))

    def working_since(self) -> datetime | None:
        """When the oldest working order was placed: the sync needs daily bars from then on."""
        with self._sessions() as session:
            oldest = session.scalar(select(PaperOrderRow.created_at).where(
                PaperOrderRow.status.not_in(FINAL_STATUSES)).order_by(PaperOrderRow.created_at))
            return as_utc(oldest) if oldest else None

    def simulate_fills(self, daily_bars: dict[str, pd.DataFrame]) -> list[str]:
        """Advance working orders through the daily bars (indexed by session open, as every source's).

        Entries are live from their placement: see `entry_fill` for which bars fill them and at
        what price. A DAY entry still unfilled at the close of its first live session is cancelled
        with its children; a GTC entry keeps working. Children go live once their parent filled and
        work from the next bar on; a stop triggers when the low reaches it, a take-profit when the
        high does; if one bar reaches both, the stop is assumed first (the conservative reading of
        a daily bar). When a child fills its sibling is cancelled (one-cancels-other). An order is
        left as it is when the bars start after the session it went live in (its fills would be
        guessed). Returns what happened, for logs.
        """
        happened = []
        with self._sessions() as session:
            working = session.scalars(select(PaperOrderRow).where(PaperOrderRow.status.not_in(FINAL_STATUSES))
                                      .order_by(PaperOrderRow.broker_order_id)).all()
            orders_by_id = {row.broker_order_id: row for row in working}
            for symbol in sorted({row.symbol for row in working}):
                bars = daily_bars.get(symbol)
                if bars is None or bars.empty:
                    continue
                mine = [row for row in working if row.symbol == symbol]
                for row in self._not_covered(session, mine, orders_by_id, bars.index[0]):
                    mine.remove(row)
                    happened.append(f"{row.client_order_id} not advanced: the {symbol} daily bars start on "
                                    f"{bars.index[0].date()}, after the session it went live in")
                closes = market_calendar.bar_close_times(bars.index, "1d")
                expiries = {row.broker_order_id: expiry_of(row.tif, as_utc(row.created_at))
                            for row in mine if row.parent_broker_order_id is None}
                # Walk the bars in time order so that, within a bracket, whichever leg the market
                # reaches first fills (stop before target within the same bar).
                for start, bar in bars.iterrows():
                    for row in mine:
                        if row.status in FINAL_STATUSES:
                            continue
                        if row.parent_broker_order_id is None:
                            happened += self._advance_entry(session, row, expiries[row.broker_order_id], mine,
                                                            start, closes[start], bar)
                        else:
                            parent = orders_by_id.get(row.parent_broker_order_id) or session.get(
                                PaperOrderRow, row.parent_broker_order_id)
                            happened += self._advance_child(session, row, parent, mine, start, bar)
            session.commit()
        return happened

    def _not_covered(self, session: Session, orders: list[PaperOrderRow], orders_by_id: dict,
                     first_bar: pd.Timestamp) -> list[PaperOrderRow]:
        """The orders whose live time the bars do not reach back to (children of unfilled parents
        are judged with their parent, when it fills during the walk)."""
        uncovered = []
        for row in orders:
            if row.parent_broker_order_id is None:
                live_from = as_utc(row.created_at)
            else:
                parent = orders_by_id.get(row.parent_broker_order_id) or session.get(
                    PaperOrderRow, row.parent_broker_order_id)
                if parent is None or parent.status != "Filled":
                    continue
                live_from = self._fill_time(session, parent)
            session_open = market_calendar.calendar().session_open(first_live_session(live_from))
            if first_bar > session_open:
                uncovered.append(row)
        return uncovered

    def _fill(self, session: Session, row: PaperOrderRow, price: float, at: datetime) -> str:
        row.status, row.filled_quantity, row.average_fill_price = "Filled", row.quantity, price
        session.add(PaperFillRow(broker_order_id=row.broker_order_id, symbol=row.symbol, side=row.side,
                                 quantity=row.quantity, price=price, executed_at=at))
        session.flush()
        return (f"{row.client_order_id} {row.side} {row.quantity} {row.symbol} filled at {price:.2f} "
                f"on the bar of {at.date()}")

    def _advance_entry(self, session: Session, row: PaperOrderRow, expires_at: pd.Timestamp | None,
                       orders: list[PaperOrderRow], start: pd.Timestamp, close: pd.Timestamp, bar) -> list[str]:
        placed_at = as_utc(row.created_at)
        children = [o for o in orders if o.parent_broker_order_id == row.broker_order_id]
        if expires_at is None or start < expires_at:
            fill = entry_fill(row.side, row.order_type, row.price, placed_at, start, close, bar)
            if fill is not None:
                lines = [self._fill(session, row, *fill)]
                for child in children:
                    if child.status == "PreSubmitted":
                        child.status = "Submitted"  # children go live once the parent fills
                return lines
        if expires_at is None or close < expires_at:
            return []
        row.status = "Cancelled"
        lines = [f"{row.client_order_id} cancelled: {describe_expiry(placed_at)}"]
        for child in children:
            if child.status not in FINAL_STATUSES:
                child.status = "Cancelled"
                lines.append(f"{child.client_order_id} cancelled with its parent {row.client_order_id}")
        return lines

    def _advance_child(self, session: Session, row: PaperOrderRow, parent: PaperOrderRow | None,
                       orders: list[PaperOrderRow], start: pd.Timestamp, bar) -> list[str]:
        if parent is None or parent.status != "Filled":
            return []  # children wait for their parent
        active_since = max(as_utc(row.created_at), self._fill_time(session, parent))
        if start <= pd.Timestamp(active_since):
            return []  # only bars that started after the parent filled (its own bar is ambiguous)
        price = fill_price(row.side, row.order_type, row.price, bar)
        if price is None:
            return []
        lines = [self._fill(session, row, price, start.to_pydatetime())]
        for sibling in orders:
            if (sibling.parent_broker_order_id == parent.broker_order_id and sibling is not row
                    and sibling.status not in FINAL_STATUSES):
                sibling.status = "Cancelled"
                lines.append(f"{sibling.client_order_id} cancelled (one-cancels-other)")
        return lines

    @staticmethod
    def _fill_time(session: Session, order: PaperOrderRow) -> datetime:
        executed = session.scalar(select(PaperFillRow.executed_at).where(
            PaperFillRow.broker_order_id == order.broker_order_id).order_by(PaperFillRow.id))
        return as_utc(executed) if executed else as_utc(order.created_at)

    def account(self, marks: dict[str, float], as_of: datetime | None = None) -> AccountState:
        """Cash and positions from the fills up to `as_of` (default now); positions valued at
        `marks` (last closes) where known; today is `as_of`'s UTC date."""
        as_of = as_utc(as_of) if as_of is not None else _utcnow()
        today = as_of.date()
        cash = self._starting_equity
        quantities: dict[str, float] = {}
        costs: dict[str, float] = {}
        realized_today = 0.0
        opened_today: set[str] = set()
        with self._sessions() as session:
            fills = session.scalars(select(PaperFillRow).order_by(PaperFillRow.id)).all()
        for fill in fills:
            if as_utc(fill.executed_at) > as_of:
                continue  # after the point in time asked about (a replay after a sync)
            signed = fill.quantity if fill.side == "BUY" else -fill.quantity
            cash -= signed * fill.price
            held = quantities.get(fill.symbol, 0.0)
            average = costs.get(fill.symbol, 0.0) / held if held else 0.0
            if held and (held > 0) != (signed > 0):  # reducing: realize P&L on the closed part
                closed = min(abs(signed), abs(held))
                pnl = closed * (fill.price - average) * (1 if held > 0 else -1)
                if as_utc(fill.executed_at).date() == today:
                    realized_today += pnl
                costs[fill.symbol] = average * (held + (closed if held < 0 else -closed))
            else:
                costs[fill.symbol] = costs.get(fill.symbol, 0.0) + signed * fill.price
                if as_utc(fill.executed_at).date() == today:
                    opened_today.add(fill.symbol)
            quantities[fill.symbol] = held + signed
        positions = {}
        unrealized_today = 0.0
        for symbol, quantity in quantities.items():
            if quantity == 0:
                continue
            average = costs[symbol] / quantity
            mark = marks.get(symbol, average)
            positions[symbol] = Position(quantity, round(average, 4), mark)
            if symbol in opened_today:
                unrealized_today += quantity * (mark - average)
        equity = cash + sum(p.market_value for p in positions.values())
        return AccountState(equity=round(equity, 2), cash=round(cash, 2), positions=positions,
                            daily_pnl=round(realized_today + unrealized_today, 2))
