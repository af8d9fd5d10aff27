"""The broker's executions, recorded once each with their commission: those of the pipeline's
orders (`record_executions`) and, in the symbols it trades, those of orders it did not send
(`record_outside_executions`: a position closed by hand in TWS); the positions they imply
(`implied_positions`) and the fills of the pipeline's own orders (`own_fills`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.broker import OUTSIDE_ORDER, Broker, as_utc
from trading_pipeline.adapters.portfolio_sync.order_states import UNCONFIRMED, advance_orders, working_symbols
from trading_pipeline.adapters.trading_db import BrokerAccount, BrokerKey, ExecutionRow, OrderRow, of_broker


def symbols_in_play(sessions: sessionmaker[Session]) -> set[str]:
    """The pipeline's symbols with an order that may still work or a position its executions imply:
    the broker must report positions under these names (IBKR matches them by conid: BRK.B is 'BRK B'
    there), or the sync would find such a position gone and cancel its stop as orphaned. Those of
    every broker in the database: they are read before the broker is made, and a name too many only
    resolves one contract more."""
    with sessions() as session:
        implied = {symbol for name, account in session.execute(select(ExecutionRow.broker, ExecutionRow.account)
                                                               .distinct())
                   for symbol in implied_positions(session, BrokerKey(name, account))}
    return working_symbols(sessions) | implied


def record_executions(sessions: sessionmaker[Session], broker: Broker, *, symbol: str | None = None,
                      client_order_ids: list[str] | None = None) -> int:
    """Record the broker's executions of the pipeline's orders, each once, with what it charged:
    of the orders that filled (of `symbol` only, when given), or of `client_order_ids` (orders just
    placed or changed, whose fill counts may not be recorded yet). IBKR reports an execution before
    it charges it (commission 0 until then): a recorded execution whose commission the broker now
    gives takes it. Returns how many executions were added. Another process may record the same
    executions at the same moment (the sync beside an orders step recording what filled at
    placement, or bringing a symbol up to date before an exit): `_once_more_on_conflict`."""
    return _once_more_on_conflict(_record_executions, sessions, broker, symbol, client_order_ids)


def _once_more_on_conflict(record, *args) -> int:
    """`record(*args)`, made once more when another process wrote one of its executions first (the
    write fails on the execution id; the second pass reads it)."""
    try:
        return record(*args)
    except IntegrityError:
        return record(*args)


def _store(session: Session, execution, client_order_id: str, symbol: str, broker: Broker) -> bool:
    """Record one execution once (True when added). One already recorded takes the commission the
    broker gives now (IBKR charges after the fill), and, booked as outside while the broker had not
    yet tied it to an order of the pipeline's, that order."""
    recorded = session.get(ExecutionRow, execution.execution_id)
    if recorded is None:
        session.add(ExecutionRow(
            execution_id=execution.execution_id, client_order_id=client_order_id, symbol=symbol,
            side=execution.side, quantity=execution.quantity, price=execution.price, broker=broker.name,
            account=broker.account_id,            executed_at=execution.executed_at, commission=execution.commission))
        return True
    if recorded.client_order_id == OUTSIDE_ORDER and client_order_id != OUTSIDE_ORDER:
        recorded.client_order_id = client_order_id  # it is the pipeline's after all
    if execution.commission and recorded.commission != execution.commission:
        recorded.commission = execution.commission
    return False


def _record_executions(sessions: sessionmaker[Session], broker: Broker, symbol: str | None,
                       client_order_ids: list[str] | None) -> int:
    added = 0
    with sessions() as session:
        query = (select(OrderRow).where(OrderRow.filled_quantity > 0) if client_order_ids is None
                 else select(OrderRow).where(OrderRow.client_order_id.in_(client_order_ids)))
        query = query.where(of_broker(OrderRow, broker))  # another broker's orders are not asked of this one
        rows = session.scalars(query if symbol is None else query.where(OrderRow.symbol == symbol)).all()
        for row in rows:
            for execution in broker.executions(row.client_order_id):
                added += _store(session, execution, row.client_order_id, row.symbol, broker)
        session.commit()
    return added


def record_outside_executions(sessions: sessionmaker[Session], broker: Broker) -> int:
    """Record the broker's executions that are none of the pipeline's orders (a sale or purchase
    made by hand in TWS, another program's) in the symbols the pipeline trades, each once with
    its commission (taken when the broker charges it later, as `record_executions` does), under
    client_order_id OUTSIDE_ORDER (""). The books close a pipeline trade they reduce with exit
    reason 'manual' at their real price, and the positions the executions imply agree with the
    broker's again.

    Only symbols the pipeline has orders in, and only executions from the start of its business
    there (its first order, or its first execution when the broker's clock puts that earlier):
    the entry gates place a first entry only while the account holds nothing in the symbol, so
    what was traded before is not the pipeline's business, and a user's trading in other
    symbols never enters its books. A symbol is left for a later pass while any of the
    pipeline's orders there may have fills not attributed to it yet (state unknown or still
    being sent, or a fill count ahead of its recorded executions): such a fill must not be
    booked as outside. Should one still be (a bracket child whose broker id was learnt late),
    `record_executions` gives it to its order once the broker does. Returns how many were added."""
    return _once_more_on_conflict(_record_outside_executions, sessions, broker)


