"""The deterministic risk engine: the model proposes, this code decides.

Every number that matters (R, margin, stop side, plausibility against the bars, size) is
recomputed here from the proposal's prices and the real bars; nothing is taken as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trading_pipeline.core.analysis import Action, RuleCheck
from trading_pipeline.core.strategies import RiskSettings

DEFAULT_STOP_ATR = 2.0
# Plausibility: the entry must sit near the last close, stops and targets near the recent range.
ENTRY_TOLERANCE_ATR = 1.0
ENTRY_TOLERANCE_SHARE = 0.02
RANGE_TOLERANCE_ATR = 6.0


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
    price: float
    previous_close: float | None = None


@dataclass(frozen=True)
class WorkingEntry:
    """An entry order the pipeline sent that may still fill (its unfilled part)."""

    client_order_id: str
    side: str
    quantity: float
    price: float
    status: str

    def describe(self) -> str:
        return f"{self.client_order_id} ({self.side} {self.quantity:g} @ {self.price:.2f}, {self.status})"


@dataclass(frozen=True)
class AccountState:
    equity: float
    cash: float
    positions: dict[str, Position] = field(default_factory=dict)
    daily_pnl: float = 0.0
    # By symbol: the pipeline's orders that open or close a position and may still fill. A symbol
    # with one gets no second order; opening ones count as positions for the limits.
    working_entries: dict[str, WorkingEntry] = field(default_factory=dict)
    # Held symbols the broker had no price for: valued at their average price, so equity and
    # today's P&L leave out their moves.
    unmarked: tuple[str, ...] = ()

    @property
    def gross_exposure(self) -> float:
        return sum(abs(p.market_value) for p in self.positions.values())

    @property
    def open_positions(self) -> int:
        return sum(1 for p in self.positions.values() if p.quantity != 0)

    @property
    def committed_exposure(self) -> float:
        """Gross exposure if every working entry filled at its limit."""
        return self.gross_exposure + sum(abs(w.quantity * w.price) for w in self.working_entries.values())

    @property
    def committed_positions(self) -> int:
        """Open positions plus symbols with a working entry and no position yet."""
        held = {s for s, p in self.positions.items() if p.quantity != 0}
        return len(held | set(self.working_entries))


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
    """Run every gate; the verdict lists each rule with its numbers, passed or not."""
    checks: list[RuleCheck] = []

    def check(rule: str, passed: bool, detail: str) -> bool:
        checks.append(RuleCheck(rule=rule, passed=bool(passed), detail=detail))
        return passed

    def verdict(accepted: bool, quantity: int = 0, **kw) -> RiskVerdict:
        base = dict(entry=proposal.entry, stop=proposal.stop, targets=list(proposal.targets),
                    r_multiple=None, profit_margin=None)
        base.update(kw)
        ok = accepted and all(c.passed for c in checks)
        return RiskVerdict(accepted=ok, quantity=quantity if ok else 0, checks=checks, **base)

    if proposal.action not in (Action.BUY, Action.SELL):
        check("actionable", False, f"proposal is {proposal.action.value}: nothing to send")
        return verdict(False)
    direction = 1 if proposal.action == Action.BUY else -1
    engaged, why = kill_switch
    check("kill_switch", not engaged, why or "kill switch off")
    check("confidence", proposal.confidence >= limits.min_confidence,
          f"confidence {proposal.confidence:.2f} vs minimum {limits.min_confidence:.2f}")

    atr, close = market.atr, market.last_close
    entry = proposal.entry
    if not check("atr_available", atr > 0 and math.isfinite(atr), f"ATR {atr}"):
        return verdict(False)
    entry_tolerance = max(ENTRY_TOLERANCE_ATR * atr, ENTRY_TOLERANCE_SHARE * close)
    if not check("entry_plausible",
                 entry is not None and math.isfinite(entry) and abs(entry - close) <= entry_tolerance,
                 f"entry {_fmt(entry)} vs last close {close:.2f} (tolerance ±{entry_tolerance:.2f})"):
        return verdict(False)
    entry = round(entry, 2)

    stop = proposal.stop
    if stop is None:
        stop = round(entry - direction * DEFAULT_STOP_ATR * atr, 2)
        check("stop_default", True, f"no stop proposed: using entry ∓ 2×ATR = {stop:.2f}")
    if not check("stop_side", math.isfinite(stop) and direction * (entry - stop) > 0,
                 f"{proposal.action.value} needs stop {'below' if direction > 0 else 'above'} "
                 f"entry {entry:.2f}; got {stop:.2f}"):
        return verdict(False, entry=entry, stop=stop)

    low_bound = market.recent_low - RANGE_TOLERANCE_ATR * atr
    high_bound = market.recent_high + RANGE_TOLERANCE_ATR * atr
    prices_in_range = all(low_bound <= p <= high_bound for p in [stop, *proposal.targets] if math.isfinite(p)) \
        and all(math.isfinite(p) for p in proposal.targets)
    check("prices_plausible", prices_in_range,
          f"stop {stop:.2f} and targets {[round(t, 2) for t in proposal.targets]} within recent range "
          f"{market.recent_low:.2f}-{market.recent_high:.2f} ± {RANGE_TOLERANCE_ATR:g}×ATR "
          f"({low_bound:.2f}-{high_bound:.2f})")
    if not check("target_present", bool(proposal.targets) and direction * (proposal.targets[0] - entry) > 0,
                 f"first target {_fmt(proposal.targets[0] if proposal.targets else None)} must be "
                 f"{'above' if direction > 0 else 'below'} entry {entry:.2f}"):
        return verdict(False, entry=entry, stop=stop)
    target = proposal.targets[0]
    risk = abs(entry - stop)
    r_multiple = round(abs(target - entry) / risk, 3)
    margin = round(abs(target - entry) / entry, 4)
    check("min_r", r_multiple >= limits.min_r,
          f"R = |{target:.2f} − {entry:.2f}| / |{entry:.2f} − {stop:.2f}| = {r_multiple:.2f} vs minimum {limits.min_r:.2f}")
    check("min_profit_margin", margin >= limits.min_profit_margin,
          f"margin = |{target:.2f} − {entry:.2f}| / {entry:.2f} = {margin:.2%} vs minimum {limits.min_profit_margin:.2%}")
    numbers = dict(entry=entry, stop=stop, r_multiple=r_multiple, profit_margin=margin)

    held = account.positions.get(symbol)
    held_qty = held.quantity if held else 0
    check("daily_loss", account.daily_pnl > -limits.daily_loss_limit * account.equity,
          f"today's P&L {account.daily_pnl:.2f} vs limit −{limits.daily_loss_limit:.0%} of equity "
          f"{account.equity:.2f} = {-limits.daily_loss_limit * account.equity:.2f}")
    if market.market_open:
        check("market_hours", True, "market open")
    elif when_market_closed == "next_open":
        check("market_hours", True, f"market closed: the {tif} order is for the next open ({market.next_open})")
    else:
        check("market_hours", False, f"market closed (next open {market.next_open}); the strategy sends orders "
                                     "only while it is open (orders.when_market_closed: no_trade)")

    working = account.working_entries.get(symbol)
    if working is not None:  # opening or closing: a second order would double what the first does
        check("order_working", False,
              f"order {working.describe()} for {symbol} may still fill; no second order until it fills, "
              "expires or is cancelled (the sync_portfolio job or order_status_sensor brings order states up to "
              "date; a 'submitting' or 'unknown' order is reconciled by re-running its orders step)")
        return verdict(False, **numbers)
    closes_position = direction < 0 and held_qty > 0
    if closes_position:
        quantity = int(held_qty)
        check("position_size", True, f"SELL closes the long position of {quantity} shares")
        return verdict(True, quantity, closes_position=True, **numbers)
    if direction > 0 and held_qty < 0:
        quantity = int(-held_qty)
        check("position_size", True, f"BUY covers the short position of {quantity} shares")
        return verdict(True, quantity, closes_position=True, **numbers)
    if direction < 0:
        check("no_short_sale", limits.allow_short,
              f"SELL with no {symbol} position would open a short; the strategy does not allow short sales "
              "(risk.allow_short: false)")
    if held_qty != 0:
        check("no_pyramiding", False, f"already holding {held_qty:g} {symbol}; no second entry")
        return verdict(False, **numbers)
    check("max_open_positions", account.committed_positions < limits.max_open_positions,
          f"{account.open_positions} open positions + {len(account.working_entries)} working entries "
          f"vs maximum {limits.max_open_positions}")

    by_risk = math.floor(account.equity * limits.risk_per_trade / risk)
    by_share = math.floor(account.equity * limits.max_position_share / entry)
    room = account.equity * limits.max_gross_exposure - account.committed_exposure
    by_exposure = max(0, math.floor(room / entry))
    quantity = min(by_risk, by_share, by_exposure)
    check("position_size", quantity >= 1,
          f"size = min(floor({account.equity:.2f} × {limits.risk_per_trade:.2%} / {risk:.2f}) = {by_risk}, "
          f"cap {limits.max_position_share:.0%} of equity / {entry:.2f} = {by_share}, "
          f"gross-exposure room (positions and working entries) {room:.2f} / {entry:.2f} = {by_exposure}) "
          f"= {quantity}")
    return verdict(True, quantity, **numbers)
