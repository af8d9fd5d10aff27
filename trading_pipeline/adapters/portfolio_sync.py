"""Portfolio sync: bring the trading database up to date with the broker.

Advances recorded orders to the broker's state (a 'submitting' or 'unknown' row left by a crash
included: found by its cOID, or closed once it clearly never reached the broker), records
executions (partial fills and commissions included), keeps each position's protective orders
sized to it, snapshots positions and the account (valued at the marks), keeps the books by
position (core/books.py: FIFO trades with net P&L and realized R), and flags drift: orders or
positions at the broker that the pipeline does not know about or that disagree with what its
executions imply, and a pipeline position without a working stop-loss. A stop-loss or take-profit
still working once its position is gone (ORPHAN_GRACE) is cancelled.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.broker import (
    FINAL_STATUSES,
    Broker,
    as_utc,
    cancel_inactive,
    describe_expiry,
    expiry_of,
)
from trading_pipeline.adapters.trading_db import (
    AccountSnapshotRow,
    DecisionRow,
    ExecutionRow,
    OrderEventRow,
    OrderRow,
    PositionSnapshotRow,
    account_lock,
)
from trading_pipeline.core.books import Fill, describe_duration, match_trades
from trading_pipeline.core.risk import AccountState, Mark, WorkingEntry
from trading_pipeline.errors import OrderRejectedError, UserError

# An orders step writes 'submitting' and sends within seconds (its HTTP calls time out well before
# this). A row still unknown to the broker after two minutes never reached it (the process died
# before or while sending); a younger one may be in flight, so it is left for the next sync.
SUBMITTING_GRACE = timedelta(minutes=2)
UNCONFIRMED = ("submitting", "unknown")  # states the pipeline wrote without the broker's word
NEVER_REACHED = "never reached the broker (sync)"
# A stop-loss or take-profit left working with no position (closed by hand, say) opens one on the
# other side when it fills, so the sync cancels it, but only once the position is really gone: a
# position just opened can be missing from the broker's list for a while (IBKR's positions lag its
# fills). So the broker must have reported no position in every sync since one made after the
# order's entry last changed (its fills) and after the position was last seen, at least this long ago.
ORPHAN_GRACE = timedelta(minutes=2)


def positions_contradicted(account: AccountState) -> str | None:
    """Why the broker's positions answer cannot be believed to say a position is gone, or None.
    An answer listing no position at all while the account's equity and cash differ (the summary,
    another source at IBKR, still values positions) is such a case: a gateway whose positions are
    empty for a while (a session just re-authenticated, a cache not yet filled) must not get every
    protective stop cancelled. Accrued interest and the like stay under the tolerance."""
    if account.positions:
        return None
    gap = account.equity - account.cash
    if abs(gap) <= max(1.0, 0.001 * abs(account.equity)):
        return None
    return (f"the broker lists no position at all, yet its equity {account.equity:,.2f} and cash "
            f"{account.cash:,.2f} differ by {gap:,.2f}: its summary still values positions")


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


# --- order states -------------------------------------------------------------------------------

def _record_change(session: Session, row: OrderRow, status: str, detail: str) -> None:
    row.status = status
    session.add(OrderEventRow(client_order_id=row.client_order_id, status=status, detail=detail))


def _cancel_row(session: Session, row: OrderRow, detail: str) -> str:
    """Record an order the broker no longer lists (or never had) as Cancelled; returns the change line."""
    change = f"{row.client_order_id}: {row.status} → Cancelled ({detail})"
    _record_change(session, row, "Cancelled", detail)
    return change


def _day_order_gone(row: OrderRow) -> bool:
    """An unfilled DAY entry (or closing order) whose session has closed."""
    if row.role != "entry" or row.tif != "DAY" or row.filled_quantity:
        return False
    return pd.Timestamp(datetime.now(UTC)) > expiry_of("DAY", as_utc(row.created_at))


def _unconfirmed_not_found(session: Session, broker: Broker, row: OrderRow) -> str:
    """A row written without the broker's word that the broker does not list by its cOID. Its
    executions prove it reached the broker (an order no longer listed after a rollover); with
    none, it never did once the grace period is over; before that it may still be in flight."""
    executions = broker.executions(row.client_order_id)
    if executions:
        filled = sum(e.quantity for e in executions)
        status = "Filled" if filled >= row.quantity else row.status
        change = (f"{row.client_order_id}: {row.status} → {status} (filled {filled:g}/{row.quantity}: "
                  "found by its executions, no longer listed by the broker)")
        row.filled_quantity = filled
        row.average_fill_price = sum(e.quantity * e.price for e in executions) / filled
        _record_change(session, row, status, f"sync: found by its executions ({filled:g} filled)")
        return change
    # Timed from the last attempt (a re-run of the orders step writes 'about to send' again), not
    # from the row's creation: an old row being sent again right now is in flight too.
    last_attempt = session.scalar(select(func.max(OrderEventRow.at)).where(
        OrderEventRow.client_order_id == row.client_order_id)) or row.created_at
    age = datetime.now(UTC) - max(as_utc(last_attempt), as_utc(row.created_at))
    if age >= SUBMITTING_GRACE:
        return _cancel_row(session, row, NEVER_REACHED)
    return (f"{row.client_order_id}: {row.status} for {age.total_seconds():.0f}s and not at the broker yet "
            f"(it may be in flight); checked again by the next sync, and recorded as Cancelled if still "
            f"absent after {SUBMITTING_GRACE.total_seconds() / 60:g} minutes")


def _advance_orders(sessions: sessionmaker[Session], broker: Broker, roles: tuple[str, ...] | None = None,
                    symbol: str | None = None) -> tuple[list[str], set[str]]:
    """Bring the pipeline's open orders (of these roles, of this symbol: all by default) to the
    broker's state; returns the change lines and the cOIDs whose state changed."""
    changes, changed = [], set()
    with sessions() as session:
        query = select(OrderRow).where(OrderRow.status.not_in(FINAL_STATUSES))
        if roles is not None:
            query = query.where(OrderRow.role.in_(roles))
        if symbol is not None:
            query = query.where(OrderRow.symbol == symbol)
        open_rows = session.scalars(query).all()
        # Entries first: an unlisted child is judged by what became of its parent.
        for row in sorted(open_rows, key=lambda r: r.parent_client_order_id is not None):
            before = (row.status, row.filled_quantity)
            order = broker.find_order(row.client_order_id)
            parent = session.get(OrderRow, row.parent_client_order_id) if row.parent_client_order_id else None
            if order is None:
                if row.status in UNCONFIRMED:
                    changes.append(_unconfirmed_not_found(session, broker, row))
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
            elif (order.status, order.filled_quantity) != before:
                if order.status == "Inactive":
                    order = cancel_inactive(broker, order)
                reconciled = row.status in UNCONFIRMED
                changes.append(f"{row.client_order_id}: {row.status} → {order.status} "
                               f"(filled {order.filled_quantity:g}/{row.quantity})"
                               + (f": {order.detail}" if order.detail else "")
                               + (" (reconciled by cOID)" if reconciled else ""))
                row.filled_quantity = order.filled_quantity
                row.average_fill_price = order.average_fill_price
                row.broker_order_id = row.broker_order_id or order.broker_order_id
                detail = f"sync: {order.detail}" if order.detail else f"sync: filled {order.filled_quantity:g}"
                _record_change(session, row, order.status,
                               f"sync: reconciled by cOID, the broker has it ({detail.removeprefix('sync: ')})"
                               if reconciled else detail)
            if (row.status, row.filled_quantity) != before:
                changed.add(row.client_order_id)
        session.commit()
    return changes, changed


