"""The client's plain values: session and account state, contracts, quotes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass(frozen=True)
class AuthStatus:
    authenticated: bool
    connected: bool
    competing: bool
    message: str = ""
    fail: str = ""
    server_name: str = ""

    @property
    def healthy(self) -> bool:
        return self.authenticated and self.connected and not self.competing


@dataclass(frozen=True)
class AccountsInfo:
    accounts: tuple[str, ...]
    selected: str
    account_id: str
    is_paper: bool
    reported_is_paper: bool | None


@dataclass(frozen=True)
class Contract:
    symbol: str
    conid: int
    exchange: str
    is_us: bool
    name: str = ""


@dataclass(frozen=True)
class Snapshot:
    conid: int
    last: float | None
    last_is_prior_close: bool  # field 31 prefixed 'C': no trade today, this is the previous close
    halted: bool  # field 31 prefixed 'H'
    bid: float | None
    ask: float | None
    bid_size: float | None  # shares (US stocks: IBKR's lots of 100 multiplied out)
    ask_size: float | None
    last_size: float | None
    volume: float | None  # field 7762, raw day volume
    open: float | None
    prior_close: float | None
    availability: str  # field 6509, e.g. 'RpB' realtime, 'DpB' delayed
    raw: dict = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class SessionHealth:
    healthy: bool
    detail: str
    authenticated: bool = False
    connected: bool = False
    competing: bool = False
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    recovered: bool = False  # ssodh/init reopened the brokerage session during this check

    def as_dict(self) -> dict:
        return {"healthy": self.healthy, "detail": self.detail, "authenticated": self.authenticated,
                "connected": self.connected, "competing": self.competing,
                "checked_at": self.checked_at.isoformat(), "recovered": self.recovered}

