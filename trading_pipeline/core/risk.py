"""The deterministic risk engine: the model proposes, this code decides.

Every number that matters (R, margin, stop side, plausibility against the bars, size) is
recomputed here from the proposal's prices and the real bars; nothing is taken as given.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal

from trading_pipeline.core.analysis import Action, RuleCheck
from trading_pipeline.core.strategies import RiskSettings

DEFAULT_STOP_ATR = 2.0
# Plausibility: the entry must sit near the last close, stops and targets near the recent range.
ENTRY_TOLERANCE_ATR = 1.0
ENTRY_TOLERANCE_SHARE = 0.02
RANGE_TOLERANCE_ATR = 6.0
TICK = 0.01  # the minimum increment of US stocks above $1, when the broker does not say
_explained = RuleCheck.explained  # bound once: a decision makes a dozen checks


@dataclass(frozen=True)
class Position:
    quantity: float  # negative = short
    average_price: float
    market_price: float
    conid: int | None = None

    @property
    def market_value(self) -> float:
        return self.quantity * self.market_price


@dataclass(frozen=True)
class Mark:
    """A symbol's price at a point in time: the close of its latest closed daily bar, and the close
    of the session before it (today's P&L of a position held overnight is measured from it)."""

    price: float
    previous_close: float | None = None


@dataclass(frozen=True)
class WorkingEntry:
    """An order the pipeline sent that may still fill (its unfilled part): an entry, or (in
    `AccountState.working_protection`) a stop-loss or take-profit; `price` is None for a market order."""

    client_order_id: str
    side: str
    quantity: float
    price: float | None
    status: str
    role: str = "entry"

    def describe(self) -> str:
        price = "MKT" if self.price is None else f"@ {self.price:.2f}"
        return f"{self.client_order_id} ({self.side} {self.quantity:g} {price}, {self.status})"


@dataclass(frozen=True)
class AccountState:
    equity: float
    cash: float
    positions: dict[str, Position] = field(default_factory=dict)
    # None: the broker could not say today's P&L (`daily_pnl_unknown` says why and what to do).
    # Only the daily-loss gate reads it, and refuses entries then; exits and protection never wait for it.
    daily_pnl: float | None = 0.0
    daily_pnl_unknown: str = ""
    # By symbol: the pipeline's orders that open or close a position and may still fill. A symbol
    # with one gets no second order; opening ones count as positions for the limits.
    working_entries: dict[str, WorkingEntry] = field(default_factory=dict)
    # By symbol: a protective order of the pipeline (stop-loss, else take-profit) still working, as
    # the broker said. It protects a position the pipeline opened, which the broker's positions may
    # not list yet (they can lag a fill by seconds): the entry gates count the symbol as held.
    working_protection: dict[str, WorkingEntry] = field(default_factory=dict)
    # Held symbols the broker had no price for: valued at their average price, so equity and
    # today's P&L leave out their moves.
    unmarked: tuple[str, ...] = ()

    # The aggregates are computed once per state (a state is frozen; a backtest asks each of them
    # for every symbol of a session).
    @functools.cached_property
    def gross_exposure(self) -> float:
        return sum(abs(p.market_value) for p in self.positions.values())

    @functools.cached_property
    def open_positions(self) -> int:
        return sum(1 for p in self.positions.values() if p.quantity != 0)

    @functools.cached_property
    def unlisted_protected(self) -> dict[str, WorkingEntry]:
        """`working_protection` of the symbols the broker lists no position in (yet)."""
        return {s: w for s, w in self.working_protection.items()
                if s not in self.positions or self.positions[s].quantity == 0}

    @functools.cached_property
    def committed_exposure(self) -> float:
        """Gross exposure if every working entry filled at its limit, with the positions the broker
        does not list yet valued at their protective order's price (their fill price is not at hand;
        a stop is a few ATR from it)."""
        unlisted = sum(abs(w.quantity * w.price) for w in self.unlisted_protected.values() if w.price is not None)
        return self.gross_exposure + unlisted + sum(abs(w.quantity * w.price) for w in self.working_entries.values())

    @functools.cached_property
    def committed_positions(self) -> int:
        """Open positions plus symbols with a working entry, or a position the broker does not list
        yet (`working_protection`), and no listed position."""
        held = {s for s, p in self.positions.items() if p.quantity != 0}
        return len(held | set(self.working_entries) | set(self.unlisted_protected))


@dataclass(frozen=True)
class Proposal:
    action: Action
    entry: float | None
    stop: float | None
    targets: list[float]
    confidence: float


@dataclass(frozen=True)
class MarketContext:
    last_close: float
    atr: float
    recent_high: float
    recent_low: float
    market_open: bool
    next_open: str  # human-readable, for the reason text
    tick: float = TICK  # the contract's minimum price increment


@dataclass(frozen=True)
class RiskVerdict:
    accepted: bool
    quantity: int
    entry: float | None
    stop: float | None
    targets: list[float]
    r_multiple: float | None
    profit_margin: float | None
    checks: list[RuleCheck]
    closes_position: bool = False


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.2f}"


