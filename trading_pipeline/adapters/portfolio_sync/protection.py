"""Every pipeline position keeps a working stop sized to it; a stop-loss or take-profit left with no
position, or on the wrong side of one flipped by hand, is cancelled after ORPHAN_GRACE. Resizes
and cancels run under the account lock, on the order as read again there."""

from __future__ import annotations

from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.broker import FINAL_STATUSES, Broker, as_utc
from trading_pipeline.adapters.portfolio_sync.order_states import record_change, working_exits
from trading_pipeline.adapters.trading_db import (
    AccountSnapshotRow,
    OrderEventRow,
    OrderRow,
    PositionSnapshotRow,
    account_lock,
    of_broker,
)
from trading_pipeline.core.risk import AccountState
from trading_pipeline.errors import OrderRejectedError, UserError

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
class Protection:
    changes: list[str] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)
    drift: list[str] = field(default_factory=list)
    unprotected: list[str] = field(default_factory=list)



def _order_state(row: OrderRow) -> tuple:
    return (row.status, row.quantity, row.filled_quantity, row.order_type, row.price, row.exit_decision_id)


@contextmanager
def _unchanged_under_the_account_lock(session: Session, row: OrderRow, result: Protection):
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
            result: Protection) -> bool | None:
    """Modify a working exit so that what is left of it equals the position, under the account
    lock. False when the broker refused or does not know the order (drift says so) or cannot
    modify orders (the caller reports the mismatch); None when the order changed since the sync
    read it (an orders step converted or resized it meanwhile): left to the next sync."""
    with _unchanged_under_the_account_lock(session, row, result) as unchanged:
        if not unchanged:
            return None
        return _resize_locked(session, broker, row, held, why, result)


def _resize_locked(session: Session, broker: Broker, row: OrderRow, held: float, why: str,
                   result: Protection) -> bool:
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
    except UserError as error:  # an unreadable answer, a gateway fault: said, and the other symbols go on
        result.drift.append(f"{cannot}, and resizing it to {held:g} failed ({error.problem}): adjust its quantity "
                            f"at the broker by hand (or close the position); {error.fix}")
        return False
    if answer is None:
        result.drift.append(f"{cannot}, and the broker does not know that order: check the position's "
                            "protective orders at the broker")
        return False
    line = f"resized from {remaining:g} to {held:g} shares to match the position ({why})"
    row.quantity = new_quantity
    row.broker_order_id = row.broker_order_id or answer.broker_order_id
    record_change(session, row, answer.status, f"sync: {line}")
    result.changes.append(f"{row.client_order_id}: {line}")
    result.changed.add(row.client_order_id)
    return True


def _no_position_since(session: Session, broker: Broker, row: OrderRow) -> datetime | None:
    """When the syncs began to find no position for the protective order `row`: the first sync
    after its entry last changed and after the symbol's position was last seen (each sync since
    found none too), or None when no such sync was made yet. This sync is not counted: its
    snapshot is written after the check. Only this account's syncs count (`of_broker`): another
    account's sync of the same broker (the DU… paper account's, on the live U… account's database)
    found nothing about this account's positions."""
    entry = row.parent_client_order_id or row.client_order_id
    changed = session.scalar(select(func.max(OrderEventRow.at)).where(OrderEventRow.client_order_id == entry))
    seen = session.scalar(select(func.max(PositionSnapshotRow.taken_at)).where(
        of_broker(PositionSnapshotRow, broker), PositionSnapshotRow.symbol == row.symbol))
    after = max(as_utc(t) for t in (row.created_at, changed, seen) if t is not None)
    first = session.scalar(select(func.min(AccountSnapshotRow.taken_at)).where(
        of_broker(AccountSnapshotRow, broker), AccountSnapshotRow.taken_at > after))
    return as_utc(first) if first is not None else None


def _wrong_side_since(session: Session, broker: Broker, row: OrderRow) -> datetime | None:
    """When the syncs began to find the symbol's position on the side the protective order `row`
    would add to (a position flipped by hand): the first snapshot on that side after its entry
    last changed and after the position was last seen on the side `row` closes, or None. This
    account's snapshots only (`of_broker`)."""
    entry = row.parent_client_order_id or row.client_order_id
    changed = session.scalar(select(func.max(OrderEventRow.at)).where(OrderEventRow.client_order_id == entry))
    adds_to = PositionSnapshotRow.quantity < 0 if row.side == "SELL" else PositionSnapshotRow.quantity > 0
    closes = PositionSnapshotRow.quantity > 0 if row.side == "SELL" else PositionSnapshotRow.quantity < 0
    of_symbol = (of_broker(PositionSnapshotRow, broker), PositionSnapshotRow.symbol == row.symbol)
    closed_side_seen = session.scalar(select(func.max(PositionSnapshotRow.taken_at)).where(*of_symbol, closes))
    after = max(as_utc(t) for t in (row.created_at, changed, closed_side_seen) if t is not None)
    first = session.scalar(select(func.min(PositionSnapshotRow.taken_at)).where(
        *of_symbol, adds_to, PositionSnapshotRow.taken_at > after))
    return as_utc(first) if first is not None else None