def _record_outside_executions(sessions: sessionmaker[Session], broker: Broker) -> int:
    added = 0
    with sessions() as session:
        orders = session.scalars(select(OrderRow).where(of_broker(OrderRow, broker))).all()
        if not orders:
            return 0
        executed: dict[str, float] = {}
        for coid, quantity in session.execute(select(ExecutionRow.client_order_id, func.sum(ExecutionRow.quantity))
                                              .where(of_broker(ExecutionRow, broker))
                                              .group_by(ExecutionRow.client_order_id)):
            executed[coid] = quantity or 0.0
        start: dict[str, datetime] = {}
        for row in orders:
            created = as_utc(row.created_at)
            start[row.symbol] = min(start.get(row.symbol, created), created)
        for symbol, first in session.execute(
                select(ExecutionRow.symbol, func.min(ExecutionRow.executed_at))
                .where(of_broker(ExecutionRow, broker), ExecutionRow.client_order_id != OUTSIDE_ORDER)
                .group_by(ExecutionRow.symbol)):
            if symbol in start and first is not None:
                start[symbol] = min(start[symbol], as_utc(first))
        unsettled = {row.symbol for row in orders
                     if row.status in UNCONFIRMED
                     or (row.filled_quantity or 0.0) > executed.get(row.client_order_id, 0.0) + 1e-9}
        symbols = sorted(set(start) - unsettled)
        if not symbols:
            return 0
        for execution in broker.outside_executions(symbols, {row.client_order_id for row in orders}):
            begins = start.get(execution.symbol)
            if begins is None or execution.symbol in unsettled or as_utc(execution.executed_at) < begins:
                continue
            added += _store(session, execution, OUTSIDE_ORDER, execution.symbol, broker)
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
    """The fills of the pipeline's orders at this broker for `symbol` since the entry that opened its latest
    position there (all of them when no entry of the pipeline filled), oldest first, after bringing
    the orders up to date with the broker as the sync does (states, fill counts, executions). Their
    signed sum is the position the pipeline holds in the symbol by its own fills; an order whose
    fill count at the broker is ahead of the executions recorded for it counts by its fill count
    (IBKR's trades list is read at most every 5 s, its order states more often).

    Why from the latest entry, not over all history (`implied_positions`): an earlier trade closed
    outside the pipeline (sold by hand in TWS, flipped) leaves its entry in the fills for ever, and
    a manual position closed by a pipeline exit leaves that sale. Summed, they make the pipeline
    hold what it does not: a lagging positions list then 'agrees' with the sum and an exit sells
    into the other side, or an exit of a position the pipeline does hold is refused. The entry gates
    open one pipeline position per symbol at a time (none while one is held or protected), so the
    latest filled entry starts the position held now."""
    advance_orders(sessions, broker, symbol=symbol)
    record_executions(sessions, broker, symbol=symbol)
    with sessions() as session:
        executed: dict[str, float] = {}
        for execution in session.scalars(select(ExecutionRow).where(of_broker(ExecutionRow, broker),
                                                                    ExecutionRow.symbol == symbol)):
            executed[execution.client_order_id] = executed.get(execution.client_order_id, 0.0) + execution.quantity
        rows = session.scalars(select(OrderRow).where(of_broker(OrderRow, broker), OrderRow.symbol == symbol)
                               .order_by(OrderRow.created_at, OrderRow.client_order_id)).all()
        fills = [OwnFill(row.client_order_id, row.role, row.side,
                         max(row.filled_quantity or 0.0, executed.get(row.client_order_id, 0.0))) for row in rows]
    fills = [fill for fill in fills if fill.quantity > 0]
    entries = [index for index, fill in enumerate(fills) if fill.role == "entry"]
    return fills[entries[-1]:] if entries else fills


def implied_positions(session: Session, broker: BrokerAccount) -> dict[str, float]:
    """The positions the executions recorded at `broker` (its account: `of_broker`) imply, by symbol."""
    quantities: dict[str, float] = {}
    for execution in session.scalars(select(ExecutionRow).where(of_broker(ExecutionRow, broker))):
        signed = execution.quantity if execution.side == "BUY" else -execution.quantity
        quantities[execution.symbol] = quantities.get(execution.symbol, 0.0) + signed
    return {symbol: quantity for symbol, quantity in quantities.items() if abs(quantity) > 1e-9}
