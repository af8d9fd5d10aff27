"""The books by position: fills matched first-in first-out per symbol into trades.

A trade is opened by an entry's fills and closed by whatever reduces the position afterwards,
whichever decision or order that was: the bracket's stop-loss or take-profit, a stop converted
into an exit, a standalone exit, a later decision's closing order. So a position opened and then
closed is one closed trade with its realized P&L, never two open trades. A fill of no decision
(decision_id "": a trade made by hand at the broker) closes like any other (reason 'manual'); one
that opens or adds never joins a decision's trade: it is a trade of its own, opened by hand, and
later sales close the oldest trade first. Pure: plain values in, plain values out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

EXIT_REASONS = ("stop_loss", "take_profit", "exit", "manual")


@dataclass(frozen=True)
class Fill:
    """One execution, with what the order it belongs to was for."""

    execution_id: str
    symbol: str
    side: str  # BUY or SELL
    quantity: float
    price: float
    commission: float
    executed_at: datetime
    decision_id: str  # the decision whose order filled
    reason: str  # entry, or for a fill that reduces a position one of EXIT_REASONS


@dataclass
class Trade:
    decision_id: str  # the decision whose entry opened it
    symbol: str
    side: str  # the opening side: BUY (long) or SELL (short)
    stop: float | None  # the opening decision's stop: what 1R was
    opened_at: datetime
    quantity: float = 0.0
    entry_value: float = 0.0
    entry_commission: float = 0.0
    closed_quantity: float = 0.0
    exit_value: float = 0.0
    exit_commission: float = 0.0
    closed_at: datetime | None = None
    exit_reasons: list[str] = field(default_factory=list)

    @property
    def direction(self) -> int:
        return 1 if self.side == "BUY" else -1

    @property
    def open_quantity(self) -> float:
        return self.quantity - self.closed_quantity

    @property
    def entry(self) -> float:
        return self.entry_value / self.quantity

    @property
    def exit(self) -> float | None:
        return self.exit_value / self.closed_quantity if self.closed_quantity else None

    @property
    def status(self) -> str:
        if self.closed_quantity <= 0:
            return "open"
        return "closed" if self.open_quantity <= 1e-9 else "partly closed"

    @property
    def commission(self) -> float:
        return self.entry_commission + self.exit_commission

    @property
    def realized_pnl(self) -> float:
        """P&L of the closed part, net of its exit commissions and its share of the entry's."""
        if not self.closed_quantity:
            return 0.0
        gross = self.direction * (self.exit_value - self.entry * self.closed_quantity)
        return gross - self.entry_commission * self.closed_quantity / self.quantity - self.exit_commission

    @property
    def r_multiple(self) -> float | None:
        """Net realized P&L over the risk the opening decision took (entry fill to its stop),
        once the trade is closed."""
        if self.status != "closed" or self.stop is None or abs(self.entry - self.stop) < 1e-9:
            return None
        return self.realized_pnl / (abs(self.entry - self.stop) * self.quantity)

    def holding_time(self, now: datetime) -> timedelta:
        return (self.closed_at if self.status == "closed" else now) - self.opened_at

    def _open(self, fill: Fill, quantity: float) -> None:
        self.quantity += quantity
        self.entry_value += quantity * fill.price
        self.entry_commission += fill.commission * quantity / fill.quantity

    def _close(self, fill: Fill, quantity: float) -> None:
        self.closed_quantity += quantity
        self.exit_value += quantity * fill.price
        self.exit_commission += fill.commission * quantity / fill.quantity
        self.closed_at = fill.executed_at
        if fill.reason not in self.exit_reasons:
            self.exit_reasons.append(fill.reason)


def match_trades(fills: list[Fill], stops: dict[str, float | None]) -> list[Trade]:
    """Trades from the fills, oldest first. A fill against the open position closes its oldest
    trades first (FIFO); one on the same side (or when flat) opens, or adds to the trade its own
    decision opened (the partial fills of one entry are one trade). A fill larger than the
    position closes it and opens the rest the other way. `stops` maps decision ids to their stop."""
    trades: list[Trade] = []
    open_by_symbol: dict[str, deque[Trade]] = {}
    for fill in sorted(fills, key=lambda f: f.executed_at):  # stable: recording order breaks ties
        sign = 1 if fill.side == "BUY" else -1
        book = open_by_symbol.setdefault(fill.symbol, deque())
        remaining = fill.quantity
        while remaining > 1e-9 and book and book[0].direction != sign:
            trade = book[0]
            closed = min(remaining, trade.open_quantity)
            trade._close(fill, closed)
            remaining -= closed
            if trade.open_quantity <= 1e-9:
                book.popleft()
        if remaining <= 1e-9:
            continue
        if book and book[-1].decision_id == fill.decision_id:
            book[-1]._open(fill, remaining)
            continue
        trade = Trade(decision_id=fill.decision_id, symbol=fill.symbol, side=fill.side,
                      stop=stops.get(fill.decision_id), opened_at=fill.executed_at)
        trade._open(fill, remaining)
        book.append(trade)
        trades.append(trade)
    return trades


def describe_duration(duration: timedelta) -> str:
    """A holding time a trader reads at a glance: 3d 4h, 5h 12m, 40m."""
    minutes = max(0, int(duration.total_seconds() // 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes}m" if hours else f"{minutes}m"
