"""Brokers behind one small interface: the embedded paper broker here, IBKR in adapters/ibkr.

The paper broker simulates the broker side in the trading database. It accepts orders (rejecting
a client order id it has seen, as IBKR does) and leaves them working: nothing fills when an order
is placed. Fills come later, from the daily bars the portfolio sync walks (`simulate_fills`),
by the rules of core/fills.py (the same function the backtest uses): entries fill in the sessions
they were live in, DAY orders expire at the close of their first session, the stop-loss and
take-profit children go live with their parent's fill. Each fill is charged its commission
(core/costs.py) and stop and market fills their slippage.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import pandas as pd
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.trading_db import PaperFillRow, PaperOrderRow
from trading_pipeline.core import market_calendar
from trading_pipeline.core.analysis import OrderLeg
from trading_pipeline.core.costs import COMMISSION_MODELS
from trading_pipeline.core.fills import (
    ORDER_TYPES,
    TIME_IN_FORCE,
    BarOutcome,
    Bracket,
    Leg,
    bracket_on_bar,
    daily_bars,
    expiry_of,
    expiry_reason,
    first_live_session,
)
from trading_pipeline.core.risk import AccountState, Mark, Position
from trading_pipeline.errors import ConfigError, OrderRejectedError, UserError


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
    commission: float = 0.0  # what the broker charged for it, fees included


@dataclass(frozen=True)
class OrderListCompleteness:
    """Whether the broker's list of working orders (what `find_order` reads) is complete right now:
    an order it does not find, with no execution, is then not working there. When it is not (IBKR
    outside the regular session: its live orders can miss working orders), `why_not` says why and
    when it will be complete again; the sync then takes an absence as proof of nothing."""

    complete: bool
    why_not: str = ""


LIST_COMPLETE = OrderListCompleteness(True)


class Broker(Protocol):
    name: str

    @property
    def account_id(self) -> str | None:
        """The account this broker trades, written on every order and execution it has
        (`OrderRow.account`) and read by `trading_db.of_broker`: IBKR's account id (DU… paper, U…
        live); None for the paper broker (one simulated account per trading database)."""
        ...

    def account(self, marks: dict[str, Mark], as_of: datetime | None = None) -> AccountState:
        """Equity, cash, positions (valued at `marks`, the latest closed daily bars) and today's
        P&L. `as_of` is the decision's point in time: the paper broker leaves out later fills (a
        replay must not see its own future); a real broker only knows the present and ignores it."""
        ...

    def find_order(self, client_order_id: str) -> BrokerOrder | None: ...

    def order_list_completeness(self, client_order_id: str | None = None) -> OrderListCompleteness:
        """Whether an order `find_order` just did not find is not working at the broker: the one
        way the sync may learn that an order it has no word of (answer lost, cancelled by hand and
        no longer listed) is gone, rather than hidden from an incomplete list. With
        `client_order_id`, also whether every lookup of that order `find_order` made answered
        (one that failed proves nothing)."""
        ...

    def place(self, symbol: str, legs: list[OrderLeg], reference_price: float,
              placed_at: datetime | None = None) -> list[BrokerOrder]:
        """Send the legs as one order (a bracket when there are children). `placed_at` is the
        decision's point in time; a real broker ignores it, the paper broker stamps with it."""
        ...

    def executions(self, client_order_id: str) -> list[BrokerExecution]: ...

    def outside_executions(self, symbols: Collection[str],
                           own_client_order_ids: Collection[str]) -> list[BrokerExecution]:
        """The executions at the broker in `symbols` that belong to none of the pipeline's orders
        (`own_client_order_ids`): trades made by hand (in TWS) or by another program, reported with
        client_order_id "" (OUTSIDE_ORDER). The portfolio sync books them, so that a position the
        pipeline opened and the user closed by hand is closed in its books too."""
        ...

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

# The client order id of an execution that is none of the pipeline's orders (a trade made by hand
# in TWS): in `BrokerExecution` and in the `executions` table (no order row has it).
OUTSIDE_ORDER = ""


