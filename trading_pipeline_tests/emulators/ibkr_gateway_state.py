"""The IBKR gateway emulator's state: configuration, injected faults, orders, deterministic market
data on the XNYS calendar, and the order engine (fills, brackets, OCA, positions, P&L)."""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd

API = "/v1/api"
CONTROL = "/__emulator__"
SLOW = {("GET", "/iserver/account/orders"), ("GET", "/iserver/account/trades"),
        ("GET", "/iserver/account/pnl/partitioned"), ("GET", "/portfolio/accounts"),
        ("GET", "/portfolio/subaccounts")}
PREFLIGHT_NEEDED = ("/iserver/marketdata/snapshot", "/iserver/account/orders", "/iserver/account/order/status",
                    "/iserver/account/trades")
# IBKR's pre-flight list also names placing, modifying and cancelling: (method, path pattern).
PREFLIGHT_NEEDED_ORDERS = (("POST", r"/iserver/account/[^/]+/orders"), ("POST", r"/iserver/account/[^/]+/order/-?\d+"),
                           ("DELETE", r"/iserver/account/[^/]+/order/-?\d+"))
STOP_WARNING = ("You are about to submit a stop order. Please be aware of the various stop order types available "
                "and the risks associated with each one.\nAre you sure you want to submit this order?")
PRICE_WARNING = ("The following order \"{side} {qty} {sym} @ {price:.2f}\" price exceeds \nthe Percentage constraint "
                 "of 3%.\nAre you sure you want to submit this order?")
# o10151's wording is not in our reference (only its id, "market order"): the emulator's own phrasing.
MARKET_WARNING = ("You are about to submit a market order. A market order executes at the best price available "
                  "when it reaches the market, which may differ from the last price.\nAre you sure you want to "
                  "submit this order?")
AUTH_STATES = ("authenticated", "connected", "expired", "logged_out", "competing")


@dataclass
class EmulatorConfig:
    account_id: str | None = None  # default DU1234567 (paper) or U1234567 (live)
    extra_accounts: tuple[str, ...] = ()
    live: bool = False
    auth_state: str = "authenticated"
    latency_ms: float = 0.0
    allow_ips: tuple[str, ...] = ("127.0.0.1", "::1", "192.*", "131.216.*", "testclient")
    enforce_pacing: bool = True
    requests_per_second: int = 10
    history_concurrency: int = 5
    slow_interval: float = 5.0
    tickle_interval: float = 1.0
    penalty_seconds: float = 0.0
    duplicate_status: int = 400  # IBKR's status for a duplicate cOID is unconfirmed (400 or 200)
    # 'monday' / 'sunday' (00:00 UTC starting the week) or 'first_session' (open of the week's first session)
    weekly_anchor: str = "monday"
    positions: int = 3  # synthetic positions held from the start (for paging: > 100)
    cash: float = 100_000.0
    daily_pnl: float = 0.0  # added to the P&L of today's fills
    pnl_available: bool = True
    fill_delay: float = 0.0
    cancel_polls: int = 2  # status reads answering PendingCancel before Cancelled
    live_orders_parent_id: bool = True  # include `parentId` in live orders for bracket children
    parent_id_as_coid: bool = False  # that parentId is the parent's cOID (seen on some gateways), not its id
    # When a MKT order executes: "calendar" = while an XNYS session is open (else at the next open),
    # "open" / "closed" = as if the market were open / closed now (set_market_open changes it).
    market_hours: str = "calendar"
    # IBKR's live orders after hours "can miss working orders" (ibind #43): while the market is
    # closed, working orders are left out of the live list (their own order/status still answers).
    after_hours_misses_working: bool = False
    # Share classes IBKR writes with a space (its ticker) -> (listing exchange, name): BRK.B is 'BRK B'.
    class_shares: dict = field(default_factory=lambda: {"BRK B": ("NYSE", "BERKSHIRE HATHAWAY INC-CL B")})
    tick_sizes: dict = field(default_factory=lambda: {"TICK05": 0.05})  # symbol -> rules.increment (else 0.01)
    init_fails: bool = False  # ssodh/init leaves the session unauthenticated
    ambiguous_symbols: tuple[str, ...] = ("AMBIG",)
    unknown_symbols: tuple[str, ...] = ("NOSUCH",)
    nodata_symbols: tuple[str, ...] = ("NODATA",)
    prior_close_symbols: tuple[str, ...] = ()  # snapshot field 31 prefixed 'C'
    seed: int = 7

    def __post_init__(self):
        if self.market_hours not in ("calendar", "open", "closed"):
            raise ValueError("market_hours must be calendar, open or closed")
        if self.auth_state not in AUTH_STATES:
            raise ValueError(f"auth_state must be one of {AUTH_STATES}")
        if self.account_id is None:
            self.account_id = "U1234567" if self.live else "DU1234567"