def _cancel_orphans(session: Session, broker: Broker, symbol: str, rows: list[OrderRow],
                    result: Protection, contradicted: str | None, flipped: float | None = None) -> None:
    """Working stop-loss and take-profit orders of a symbol the broker reports no position for, or
    (`flipped`: the position held) a position on the side they would add to: each is cancelled
    once that has lasted (ORPHAN_GRACE) and the account does not contradict it
    (`positions_contradicted`), else reported as drift."""
    grace = f"{ORPHAN_GRACE.total_seconds() / 60:g} minutes"
    for row in rows:
        kind = row.role.replace("_", "-")
        what = f"{symbol}: the working {kind} {row.client_order_id} ({row.side} {row.quantity - row.filled_quantity:g})"
        if flipped is not None:
            since = _wrong_side_since(session, broker, row)
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
        since = _no_position_since(session, broker, row)
        if since is None or datetime.now(UTC) - since < ORPHAN_GRACE:
            result.drift.append(f"{what} has no position at the broker: a sync {grace} or more after the first one "
                                "finding none cancels it if it finds none either (a position just opened may not be "
                                "listed yet); cancel it at the broker now if the position was closed by hand")
            continue
        _cancel_left_over(session, broker, row, what, since, result,
                          f"no {symbol} position at the broker in the syncs since {since:%Y-%m-%d %H:%M} UTC; "
                          f"filled, this {kind} would have opened a position on the other side")


def _cancel_left_over(session: Session, broker: Broker, row: OrderRow, what: str, since: datetime,
                      result: Protection, why: str) -> None:
    """Cancel a protective order its position no longer needs (`why`), under the account lock and
    only if the order is still as the sync read it, recording what the broker did."""
    with _unchanged_under_the_account_lock(session, row, result) as unchanged:
        if unchanged:
            _cancel_left_over_locked(session, broker, row, what, since, result, why)


def _cancel_left_over_locked(session: Session, broker: Broker, row: OrderRow, what: str, since: datetime,
                             result: Protection, why: str) -> None:
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
    record_change(session, row, answer.status, f"sync: {detail}")
    result.changes.append(change)
    result.changed.add(row.client_order_id)


def protect_positions(session: Session, broker: Broker, held: dict[str, float],
                       implied: dict[str, float], contradicted: str | None = None,
                       unknown: Collection[str] = ()) -> Protection:
    """Compare each position with the stop-loss orders protecting it and fix what can be fixed:
    a stop (and take-profit) larger than the position, once its entry is done (a partial
    take-profit, or a partial entry whose remainder expired or was cancelled), is resized to the
    position, so that it can never trade more than is held; one whose position is gone is
    cancelled. What cannot be fixed is drift; a position the pipeline opened with no working
    stop-loss is reported as unprotected. `held`: the broker's positions; `implied`: the pipeline's
    own, by its books (the open part of the trades its entries opened: shares bought by hand beside
    it need no stop of the pipeline's, and a trade closed by hand is closed there too). `unknown`:
    the orders the broker did not know in this sync (`advance_orders`): a stop the books keep as
    working but the broker no longer knows (a bracket cancelled by hand before a rollover no sync
    saw) protects nothing, and counted it would hide that a later position has no stop."""
    result = Protection()
    symbols = {row.symbol for row in session.scalars(select(OrderRow).where(
        of_broker(OrderRow, broker), OrderRow.role.in_(("stop_loss", "take_profit")),
        OrderRow.status.not_in(FINAL_STATUSES)))}

    def working(symbol: str, role: str) -> list[OrderRow]:  # this broker's only: another's are not its protection
        return working_exits(session, symbol, role, broker=broker)

    for symbol in sorted(symbols | set(implied)):
        stops = working(symbol, "stop_loss")
        position = abs(held.get(symbol, 0.0))
        closing_side = "SELL" if held.get(symbol, 0.0) > 0 else "BUY"
        wrong_side = [row for row in stops + working(symbol, "take_profit") if row.side != closing_side]
        if position and wrong_side:  # e.g. flipped by hand: what is left working would add to it
            _cancel_orphans(session, broker, symbol, wrong_side, result, None, flipped=held[symbol])
            continue
        if position == 0:  # e.g. the position closed by hand: what is left working would open one
            _cancel_orphans(session, broker, symbol, stops + working(symbol, "take_profit"), result,
                            contradicted)
            continue
        stops = [row for row in stops if row.client_order_id not in unknown]
        covered = sum(row.quantity - row.filled_quantity for row in stops)
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
                for target in working(symbol, "take_profit"):
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
