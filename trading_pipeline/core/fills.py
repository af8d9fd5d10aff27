"""When, and at what price, a daily bar fills an order: the one implementation of the paper fill
rules, used by the paper broker (adapters/broker.py) and by the backtest. Pure: plain values in,
plain values out; no database, no clock.

The rules (a daily bar has four prices and no order of events inside it, so each rule takes the
reading that does not flatter the strategy, and never a price seen before the order was live):
- An order works from its `live_since`: its placement, the moment it was modified, or (a bracket's
  child) its parent's fill. A bar that closed by then cannot fill it.
- A bar that started at or after `live_since` fills a limit or a stop at its price when its range
  reaches it, or at the open when the market opened beyond it (a gap: better than a limit, worse
  than a stop), and a market order at the open.
- A bar already in progress at `live_since` (placed or modified during the session) fills a limit
  or stop only at its own price (the open happened before the order existed), and a market order
  at the session's close: the first price known to come after it.
- When the entry fills, the rest of that bar happens after the fill: the stop-loss counts on the
  entry's fill bar. The take-profit counts on it only when the entry filled at the open (then the
  whole bar's range came after the fill); after a fill inside the bar, the high may have come
  before it, so the target works from the next bar.
- The children of a bracket are one-cancels-other. A child filled at the open comes first (the
  open is the bar's first trade); otherwise a bar that reaches both the stop and the target takes
  the stop. A fill of one reduces the others by its quantity; one left with nothing is cancelled.
- A DAY order stops working at the close of its first live session (`expiry_of`); a parent that
  expires takes its waiting children with it.
- Stop and market fills pay `slippage_bps` basis points (a buy higher, a sell lower), the slipped
  price rounded to the cent against the order; limits fill at their price or better. Every fill carries its commission (core/costs.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime

import pandas as pd

from trading_pipeline.core import costs, market_calendar

ORDER_TYPES = ("LMT", "STP", "MKT")
TIME_IN_FORCE = ("DAY", "GTC")
AT_OPEN, INSIDE_BAR, AT_CLOSE = 0, 1, 2  # when in the bar a fill happened, for ordering siblings


# --- Sessions -------------------------------------------------------------------------------------

def first_live_session(placed_at: datetime) -> pd.Timestamp:
    """The XNYS session an order placed at `placed_at` first works in: the session in progress,
    else the next one (placed after Friday's close: Monday's, or the session after a holiday)."""
    return market_calendar.first_live_session(placed_at)[0]


def expiry_of(tif: str, placed_at: datetime) -> pd.Timestamp | None:
    """When an unfilled order stops working: a DAY order at the close of its first live session,
    a GTC order never."""
    if tif == "GTC":
        return None
    if tif == "DAY":
        return market_calendar.first_live_session(placed_at)[1]
    raise ValueError(f"the paper broker knows the time in force {TIME_IN_FORCE}, not {tif!r}")


def expiry_reason(expires_at: datetime) -> str:
    day = pd.Timestamp(expires_at).tz_convert("America/New_York").date()
    return f"DAY order expired unfilled at the close of {day}"


# --- One order against one bar ----------------------------------------------------------------------

@dataclass(frozen=True)
class DailyBar:
    """One session's bar: `start` is the session open (how every source stamps daily bars), `end`
    its close (early closes included)."""

    start: datetime
    end: datetime
    open: float
    high: float
    low: float
    close: float


def daily_bars(frame: pd.DataFrame) -> list[DailyBar]:
    """A daily OHLC frame indexed by session open, as DailyBars in time order (times as plain
    datetimes: comparing them is several times faster than comparing pandas Timestamps)."""
    ends = market_calendar.bar_close_times(frame.index, "1d")
    return [DailyBar(start.to_pydatetime(), end.to_pydatetime(), float(o), float(h), float(low), float(c))
            for start, end, o, h, low, c in zip(frame.index, ends, frame["open"], frame["high"], frame["low"],
                                                frame["close"])]


def _executes_at_or_below(side: str, order_type: str) -> bool:
    """A buy limit and a sell stop execute once the market comes down to their price; a sell
    limit and a buy stop once it comes up to it."""
    return (side == "BUY") != (order_type == "STP")


def trades_through(side: str, order_type: str, price: float, bar: DailyBar) -> bool:
    """Whether the bar's range reaches the order's price from the side that executes it."""
    if _executes_at_or_below(side, order_type):
        return bar.low <= price
    return bar.high >= price


def fill_price(side: str, order_type: str, price: float, bar: DailyBar) -> float | None:
    """Where a bar that started while a limit or stop order was working fills it (before
    slippage), or None. A gap through the price fills at the open: better than a limit, worse
    than a stop."""
    if not trades_through(side, order_type, price, bar):
        return None
    return min(bar.open, price) if _executes_at_or_below(side, order_type) else max(bar.open, price)


def slipped(side: str, price: float, slippage_bps: float) -> float:
    """`price` moved against the order by `slippage_bps` basis points, then to the cent against the
    order too (a buy up, a sell down): rounded to the nearest cent, 5 bps of a price under $10 (less
    than half a cent) vanished, and above that up to half a cent of the slippage went unpaid."""
    if side == "BUY":
        return math.ceil(round(price * (1 + slippage_bps / 10_000) * 100, 6)) / 100
    return math.floor(round(price * (1 - slippage_bps / 10_000) * 100, 6)) / 100


@dataclass(frozen=True)
class Leg:
    """A working order. `quantity` is what is left to fill; `price` is None for a market order;
    `live_since` None means a bracket child still waiting for its parent to fill; `expires_at`
    (from `expiry_of`) None means good till cancelled. Times are aware datetimes; plain ones
    compare faster than pandas Timestamps (a backtest calls this for every bar of every trade)."""

    key: str
    side: str
    order_type: str
    quantity: float
    price: float | None
    live_since: datetime | None
    expires_at: datetime | None = None


@dataclass(frozen=True)
class LegFill:
    key: str
    quantity: float
    price: float
    at: datetime
    commission: float
    detail: str = ""
    when: int = INSIDE_BAR  # AT_OPEN, INSIDE_BAR or AT_CLOSE


def leg_fill(leg: Leg, bar: DailyBar, *, slippage_bps: float, commission_model: str) -> LegFill | None:
    """Whether, when and at what price `bar` fills the whole of `leg` (see the module's rules).
    The fill is stamped at the bar's start, at `live_since` for an order that went live during
    the session, at the close for a market order filled there."""
    live = leg.live_since
    if live is None or bar.end <= live or (leg.expires_at is not None and bar.start >= leg.expires_at):
        return None
    detail = ""
    if bar.start >= live:  # the whole bar came after the order went live
        if leg.order_type == "MKT":
            price, at, when = bar.open, bar.start, AT_OPEN
        else:
            price = fill_price(leg.side, leg.order_type, leg.price, bar)
            if price is None:
                return None
            at, when = bar.start, AT_OPEN if price == bar.open else INSIDE_BAR
    elif leg.order_type == "MKT":  # live during the session: the close is the first price known after
        price, at, when = bar.close, bar.end, AT_CLOSE
        detail = (f"market order live since {pd.Timestamp(live).isoformat()}, during the session: filled at "
                  f"the session's close, the first price known after it went live")
    else:
        if not trades_through(leg.side, leg.order_type, leg.price, bar):
            return None
        price, at, when = leg.price, live, INSIDE_BAR
    if leg.order_type in ("STP", "MKT") and slippage_bps:
        price = slipped(leg.side, price, slippage_bps)
    price = round(price, 2)
    return LegFill(leg.key, leg.quantity, price, at,
                   costs.commission(commission_model, leg.side, leg.quantity, price), detail, when)


# --- A bracket against one bar ----------------------------------------------------------------------

@dataclass(frozen=True)
class Bracket:
    """The working orders of one bracket: `parent` while it is working (None once filled, and for
    children whose parent filled earlier), `children` its one-cancels-other exits. A standalone
    order (an exit, a closing limit) is a parent with no children."""

    parent: Leg | None
    children: tuple[Leg, ...] = ()


@dataclass(frozen=True)
class Cancelled:
    key: str
    reason: str


@dataclass(frozen=True)
class BarOutcome:
    """What one bar did to a bracket. `bracket` is what still works afterwards (feed it to the
    next bar); `went_live` gives the children that went live on this bar with their `live_since`;
    `reduced` the siblings left with less to fill (key, quantity still to fill)."""

    bracket: Bracket
    fills: tuple[LegFill, ...] = ()
    cancelled: tuple[Cancelled, ...] = ()
    went_live: tuple[tuple[str, datetime], ...] = ()
    reduced: tuple[tuple[str, float], ...] = ()

    @property
    def done(self) -> bool:
        return self.bracket.parent is None and not self.bracket.children


def _children_go_live(children: tuple[Leg, ...], parent_fill: LegFill, bar: DailyBar) -> tuple[Leg, ...]:
    """The children of a parent that just filled. After a fill at the open the whole bar follows
    it; after a fill inside the bar, a stop (or market) child still counts on this bar (the worst
    case) but a target only from the next bar (the bar's high may have come before the fill)."""
    went_live = []
    for child in children:
        if parent_fill.when == AT_OPEN or child.order_type in ("STP", "MKT"):
            went_live.append(replace(child, live_since=parent_fill.at))
        else:
            went_live.append(replace(child, live_since=bar.end))
    return tuple(went_live)


def bracket_on_bar(bracket: Bracket, bar: DailyBar, *, slippage_bps: float, commission_model: str) -> BarOutcome:
    """Advance one bracket (or standalone order) through one daily bar: which legs fill, at what
    price and time, which are cancelled (one-cancels-other, with their parent) or expire."""
    fills: list[LegFill] = []
    cancelled: list[Cancelled] = []
    went_live: list[tuple[str, datetime]] = []
    parent, children = bracket.parent, bracket.children
    if parent is not None:
        fill = leg_fill(parent, bar, slippage_bps=slippage_bps, commission_model=commission_model)
        if fill is not None:
            fills.append(fill)
            children = _children_go_live(children, fill, bar)
            went_live = [(child.key, child.live_since) for child in children]
            parent = None
        elif parent.expires_at is not None and bar.end >= parent.expires_at:
            reason = expiry_reason(parent.expires_at)
            cancelled.append(Cancelled(parent.key, reason))
            cancelled += [Cancelled(c.key, f"cancelled with its parent {parent.key}: {reason}") for c in children]
            return BarOutcome(Bracket(None, ()), tuple(fills), tuple(cancelled))
        else:
            return BarOutcome(bracket)  # the children wait for their parent

    candidates = [f for child in children
                  if (f := leg_fill(child, bar, slippage_bps=slippage_bps, commission_model=commission_model))]
    by_key = {child.key: child for child in children}
    # The open is the bar's first trade; inside the bar a stop comes before a target.
    candidates.sort(key=lambda f: (f.when, by_key[f.key].order_type == "LMT"))
    remaining = {child.key: child.quantity for child in children}
    finished: set[str] = set()
    for candidate in candidates:
        quantity = remaining[candidate.key]
        if candidate.key in finished or quantity <= 0:
            continue
        if quantity != candidate.quantity:  # reduced by a sibling's fill earlier in this bar
            leg = by_key[candidate.key]
            candidate = replace(candidate, quantity=quantity,
                                commission=costs.commission(commission_model, leg.side, quantity, candidate.price))
        fills.append(candidate)
        finished.add(candidate.key)
        for key, left in remaining.items():
            if key in finished:
                continue
            remaining[key] = left - quantity
            if left - quantity <= 1e-9:
                finished.add(key)
                cancelled.append(Cancelled(key, f"one-cancels-other: {candidate.key} filled"))
    still = []
    for child in children:
        if child.key in finished:
            continue
        if child.live_since is not None and child.expires_at is not None and bar.end >= child.expires_at:
            cancelled.append(Cancelled(child.key, expiry_reason(child.expires_at)))
            continue
        left = remaining[child.key]
        still.append(child if left == child.quantity else replace(child, quantity=left))
    if not fills and not cancelled and not went_live:
        return BarOutcome(bracket)  # nothing happened: the same bracket works on
    reduced = tuple((c.key, c.quantity) for c in still if c.quantity != by_key[c.key].quantity)
    return BarOutcome(Bracket(None, tuple(still)), tuple(fills), tuple(cancelled), tuple(went_live), reduced)