@dataclass
class Fault:
    """An injected answer. By default it replaces the gateway's answer with `body` as JSON (None:
    an empty body) and `status`. `raw` sends those bytes/text instead (an HTML page, truncated
    JSON, ...) with `content_type`. `process` handles the request normally first (the gateway's
    state changes, e.g. an order is placed) and then answers with the fault; `transform` also
    handles it normally and answers with transform(the gateway's JSON answer), same status
    (a differently shaped but equivalent answer: a dict instead of a list, strings for numbers).
    `raw` may also be a function returning an async iterator of bytes (called for each answer): the
    body is then streamed as it yields, e.g. `trickle` or `flood` below."""

    method: str | None
    path: str  # fnmatch pattern on the path after /v1/api
    status: int = 200
    body: object = None
    count: int = 1
    delay: float = 0.0  # seconds before answering
    process: bool = False  # handle the request normally, then delay and answer (e.g. an answer lost in transit)
    raw: str | bytes | Callable[[], AsyncIterator[bytes]] | None = None
    content_type: str = "text/html; charset=utf-8"
    transform: Callable[[object], object] | None = None
    headers: dict[str, str] | None = None  # e.g. a Location for a redirect

    def response(self):
        response = _json(self.body, self.status)
        if callable(self.raw):
            from starlette.responses import StreamingResponse

            response = StreamingResponse(self.raw(), status_code=self.status, media_type=self.content_type)
        elif self.raw is not None:
            from starlette.responses import Response

            response = Response(self.raw, status_code=self.status, media_type=self.content_type)
        response.headers.update(self.headers or {})
        return response


async def trickle(body: bytes = b"[]", every: float = 0.1, seconds: float = 10.0) -> AsyncIterator[bytes]:
    """An answer sent a byte at a time: `every` s between bytes, each arriving well within any read
    timeout, so it lasts `seconds` (whitespace, then `body`, which a patient client reads whole).
    Bounded, so a client that never gives up still gets an answer and a failing test ends."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        yield b" "
        await asyncio.sleep(every)
    yield body


async def flood(megabytes: int = 64) -> AsyncIterator[bytes]:
    """An answer far larger than any of the gateway's (a few KB): `megabytes` of spaces."""
    for _ in range(megabytes):
        yield b" " * 1_000_000


@dataclass
class EmuOrder:
    order_id: int
    conid: int
    symbol: str
    side: str
    order_type: str  # LMT / STP / MKT
    quantity: float
    price: float
    tif: str
    coid: str | None
    parent_id: int | None
    status: str
    created: float
    filled: float = 0.0
    avg_price: float | None = None
    cancel_reads: int = 0
    account_sent: bool = False  # placed with acctId: a modification must repeat it (every original field)
    last_time: float = field(default_factory=time.time)


