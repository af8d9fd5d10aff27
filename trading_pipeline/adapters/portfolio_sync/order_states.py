"""The pipeline's orders brought to the broker's state, and what may still fill.

`advance_orders` moves each open order row to what the broker says (a 'submitting' or 'unknown' row
left by a crash included: found by its cOID, or closed once it clearly never reached the broker;
a DAY order gone after its session expired; one that ended outside the pipeline and is no longer
listed recorded as Cancelled; an `Inactive` one cancelled or cut to its fill). An order the broker
does not find is taken for gone only when the broker says its list of working orders is complete
now (`Broker.order_list_completeness`: IBKR's can miss working orders after hours); otherwise the
row is kept as it is, and keeps holding its symbol.
`with_working_orders` gives the risk gates the orders that may still fill and, by symbol, the
protective orders still working (the position they protect counts as held).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.broker import FINAL_STATUSES, Broker, as_utc, cancel_inactive, describe_expiry, expiry_of
from trading_pipeline.adapters.trading_db import BrokerAccount, OrderEventRow, OrderRow, of_broker
from trading_pipeline.core.market_calendar import periods_closed_between
from trading_pipeline.core.risk import AccountState, WorkingEntry

# An orders step writes 'submitting' and sends within seconds (its HTTP calls time out well before
# this). A row still unknown to the broker after two minutes never reached it (the process died
# before or while sending); a younger one may be in flight, so it is left for the next sync.
SUBMITTING_GRACE = timedelta(minutes=2)
UNCONFIRMED = ("submitting", "unknown")  # states the pipeline wrote without the broker's word
NEVER_REACHED = "never reached the broker (sync)"
# The event of an order the broker refused as a duplicate of its cOID: the broker has (or had) it.
DUPLICATE_ANSWER = "broker answered duplicate cOID; reconciled"


# --- order states -------------------------------------------------------------------------------

def record_change(session: Session, row: OrderRow, status: str, detail: str) -> None:
    row.status = status
    session.add(OrderEventRow(client_order_id=row.client_order_id, status=status, detail=detail))


def _cancel_row(session: Session, row: OrderRow, detail: str) -> str:
    """Record an order the broker no longer lists (or never had) as Cancelled; returns the change line."""
    change = f"{row.client_order_id}: {row.status} → Cancelled ({detail})"
    record_change(session, row, "Cancelled", detail)
    return change


def _day_order_gone(row: OrderRow) -> bool:
    """An unfilled DAY entry (or closing order) whose session has closed."""
    if row.role != "entry" or row.tif != "DAY" or row.filled_quantity:
        return False
    return pd.Timestamp(datetime.now(UTC)) > expiry_of("DAY", as_utc(row.created_at))


def _acknowledged(session: Session, row: OrderRow) -> str | None:
    """Why the broker is known to have received `row`, written without its word, or None: it (or
    its bracket's entry) was answered as a duplicate cOID, or its entry, placed in the same request,
    carries the broker's order id (an acknowledgement that named only the entry)."""
    parent = session.get(OrderRow, row.parent_client_order_id) if row.parent_client_order_id else None
    coids = [row.client_order_id] + ([parent.client_order_id] if parent is not None else [])
    if session.scalar(select(OrderEventRow.id).where(OrderEventRow.client_order_id.in_(coids),
                                                     OrderEventRow.detail == DUPLICATE_ANSWER).limit(1)):
        return f"the broker answered that it has {coids[-1]} (a duplicate cOID)"
    if parent is not None and parent.broker_order_id:
        return f"its entry {parent.client_order_id}, sent in the same request, is at the broker"
    return None


def _last_change(session: Session, row: OrderRow) -> datetime:
    """When the row last changed: its last event (a re-run of the orders step writes 'about to send'
    again, a modification its own) or its creation, whichever is later. A sync that only looks at
    it writes no event, so the grace is never restarted by looking."""
    last_event = session.scalar(select(func.max(OrderEventRow.at)).where(
        OrderEventRow.client_order_id == row.client_order_id)) or row.created_at
    return max(as_utc(last_event), as_utc(row.created_at))


def _kept_line(row: OrderRow, absent: str, why_not: str) -> str:
    return (f"{row.client_order_id}: {row.status}: {absent}, but the broker's list of working orders is not complete "
            f"now ({why_not}); kept as it is (it may be working there, so it still holds {row.symbol})")


def _unconfirmed_not_found(session: Session, broker: Broker, row: OrderRow) -> str:
    """A row written without the broker's word that the broker does not list by its cOID. Its
    executions prove it reached the broker (an order no longer listed after a rollover); with
    none, it never did once the grace period is over and the broker says its list is complete
    (`order_list_completeness`); before that it may still be in flight, and while the list may
    miss working orders (IBKR after hours) its absence proves nothing: taken for never placed, it
    would free its symbol for a second entry beside it. It is then kept (holding its symbol) until
    a sync that reads a complete list, which a row sent after hours meets at the next session's
    open, long past its grace: it is then decided at once.

    One the broker acknowledged (`_acknowledged`) did reach it, and its absence from a list proves
    nothing while IBKR's live orders can miss working orders (after hours): taken for never placed,
    a working stop would be passed over and an exit sent beside it. It is recorded as Cancelled
    only once a whole session has closed since, with no sign of it (that session's syncs read a
    complete list)."""
    executions = broker.executions(row.client_order_id)
    if executions:
        filled = sum(e.quantity for e in executions)
        status = "Filled" if filled >= row.quantity else row.status
        change = (f"{row.client_order_id}: {row.status} → {status} (filled {filled:g}/{row.quantity}: "
                  "found by its executions, no longer listed by the broker)")
        row.filled_quantity = filled
        row.average_fill_price = sum(e.quantity * e.price for e in executions) / filled
        record_change(session, row, status, f"sync: found by its executions ({filled:g} filled)")
        return change
    # Timed from the last attempt (a re-run of the orders step writes 'about to send' again), not
    # from the row's creation: an old row being sent again right now is in flight too.
    since = _last_change(session, row)
    age = datetime.now(UTC) - since
    if (acknowledged := _acknowledged(session, row)) is not None:
        if periods_closed_between(since, datetime.now(UTC), "1d"):
            # A whole session has closed since, but if no sync read a list in it, this one may be
            # the first, after hours: only a complete list says it is gone.
            completeness = broker.order_list_completeness(row.client_order_id)
            if not completeness.complete:
                return _kept_line(row, f"{acknowledged}, but it has not listed it through a whole session since",
                                  completeness.why_not)
            return _cancel_row(session, row, f"sync: {acknowledged}, but it has not listed it through a whole "
                                             "session since, and it has no execution")
        return (f"{row.client_order_id}: {row.status}: {acknowledged}, but it does not list it (after hours IBKR's "
                "live orders can miss working orders); kept as it is until the broker lists it, or recorded as "
                "Cancelled if it is still absent after the next session's close")
    if age >= SUBMITTING_GRACE:
        completeness = broker.order_list_completeness(row.client_order_id)
        if completeness.complete:
            return _cancel_row(session, row, NEVER_REACHED)
        return _kept_line(row, f"not found by the broker {age.total_seconds() / 60:.0f} minutes after it was sent, "
                               "with no execution", completeness.why_not)
    return (f"{row.client_order_id}: {row.status} for {age.total_seconds():.0f}s and not at the broker yet "
            f"(it may be in flight); checked again by the next sync, and recorded as Cancelled if still "
            f"absent after {SUBMITTING_GRACE.total_seconds() / 60:g} minutes")


ENDED_OUTSIDE = ("sync: ended outside the pipeline (cancelled by hand, say) and no longer listed by the broker, "
                 "with no execution")


def _confirmed_not_found(session: Session, broker: Broker, row: OrderRow) -> str:
    """A row the broker confirmed (it has its IBKR order id) that the broker no longer finds, not
    by its list, nor its own status, nor an execution: it ended outside the pipeline (cancelled by
    hand in TWS, say, and a day rollover no sync saw took it off IBKR's list, which covers the
    current day only). Recorded as Cancelled once the broker says its list is complete now and the
    row is older than an order can be in flight (SUBMITTING_GRACE); left open it would count as a
    working entry (`order_working`) and block its symbol for ever. A protective order so closed no
    longer counts as its position's stop: the sync reports that position unprotected while held.
    Otherwise (an incomplete list, a young row, no order id, an execution the lookup missed) it is
    kept as it is, with a line that says so."""
    unknown = f"{row.client_order_id}: {row.status} here but unknown to the broker"
    if not row.broker_order_id:
        return f"{unknown}; check it at the broker"
    age = datetime.now(UTC) - _last_change(session, row)
    if age < SUBMITTING_GRACE:
        return (f"{unknown} for {age.total_seconds():.0f}s; checked again by the next sync, and recorded as "
                f"Cancelled if still absent after {SUBMITTING_GRACE.total_seconds() / 60:g} minutes")
    completeness = broker.order_list_completeness(row.client_order_id)
    if not completeness.complete:
        return _kept_line(row, "the broker does not find it", completeness.why_not) + \
            "; check it at the broker"
    if broker.executions(row.client_order_id):  # it traded, and the lookup did not tie the fills to it
        return f"{unknown}, though it has executions; check it at the broker"
    detail = ENDED_OUTSIDE
    if row.role in PROTECTIVE_ROLES:
        detail += (f"; it no longer protects the {row.symbol} position (one still held is reported with no working "
                   "stop-loss)")
    return _cancel_row(session, row, detail)


def advance_orders(sessions: sessionmaker[Session], broker: Broker, roles: tuple[str, ...] | None = None,
                   symbol: str | None = None) -> tuple[list[str], set[str], set[str]]:
    """Bring the pipeline's open orders at this broker (of these roles, of this symbol: all by
    default; another broker's rows in the same database are left as they are) to the broker's state; returns the change lines, the cOIDs whose state changed, and the cOIDs of the
    open orders the broker does not know (left as they were)."""
    changes, changed, unknown = [], set(), set()
    with sessions() as session:
        query = select(OrderRow).where(of_broker(OrderRow, broker), OrderRow.status.not_in(FINAL_STATUSES))
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
                if parent is not None and parent.status == "Cancelled" and not parent.filled_quantity:
                    changes.append(_cancel_row(session, row, f"sync: cancelled with its parent "
                                                             f"{parent.client_order_id}, which never filled"))
                elif row.status in UNCONFIRMED:
                    changes.append(_unconfirmed_not_found(session, broker, row))
                elif _day_order_gone(row):
                    # IBKR lists only the current session's orders (and a week of executions): a DAY
                    # order absent after its session closed, with no execution, expired unfilled.
                    # Left open, it would block the symbol's next order (order_working) for ever.
                    changes.append(_cancel_row(session, row, "sync: no longer listed by the broker and no execution "
                                                             f"after its DAY session: "
                                                             f"{describe_expiry(as_utc(row.created_at))}"))
                else:
                    changes.append(_confirmed_not_found(session, broker, row))
                if row.status not in FINAL_STATUSES:
                    unknown.add(row.client_order_id)
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
                record_change(session, row, order.status,
                               f"sync: reconciled by cOID, the broker has it ({detail.removeprefix('sync: ')})"
                               if reconciled else detail)
            if (row.status, row.filled_quantity) != before:
                changed.add(row.client_order_id)
        session.commit()
    return changes, changed, unknown


PROTECTIVE_ROLES = ("stop_loss", "take_profit")


def with_working_orders(account: AccountState, sessions: sessionmaker[Session], broker: Broker) -> AccountState:
    """`account` as the entry gates read it: with the pipeline's orders that may still fill, by symbol
    (each decision's first leg, the bracket's entry or the order closing a position; one whose state
    is unknown, 'submitting', counts until the sync reconciles it) and, by symbol, its stop-loss (else take-profit) still working
    (`AccountState.working_protection`), both after asking the broker for their states. The broker's
    positions can lag a fill by seconds: an entry that just filled is no longer working and its
    position may not be listed yet, but its stop works, so the symbol still counts as held. A
    stop whose state the broker has not confirmed yet (an acknowledgement that named only the
    entry, a crash after it) counts too, as an entry whose state is unknown counts as working: it
    may be working, and its entry filled; the sync confirms it or closes it as never placed.

    One the broker does not know, placed longer ago than an order can be in flight
    (SUBMITTING_GRACE), does not count: with a complete list `advance_orders` has just recorded it
    as Cancelled (it ended outside the pipeline); with one that may miss working orders (IBKR after
    hours) the books keep it as it was until a complete list decides, and IBKR's own status of the
    order, asked by its id, answers for a working one (503 only for one that ended before this
    session). Counted, it would hold its symbol as a position for ever."""
    _, _, unknown = advance_orders(sessions, broker, roles=("entry", *PROTECTIVE_ROLES))
    now = datetime.now(UTC)

    def listed_or_young(row: OrderRow) -> bool:
        return row.client_order_id not in unknown or now - as_utc(row.created_at) < SUBMITTING_GRACE

    with sessions() as session:
        protection = {}
        for symbol in sorted(set(session.scalars(select(OrderRow.symbol).where(
                of_broker(OrderRow, broker), OrderRow.role.in_(PROTECTIVE_ROLES),
                OrderRow.status.not_in(FINAL_STATUSES))))):
            live = [row for row in (*working_exits(session, symbol, "stop_loss", unconfirmed=True, broker=broker),
                                    *working_exits(session, symbol, "take_profit", unconfirmed=True,
                                                   broker=broker))
                    if listed_or_young(row)]
            if live:
                row = min(live, key=lambda r: r.status in UNCONFIRMED)  # the broker's word first
                protection[symbol] = WorkingEntry(row.client_order_id, row.side, row.quantity - row.filled_quantity,
                                                  row.price, row.status, row.role)
        return dataclasses.replace(account, working_entries=_working_entries(session, broker), working_protection=protection)


def _working_entries(session: Session, broker: BrokerAccount) -> dict[str, WorkingEntry]:
    rows = session.scalars(select(OrderRow).where(of_broker(OrderRow, broker), OrderRow.role == "entry",
                                                  OrderRow.status.not_in(FINAL_STATUSES))).all()
    return {row.symbol: WorkingEntry(row.client_order_id, row.side, row.quantity - row.filled_quantity,
                                     row.price, row.status)
            for row in rows if row.quantity - row.filled_quantity > 0}



def working_symbols(sessions: sessionmaker[Session], broker: BrokerAccount | None = None) -> set[str]:
    """Symbols with a pipeline order that may still work (the sync marks them and walks their bars):
    at `broker` (its account: `of_broker`), or at any broker when None (the names a broker must report
    positions under, `symbols_in_play`: a superset is harmless there)."""
    query = select(OrderRow.symbol).where(OrderRow.status.not_in(FINAL_STATUSES))
    if broker is not None:
        query = query.where(of_broker(OrderRow, broker))
    with sessions() as session:
        return set(session.scalars(query))


def working_exits(session: Session, symbol: str, role: str, unconfirmed: bool = False, *,
                  broker: BrokerAccount) -> list[OrderRow]:
    """The symbol's working protective orders at `broker` (its account: `of_broker`): confirmed by the broker (or, with `unconfirmed`, also
    written without its word: their state unknown, they may be working), and live (a child whose
    entry has not filled at all waits; one whose entry filled in part protects that part)."""
    rows = session.scalars(select(OrderRow).where(
        of_broker(OrderRow, broker), OrderRow.symbol == symbol, OrderRow.role == role,
        OrderRow.status.not_in(FINAL_STATUSES if unconfirmed else (*FINAL_STATUSES, *UNCONFIRMED)))).all()
    live = []
    for row in rows:
        parent = session.get(OrderRow, row.parent_client_order_id) if row.parent_client_order_id else None
        if parent is None or parent.filled_quantity > 0:
            live.append(row)
    return live