def to_tick(price: float, tick: float) -> float:
    """`price` rounded to the nearest multiple of `tick`, without binary noise (99.996 -> 100.0 at 0.01)."""
    return round(round(price / tick) * tick, _tick_decimals(tick))


@functools.lru_cache(maxsize=64)
def _tick_decimals(tick: float) -> int:
    return max(0, -Decimal(str(tick)).normalize().as_tuple().exponent)


def entry_limits(symbol: str, entry: float, stop: float, account: AccountState, limits: RiskSettings,
                 own_order: str | None = None) -> tuple[int, list[RuleCheck]]:
    """The account-wide gates of an opening trade and its size: no order already working for the
    symbol, no position in it (one a working stop-loss or take-profit of the pipeline protects
    counts, listed by the broker or not), the daily-loss breaker, the open-positions cap, and the
    size from risk per trade, the position cap and the gross-exposure room. Run when the decision
    is made and again, under the account lock, right before the order is sent (other runs may have
    used the room since). `own_order` is this decision's cOID (a reconciliation may find it working)."""
    checks: list[RuleCheck] = []

    def check(rule: str, passed: bool, detail: str | Callable[[], str]) -> bool:
        checks.append(RuleCheck(rule, bool(passed), detail) if isinstance(detail, str)
                      else _explained(rule, bool(passed), detail))
        return passed

    working = account.working_entries if own_order is None else \
        {s: w for s, w in account.working_entries.items() if w.client_order_id != own_order}
    held = account.positions.get(symbol)
    held_qty = held.quantity if held else 0
    if account.daily_pnl is None:  # never taken for 0: a real loss today would let entries through
        check("daily_loss", False, f"today's P&L is unknown, so the daily-loss limit cannot be checked and no "
                                   f"new entry is sent (exits and stops are not held up): {account.daily_pnl_unknown}")
    else:
        check("daily_loss", account.daily_pnl > -limits.daily_loss_limit * account.equity,
              lambda: f"today's P&L {account.daily_pnl:.2f} vs limit −{limits.daily_loss_limit:.0%} of equity "
              f"{account.equity:.2f} = {-limits.daily_loss_limit * account.equity:.2f}")
    if symbol in working:  # a second order would double what the first does
        check("order_working", False,
              f"order {working[symbol].describe()} for {symbol} may still fill; no second order until it fills, "
              "expires or is cancelled (the sync_portfolio job or order_status_sensor brings order states up to "
              "date and reconciles 'submitting' orders)")
        return 0, checks
    if held_qty != 0:
        check("no_pyramiding", False, f"already holding {held_qty:g} {symbol}; no second entry")
        return 0, checks
    if (protective := account.working_protection.get(symbol)) is not None:
        # An entry that filled leaves order_working at once; the broker's positions may list the
        # fill only seconds later. Its stop is the pipeline's own record that the position exists.
        check("no_pyramiding", False,
              f"the pipeline's {protective.role.replace('_', '-')} {protective.describe()} for {symbol} is still "
              "working: the position it protects counts as held, though the broker's positions do not list it "
              "(they can lag a fill by seconds); no second entry. If that position was closed by hand, the "
              "sync cancels the orphaned order after its grace period and entries resume")
        return 0, checks
    others = account if working is account.working_entries else replace(account, working_entries=working)
    # Counted now: the text, written later, must say what the gate saw even if a dict of the
    # account changes after (the other numbers the texts read are immutable).
    open_positions, working_count = others.open_positions, len(working)
    unlisted = len(set(others.unlisted_protected) - set(working))
    check("max_open_positions", others.committed_positions < limits.max_open_positions,
          lambda: f"{open_positions} open positions + {working_count} working entries "
          + (f"+ {unlisted} held under a working stop but not listed by the broker yet " if unlisted else "")
          + f"vs maximum {limits.max_open_positions}")
    risk = abs(entry - stop)
    by_risk = math.floor(account.equity * limits.risk_per_trade / risk)
    by_share = math.floor(account.equity * limits.max_position_share / entry)
    room = account.equity * limits.max_gross_exposure - others.committed_exposure
    by_exposure = max(0, math.floor(room / entry))
    quantity = max(0, min(by_risk, by_share, by_exposure))
    check("position_size", quantity >= 1,
          lambda: f"size = min(floor({account.equity:.2f} × {limits.risk_per_trade:.2%} / {risk:.2f}) = {by_risk}, "
          f"cap {limits.max_position_share:.0%} of equity / {entry:.2f} = {by_share}, "
          f"gross-exposure room (positions and working entries) {room:.2f} / {entry:.2f} = {by_exposure}) "
          f"= {quantity}")
    return (quantity if all(c.passed for c in checks) else 0), checks