PROTECTIVE_ROLES = ("stop_loss", "take_profit")


def working_entries(sessions: sessionmaker[Session], broker: Broker) -> dict[str, WorkingEntry]:
    """The pipeline's orders that may still fill, by symbol, after asking the broker for their
    state: each decision's first leg (the bracket's entry, or the order closing a position). The
    risk gates send no second order for such a symbol and count opening ones as positions; one
    whose state is unknown ('submitting') counts too until the sync reconciles it."""
    _advance_orders(sessions, broker, roles=("entry",))
    with sessions() as session:
        return _working_entries(session)


def with_working_orders(account: AccountState, sessions: sessionmaker[Session], broker: Broker) -> AccountState:
    """`account` as the entry gates read it: with the pipeline's orders that may still fill
    (`working_entries`) and, by symbol, its stop-loss (else take-profit) still working
    (`AccountState.working_protection`), both after asking the broker for their states. The broker's
    positions can lag a fill by seconds: an entry that just filled is no longer working and its
    position may not be listed yet, but its stop works, so the symbol still counts as held."""
    _advance_orders(sessions, broker, roles=("entry", *PROTECTIVE_ROLES))
    with sessions() as session:
        protection = {}
        for symbol in sorted(set(session.scalars(select(OrderRow.symbol).where(
                OrderRow.role.in_(PROTECTIVE_ROLES), OrderRow.status.not_in(FINAL_STATUSES))))):
            live = [*_working_exits(session, symbol, "stop_loss"), *_working_exits(session, symbol, "take_profit")]
            if live:
                row = live[0]
                protection[symbol] = WorkingEntry(row.client_order_id, row.side, row.quantity - row.filled_quantity,
                                                  row.price, row.status, row.role)
        return dataclasses.replace(account, working_entries=_working_entries(session), working_protection=protection)