def cancel_inactive(broker: Broker, order: BrokerOrder) -> BrokerOrder:
    """An order the broker reports Inactive, cancelled so that it is done: the pipeline counts
    Inactive as final, but IBKR's Inactive is a rejection *or an order held*, and a held order that
    became active again would trade beside what the pipeline does next (a second entry, a second
    exit). What the cancel gave, or the Inactive order; `detail` says which.

    One that filled in part is cut to what it filled instead (a modification of its quantity),
    never cancelled: cancelling a bracket's entry cancels its stop-loss and take-profit with it
    (IBKR's rule), and those protect the part filled. If the broker will not cut it, it is left."""
    why = "Inactive at the broker (rejected or held)"
    if order.filled_quantity > 0:
        return _cut_to_filled(broker, order, why)
    try:
        answer = broker.cancel(order.client_order_id)
    except UserError as error:
        return dataclasses.replace(order, detail=f"{why}; cancelling it failed ({error.problem}): check the order "
                                                 "at the broker and cancel it there if it is held")
    if answer is not None and answer.status == "Cancelled":
        return dataclasses.replace(answer, detail=f"{why}; cancelled so that it cannot become active again")
    return dataclasses.replace(order, detail=f"{why}; the cancel sent left it "
                                             f"{answer.status if answer else 'unknown to the broker'}")


def _cut_to_filled(broker: Broker, order: BrokerOrder, why: str) -> BrokerOrder:
    filled = int(order.filled_quantity)
    why = f"{why} after filling {order.filled_quantity:g}"
    kept = (f"NOT cancelled: that would cancel the stop-loss protecting the {order.filled_quantity:g} filled "
            f"(a bracket is cancelled with its entry); reduce its quantity to {filled} at the broker so that "
            "its rest cannot become active again")
    try:
        answer = broker.modify(order.client_order_id, quantity=filled)
    except UserError as error:
        return dataclasses.replace(order, detail=f"{why}; cutting it to what it filled failed ({error.problem}); "
                                                 f"{kept}")
    if answer is not None and answer.status == "Filled":
        return dataclasses.replace(answer, detail=f"{why}; cut to the {filled} filled so that its rest cannot "
                                                  "become active again (not cancelled: its stop-loss protects them)")
    return dataclasses.replace(order, detail=f"{why}; cutting it to what it filled left it "
                                             f"{answer.status if answer else 'unknown to the broker'}; {kept}")


PAPER_TIME_IN_FORCE = TIME_IN_FORCE
PAPER_MIN_TICK = 0.01


def _utcnow() -> datetime:  # one place to travel in time in tests
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite drops the zone



def describe_expiry(placed_at: datetime) -> str:
    """Why a DAY order placed at `placed_at` is gone unfilled."""
    return expiry_reason(expiry_of("DAY", placed_at))


@functools.lru_cache(maxsize=1)
def _session_closes() -> pd.DatetimeIndex:
    return pd.DatetimeIndex(market_calendar.calendar().schedule["close"]).tz_convert("UTC")


def previous_close_time(as_of: datetime) -> pd.Timestamp:
    """The close the day's P&L is measured from: that of the session before the latest session
    closed by `as_of` (the session whose close a Mark's `previous_close` is)."""
    closes = _session_closes()
    latest = closes.searchsorted(pd.Timestamp(as_of), side="right") - 1
    return closes[latest - 1]


# --- The paper broker -----------------------------------------------------------------------------

