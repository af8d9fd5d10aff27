"""The books by position: every recorded execution matched FIFO per symbol (core/books.py), with
each trade's exit reason read from the role of the order that closed it. An execution of no order
of the pipeline's (OUTSIDE_ORDER: made by hand in TWS) closes with reason 'manual'; one that adds
to a position, or opens one, is a trade of its own with no decision (decision_id ""): opened by hand."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from trading_pipeline.adapters.broker import as_utc
from trading_pipeline.adapters.trading_db import (
    BrokerAccount,
    DecisionRow,
    ExecutionRow,
    OrderEventRow,
    OrderRow,
    of_broker,
)
from trading_pipeline.core.books import Fill, Trade, describe_duration, match_trades


def exit_reason(row: OrderRow | None, converted: set[str]) -> str:
    """Why a fill that reduced a position happened, from the role of its order."""
    if row is None:
        return "manual"
    if row.role == "stop_loss":  # a stop turned into a market exit by a decision keeps its role
        turned = (row.client_order_id in converted or row.order_type == "MKT"
                  or row.exit_decision_id)
        return "exit" if turned else "stop_loss"
    if row.role in ("take_profit", "exit"):
        return row.role
    if row.role == "entry":  # a later decision's order that closed the position
        return "exit"
    return "manual"


def matched_trades(session: Session, broker: BrokerAccount) -> list[Trade]:
    """Every execution recorded at `broker` (its account: `of_broker`) matched FIFO per symbol into trades
    (core/books.py): the paper broker's fills are not the IBKR account's trades, nor the reverse."""
    orders = {row.client_order_id: row for row in session.scalars(select(OrderRow))}
    converted = set(session.scalars(select(OrderEventRow.client_order_id).where(
        OrderEventRow.detail.contains("converted"))))
    stops = dict(session.execute(select(DecisionRow.decision_id, DecisionRow.stop)).all())
    executions = session.scalars(select(ExecutionRow).where(of_broker(ExecutionRow, broker))
                                 .order_by(ExecutionRow.executed_at)).all()
    fills = [Fill(execution_id=e.execution_id, symbol=e.symbol, side=e.side, quantity=e.quantity, price=e.price,
                  commission=e.commission, executed_at=as_utc(e.executed_at),
                  decision_id=orders[e.client_order_id].decision_id if e.client_order_id in orders else "",
                  reason=exit_reason(orders.get(e.client_order_id), converted))
             for e in executions]
    return match_trades(fills, stops)


def pipeline_positions(trades: list[Trade]) -> dict[str, float]:
    """What the pipeline holds by its books (`matched_trades`): the open part of the trades its
    entries opened, signed, by symbol. Shares bought (or sold short) by hand beside it are not the
    pipeline's position: they have no stop of its to keep."""
    held: dict[str, float] = {}
    for trade in trades:
        if trade.decision_id and trade.open_quantity > 1e-9:
            held[trade.symbol] = held.get(trade.symbol, 0.0) + trade.direction * trade.open_quantity
    return {symbol: quantity for symbol, quantity in held.items() if abs(quantity) > 1e-9}


def trades_by_position(trades: list[Trade], now: datetime) -> list[dict]:
    """The books by position (`matched_trades`), as the executions asset shows them."""
    return [{
        "decision_id": trade.decision_id, "symbol": trade.symbol, "side": trade.side,
        "quantity": round(trade.quantity), "entry": round(trade.entry, 2),
        "exit": round(trade.exit, 2) if trade.exit is not None else None,
        "closed_quantity": round(trade.closed_quantity), "status": trade.status,
        "realized_pnl": round(trade.realized_pnl, 2), "commission": round(trade.commission, 2),
        "r_multiple": round(trade.r_multiple, 2) if trade.r_multiple is not None else None,
        "exit_reason": ", ".join(trade.exit_reasons) or None,
        "opened_at": trade.opened_at.isoformat(),
        "closed_at": trade.closed_at.isoformat() if trade.status == "closed" else None,
        "holding_time": describe_duration(trade.holding_time(now)),
    } for trade in trades]