def _working_entries(session: Session) -> dict[str, WorkingEntry]:
    rows = session.scalars(select(OrderRow).where(OrderRow.role == "entry",
                                                  OrderRow.status.not_in(FINAL_STATUSES))).all()
    return {row.symbol: WorkingEntry(row.client_order_id, row.side, row.quantity - row.filled_quantity,
                                     row.price, row.status)
            for row in rows if row.quantity - row.filled_quantity > 0}


def working_symbols(sessions: sessionmaker[Session]) -> set[str]:
    """Symbols with a pipeline order that may still work (the sync marks them and walks their bars)."""
    with sessions() as session:
        return set(session.scalars(select(OrderRow.symbol).where(OrderRow.status.not_in(FINAL_STATUSES))))


def symbols_in_play(sessions: sessionmaker[Session]) -> set[str]:
    """The pipeline's symbols with an order that may still work or a position its executions imply:
    the broker must report positions under these names (IBKR matches them by conid: BRK.B is 'BRK B'
    there), or the sync would find such a position gone and cancel its stop as orphaned."""
    with sessions() as session:
        implied = set(_implied_positions(session))
    return working_symbols(sessions) | implied


# --- executions, marks, account -------------------------------------------------------------------

def record_executions(sessions: sessionmaker[Session], broker: Broker, *, symbol: str | None = None,
                      client_order_ids: list[str] | None = None) -> int:
    """Record the broker's executions of the pipeline's orders, each once, with what it charged:
    of the orders that filled (of `symbol` only, when given), or of `client_order_ids` (orders just
    placed or changed, whose fill counts may not be recorded yet). IBKR reports an execution before
    it charges it (commission 0 until then): a recorded execution whose commission the broker now
    gives takes it. Returns how many executions were added."""
    added = 0
    with sessions() as session:
        query = (select(OrderRow).where(OrderRow.filled_quantity > 0) if client_order_ids is None
                 else select(OrderRow).where(OrderRow.client_order_id.in_(client_order_ids)))
        rows = session.scalars(query if symbol is None else query.where(OrderRow.symbol == symbol)).all()
        for row in rows:
            for execution in broker.executions(row.client_order_id):
                recorded = session.get(ExecutionRow, execution.execution_id)
                if recorded is None:
                    session.add(ExecutionRow(
                        execution_id=execution.execution_id, client_order_id=row.client_order_id,
                        symbol=row.symbol, side=execution.side, quantity=execution.quantity,
                        price=execution.price, broker=broker.name, executed_at=execution.executed_at,
                        commission=execution.commission))
                    added += 1
                elif execution.commission and recorded.commission != execution.commission:
                    recorded.commission = execution.commission
        session.commit()
    return added


@dataclass(frozen=True)
class OwnFill:
    """What one of the pipeline's orders has filled, by the broker's word."""

    client_order_id: str
    role: str
    side: str
    quantity: float

    @property
    def signed(self) -> float:
        return self.quantity if self.side == "BUY" else -self.quantity