def evaluate(
    proposal: Proposal,
    symbol: str,
    market: MarketContext,
    account: AccountState,
    limits: RiskSettings,
    *,
    kill_switch: tuple[bool, str] = (False, ""),
    tif: str = "DAY",
    when_market_closed: str = "next_open",
) -> RiskVerdict:
    """Run every gate; the verdict lists each rule with its numbers, passed or not.

    A proposal against a held position (SELL while long, BUY while short) is an exit and passes
    only the gates that make sense for one (`_evaluate_exit`): the entry gates never stop the
    pipeline from reducing risk."""
    if proposal.action not in (Action.BUY, Action.SELL):
        return RiskVerdict(False, 0, proposal.entry, proposal.stop, list(proposal.targets), None, None,
                           [RuleCheck(rule="actionable", passed=False,
                                      detail=f"proposal is {proposal.action.value}: nothing to send")])
    direction = 1 if proposal.action == Action.BUY else -1
    held = account.positions.get(symbol)
    if held is not None and direction * held.quantity < 0:
        return _evaluate_exit(proposal, symbol, market, account, held, kill_switch)
    return _evaluate_entry(proposal, symbol, market, account, limits, direction,
                           kill_switch=kill_switch, tif=tif, when_market_closed=when_market_closed)


def _evaluate_exit(proposal: Proposal, symbol: str, market: MarketContext, account: AccountState,
                   held: Position, kill_switch: tuple[bool, str]) -> RiskVerdict:
    """Gates of an exit: a position to close and no other order of the symbol working. Model
    prices, confidence, market hours, the loss breaker and the kill switch do not apply: the exit
    is a market order for at most the held size, so it can only reduce the position."""
    checks: list[RuleCheck] = []
    quantity = int(abs(held.quantity))
    what = "SELL closes the long" if proposal.action == Action.SELL else "BUY covers the short"
    checks.append(RuleCheck(rule="position_to_close", passed=quantity >= 1,
                            detail=f"{what} position of {quantity} {symbol} (a market order for at most the held size)"))
    working = account.working_entries.get(symbol)
    if working is not None:
        checks.append(RuleCheck(rule="order_working", passed=False,
                                detail=f"order {working.describe()} for {symbol} may still fill; the exit waits until "
                                       "it fills, expires or is cancelled (its bracket's stop protects what filled)"))
    engaged, why = kill_switch
    if engaged:
        checks.append(RuleCheck(rule="kill_switch", passed=True,
                                detail=f"kill switch engaged ({why}): it stops entries; an exit only reduces the "
                                       "position, so it is allowed (TRADING_ORDERS_ENABLED=no stops exits too)"))
    accepted = all(c.passed for c in checks)
    exit_price = to_tick(market.last_close, market.tick)  # a reference: the exit is a market order
    return RiskVerdict(accepted, quantity if accepted else 0, exit_price, None, [], None, None, checks,
                       closes_position=True)


