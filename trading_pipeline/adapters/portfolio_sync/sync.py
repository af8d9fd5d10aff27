"""One sync pass (`sync_portfolio`): order states, executions, the account at the marks, protection,
snapshots, the books, and what each decision's orders became."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.broker import FINAL_STATUSES, Broker, as_utc
from trading_pipeline.adapters.portfolio_sync.books import (
    exit_reason,
    matched_trades,
    pipeline_positions,
    trades_by_position,
)
from trading_pipeline.adapters.portfolio_sync.executions import (
    implied_positions,
    record_executions,
    record_outside_executions,
)
from trading_pipeline.adapters.portfolio_sync.order_states import advance_orders, working_exits
from trading_pipeline.adapters.portfolio_sync.protection import positions_contradicted, protect_positions
from trading_pipeline.adapters.trading_db import (
    AccountSnapshotRow,
    ExecutionRow,
    OrderEventRow,
    OrderRow,
    PositionSnapshotRow,
    describe_broker,
    of_broker,
)
from trading_pipeline.core.risk import AccountState, Mark
from trading_pipeline.errors import UserError


@dataclass
class SyncReport:
    account: AccountState
    status_changes: list[str] = field(default_factory=list)
    new_executions: int = 0
    drift: list[str] = field(default_factory=list)
    positions: list[dict] = field(default_factory=list)
    trades: list[dict] = field(default_factory=list)
    # The drift that leaves a pipeline position without protection (also in `drift`): an error.
    unprotected: list[str] = field(default_factory=list)
    # What each decision's orders became, for the decisions whose orders changed in this sync.
    orders: list[dict] = field(default_factory=list)
    # Open orders another broker or account wrote in this database (paper rows while
    # TRADING_BROKER=ibkr, the DU… account's while IBKR trades the U… one): left as they are, one
    # line per broker and account.
    other_brokers: list[str] = field(default_factory=list)


def other_brokers_open(session: Session, broker: Broker) -> list[str]:
    """One line per other broker or account with open orders in this database (paper rows while
    TRADING_BROKER=ibkr, the DU… paper account's rows while the gateway is logged in to the live U…
    account): never asked of, cancelled at or counted for this broker (`of_broker`), and checked
    again when that broker, logged in to that account, runs."""
    this = broker.name + (f", account {broker.account_id}" if broker.account_id else "")
    counts = session.execute(select(OrderRow.broker, OrderRow.account, func.count()).where(
        ~of_broker(OrderRow, broker), OrderRow.status.not_in(FINAL_STATUSES))
        .group_by(OrderRow.broker, OrderRow.account))
    lines = []
    for other, account, count in sorted(counts, key=lambda c: (c[0], c[1] or "")):
        when = f"TRADING_BROKER={other} runs again" + (f" with the gateway logged in to account {account}"
                                                        if account else "")
        lines.append(f"{count} open order(s) of {describe_broker(other, account)} in this database are not this "
                     f"broker's ({this}): left as they are; they are checked when {when}; use a separate "
                     "TRADING_DATABASE_URL per broker and account to keep them apart")
    return lines


# --- what each decision's orders became (observations on the `orders` asset) -----------------------

def _changes_since_last_sync(session: Session, broker: Broker, started: datetime) -> list[tuple[str, str]]:
    """Order events written since the previous sync by others than this sync (the orders step
    placing or converting a stop into an exit, the risk gates reading an entry's state): what an
    order became shows on the asset whoever saw it first. (cOID, line) pairs, oldest first."""
    previous = session.scalar(select(func.max(AccountSnapshotRow.taken_at)).where(
        of_broker(AccountSnapshotRow, broker)))  # this account's last sync, never another's
    query = select(OrderEventRow).where(OrderEventRow.at < started, OrderEventRow.client_order_id.in_(
        select(OrderRow.client_order_id).where(of_broker(OrderRow, broker)))).order_by(OrderEventRow.id)
    if previous is not None:
        query = query.where(OrderEventRow.at > previous)
    return [(event.client_order_id, f"{event.client_order_id}: {event.status} ({event.detail})")
            for event in session.scalars(query)]


def _order_outcomes(session: Session, broker: Broker, changed: set[str], changes: list[str]) -> list[dict]:
    """For each decision with a changed order: its legs' states, fills, average prices and
    commissions, which child filled, and the change lines."""
    if not changed:
        return []
    decision_ids = set(session.scalars(select(OrderRow.decision_id).where(OrderRow.client_order_id.in_(changed))))
    commissions: dict[str, float] = {}
    for execution in session.scalars(select(ExecutionRow).where(of_broker(ExecutionRow, broker))):
        commissions[execution.client_order_id] = commissions.get(execution.client_order_id, 0.0) + execution.commission
    converted = set(session.scalars(select(OrderEventRow.client_order_id).where(
        OrderEventRow.detail.contains("converted"))))
    role_order = {"entry": 0, "exit": 0, "stop_loss": 1, "take_profit": 2}
    outcomes = []
    for decision_id in sorted(decision_ids):
        legs = sorted(session.scalars(select(OrderRow).where(OrderRow.decision_id == decision_id)),
                      key=lambda r: (role_order.get(r.role, 3), r.client_order_id))
        first = legs[0]
        children = [leg for leg in legs[1:] if leg.filled_quantity > 0]
        filled_child = ", ".join(exit_reason(leg, converted) if leg.role == "stop_loss" else leg.role
                                 for leg in children) or None
        coids = {leg.client_order_id for leg in legs}
        outcomes.append({
            "symbol": first.symbol, "decision_id": decision_id, "client_order_id": first.client_order_id,
            "status": first.status, "filled_quantity": first.filled_quantity, "quantity": first.quantity,
            "average_fill_price": first.average_fill_price, "filled_child": filled_child,
            "commission": round(sum(commissions.get(leg.client_order_id, 0.0) for leg in legs), 2),
            "legs": [{"role": leg.role, "client_order_id": leg.client_order_id, "side": leg.side,
                      "order_type": leg.order_type, "quantity": leg.quantity, "price": leg.price,
                      "status": leg.status, "filled_quantity": leg.filled_quantity,
                      "average_fill_price": leg.average_fill_price,
                      "commission": round(commissions.get(leg.client_order_id, 0.0), 2)} for leg in legs],
            "changes": [line for line in changes if line.split(":", 1)[0] in coids],
        })
    return outcomes


# --- the sync ---------------------------------------------------------------------------------------

def sync_portfolio(sessions: sessionmaker[Session], broker: Broker, marks: dict[str, Mark],
                   as_of: datetime | None = None) -> SyncReport:
    """One pass: order states, executions, the account at the marks, protection, snapshots, books.
    Positions are keyed as the broker returns them: by the strategy's symbol (never re-keyed)."""
    started = datetime.now(UTC)
    changes, changed, unknown = advance_orders(sessions, broker)
    drift, added = [], 0
    try:
        added = record_executions(sessions, broker)
    except UserError as error:  # an unreadable answer (nothing is guessed): the books wait for the next
        # sync, never the protection below, which reads the broker's positions (a stop resized to them)
        drift.append(f"the pipeline's executions are not all recorded in this sync: {error.problem}. {error.fix}")
    try:  # after its own: what is left is not the pipeline's
        added += record_outside_executions(sessions, broker)
    except UserError as error:  # bookkeeping of trades the pipeline did not make: never in the way of
        # protection (a stop resized to a position reduced by hand), so the pass goes on and says why
        drift.append(f"the broker's trades not made by the pipeline (by hand in TWS) are not recorded in this "
                     f"sync: {error.problem}. {error.fix}")
    account = broker.account(marks, as_of)
    now = datetime.now(UTC)
    with sessions() as session:
        changes_elsewhere = _changes_since_last_sync(session, broker, started)
        changed |= {coid for coid, _ in changes_elsewhere}
        known = set(session.scalars(select(OrderRow.client_order_id).where(of_broker(OrderRow, broker))))
        for order in broker.open_orders():
            if order.client_order_id not in known:
                drift.append(f"broker has open order {order.client_order_id or order.broker_order_id} "
                             "that the pipeline did not send")
        implied = implied_positions(session, broker)
        held = {symbol: p.quantity for symbol, p in account.positions.items() if p.quantity}
        for symbol in sorted(set(implied) | set(held)):
            if abs(implied.get(symbol, 0.0) - held.get(symbol, 0.0)) > 1e-9:
                drift.append(f"{symbol}: broker holds {held.get(symbol, 0.0):g}, the pipeline's executions "
                             f"imply {implied.get(symbol, 0.0):g}")
        books = matched_trades(session, broker)  # protection adds no execution: the books stay these
        protection = protect_positions(session, broker, held, pipeline_positions(books),
                                       positions_contradicted(account), unknown)
        session.commit()
        changes.extend(protection.changes)
        changed |= protection.changed
        drift.extend(protection.drift)
        positions = []
        account_id = broker.account_id  # the snapshots name the account, as the orders do (`of_broker`)
        for symbol, position in sorted(account.positions.items()):
            unrealized = round(position.quantity * (position.market_price - position.average_price), 2)
            stop = working_exits(session, symbol, "stop_loss", broker=broker)
            positions.append({"symbol": symbol, "quantity": position.quantity,
                              "average_price": position.average_price, "market_price": position.market_price,
                              "market_value": round(position.market_value, 2), "unrealized_pnl": unrealized,
                              "stop": stop[0].price if len(stop) == 1 else None})
            session.add(PositionSnapshotRow(taken_at=now, broker=broker.name, account=account_id, symbol=symbol,
                                            quantity=position.quantity, average_price=position.average_price,
                                            market_price=position.market_price, unrealized_pnl=unrealized))
        session.add(AccountSnapshotRow(taken_at=now, broker=broker.name, account=account_id, equity=account.equity,
                                       cash=account.cash, gross_exposure=account.gross_exposure,
                                       daily_pnl=account.daily_pnl, open_positions=account.open_positions))
        trades = trades_by_position(books, as_utc(as_of) if as_of is not None else now)
        outcomes = _order_outcomes(session, broker, changed, [line for _, line in changes_elsewhere] + changes)
        others = other_brokers_open(session, broker)
        session.commit()
    return SyncReport(account, changes, added, drift, positions, trades, protection.unprotected, outcomes, others)