def own_fills(sessions: sessionmaker[Session], broker: Broker, symbol: str) -> list[OwnFill]:
    """The pipeline's orders for `symbol` that filled, oldest first, after bringing them up to date
    with the broker as the sync does (states, fill counts, executions). Their signed sum is the
    position the pipeline's executions imply (`_implied_positions`); an order whose fill count at
    the broker is ahead of the executions recorded for it counts by its fill count (IBKR's trades
    list is read at most every 5 s, its order states more often)."""
    _advance_orders(sessions, broker, symbol=symbol)
    record_executions(sessions, broker, symbol=symbol)
    with sessions() as session:
        executed: dict[str, float] = {}
        for execution in session.scalars(select(ExecutionRow).where(ExecutionRow.symbol == symbol)):
            executed[execution.client_order_id] = executed.get(execution.client_order_id, 0.0) + execution.quantity
        rows = session.scalars(select(OrderRow).where(OrderRow.symbol == symbol)
                               .order_by(OrderRow.created_at, OrderRow.client_order_id)).all()
        fills = [OwnFill(row.client_order_id, row.role, row.side,
                         max(row.filled_quantity or 0.0, executed.get(row.client_order_id, 0.0))) for row in rows]
    return [fill for fill in fills if fill.quantity > 0]


def _implied_positions(session: Session) -> dict[str, float]:
    quantities: dict[str, float] = {}
    for execution in session.scalars(select(ExecutionRow)):
        signed = execution.quantity if execution.side == "BUY" else -execution.quantity
        quantities[execution.symbol] = quantities.get(execution.symbol, 0.0) + signed
    return {symbol: quantity for symbol, quantity in quantities.items() if abs(quantity) > 1e-9}


# --- the books --------------------------------------------------------------------------------------

def _exit_reason(row: OrderRow | None, converted: set[str]) -> str:
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


def _trades(session: Session, now: datetime) -> list[dict]:
    """The books by position: every execution matched FIFO per symbol (core/books.py)."""
    orders = {row.client_order_id: row for row in session.scalars(select(OrderRow))}
    converted = set(session.scalars(select(OrderEventRow.client_order_id).where(
        OrderEventRow.detail.contains("converted"))))
    stops = dict(session.execute(select(DecisionRow.decision_id, DecisionRow.stop)).all())
    executions = session.scalars(select(ExecutionRow).order_by(ExecutionRow.executed_at)).all()
    fills = [Fill(execution_id=e.execution_id, symbol=e.symbol, side=e.side, quantity=e.quantity, price=e.price,
                  commission=e.commission, executed_at=as_utc(e.executed_at),
                  decision_id=orders[e.client_order_id].decision_id if e.client_order_id in orders else "",
                  reason=_exit_reason(orders.get(e.client_order_id), converted))
             for e in executions]
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
    } for trade in match_trades(fills, stops)]


# --- protection: every pipeline position keeps a working stop sized to it --------------------------

@dataclass
class _Protection:
    changes: list[str] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)
    drift: list[str] = field(default_factory=list)
    unprotected: list[str] = field(default_factory=list)


def _working_exits(session: Session, symbol: str, role: str) -> list[OrderRow]:
    """The symbol's working protective orders: confirmed by the broker, and live (a child whose
    entry has not filled at all waits; one whose entry filled in part protects that part)."""
    rows = session.scalars(select(OrderRow).where(
        OrderRow.symbol == symbol, OrderRow.role == role,
        OrderRow.status.not_in((*FINAL_STATUSES, *UNCONFIRMED)))).all()
    live = []
    for row in rows:
        parent = session.get(OrderRow, row.parent_client_order_id) if row.parent_client_order_id else None
        if parent is None or parent.filled_quantity > 0:
            live.append(row)
    return live


def _order_state(row: OrderRow) -> tuple:
    return (row.status, row.quantity, row.filled_quantity, row.order_type, row.price, row.exit_decision_id)