def _evaluate_entry(proposal: Proposal, symbol: str, market: MarketContext, account: AccountState,
                    limits: RiskSettings, direction: int, *, kill_switch: tuple[bool, str], tif: str,
                    when_market_closed: str) -> RiskVerdict:
    checks: list[RuleCheck] = []
    tick = market.tick

    def check(rule: str, passed: bool, detail: str | Callable[[], str]) -> bool:
        checks.append(RuleCheck(rule, bool(passed), detail) if isinstance(detail, str)
                      else _explained(rule, bool(passed), detail))
        return passed

    def verdict(accepted: bool, quantity: int = 0, **kw) -> RiskVerdict:
        base = {"entry": proposal.entry, "stop": proposal.stop, "targets": list(proposal.targets),
                "r_multiple": None, "profit_margin": None}
        base.update(kw)
        ok = accepted and all(c.passed for c in checks)
        return RiskVerdict(accepted=ok, quantity=quantity if ok else 0, checks=checks, **base)

    engaged, why = kill_switch
    check("kill_switch", not engaged, why or "kill switch off")
    check("confidence", proposal.confidence >= limits.min_confidence,
          lambda: f"confidence {proposal.confidence:.2f} vs minimum {limits.min_confidence:.2f}")

    atr, close = market.atr, market.last_close
    if not check("atr_available", atr > 0 and math.isfinite(atr),
                 lambda: f"ATR {atr:.4f}" if math.isfinite(atr) else "ATR none"):
        return verdict(False)
    if proposal.entry is not None and not math.isfinite(proposal.entry):
        check("entry_plausible", False, f"entry {proposal.entry} is not a number")
        return verdict(False)
    if not all(math.isfinite(p) for p in [*proposal.targets, *([proposal.stop] if proposal.stop is not None else [])]):
        check("prices_plausible", False, f"stop {proposal.stop} and targets {proposal.targets} must be numbers")
        return verdict(False)
    # Every price as the exchange will take it, before any gate looks at it: a stop 0.004 below
    # the entry is the entry itself once rounded.
    entry = None if proposal.entry is None else to_tick(proposal.entry, tick)
    targets = [to_tick(t, tick) for t in proposal.targets]
    entry_tolerance = max(ENTRY_TOLERANCE_ATR * atr, ENTRY_TOLERANCE_SHARE * close)
    if not check("entry_plausible", entry is not None and abs(entry - close) <= entry_tolerance,
                 lambda: f"entry {_fmt(entry)} vs last close {close:.2f} (tolerance ±{entry_tolerance:.2f})"):
        return verdict(False)

    if proposal.stop is None:
        stop = to_tick(entry - direction * DEFAULT_STOP_ATR * atr, tick)
        check("stop_default", True, lambda: f"no stop proposed: using entry ∓ 2×ATR = {stop:.2f}")
    else:
        stop = to_tick(proposal.stop, tick)
    rounded = {"entry": entry, "stop": stop, "targets": list(targets)}  # `targets` stays as the texts read it
    if not check("stop_side", direction * (entry - stop) > 0,
                 lambda: f"{proposal.action.value} needs stop {'below' if direction > 0 else 'above'} "
                 f"entry {entry:.2f}; got {stop:.2f} (rounded to the {tick:g} tick)"):
        return verdict(False, **rounded)
    min_distance = max(tick, limits.min_stop_atr * atr)
    if not check("stop_distance", abs(entry - stop) >= min_distance - tick / 2,
                 lambda: f"stop distance {abs(entry - stop):.2f} vs minimum max(1 tick {tick:g}, "
                 f"{limits.min_stop_atr:g} × ATR {atr:.2f}) = {min_distance:.2f}"):
        return verdict(False, **rounded)

    low_bound = market.recent_low - RANGE_TOLERANCE_ATR * atr
    high_bound = market.recent_high + RANGE_TOLERANCE_ATR * atr
    check("prices_plausible", all(low_bound <= p <= high_bound for p in [stop, *targets]),
          lambda: f"stop {stop:.2f} and targets {targets} within recent range "
          f"{market.recent_low:.2f} to {market.recent_high:.2f} ± {RANGE_TOLERANCE_ATR:g}×ATR "
          f"({low_bound:.2f} to {high_bound:.2f})")
    if not check("target_present", bool(targets) and direction * (targets[0] - entry) > 0,
                 lambda: f"first target {_fmt(targets[0] if targets else None)} must be "
                 f"{'above' if direction > 0 else 'below'} entry {entry:.2f}"):
        return verdict(False, **rounded)
    target = targets[0]
    risk = abs(entry - stop)
    r_multiple = round(abs(target - entry) / risk, 3)
    margin = round(abs(target - entry) / entry, 4)
    check("min_r", r_multiple >= limits.min_r,
          lambda: f"R = reward {abs(target - entry):.2f} (target {target:.2f}, entry {entry:.2f}) ÷ risk {risk:.2f} "
          f"(stop {stop:.2f}) = {r_multiple:.2f} vs minimum {limits.min_r:.2f}")
    check("min_profit_margin", margin >= limits.min_profit_margin,
          lambda: f"margin = reward {abs(target - entry):.2f} ÷ entry {entry:.2f} = {margin:.2%} "
          f"vs minimum {limits.min_profit_margin:.2%}")
    numbers = dict(r_multiple=r_multiple, profit_margin=margin, **rounded)

    if market.market_open:
        check("market_hours", True, "market open")
    elif when_market_closed == "next_open":
        check("market_hours", True, lambda: f"market closed: the {tif} order is for the next open ({market.next_open})")
    else:
        check("market_hours", False, f"market closed (next open {market.next_open}); the strategy sends orders "
                                     "only while it is open (orders.when_market_closed: no_trade)")
    if direction < 0:
        check("no_short_sale", limits.allow_short,
              lambda: f"SELL with no {symbol} position would open a short; the strategy does not allow short sales "
              "(risk.allow_short: false)")
    quantity, account_checks = entry_limits(symbol, entry, stop, account, limits)
    checks.extend(account_checks)
    return verdict(True, quantity, **numbers)
