"""Portfolio sync: bring the trading database up to date with the broker.

Advances recorded orders to the broker's state, records executions (partial fills included),
snapshots positions and the account, computes P&L per position and per decision (the realized
R multiple once a trade is closed), and flags drift: orders or positions at the broker that the
pipeline does not know about, or that disagree with what its executions imply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.broker import FINAL_STATUSES, Broker, as_utc, describe_expiry, expiry_of
from trading_pipeline.adapters.trading_db import (
    AccountSnapshotRow,
    DecisionRow,
    ExecutionRow,
    OrderEventRow,
    OrderRow,
    PositionSnapshotRow,
)
from trading_pipeline.core.risk import AccountState, WorkingEntry


@dataclass
class SyncReport:
    account: AccountState
    status_changes: list[str] = field(default_factory=list)
    new_executions: int = 0
    drift: list[str] = field(default_factory=list)
    positions: list[dict] = field(default_factory=list)
    trades: list[dict] = field(default_factory=list)


def _advance_orders(sessions: sessionmaker[Session], broker: Broker, role: str | None = None) -> list[str]:
    changes = []
    with sessions() as session:
        query = select(OrderRow).where(OrderRow.status.not_in(FINAL_STATUSES))
        open_rows = session.scalars(query if role is None else query.where(OrderRow.role == role)).all()
        # Entries first: an unlisted child is judged by what became of its parent.
        for row in sorted(open_rows, key=lambda r: r.parent_client_order_id is not None):
            order = broker.find_order(row.client_order_id)
            parent = session.get(OrderRow, row.parent_client_order_id) if row.parent_client_order_id else None
            if order is None:
                if row.status == "submitting":
                    changes.append(f"{row.client_order_id}: recorded as submitting but unknown to the broker")
                elif _day_order_gone(row):
                    # IBKR lists only the current session's orders (and a week of executions): a DAY
                    # order absent after its session closed, with no execution, expired unfilled.
                    # Left open, it would block the symbol's next order (order_working) for ever.
                    changes.append(_cancel_row(session, row, "sync: no longer listed by the broker and no execution "
                                                             f"after its DAY session: "
                                                             f"{describe_expiry(as_utc(row.created_at))}"))
                elif parent is not None and parent.status == "Cancelled" and not parent.filled_quantity:
                    changes.append(_cancel_row(session, row, f"sync: cancelled with its parent "
                                                             f"{parent.client_order_id}, which never filled"))
                else:
                    changes.append(f"{row.client_order_id}: {row.status} here but unknown to the broker; "
                                   "check it at the broker")
                continue
            if (order.status, order.filled_quantity) != (row.status, row.filled_quantity):
                changes.append(f"{row.client_order_id}: {row.status} → {order.status} "
                               f"(filled {order.filled_quantity:g}/{row.quantity})"
                               + (f": {order.detail}" if order.detail else ""))
                row.status = order.status
                row.filled_quantity = order.filled_quantity
                row.average_fill_price = order.average_fill_price
                row.broker_order_id = row.broker_order_id or order.broker_order_id
                session.add(OrderEventRow(client_order_id=row.client_order_id, status=order.status,
                                          detail=f"sync: {order.detail}" if order.detail
                                          else f"sync: filled {order.filled_quantity:g}"))
        session.commit()
    return changes


def _cancel_row(session: Session, row: OrderRow, detail: str) -> str:
    """Record an order the broker no longer lists as Cancelled; returns the change line."""
    change = f"{row.client_order_id}: {row.status} → Cancelled ({detail})"
    row.status = "Cancelled"
    session.add(OrderEventRow(client_order_id=row.client_order_id, status="Cancelled", detail=detail))
    return change


def _day_order_gone(row: OrderRow) -> bool:
    """An unfilled DAY entry (or closing order) whose session has closed."""
    if row.role != "entry" or row.tif != "DAY" or row.filled_quantity:
        return False
    return pd.Timestamp(datetime.now(timezone.utc)) > expiry_of("DAY", as_utc(row.created_at))


def working_entries(sessions: sessionmaker[Session], broker: Broker) -> dict[str, WorkingEntry]:
    """The pipeline's orders that may still fill, by symbol, after asking the broker for their
    state: each decision's first leg (the bracket's entry, or the order closing a position). The
    risk gates send no second order for such a symbol and count opening ones as positions; one
    whose state is unknown ('submitting') counts too until it is reconciled."""
    _advance_orders(sessions, broker, role="entry")
    with sessions() as session:
        rows = session.scalars(select(OrderRow).where(OrderRow.role == "entry",
                                                      OrderRow.status.not_in(FINAL_STATUSES))).all()
        return {row.symbol: WorkingEntry(row.client_order_id, row.side, row.quantity - row.filled_quantity,
                                         row.price, row.status)
                for row in rows if row.quantity - row.filled_quantity > 0}


def _record_executions(sessions: sessionmaker[Session], broker: Broker) -> int:
    added = 0
    with sessions() as session:
        rows = session.scalars(select(OrderRow).where(OrderRow.filled_quantity > 0)).all()
        for row in rows:
            for execution in broker.executions(row.client_order_id):
                if session.get(ExecutionRow, execution.execution_id) is None:
                    session.add(ExecutionRow(
                        execution_id=execution.execution_id, client_order_id=row.client_order_id,
                        symbol=row.symbol, side=execution.side, quantity=execution.quantity,
                        price=execution.price, broker=broker.name, executed_at=execution.executed_at))
                    added += 1
        session.commit()
    return added


def _implied_positions(session: Session) -> dict[str, float]:
    quantities: dict[str, float] = {}
    for execution in session.scalars(select(ExecutionRow)):
        signed = execution.quantity if execution.side == "BUY" else -execution.quantity
        quantities[execution.symbol] = quantities.get(execution.symbol, 0.0) + signed
    return {symbol: quantity for symbol, quantity in quantities.items() if abs(quantity) > 1e-9}


def _trades_by_decision(session: Session) -> list[dict]:
    """Per decision: entry and exit fills, P&L, and the realized R multiple once closed."""
    trades = []
    decisions = {d.decision_id: d for d in session.scalars(select(DecisionRow))}
    orders = session.scalars(select(OrderRow)).all()
    executions = session.scalars(select(ExecutionRow)).all()
    fills_by_order: dict[str, list[ExecutionRow]] = {}
    for execution in executions:
        fills_by_order.setdefault(execution.client_order_id, []).append(execution)
    for decision_id in sorted({o.decision_id for o in orders}):
        legs = [o for o in orders if o.decision_id == decision_id]
        decision = decisions.get(decision_id)
        entry_legs = [o for o in legs if o.role == "entry"]
        exit_legs = [o for o in legs if o.role != "entry"]
        entry_fills = [f for o in entry_legs for f in fills_by_order.get(o.client_order_id, [])]
        exit_fills = [f for o in exit_legs for f in fills_by_order.get(o.client_order_id, [])]
        if not entry_fills:
            continue
        entry_qty = sum(f.quantity for f in entry_fills)
        entry_price = sum(f.quantity * f.price for f in entry_fills) / entry_qty
        direction = 1 if entry_fills[0].side == "BUY" else -1
        exit_qty = sum(f.quantity for f in exit_fills)
        exit_price = sum(f.quantity * f.price for f in exit_fills) / exit_qty if exit_qty else None
        closed = exit_qty >= entry_qty
        realized = direction * (exit_price - entry_price) * exit_qty if exit_price is not None else 0.0
        r_multiple = None
        if closed and decision is not None and decision.stop is not None and entry_price != decision.stop:
            r_multiple = round(direction * (exit_price - entry_price) / abs(entry_price - decision.stop), 2)
        trades.append({
            "decision_id": decision_id, "symbol": entry_fills[0].symbol,
            "side": entry_fills[0].side, "quantity": entry_qty, "entry": round(entry_price, 2),
            "exit": round(exit_price, 2) if exit_price is not None else None,
            "status": "closed" if closed else "open", "realized_pnl": round(realized, 2),
            "r_multiple": r_multiple,
        })
    return trades


def _protection_drift(session: Session, held: dict[str, float], implied: dict[str, float]) -> list[str]:
    """Stop-loss orders that no longer match the position they protect: after a partial entry
    fill, a partial exit or a trade by hand, a stop for the original size would trade more (or
    less) than is held when it triggers."""
    stops: dict[str, float] = {}
    for row in session.scalars(select(OrderRow).where(
            OrderRow.role == "stop_loss", OrderRow.status.not_in((*FINAL_STATUSES, "PreSubmitted")))):
        stops[row.symbol] = stops.get(row.symbol, 0.0) + row.quantity - row.filled_quantity
    problems = []
    for symbol in sorted(set(stops) | {s for s in held if implied.get(s)}):
        position, covered = abs(held.get(symbol, 0.0)), stops.get(symbol, 0.0)
        if abs(position - covered) < 1e-9:
            continue
        if position == 0:
            problems.append(f"{symbol}: working stop-loss orders for {covered:g} shares but no position: "
                            "cancel them before they trigger")
        else:
            problems.append(f"{symbol}: the position is {position:g} shares but working stop-loss orders cover "
                            f"{covered:g}: adjust the stop's quantity at the broker (or close the position)")
    return problems


def sync_portfolio(sessions: sessionmaker[Session], broker: Broker, marks: dict[str, float]) -> SyncReport:
    changes = _advance_orders(sessions, broker)
    added = _record_executions(sessions, broker)
    account = broker.account(marks)
    now = datetime.now(timezone.utc)
    drift = []
    with sessions() as session:
        known = {row.client_order_id for row in session.scalars(select(OrderRow))}
        for order in broker.open_orders():
            if order.client_order_id not in known:
                drift.append(f"broker has open order {order.client_order_id or order.broker_order_id} "
                             "that the pipeline did not send")
        implied = _implied_positions(session)
        held = {symbol: p.quantity for symbol, p in account.positions.items() if p.quantity}
        for symbol in sorted(set(implied) | set(held)):
            if abs(implied.get(symbol, 0.0) - held.get(symbol, 0.0)) > 1e-9:
                drift.append(f"{symbol}: broker holds {held.get(symbol, 0.0):g}, the pipeline's executions "
                             f"imply {implied.get(symbol, 0.0):g}")
        drift.extend(_protection_drift(session, held, implied))
        positions = []
        for symbol, position in sorted(account.positions.items()):
            unrealized = round(position.quantity * (position.market_price - position.average_price), 2)
            positions.append({"symbol": symbol, "quantity": position.quantity,
                              "average_price": position.average_price, "market_price": position.market_price,
                              "market_value": round(position.market_value, 2), "unrealized_pnl": unrealized})
            session.add(PositionSnapshotRow(taken_at=now, broker=broker.name, symbol=symbol,
                                            quantity=position.quantity, average_price=position.average_price,
                                            market_price=position.market_price, unrealized_pnl=unrealized))
        session.add(AccountSnapshotRow(taken_at=now, broker=broker.name, equity=account.equity, cash=account.cash,
                                       gross_exposure=account.gross_exposure, daily_pnl=account.daily_pnl,
                                       open_positions=account.open_positions))
        trades = _trades_by_decision(session)
        session.commit()
    return SyncReport(account, changes, added, drift, positions, trades)