class PaperBroker:
    name = "paper"
    account_id = None  # one simulated account per trading database: its rows' account is NULL

    def __init__(self, sessions: sessionmaker[Session], starting_equity: float,
                 commission_model: str = "ibkr_fixed", slippage_bps: float = 0.0,
                 clock: Callable[[], datetime] | None = None):
        """`clock` says what time it is for placements without `placed_at` and for
        modifications: the real clock unless the deployment simulates one (TRADING_AS_OF)."""
        if commission_model not in COMMISSION_MODELS:
            raise ConfigError(f"TRADING_PAPER_COMMISSION={commission_model!r} is not a known commission model",
                              f"set TRADING_PAPER_COMMISSION to one of: {', '.join(COMMISSION_MODELS)} "
                              "(default ibkr_fixed), or unset it")
        if not (math.isfinite(slippage_bps) and slippage_bps >= 0):
            raise ConfigError(f"TRADING_PAPER_SLIPPAGE_BPS={slippage_bps!r} is not a slippage in basis points",
                              "set TRADING_PAPER_SLIPPAGE_BPS to a number >= 0 (e.g. 5 for 0.05%), or unset it for 0")
        self._sessions = sessions
        self._starting_equity = starting_equity
        self.commission_model = commission_model
        self.slippage_bps = slippage_bps
        self._clock = clock

    def _now(self) -> datetime:
        return self._clock() if self._clock is not None else _utcnow()

    @staticmethod
    def _as_broker_order(row: PaperOrderRow) -> BrokerOrder:
        return BrokerOrder(row.client_order_id, str(row.broker_order_id), row.status,
                           row.filled_quantity, row.average_fill_price, row.detail or "")

    def _row(self, session: Session, client_order_id: str) -> PaperOrderRow | None:
        return session.scalar(select(PaperOrderRow).where(PaperOrderRow.client_order_id == client_order_id))

    def find_order(self, client_order_id: str) -> BrokerOrder | None:
        with self._sessions() as session:
            row = self._row(session, client_order_id)
            return self._as_broker_order(row) if row else None

    def min_tick(self, symbol: str) -> float:
        return PAPER_MIN_TICK

    def order_list_completeness(self, client_order_id: str | None = None) -> OrderListCompleteness:
        """Always complete: the paper broker's orders are rows of the trading database."""
        return LIST_COMPLETE

    def cancel(self, client_order_id: str) -> BrokerOrder | None:
        """Cancel a working order; an unfilled parent takes its waiting children with it (as at
        IBKR: they can no longer go live)."""
        with self._sessions() as session:
            row = self._row(session, client_order_id)
            if row is None:
                return None
            if row.status not in FINAL_STATUSES:
                row.status, row.detail = "Cancelled", "cancelled on request"
                if row.filled_quantity == 0:
                    for child in session.scalars(select(PaperOrderRow).where(
                            PaperOrderRow.parent_broker_order_id == row.broker_order_id,
                            PaperOrderRow.status.not_in(FINAL_STATUSES))):
                        child.status = "Cancelled"
                        child.detail = f"cancelled with its parent {row.client_order_id}: cancelled on request"
                session.commit()
            return self._as_broker_order(row)

    @staticmethod
    def _check_price(order_type: str, price: float | None) -> None:
        if order_type not in ORDER_TYPES:
            raise PaperOrderRejected(f"the paper broker does not support the order type {order_type}",
                                     f"use one of {', '.join(ORDER_TYPES)}")
        if order_type == "MKT" and price is not None:
            raise PaperOrderRejected("a market order has no price", "send MKT with price None")
        if order_type != "MKT" and (price is None or not math.isfinite(price) or price <= 0):
            raise PaperOrderRejected(f"a {order_type} order needs a positive price, not {price!r}",
                                     "give the order its limit or stop price")

    def place(self, symbol: str, legs: list[OrderLeg], reference_price: float,
              placed_at: datetime | None = None) -> list[BrokerOrder]:
        """Accept the legs as working orders; nothing fills here (`simulate_fills` fills them on
        later bars). `reference_price` is not used: whether a limit is marketable is for the
        market after `placed_at` to say, not for the last close the decision was made from."""
        unsupported = sorted({leg.tif for leg in legs} - set(PAPER_TIME_IN_FORCE))
        if unsupported:
            raise PaperOrderRejected(f"the paper broker does not support time in force {', '.join(unsupported)}",
                                     f"use one of {', '.join(PAPER_TIME_IN_FORCE)} (orders.tif in the strategies file)")
        for leg in legs:
            self._check_price(leg.order_type, None if leg.order_type == "MKT" else leg.price)
        now = placed_at or self._now()
        with self._sessions() as session:
            try:
                parent_id = None
                rows = []
                for leg in legs:
                    row = PaperOrderRow(
                        client_order_id=leg.client_order_id, parent_broker_order_id=parent_id,
                        symbol=symbol, side=leg.side, order_type=leg.order_type, quantity=leg.quantity,
                        price=None if leg.order_type == "MKT" else leg.price, tif=leg.tif,
                        status="PreSubmitted" if parent_id else "Submitted", filled_quantity=0.0,
                        created_at=now, live_since=None if parent_id else now)
                    session.add(row)
                    session.flush()
                    parent_id = parent_id or row.broker_order_id
                    rows.append(row)
                session.commit()
            except IntegrityError:
                session.rollback()
                raise DuplicateOrderError(legs[0].client_order_id) from None
            return [self._as_broker_order(row) for row in rows]

    def modify(self, client_order_id: str, *, order_type: str | None = None, price: float | None = None,
               quantity: int | None = None) -> BrokerOrder | None:
        """Change a working order in place. It works from the change on, for fills as for a new
        order: a stop turned into a market order at t fills at the open of the first session that
        starts after t, or at the close of the session in progress at t. It stays in its bracket
        (one-cancels-other with its siblings) and keeps its time in force and DAY expiry."""
        with self._sessions() as session:
            row = self._row(session, client_order_id)
            if row is None:
                return None
            if row.status in FINAL_STATUSES:
                return self._as_broker_order(row)
            new_type = order_type or row.order_type
            new_price = price if (price is not None or order_type == "MKT") else row.price
            self._check_price(new_type, new_price)
            new_quantity = row.quantity if quantity is None else quantity
            if new_quantity <= 0 or new_quantity < row.filled_quantity:
                raise PaperOrderRejected(
                    f"{client_order_id}: quantity {new_quantity} is below the {row.filled_quantity:g} already filled",
                    f"give a quantity of at least {max(row.filled_quantity, 1):g}")
            row.order_type, row.price, row.quantity = new_type, new_price, new_quantity
            if row.live_since is not None:
                row.live_since = self._now()
            if row.filled_quantity >= row.quantity:
                row.status = "Filled"
            session.commit()
            return self._as_broker_order(row)

    def executions(self, client_order_id: str) -> list[BrokerExecution]:
        with self._sessions() as session:
            rows = session.execute(
                select(PaperFillRow, PaperOrderRow.client_order_id)
                .join(PaperOrderRow, PaperFillRow.broker_order_id == PaperOrderRow.broker_order_id)
                .where(PaperOrderRow.client_order_id == client_order_id)).all()
            return [BrokerExecution(f"paper-{fill.id}", coid, fill.symbol, fill.side, fill.quantity, fill.price,
                                    as_utc(fill.executed_at), fill.commission) for fill, coid in rows]

    def outside_executions(self, symbols: Collection[str],
                           own_client_order_ids: Collection[str]) -> list[BrokerExecution]:
        """None: nothing trades at the paper broker but the pipeline's own orders."""
        return []

    def open_orders(self) -> list[BrokerOrder]:
        with self._sessions() as session:
            rows = session.scalars(select(PaperOrderRow).where(PaperOrderRow.status.not_in(FINAL_STATUSES))
                                   .order_by(PaperOrderRow.broker_order_id)).all()
            return [self._as_broker_order(row) for row in rows]

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

    # --- fills from daily bars ---

    def simulate_fills(self, daily_bars_by_symbol: dict[str, pd.DataFrame]) -> list[str]:
        """Advance the working orders through the daily bars (indexed by session open, as every
        source's), bracket by bracket, with `core.fills.bracket_on_bar`: the rules are there.
        A bracket is left as it is when the bars start after the session one of its orders went
        live in (its fills would be guessed). Re-walking bars an order has already been through
        changes nothing: an order still working did not fill on them. Returns what happened."""
        happened = []
        with self._sessions() as session:
            working = session.scalars(select(PaperOrderRow).where(PaperOrderRow.status.not_in(FINAL_STATUSES))
                                      .order_by(PaperOrderRow.broker_order_id)).all()
            for symbol in sorted({row.symbol for row in working}):
                frame = daily_bars_by_symbol.get(symbol)
                if frame is None or frame.empty:
                    continue
                groups: dict[int, list[PaperOrderRow]] = {}
                for row in working:
                    if row.symbol == symbol:
                        groups.setdefault(row.parent_broker_order_id or row.broker_order_id, []).append(row)
                brackets: dict[int, Bracket] = {}
                for root, rows in groups.items():
                    uncovered = [row for row in rows if not self._covered(row, frame.index[0])]
                    if uncovered:
                        happened += [f"{row.client_order_id} not advanced: the {symbol} daily bars start on "
                                     f"{frame.index[0].date()}, after the session it went live in" for row in uncovered]
                        continue
                    parent = next((row for row in rows if row.broker_order_id == root), None)
                    brackets[root] = Bracket(self._leg(parent) if parent else None,
                                             tuple(self._leg(row) for row in rows if row is not parent))
                rows_by_key = {row.client_order_id: row for row in working if row.symbol == symbol}
                for bar in daily_bars(frame):
                    for root in list(brackets):
                        outcome = bracket_on_bar(brackets[root], bar, slippage_bps=self.slippage_bps,
                                                 commission_model=self.commission_model)
                        happened += self._record(session, outcome, rows_by_key, bar.start)
                        brackets[root] = outcome.bracket
                        if outcome.done:
                            del brackets[root]
            session.commit()
        return happened

    @staticmethod
    def _leg(row: PaperOrderRow) -> Leg:
        expires_at = expiry_of(row.tif, as_utc(row.created_at))
        return Leg(row.client_order_id, row.side, row.order_type, row.quantity - row.filled_quantity, row.price,
                   as_utc(row.live_since) if row.live_since else None,
                   expires_at.to_pydatetime() if expires_at is not None else None)

    @staticmethod
    def _covered(row: PaperOrderRow, first_bar: pd.Timestamp) -> bool:
        """Whether the bars reach back to the session the order went live in (a child waiting for
        its parent is judged with the parent)."""
        if row.live_since is None:
            return True
        session_open = market_calendar.calendar().session_open(first_live_session(as_utc(row.live_since)))
        return first_bar <= session_open

    @staticmethod
    def _record(session: Session, outcome: BarOutcome, rows: dict[str, PaperOrderRow],
                bar_start: datetime) -> list[str]:
        lines = []
        day = pd.Timestamp(bar_start).tz_convert("America/New_York").date()
        for fill in outcome.fills:
            row = rows[fill.key]
            filled = row.filled_quantity + fill.quantity
            row.average_fill_price = round(
                ((row.average_fill_price or 0.0) * row.filled_quantity + fill.price * fill.quantity) / filled, 4)
            row.filled_quantity = filled
            row.status = "Filled" if filled >= row.quantity - 1e-9 else row.status
            if fill.detail:
                row.detail = fill.detail
            session.add(PaperFillRow(broker_order_id=row.broker_order_id, symbol=row.symbol, side=row.side,
                                     quantity=fill.quantity, price=fill.price, commission=fill.commission,
                                     executed_at=pd.Timestamp(fill.at).to_pydatetime()))
            lines.append(f"{row.client_order_id} {row.side} {fill.quantity:g} {row.symbol} filled at "
                         f"{fill.price:.2f} on the bar of {day}")
        for key, live_since in outcome.went_live:
            row = rows[key]
            row.live_since = pd.Timestamp(live_since).to_pydatetime()
            if row.status == "PreSubmitted":
                row.status = "Submitted"  # children work once their parent filled
        for key, left in outcome.reduced:
            rows[key].quantity = rows[key].filled_quantity + left
        for cancelled in outcome.cancelled:
            row = rows[cancelled.key]
            row.status, row.detail = "Cancelled", cancelled.reason
            lines.append(f"{row.client_order_id} cancelled: {cancelled.reason}")
        session.flush()
        return lines

    # --- the account ---

    def account(self, marks: dict[str, Mark], as_of: datetime | None = None) -> AccountState:
        """Cash and positions from the fills up to `as_of` (default now), commissions charged.

        Every held position is valued at its mark (the latest closed daily close); one without a
        mark at its average price, and listed in `unmarked`. Today's P&L is the change of the
        account's value since the previous close (`previous_close_time`): positions held then
        count from their mark's previous close (their average price when it is not known), those
        opened since from their fill, and what was sold since at its fill price, net of the
        commissions paid since. Without closes since the fills it is realized P&L + unrealized
        change, as a statement would show it."""
        bad = [symbol for symbol, mark in marks.items() if not isinstance(mark, Mark)]
        if bad:
            raise TypeError(f"account() takes marks as core.risk.Mark values; got {marks[bad[0]]!r} for {bad[0]}")
        as_of = as_utc(as_of) if as_of is not None else self._now()
        reference_time = previous_close_time(as_of)
        with self._sessions() as session:
            fills = session.scalars(select(PaperFillRow).order_by(PaperFillRow.id)).all()
        fills = sorted((f for f in fills if as_utc(f.executed_at) <= as_of),
                       key=lambda f: (as_utc(f.executed_at), f.id))
        book = _Book(self._starting_equity)
        reference = None
        for fill in fills:
            if reference is None and as_utc(fill.executed_at) > reference_time:
                reference = book.copy()
            book.apply(fill.symbol, fill.quantity if fill.side == "BUY" else -fill.quantity, fill.price,
                       fill.commission)
        reference = reference or book.copy()

        positions, unmarked = {}, []
        for symbol, quantity in book.quantities.items():
            if quantity == 0:
                continue
            average = book.average(symbol)
            mark = marks.get(symbol)
            if mark is None:
                unmarked.append(symbol)
            positions[symbol] = Position(quantity, round(average, 4), mark.price if mark else average)
        equity = book.cash + sum(p.market_value for p in positions.values())
        value_then = reference.cash
        for symbol, quantity in reference.quantities.items():
            mark = marks.get(symbol)
            known = mark is not None and mark.previous_close is not None
            value_then += quantity * (mark.previous_close if known else reference.average(symbol))
        return AccountState(equity=round(equity, 2), cash=round(book.cash, 2), positions=positions,
                            daily_pnl=round(equity - value_then, 2), unmarked=tuple(sorted(unmarked)))


class _Book:
    """Cash and average-cost positions, fill by fill."""

    def __init__(self, cash: float):
        self.cash = cash
        self.quantities: dict[str, float] = {}
        self.costs: dict[str, float] = {}

    def copy(self) -> _Book:
        other = _Book(self.cash)
        other.quantities, other.costs = dict(self.quantities), dict(self.costs)
        return other

    def average(self, symbol: str) -> float:
        held = self.quantities.get(symbol, 0.0)
        return self.costs.get(symbol, 0.0) / held if held else 0.0

    def apply(self, symbol: str, signed: float, price: float, commission: float) -> None:
        self.cash -= signed * price + commission
        held = self.quantities.get(symbol, 0.0)
        if held and (held > 0) != (signed > 0):  # reducing: the rest keeps its average price
            closed = min(abs(signed), abs(held))
            average = self.average(symbol)
            remaining = held + (closed if held < 0 else -closed)
            opened = signed + (closed if signed < 0 else -closed)  # beyond flat: a new position at this price
            self.costs[symbol] = average * remaining + opened * price
        else:
            self.costs[symbol] = self.costs.get(symbol, 0.0) + signed * price
        self.quantities[symbol] = held + signed