@contextmanager
def _unchanged_under_the_account_lock(session: Session, row: OrderRow, result: _Protection):
    """Hold the account lock the orders step holds while it places, converts a stop into an exit
    or resizes its siblings, and yield whether `row` is still as this sync read it (the database
    read again under the lock). A resize or cancel made outside it races the orders step: an IBKR
    modify repeats every field as read just before, so a resize read before an exit's conversion
    and sent after it turns the exit back into the stop. Changed meanwhile, the order is left to
    the next sync, which reads it afresh. What this session wrote so far is committed first: a
    broker keeping its state in the same database (the paper broker, on SQLite) could not write
    while this session holds the database's lock."""
    session.commit()
    with account_lock(sessionmaker(bind=session.get_bind())):
        read = _order_state(row)
        session.refresh(row)
        unchanged = _order_state(row) == read
        if not unchanged:
            line = (f"{row.client_order_id}: changed while the sync looked at it (now {row.status} "
                    f"{row.order_type} {row.quantity - row.filled_quantity:g}"
                    + (f", the exit of decision {row.exit_decision_id}" if row.exit_decision_id else "")
                    + "); left as it is, the next sync reads it again")
            result.changes.append(line)
        session.commit()
        yield unchanged
        session.commit()  # what the broker answered is recorded before another process may act on the order


def _resize(session: Session, broker: Broker, row: OrderRow, held: float, why: str,
            result: _Protection) -> bool | None:
    """Modify a working exit so that what is left of it equals the position, under the account
    lock. False when the broker refused or does not know the order (drift says so) or cannot
    modify orders (the caller reports the mismatch); None when the order changed since the sync
    read it (an orders step converted or resized it meanwhile): left to the next sync."""
    with _unchanged_under_the_account_lock(session, row, result) as unchanged:
        if not unchanged:
            return None
        return _resize_locked(session, broker, row, held, why, result)


def _resize_locked(session: Session, broker: Broker, row: OrderRow, held: float, why: str,
                   result: _Protection) -> bool:
    """The resize, the account lock held. The order's total is what it filled by now, as the broker
    says (the books lag: a stop elected while the sync runs has sold some already), plus what is held."""
    current = broker.find_order(row.client_order_id)
    if current is not None and current.filled_quantity > row.filled_quantity:
        row.filled_quantity = current.filled_quantity
        row.average_fill_price = current.average_fill_price or row.average_fill_price
    # Never more than it was: the position was read before the broker's fill count, so a fill in
    # between counts twice here (once sold, once held); grown, the stop could sell what is not held.
    new_quantity = min(round(row.filled_quantity + held), round(row.quantity))
    if new_quantity == round(row.quantity):
        return True  # what is left of it is the position already (it filled the difference meanwhile)
    remaining = row.quantity - row.filled_quantity
    symbol = row.symbol
    cannot = (f"{symbol}: the position is {held:g} shares but the {row.role.replace('_', '-')} "
              f"{row.client_order_id} is for {remaining:g}")
    session.commit()
    try:
        answer = broker.modify(row.client_order_id, quantity=new_quantity)
    except OrderRejectedError as refusal:
        result.drift.append(f"{cannot}, and the broker refused to resize it to {held:g} ({refusal.problem}): "
                            f"adjust its quantity at the broker by hand (or close the position); {refusal.fix}")
        return False
    if answer is None:
        result.drift.append(f"{cannot}, and the broker does not know that order: check the position's "
                            "protective orders at the broker")
        return False
    line = f"resized from {remaining:g} to {held:g} shares to match the position ({why})"
    row.quantity = new_quantity
    row.broker_order_id = row.broker_order_id or answer.broker_order_id
    _record_change(session, row, answer.status, f"sync: {line}")
    result.changes.append(f"{row.client_order_id}: {line}")
    result.changed.add(row.client_order_id)
    return True