# ------------------------------------------------------------------------------------------------
# Market data generation (deterministic per conid, on the XNYS calendar)
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _schedule() -> pd.DataFrame:
    from trading_pipeline.core.market_calendar import calendar

    schedule = calendar().schedule
    today = pd.Timestamp.now(tz="UTC").normalize().tz_localize(None)
    schedule = schedule.loc[(schedule.index >= "2000-01-03") & (schedule.index <= today + pd.Timedelta(days=1))]
    opens = pd.DatetimeIndex(schedule["open"]).tz_convert("UTC")
    frame = pd.DataFrame({"close": pd.DatetimeIndex(schedule["close"]).tz_convert("UTC")}, index=opens)
    frame["week"] = opens.tz_convert("America/New_York").tz_localize(None).to_period("W-SUN").asi8
    return frame


@functools.lru_cache(maxsize=1024)
def _daily_bars(conid: int, seed: int) -> pd.DataFrame:
    schedule = _schedule()
    rng = np.random.default_rng((zlib.crc32(str(conid).encode()) + seed) % (2**32))
    n = len(schedule)
    start = 20 + rng.random() * 200
    close = start * np.exp(np.cumsum(rng.normal(0.0003, 0.016, n)))
    open_ = np.concatenate([[start], close[:-1]]) * np.exp(rng.normal(0, 0.004, n))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.007, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.007, n)))
    open_, close = open_.round(2), close.round(2)
    high = np.maximum(high.round(2), np.maximum(open_, close))
    low = np.minimum(low.round(2), np.minimum(open_, close))
    volume = np.round(rng.lognormal(15.2, 0.4, n))  # whole shares, a few million a day
    return pd.DataFrame({"o": open_, "h": high, "l": low, "c": close, "v": volume}, index=schedule.index)


@functools.lru_cache(maxsize=1024)
def _weekly_bars(conid: int, seed: int, anchor: str) -> pd.DataFrame:
    daily = _daily_bars(conid, seed)
    weeks = _schedule()["week"].to_numpy()
    grouped = daily.groupby(weeks, sort=True)
    weekly = pd.DataFrame({"o": grouped["o"].first(), "h": grouped["h"].max(), "l": grouped["l"].min(),
                           "c": grouped["c"].last(), "v": grouped["v"].sum()})
    if anchor == "first_session":
        firsts = daily.index.to_series().groupby(weeks, sort=True).min()
        weekly.index = pd.DatetimeIndex(firsts.to_numpy()).tz_localize("UTC") if firsts.dt.tz is None \
            else pd.DatetimeIndex(firsts)
    else:  # Monday (or the Sunday before it) 00:00 UTC of the week
        mondays = pd.PeriodIndex.from_ordinals(weekly.index.to_numpy(), freq="W-SUN").start_time.tz_localize("UTC")
        weekly.index = mondays - pd.Timedelta(days=1) if anchor == "sunday" else mondays
    return weekly


def _period_start(anchor: pd.Timestamp, count: int, unit: str, sessions: pd.DatetimeIndex) -> pd.Timestamp:
    if unit == "d":  # trading days (30d of 1d bars returned ~30 bars in a recorded answer)
        before = sessions[sessions < anchor]
        return before[-count] if len(before) >= count else pd.Timestamp("1990-01-01", tz="UTC")
    days = {"min": count / 1440, "h": count / 24, "w": 7 * count, "m": 30.4375 * count, "y": 365.25 * count}[unit]
    return anchor - pd.Timedelta(days=days)


# ------------------------------------------------------------------------------------------------
# The gateway state machine
# ------------------------------------------------------------------------------------------------

_CONTRACTS: dict[int, tuple[str, str, bool, str]] = {}


