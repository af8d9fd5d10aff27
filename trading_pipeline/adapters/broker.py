"""Brokers behind one small interface: the embedded paper broker here, IBKR in adapters/ibkr.

The paper broker simulates the broker side in the trading database: it accepts orders (rejecting
a client order id it has seen, as IBKR does), fills a marketable limit entry at once at its limit
price, and leaves the stop-loss and take-profit children working.
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
from trading_pipeline.core.analysis import OrderLeg
from trading_pipeline.core.risk import AccountState, Position


class DuplicateOrderError(Exception):
    """The broker already has an order with this client order id."""


@dataclass(frozen=True)
class BrokerOrder:
    client_order_id: str
    broker_order_id: str
    status: str  # Submitted, PreSubmitted, Filled, Cancelled, Inactive
    filled_quantity: float
    average_fill_price: float | None


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

    def account(self, marks: dict[str, float]) -> AccountState: ...

    def find_order(self, client_order_id: str) -> BrokerOrder | None: ...

    def place(self, symbol: str, legs: list[OrderLeg], reference_price: float,
              placed_at: datetime | None = None) -> list[BrokerOrder]:
        """Send the legs as one order (a bracket when there are children). `placed_at` is the
        decision's point in time; a real broker ignores it, the paper broker stamps with it."""
        ...

    def executions(self, client_order_id: str) -> list[BrokerExecution]: ...

    def open_orders(self) -> list[BrokerOrder]: ...


FINAL_STATUSES = ("Filled", "Cancelled", "Inactive", "Rejected")


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)  # SQLite drops the zone


def _fill_price(order: PaperOrderRow, bar) -> float | None:
    """Where a daily bar fills the order, or None. Gaps fill at the open (worse for stops)."""
    open_, high, low = float(bar["open"]), float(bar["high"]), float(bar["low"])
    if order.order_type == "STP":
        if order.side == "SELL" and low <= order.price:
            return round(min(open_, order.price), 2)
        if order.side == "BUY" and high >= order.price:
            return round(max(open_, order.price), 2)
        return None
    if order.side == "BUY" and low <= order.price:
        return round(min(open_, order.price), 2)
    if order.side == "SELL" and high >= order.price:
        return round(max(open_, order.price), 2)
    return None