def _no_position_since(session: Session, broker_name: str, row: OrderRow) -> datetime | None:
    """When the syncs began to find no position for the protective order `row`: the first sync
    after its entry last changed and after the symbol's position was last seen (each sync since
    found none too), or None when no such sync was made yet. This sync is not counted: its
    snapshot is written after the check."""
    entry = row.parent_client_order_id or row.client_order_id
    changed = session.scalar(select(func.max(OrderEventRow.at)).where(OrderEventRow.client_order_id == entry))
    seen = session.scalar(select(func.max(PositionSnapshotRow.taken_at)).where(
        PositionSnapshotRow.broker == broker_name, PositionSnapshotRow.symbol == row.symbol))
    after = max(as_utc(t) for t in (row.created_at, changed, seen) if t is not None)
    first = session.scalar(select(func.min(AccountSnapshotRow.taken_at)).where(
        AccountSnapshotRow.broker == broker_name, AccountSnapshotRow.taken_at > after))
    return as_utc(first) if first is not None else None


def _wrong_side_since(session: Session, broker_name: str, row: OrderRow) -> datetime | None:
    """When the syncs began to find the symbol's position on the side the protective order `row`
    would add to (a position flipped by hand): the first snapshot on that side after its entry
    last changed and after the position was last seen on the side `row` closes, or None."""
    entry = row.parent_client_order_id or row.client_order_id
    changed = session.scalar(select(func.max(OrderEventRow.at)).where(OrderEventRow.client_order_id == entry))
    adds_to = PositionSnapshotRow.quantity < 0 if row.side == "SELL" else PositionSnapshotRow.quantity > 0
    closes = PositionSnapshotRow.quantity > 0 if row.side == "SELL" else PositionSnapshotRow.quantity < 0
    of_symbol = (PositionSnapshotRow.broker == broker_name, PositionSnapshotRow.symbol == row.symbol)
    closed_side_seen = session.scalar(select(func.max(PositionSnapshotRow.taken_at)).where(*of_symbol, closes))
    after = max(as_utc(t) for t in (row.created_at, changed, closed_side_seen) if t is not None)
    first = session.scalar(select(func.min(PositionSnapshotRow.taken_at)).where(
        *of_symbol, adds_to, PositionSnapshotRow.taken_at > after))
    return as_utc(first) if first is not None else None


def _cancel_orphans(session: Session, broker: Broker, symbol: str, rows: list[OrderRow],
                    result: _Protection, contradicted: str | None, flipped: float | None = None) -> None:
    """Working stop-loss and take-profit orders of a symbol the broker reports no position for, or
    (`flipped`: the position held) a position on the side they would add to: each is cancelled
    once that has lasted (ORPHAN_GRACE) and the account does not contradict it
    (`positions_contradicted`), else reported as drift."""
    grace = f"{ORPHAN_GRACE.total_seconds() / 60:g} minutes"
    for row in rows:
        kind = row.role.replace("_", "-")
        what = f"{symbol}: the working {kind} {row.client_order_id} ({row.side} {row.quantity - row.filled_quantity:g})"
        if flipped is not None:
            since = _wrong_side_since(session, broker.name, row)
            if since is None or datetime.now(UTC) - since < ORPHAN_GRACE:
                result.drift.append(f"{what} would add to the position of {flipped:g} shares instead of closing it "
                                    f"(flipped by hand?): a sync {grace} or more after the first one finding it so "
                                    "cancels it if the position is still on that side; cancel it at the broker now "
                                    "and protect the position with a stop on the other side")
                continue
            _cancel_left_over(session, broker, row, what, since, result,
                              f"the {symbol} position has been {flipped:g} shares in the syncs since "
                              f"{since:%Y-%m-%d %H:%M} UTC; filled, this {kind} would have added to it")
            continue
        if contradicted:
            result.drift.append(f"{what} has no position in the broker's answer, but {contradicted}: it is kept "
                                "(cancelling the stop of a position still held would leave it unprotected); check "
                                "the positions at the broker, and cancel it there if the position was closed by hand")
            continue
        since = _no_position_since(session, broker.name, row)
        if since is None or datetime.now(UTC) - since < ORPHAN_GRACE:
            result.drift.append(f"{what} has no position at the broker: a sync {grace} or more after the first one "
                                "finding none cancels it if it finds none either (a position just opened may not be "
                                "listed yet); cancel it at the broker now if the position was closed by hand")
            continue
        _cancel_left_over(session, broker, row, what, since, result,
                          f"no {symbol} position at the broker in the syncs since {since:%Y-%m-%d %H:%M} UTC; "
                          f"filled, this {kind} would have opened a position on the other side")