class GatewayState:
    def __init__(self, config: EmulatorConfig):
        self.config = config
        self.lock = threading.RLock()
        self.auth_state = config.auth_state
        self.market_hours = config.market_hours
        self.session_epoch = 0
        self.preflight_epoch = -1
        self.portfolio_epoch = -1
        self.live_orders_epoch = -1
        self.snapshot_warm: set[int] = set()
        self.pending: dict[str, dict] = {}  # reply id -> pending placement
        self.answers: list[tuple[str, str, bool]] = []  # (place|modify, question id, confirmed), as replied
        self.voided: set[str] = set()
        self.orders: dict[int, EmuOrder] = {}
        self.next_order_id = 1_210_386_700
        self.coids: dict[str, float] = {}  # cOID -> registration time (unique within 24 h)
        self.executions: list[dict] = []
        self.prices: dict[int, float] = {}
        self.contracts = _CONTRACTS  # conid -> (symbol, exchange, isUS, name); conids are deterministic
        self.positions_cache: list[dict] | None = None
        self.positions_lagging: list[dict] | None = None  # the positions answer, frozen (IBKREmulator.lag_positions)
        self.synthetic_positions = self._synthetic_positions(config.positions)
        self.cash = config.cash
        self.realized_today = 0.0
        self.faults: list[Fault] = []
        # stats
        self.arrivals: collections.deque[float] = collections.deque()
        self.peak_rps = 0
        self.history_in_flight = 0
        self.peak_history_in_flight = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[float, str, str, int, dict]] = []  # (time, method, path, status, query)
        self.rate_limited = 0
        self.penalty_until = 0.0
        self.last_slow: dict[tuple[str, str], float] = {}

    # -------------------------------------------------------------- helpers
    @property
    def accounts(self) -> list[str]:
        return [self.config.account_id, *self.config.extra_accounts]

    @staticmethod
    def conid_for(symbol: str, salt: int = 0) -> int:
        return 100_000 + (zlib.crc32(f"{symbol}:{salt}".encode()) % 800_000_000)

    def instruments(self, symbol: str) -> list[dict]:
        """/trsrv/stocks for one symbol, as IBKR spells it: upper case, share classes with a space
        ('BRK B'); 'BRK.B' is not an IBKR symbol and finds nothing."""
        if symbol in self.config.unknown_symbols or symbol != symbol.upper() or "." in symbol:
            return []
        if symbol in self.config.class_shares:
            exchange, name = self.config.class_shares[symbol]
            conid = self.conid_for(symbol)
            self.contracts[conid] = (symbol, exchange, True, name)
            return [{"name": name, "chineseName": None, "assetClass": "STK",
                     "contracts": [{"conid": conid, "exchange": exchange, "isUS": True}]}]
        primary = self.conid_for(symbol)
        self.contracts[primary] = (symbol, "NASDAQ", True, f"{symbol} INC")
        mexi = self.conid_for(symbol, 1)
        self.contracts[mexi] = (symbol, "MEXI", False, f"{symbol} INC")
        cdr = self.conid_for(symbol, 2)
        self.contracts[cdr] = (symbol, "AEQLIT", False, f"{symbol} INC-CDR")
        result = [
            {"name": f"{symbol} INC", "chineseName": None, "assetClass": "STK",
             "contracts": [{"conid": primary, "exchange": "NASDAQ", "isUS": True},
                           {"conid": mexi, "exchange": "MEXI", "isUS": False}]},
            {"name": f"{symbol} INC-CDR", "chineseName": None, "assetClass": "STK",
             "contracts": [{"conid": cdr, "exchange": "AEQLIT", "isUS": False}]},
        ]
        if symbol in self.config.ambiguous_symbols:
            other = self.conid_for(symbol, 3)
            self.contracts[other] = (symbol, "NYSE", True, f"{symbol} CORP-CL B")
            result.append({"name": f"{symbol} CORP-CL B", "chineseName": None, "assetClass": "STK",
                           "contracts": [{"conid": other, "exchange": "NYSE", "isUS": True}]})
        return result

    def tick_of(self, conid: int) -> float:
        return self.config.tick_sizes.get(self.symbol_of(conid), 0.01)

    def off_tick(self, conid: int, price) -> bool:
        """Whether a price is not a multiple of the contract's minimum increment."""
        tick = self.tick_of(conid)
        steps = float(price) / tick
        return abs(steps - round(steps)) > 1e-6

    def symbol_of(self, conid: int) -> str:
        return self.contracts.get(conid, (f"C{conid}",))[0]

    def price(self, conid: int) -> float:
        if conid not in self.prices:
            # The market now: the open of the session in progress, else the close of the latest
            # finished one. A session's close is not known before it ends (it would be look-ahead,
            # and a decision made on the last closed bar would see a >3% o163 gap on volatile days).
            daily = _daily_bars(conid, self.config.seed)
            now = pd.Timestamp.now(tz="UTC")
            started = daily.index <= now
            session_close = _schedule()["close"][started].iloc[-1]
            latest = daily[started].iloc[-1]
            self.prices[conid] = float(latest["c"] if session_close <= now else latest["o"])
        return self.prices[conid]

    def _synthetic_positions(self, count: int) -> list[dict]:
        rows = []
        for i in range(count):
            symbol = f"POS{i:03d}"
            conid = self.conid_for(symbol)
            self.contracts[conid] = (symbol, "NYSE", True, f"{symbol} INC")
            rows.append({"symbol": symbol, "conid": conid, "position": float(10 + i), "avg": 50.0 + i % 7,
                         "mkt": 51.0 + i % 7})
        return rows

    def new_session(self) -> None:
        self.session_epoch += 1
        self.snapshot_warm.clear()
        self.pending.clear()

    # -------------------------------------------------------------- order engine
    def market_is_open(self) -> bool:
        if self.market_hours != "calendar":
            return self.market_hours == "open"
        now = pd.Timestamp.now(tz="UTC")
        schedule = _schedule()
        started = schedule[schedule.index <= now]
        return not started.empty and now < started["close"].iloc[-1]

    def advance(self) -> None:
        now = time.time()
        for order in sorted(self.orders.values(), key=lambda o: o.order_id):
            if order.status not in ("Submitted", "PreSubmitted"):
                continue
            if order.parent_id is not None:
                parent = self.orders.get(order.parent_id)
                if parent is None or parent.status != "Filled":
                    continue
            elif now - order.created < self.config.fill_delay:
                continue
            market = self.price(order.conid)
            buy = order.side == "BUY"
            if order.order_type == "MKT":  # executes at the market while it is open, else at the next open
                if self.market_is_open():
                    self.fill(order, round(market, 2), now)
                continue
            if order.order_type == "LMT":
                hit = market <= order.price if buy else market >= order.price
                fill = min(market, order.price) if buy else max(market, order.price)
            else:  # STP
                hit = market >= order.price if buy else market <= order.price
                fill = market
            if hit:
                self.fill(order, round(fill, 2), now)

    def fill(self, order: EmuOrder, price: float, now: float, quantity: float | None = None) -> None:
        """Execute `quantity` (default: what remains) of the order at `price`. Bracket children go
        live when their parent has filled; within a bracket the children are one-cancels-other
        with reduction: a child's fill cancels its sibling when complete, else reduces it by as much."""
        quantity = order.quantity - order.filled if quantity is None else min(quantity, order.quantity - order.filled)
        if quantity <= 0:
            return
        before = order.filled
        order.filled = before + quantity
        order.avg_price = round(((order.avg_price or 0.0) * before + price * quantity) / order.filled, 4)
        order.last_time = now
        if order.filled >= order.quantity:
            order.status = "Filled"
        signed = quantity if order.side == "BUY" else -quantity
        self.cash -= signed * price
        self.executions.append({
            "execution_id": f"0000e0d5.{uuid.uuid4().hex[:8]}.01.01", "symbol": order.symbol,
            "supports_tax_opt": "1", "side": "B" if order.side == "BUY" else "S",
            "order_description": f"{'Bot' if order.side == 'BUY' else 'Sold'} {quantity:g} @ {price:.2f} on ISLAND",
            "trade_time": datetime.fromtimestamp(now, UTC).strftime("%Y%m%d-%H:%M:%S"),
            "trade_time_r": int(now * 1000), "size": float(quantity), "price": f"{price:.2f}",
            **({"order_ref": order.coid} if order.coid else {}),
            "submitter": "emulator", "exchange": "ISLAND", "commission": "1.00",
            "net_amount": round(quantity * price, 2), "account": self.config.account_id,
            "accountCode": self.config.account_id, "company_name": f"{order.symbol} INC",
            "contract_description_1": order.symbol, "sec_type": "STK", "listing_exchange": "NASDAQ.NMS",
            "conid": order.conid, "conidEx": str(order.conid), "clearing_id": "IB", "clearing_name": "IB",
            "liquidation_trade": "0", "is_event_trading": "0", "order_id": order.order_id})
        for other in self.orders.values():
            if order.status == "Filled" and other.parent_id == order.order_id and other.status == "PreSubmitted":
                other.status = "Submitted"  # bracket children go live when the parent fills
            if (order.parent_id is not None and other.parent_id == order.parent_id and other is not order
                    and other.status in ("Submitted", "PreSubmitted")):
                if order.status == "Filled":
                    other.status = "Cancelled"  # OCA: one child filled, the sibling is cancelled
                else:  # a partial fill reduces the sibling by as much (OCA with reduction)
                    other.quantity = max(other.filled, other.quantity - quantity)

    def cut_to_filled(self, order: EmuOrder) -> None:
        """An order modified down to what it already filled is done: Filled, its bracket children
        go live, a child's one-cancels-other sibling is cancelled (as on a complete fill)."""
        if not order.filled or order.filled < order.quantity:
            return
        order.status = "Filled"
        for other in self.orders.values():
            if other.parent_id == order.order_id and other.status == "PreSubmitted":
                other.status = "Submitted"
            if (order.parent_id is not None and other.parent_id == order.parent_id and other is not order
                    and other.status in ("Submitted", "PreSubmitted")):
                other.status = "Cancelled"

    def fill_positions(self) -> dict[int, tuple[float, float]]:
        held: dict[int, tuple[float, float]] = {}
        for execution in self.executions:
            conid = execution["conid"]
            quantity, cost = held.get(conid, (0.0, 0.0))
            signed = execution["size"] if execution["side"] == "B" else -execution["size"]
            held[conid] = (quantity + signed, cost + signed * float(execution["price"]))
        return held

    def build_positions(self) -> list[dict]:
        rows = []
        for p in self.synthetic_positions:
            rows.append(self._position_row(p["conid"], p["symbol"], p["position"], p["avg"], p["mkt"]))
        for conid, (quantity, cost) in sorted(self.fill_positions().items()):
            if quantity:
                rows.append(self._position_row(conid, self.symbol_of(conid), quantity, cost / quantity,
                                               self.price(conid)))
        return rows

    def _position_row(self, conid, symbol, quantity, average, market) -> dict:
        return {"acctId": self.config.account_id, "conid": conid, "contractDesc": symbol, "position": quantity,
                "mktPrice": market, "mktValue": round(quantity * market, 2), "currency": "USD",
                "avgCost": average, "avgPrice": average, "realizedPnl": 0.0,
                "unrealizedPnl": round(quantity * (market - average), 2), "assetClass": "STK", "ticker": symbol,
                "listingExchange": "NASDAQ", "multiplier": 0.0, "undConid": 0, "expiry": None, "putOrCall": None,
                "strike": "0", "isUS": True, "pageSize": 100}

    def net_liquidation(self) -> float:
        positions = sum(p["position"] * p["mkt"] for p in self.synthetic_positions)
        for conid, (quantity, _) in self.fill_positions().items():
            positions += quantity * self.price(conid)
        return round(self.cash + positions, 2)

    def today_pnl(self) -> float:
        unrealized = 0.0
        for conid, (quantity, cost) in self.fill_positions().items():
            unrealized += quantity * self.price(conid) - cost
        return round(self.config.daily_pnl + unrealized, 2)


# ------------------------------------------------------------------------------------------------
# HTTP layer
# ------------------------------------------------------------------------------------------------

def _json(body, status: int = 200):
    from starlette.responses import JSONResponse, Response

    if body is None:
        return Response(status_code=status)
    return JSONResponse(body, status_code=status)


def _error(text: str, status: int = 200):
    return _json({"error": text}, status)



def _plain(text: str, status: int):
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(text, status_code=status)