class PaperBroker:
    name = "paper"

    def __init__(self, sessions: sessionmaker[Session], starting_equity: float):
        self._sessions = sessions
        self._starting_equity = starting_equity

    @staticmethod
    def _as_broker_order(row: PaperOrderRow) -> BrokerOrder:
        return BrokerOrder(row.client_order_id, str(row.broker_order_id), row.status,
                           row.filled_quantity, row.average_fill_price)

    def find_order(self, client_order_id: str) -> BrokerOrder | None:
        with self._sessions() as session:
            row = session.scalar(select(PaperOrderRow).where(PaperOrderRow.client_order_id == client_order_id))
            return self._as_broker_order(row) if row else None

    def place(self, symbol: str, legs: list[OrderLeg], reference_price: float,
              placed_at: datetime | None = None) -> list[BrokerOrder]:
        now = placed_at or datetime.now(timezone.utc)
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
                entry = rows[0]
                marketable = (entry.side == "BUY" and entry.price >= reference_price) or (
                    entry.side == "SELL" and entry.price <= reference_price)
                if entry.order_type == "LMT" and marketable:
                    entry.status, entry.filled_quantity, entry.average_fill_price = "Filled", entry.quantity, entry.price
                    session.add(PaperFillRow(broker_order_id=entry.broker_order_id, symbol=symbol, side=entry.side,
                                             quantity=entry.quantity, price=entry.price, executed_at=now))
                    for child in rows[1:]:
                        child.status = "Submitted"  # children go live once the parent fills
                session.commit()
            except IntegrityError:
                session.rollback()
                raise DuplicateOrderError(legs[0].client_order_id) from None
            return [self._as_broker_order(row) for row in rows]

    def executions(self, client_order_id: str) -> list[BrokerExecution]:
        with self._sessions() as session:
            rows = session.execute(
                select(PaperFillRow, PaperOrderRow.client_order_id)
                .join(PaperOrderRow, PaperFillRow.broker_order_id == PaperOrderRow.broker_order_id)
                .where(PaperOrderRow.client_order_id == client_order_id)).all()
            return [BrokerExecution(f"paper-{fill.id}", coid, fill.symbol, fill.side, fill.quantity, fill.price,
                                    _as_utc(fill.executed_at)) for fill, coid in rows]

    def open_orders(self) -> list[BrokerOrder]:
        with self._sessions() as session:
            rows = session.scalars(select(PaperOrderRow).where(PaperOrderRow.status.not_in(FINAL_STATUSES))
                                   .order_by(PaperOrderRow.broker_order_id)).all()
            return [self._as_broker_order(row) for row in rows]

    def working_symbols(self) -> list[str]:
        with self._sessions() as session:
            return sorted(set(session.scalars(select(PaperOrderRow.symbol).where(
                PaperOrderRow.status.not_in(FINAL_STATUSES)))))

    def simulate_fills(self, daily_bars: dict[str, "pd.DataFrame"]) -> list[str]:
        """Advance working orders through the daily bars that started after each order was placed.

        Entry limits fill when the bar trades through the limit (at the open if it gapped through);
        a stop triggers when the low reaches it, a take-profit when the high does; if one bar
        reaches both, the stop is assumed first (the conservative reading of a daily bar). When a
        child fills its sibling is cancelled (one-cancels-other). Returns what happened, for logs.
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
                # Walk the bars in time order so that, within a bracket, whichever leg the market
                # reaches first fills (stop before target within the same bar).
                for start, bar in bars.iterrows():
                    for row in mine:
                        if row.status in FINAL_STATUSES:
                            continue
                        parent = None
                        active_since = _as_utc(row.created_at)
                        if row.parent_broker_order_id is not None:
                            parent = orders_by_id.get(row.parent_broker_order_id) or session.get(
                                PaperOrderRow, row.parent_broker_order_id)
                            if parent is None or parent.status != "Filled":
                                continue  # children wait for their parent
                            active_since = max(active_since, self._fill_time(session, parent))
                        if start <= pd.Timestamp(active_since):
                            continue  # only bars that started after the order was live
                        price = _fill_price(row, bar)
                        if price is None:
                            continue
                        row.status, row.filled_quantity, row.average_fill_price = "Filled", row.quantity, price
                        session.add(PaperFillRow(broker_order_id=row.broker_order_id, symbol=symbol, side=row.side,
                                                 quantity=row.quantity, price=price, executed_at=start.to_pydatetime()))
                        session.flush()
                        happened.append(f"{row.client_order_id} {row.side} {row.quantity} {symbol} filled at "
                                        f"{price:.2f} on the bar of {start.date()}")
                        family = [r for r in mine if r.parent_broker_order_id == (
                            row.broker_order_id if parent is None else parent.broker_order_id)]
                        for other in family:
                            if parent is None and other.status == "PreSubmitted":
                                other.status = "Submitted"  # children go live once the parent fills
                            elif parent is not None and other is not row and other.status not in FINAL_STATUSES:
                                other.status = "Cancelled"
                                happened.append(f"{other.client_order_id} cancelled (one-cancels-other)")
            session.commit()
        return happened

    @staticmethod
    def _fill_time(session: Session, order: PaperOrderRow) -> datetime:
        executed = session.scalar(select(PaperFillRow.executed_at).where(
            PaperFillRow.broker_order_id == order.broker_order_id).order_by(PaperFillRow.id))
        return _as_utc(executed) if executed else _as_utc(order.created_at)

    def account(self, marks: dict[str, float]) -> AccountState:
        """Cash and positions from the fills; positions valued at `marks` (last closes) where known."""
        today = datetime.now(timezone.utc).date()
        cash = self._starting_equity
        quantities: dict[str, float] = {}
        costs: dict[str, float] = {}
        realized_today = 0.0
        opened_today: set[str] = set()
        with self._sessions() as session:
            fills = session.scalars(select(PaperFillRow).order_by(PaperFillRow.id)).all()
        for fill in fills:
            signed = fill.quantity if fill.side == "BUY" else -fill.quantity
            cash -= signed * fill.price
            held = quantities.get(fill.symbol, 0.0)
            average = costs.get(fill.symbol, 0.0) / held if held else 0.0
            if held and (held > 0) != (signed > 0):  # reducing: realize P&L on the closed part
                closed = min(abs(signed), abs(held))
                pnl = closed * (fill.price - average) * (1 if held > 0 else -1)
                if _as_utc(fill.executed_at).date() == today:
                    realized_today += pnl
                costs[fill.symbol] = average * (held + (closed if held < 0 else -closed))
            else:
                costs[fill.symbol] = costs.get(fill.symbol, 0.0) + signed * fill.price
                if _as_utc(fill.executed_at).date() == today:
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