def _cancel_left_over(session: Session, broker: Broker, row: OrderRow, what: str, since: datetime,
                      result: _Protection, why: str) -> None:
    """Cancel a protective order its position no longer needs (`why`), under the account lock and
    only if the order is still as the sync read it, recording what the broker did."""
    with _unchanged_under_the_account_lock(session, row, result) as unchanged:
        if unchanged:
            _cancel_left_over_locked(session, broker, row, what, since, result, why)


def _cancel_left_over_locked(session: Session, broker: Broker, row: OrderRow, what: str, since: datetime,
                             result: _Protection, why: str) -> None:
    try:
        answer = broker.cancel(row.client_order_id)
    except UserError as error:
        result.drift.append(f"{what} is left over since {since:%Y-%m-%d %H:%M} UTC, and cancelling it failed "
                            f"({error.problem}): cancel it at the broker now; {error.fix}")
        return
    if answer is None:
        result.drift.append(f"{what} is left over since {since:%Y-%m-%d %H:%M} UTC, and the broker does not know "
                            "that order: check the symbol's orders at the broker and cancel it there")
        return
    detail = (f"cancelled by the sync: {why}" if answer.status == "Cancelled"
              else f"{answer.status} when the sync cancelled it: {why}")
    change = f"{row.client_order_id}: {row.status} → {answer.status} ({detail})"
    row.filled_quantity = answer.filled_quantity
    row.average_fill_price = answer.average_fill_price or row.average_fill_price
    _record_change(session, row, answer.status, f"sync: {detail}")
    result.changes.append(change)
    result.changed.add(row.client_order_id)


def _protect_positions(session: Session, broker: Broker, held: dict[str, float],
                       implied: dict[str, float], contradicted: str | None = None) -> _Protection:
    """Compare each position with the stop-loss orders protecting it and fix what can be fixed:
    a stop (and take-profit) larger than the position, once its entry is done (a partial
    take-profit, or a partial entry whose remainder expired or was cancelled), is resized to the
    position, so that it can never trade more than is held; one whose position is gone is
    cancelled. What cannot be fixed is drift; a position the pipeline opened with no working
    stop-loss is reported as unprotected."""
    result = _Protection()
    symbols = {row.symbol for row in session.scalars(select(OrderRow).where(
        OrderRow.role.in_(("stop_loss", "take_profit")), OrderRow.status.not_in(FINAL_STATUSES)))}
    for symbol in sorted(symbols | set(implied)):
        stops = _working_exits(session, symbol, "stop_loss")
        position = abs(held.get(symbol, 0.0))
        closing_side = "SELL" if held.get(symbol, 0.0) > 0 else "BUY"
        wrong_side = [row for row in stops + _working_exits(session, symbol, "take_profit") if row.side != closing_side]
        if position and wrong_side:  # e.g. flipped by hand: what is left working would add to it
            _cancel_orphans(session, broker, symbol, wrong_side, result, None, flipped=held[symbol])
            continue
        covered = sum(row.quantity - row.filled_quantity for row in stops)
        if position == 0:  # e.g. the position closed by hand: what is left working would open one
            _cancel_orphans(session, broker, symbol, stops + _working_exits(session, symbol, "take_profit"), result,
                            contradicted)
            continue
        if not stops:
            if implied.get(symbol):
                result.unprotected.append(
                    f"{symbol}: the pipeline's position of {held[symbol]:g} shares has NO working stop-loss: "
                    "place a protective stop at the broker now (or close the position); the pipeline keeps "
                    "a stop on every position it opened until it is flat")
            continue
        if abs(position - covered) < 1e-9:
            continue
        entries = [session.get(OrderRow, row.parent_client_order_id) for row in stops if row.parent_client_order_id]
        if position < covered and any(e is not None and e.status not in FINAL_STATUSES for e in entries):
            continue  # the entry is still filling: its children are sized to it at the broker
        if position < covered and len(stops) == 1:
            (stop,) = stops
            entry = session.get(OrderRow, stop.parent_client_order_id) if stop.parent_client_order_id else None
            why = (f"entry {entry.client_order_id} {entry.status} with {entry.filled_quantity:g}/{entry.quantity} "
                   "filled" if entry is not None and entry.filled_quantity < entry.quantity
                   else "the position was reduced")
            resized = _resize(session, broker, stop, position, why, result)
            if resized is None:
                continue  # an orders step changed it meanwhile: the next sync looks again
            if resized:
                for target in _working_exits(session, symbol, "take_profit"):
                    if (target.parent_client_order_id == stop.parent_client_order_id
                            and target.quantity - target.filled_quantity > position + 1e-9):
                        _resize(session, broker, target, position, why, result)
                continue
            if any(stop.client_order_id in line for line in result.drift):
                continue  # the broker refused or did not know it: already reported
        result.drift.append(f"{symbol}: the position is {position:g} shares but working stop-loss orders cover "
                            f"{covered:g}: adjust the stop's quantity at the broker (or close the position)")
    result.drift.extend(result.unprotected)
    return result


# --- what each decision's orders became (observations on the `orders` asset) -----------------------

def _changes_since_last_sync(session: Session, broker_name: str, started: datetime) -> list[tuple[str, str]]:
    """Order events written since the previous sync by others than this sync (the orders step
    placing or converting a stop into an exit, the risk gates reading an entry's state): what an
    order became shows on the asset whoever saw it first. (cOID, line) pairs, oldest first."""
    previous = session.scalar(select(func.max(AccountSnapshotRow.taken_at)).where(
        AccountSnapshotRow.broker == broker_name))
    query = select(OrderEventRow).where(OrderEventRow.at < started).order_by(OrderEventRow.id)
    if previous is not None:
        query = query.where(OrderEventRow.at > previous)
    return [(event.client_order_id, f"{event.client_order_id}: {event.status} ({event.detail})")
            for event in session.scalars(query)]


def _order_outcomes(session: Session, changed: set[str], changes: list[str]) -> list[dict]:
    """For each decision with a changed order: its legs' states, fills, average prices and
    commissions, which child filled, and the change lines."""
    if not changed:
        return []
    decision_ids = set(session.scalars(select(OrderRow.decision_id).where(OrderRow.client_order_id.in_(changed))))
    commissions: dict[str, float] = {}
    for execution in session.scalars(select(ExecutionRow)):
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
        filled_child = ", ".join(_exit_reason(leg, converted) if leg.role == "stop_loss" else leg.role
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
    changes, changed = _advance_orders(sessions, broker)
    added = record_executions(sessions, broker)
    account = broker.account(marks, as_of)
    now = datetime.now(UTC)
    drift = []
    with sessions() as session:
        changes_elsewhere = _changes_since_last_sync(session, broker.name, started)
        changed |= {coid for coid, _ in changes_elsewhere}
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
        protection = _protect_positions(session, broker, held, implied, positions_contradicted(account))
        session.commit()
        changes.extend(protection.changes)
        changed |= protection.changed
        drift.extend(protection.drift)
        positions = []
        for symbol, position in sorted(account.positions.items()):
            unrealized = round(position.quantity * (position.market_price - position.average_price), 2)
            stop = _working_exits(session, symbol, "stop_loss")
            positions.append({"symbol": symbol, "quantity": position.quantity,
                              "average_price": position.average_price, "market_price": position.market_price,
                              "market_value": round(position.market_value, 2), "unrealized_pnl": unrealized,
                              "stop": stop[0].price if len(stop) == 1 else None})
            session.add(PositionSnapshotRow(taken_at=now, broker=broker.name, symbol=symbol,
                                            quantity=position.quantity, average_price=position.average_price,
                                            market_price=position.market_price, unrealized_pnl=unrealized))
        session.add(AccountSnapshotRow(taken_at=now, broker=broker.name, equity=account.equity, cash=account.cash,
                                       gross_exposure=account.gross_exposure, daily_pnl=account.daily_pnl,
                                       open_positions=account.open_positions))
        trades = _trades(session, as_utc(as_of) if as_of is not None else now)
        outcomes = _order_outcomes(session, changed, [line for _, line in changes_elsewhere] + changes)
        session.commit()
    return SyncReport(account, changes, added, drift, positions, trades, protection.unprotected, outcomes)
