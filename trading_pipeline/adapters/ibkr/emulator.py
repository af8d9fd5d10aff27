"""A local emulator of the IBKR Client Portal gateway endpoints the pipeline uses, with the
documented quirks (shared/reference/ibkr-client-portal-api.md), for tests, benchmarks and trying
the `ibkr` modes without an account:

    python -m trading_pipeline.adapters.ibkr.emulator --port 5000 [--latency-ms 200] [--https]
        [--auth-state authenticated|connected|expired|logged_out|competing] [--live] [--account ID]

Quirks reproduced: the auth states (401 logged out, 400 'no bridge' without a brokerage session,
ssodh/init opening it, competing sessions, 403 for an IP outside the allow list); the
/iserver/accounts pre-flight; the empty first snapshot and live-orders answers; 1000 points per
history answer, period/bar checked against IBKR's table, US volumes in lots of 100; questions on
order placement (a reply must come straight away: any other request voids it); `{"error": ...}`
bodies with status 200; 429 above 10 requests/s, above 5 history requests in flight and on the
1-per-5-s endpoints (optionally a penalty box); duplicate cOID rejection; order state progression
(Submitted -> Filled at the emulated market price, bracket children activated, OCA, PendingCancel
-> Cancelled) with executions and positions; cached positions until invalidated.

Only this module imports starlette/uvicorn; the client never imports it. It serves 127.0.0.1 by
default. Test hooks: the `IBKREmulator` object (set_auth_state, set_price, inject, stats, ...)
and, for a running CLI instance, GET /__emulator__/stats and POST /__emulator__/state. `inject`
plays a hostile gateway for the next N matching requests: any status and JSON body, raw bytes
(HTML pages, empty or truncated bodies) with headers (a redirect's Location), the normal answer
delayed or replaced after the request took effect, or the normal answer reshaped by a function.
Without injected faults it behaves as documented.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import fnmatch
import functools
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from trading_pipeline.adapters.ibkr import history as hist

API = "/v1/api"
CONTROL = "/__emulator__"
SLOW = {("GET", "/iserver/account/orders"), ("GET", "/iserver/account/trades"),
        ("GET", "/iserver/account/pnl/partitioned"), ("GET", "/portfolio/accounts"),
        ("GET", "/portfolio/subaccounts")}
PREFLIGHT_NEEDED = ("/iserver/marketdata/snapshot", "/iserver/account/orders", "/iserver/account/order/status",
                    "/iserver/account/trades")
STOP_WARNING = ("You are about to submit a stop order. Please be aware of the various stop order types available "
                "and the risks associated with each one.\nAre you sure you want to submit this order?")
PRICE_WARNING = ("The following order \"{side} {qty} {sym} @ {price:.2f}\" price exceeds \nthe Percentage constraint "
                 "of 3%.\nAre you sure you want to submit this order?")
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
    init_fails: bool = False  # ssodh/init leaves the session unauthenticated
    ambiguous_symbols: tuple[str, ...] = ("AMBIG",)
    unknown_symbols: tuple[str, ...] = ("NOSUCH",)
    nodata_symbols: tuple[str, ...] = ("NODATA",)
    prior_close_symbols: tuple[str, ...] = ()  # snapshot field 31 prefixed 'C'
    seed: int = 7

    def __post_init__(self):
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
    (a differently shaped but equivalent answer: a dict instead of a list, strings for numbers)."""

    method: str | None
    path: str  # fnmatch pattern on the path after /v1/api
    status: int = 200
    body: object = None
    count: int = 1
    delay: float = 0.0  # seconds before answering
    process: bool = False  # handle the request normally, then delay and answer (e.g. an answer lost in transit)
    raw: str | bytes | None = None
    content_type: str = "text/html; charset=utf-8"
    transform: Callable[[object], object] | None = None
    headers: dict[str, str] | None = None  # e.g. a Location for a redirect

    def response(self):
        response = _json(self.body, self.status)
        if self.raw is not None:
            from starlette.responses import Response

            response = Response(self.raw, status_code=self.status, media_type=self.content_type)
        response.headers.update(self.headers or {})
        return response


@dataclass
class EmuOrder:
    order_id: int
    conid: int
    symbol: str
    side: str
    order_type: str  # LMT / STP
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
        self.session_epoch = 0
        self.preflight_epoch = -1
        self.portfolio_epoch = -1
        self.live_orders_epoch = -1
        self.snapshot_warm: set[int] = set()
        self.pending: dict[str, dict] = {}  # reply id -> pending placement
        self.voided: set[str] = set()
        self.orders: dict[int, EmuOrder] = {}
        self.next_order_id = 1_210_386_700
        self.coids: dict[str, float] = {}  # cOID -> registration time (unique within 24 h)
        self.executions: list[dict] = []
        self.prices: dict[int, float] = {}
        self.contracts = _CONTRACTS  # conid -> (symbol, exchange, isUS, name); conids are deterministic
        self.positions_cache: list[dict] | None = None
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
        if symbol in self.config.unknown_symbols or symbol != symbol.upper() or "." in symbol:
            return []
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
            if order.order_type == "LMT":
                hit = market <= order.price if buy else market >= order.price
                fill = min(market, order.price) if buy else max(market, order.price)
            else:  # STP
                hit = market >= order.price if buy else market <= order.price
                fill = market
            if hit:
                self.fill(order, round(fill, 2), now)

    def fill(self, order: EmuOrder, price: float, now: float) -> None:
        order.status, order.filled, order.avg_price, order.last_time = "Filled", order.quantity, price, now
        signed = order.quantity if order.side == "BUY" else -order.quantity
        self.cash -= signed * price
        self.executions.append({
            "execution_id": f"0000e0d5.{uuid.uuid4().hex[:8]}.01.01", "symbol": order.symbol,
            "supports_tax_opt": "1", "side": "B" if order.side == "BUY" else "S",
            "order_description": f"{'Bot' if order.side == 'BUY' else 'Sold'} {order.quantity:g} @ {price:.2f} on ISLAND",
            "trade_time": datetime.fromtimestamp(now, UTC).strftime("%Y%m%d-%H:%M:%S"),
            "trade_time_r": int(now * 1000), "size": float(order.quantity), "price": f"{price:.2f}",
            **({"order_ref": order.coid} if order.coid else {}),
            "submitter": "emulator", "exchange": "ISLAND", "commission": "1.00",
            "net_amount": round(order.quantity * price, 2), "account": self.config.account_id,
            "accountCode": self.config.account_id, "company_name": f"{order.symbol} INC",
            "contract_description_1": order.symbol, "sec_type": "STK", "listing_exchange": "NASDAQ.NMS",
            "conid": order.conid, "conidEx": str(order.conid), "clearing_id": "IB", "clearing_name": "IB",
            "liquidation_trade": "0", "is_event_trading": "0", "order_id": order.order_id})
        for other in self.orders.values():
            if other.parent_id == order.order_id and other.status == "PreSubmitted":
                other.status = "Submitted"  # bracket children go live when the parent fills
            if (order.parent_id is not None and other.parent_id == order.parent_id and other is not order
                    and other.status in ("Submitted", "PreSubmitted")):
                other.status = "Cancelled"  # OCA: one child filled, the sibling is cancelled

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


class IBKREmulator:
    """The emulator: `start()` serves it on host:port (0 = ephemeral) in a background thread."""

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 https: bool = False):
        self.config = config or EmulatorConfig()
        self.state = GatewayState(self.config)
        self.host, self.port, self.https = host, port, https
        self._server = None
        self._thread: threading.Thread | None = None
        self._tempdir = None
        self.app = self._build_app()

    # -------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        scheme = "https" if self.https else "http"
        host = "localhost" if self.https and self.host == "127.0.0.1" else self.host
        return f"{scheme}://{host}:{self.port}{API}"

    def start(self) -> IBKREmulator:
        import uvicorn

        _schedule()  # load the exchange calendar before serving (it takes about a second)
        ssl = {}
        if self.https:
            ssl = self._self_signed_cert()
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", access_log=False,
                                lifespan="off", timeout_keep_alive=30, **ssl)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="ibkr-emulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the IBKR emulator did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True  # do not wait for idle keep-alive connections
            self._thread.join(timeout=10)
            self._server = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _self_signed_cert(self) -> dict:
        """A throwaway self-signed certificate for localhost (like the gateway's own vertx.jks):
        made with the `cryptography` package if installed, else with the `openssl` command."""
        import shutil
        import subprocess
        import tempfile
        from pathlib import Path

        self._tempdir = tempfile.TemporaryDirectory(prefix="ibkr-emulator-")
        folder = Path(self._tempdir.name)
        cert, key = folder / "cert.pem", folder / "key.pem"
        try:
            import datetime as dt

            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID
        except ImportError:
            if shutil.which("openssl") is None:
                raise SystemExit("--https needs the 'cryptography' package or the openssl command: install one, "
                                 "or run without --https and set IBKR_GATEWAY_URL=http://127.0.0.1:<port>/v1/api") \
                    from None
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                            "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
            return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        private = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = dt.datetime.now(dt.UTC)
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                       .public_key(private.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                       .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                       .sign(private, hashes.SHA256()))
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                              serialization.NoEncryption()))
        return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}

    # -------------------------------------------------------------- test hooks
    def reset(self, config: EmulatorConfig | None = None) -> IBKREmulator:
        """A fresh gateway (new state, optionally a new configuration) on the running server."""
        if config is not None:
            self.config = config
        self.state = GatewayState(self.config)
        return self

    def set_auth_state(self, state: str) -> None:
        if state not in AUTH_STATES:
            raise ValueError(state)
        with self.state.lock:
            self.state.auth_state = state
            if state == "authenticated":
                self.state.new_session()

    def set_price(self, symbol: str, price: float) -> None:
        with self.state.lock:
            self.state.instruments(symbol)
            self.state.prices[self.state.conid_for(symbol)] = float(price)
            self.state.advance()

    def inject(self, path: str, method: str | None = None, status: int = 200, body=None, count: int = 1,
               delay: float = 0.0, process: bool = False, raw: str | bytes | None = None,
               content_type: str = "text/html; charset=utf-8", transform=None,
               headers: dict[str, str] | None = None) -> None:
        """The next `count` requests matching (method, path pattern) get the fault (see Fault)."""
        with self.state.lock:
            self.state.faults.append(Fault(method, path, status, body, count, delay, process, raw, content_type,
                                           transform, headers))

    def new_day(self) -> None:
        """Finished orders leave the live-orders list (it covers the current day only); executions
        (7 days) and the 24 h cOID registry stay."""
        with self.state.lock:
            for order_id in [i for i, o in self.state.orders.items() if o.status in ("Filled", "Cancelled")]:
                del self.state.orders[order_id]

    def add_question(self, message_id: str, text: str, count: int = 1) -> None:
        """The next `count` placements also ask question `message_id` with `text`."""
        with self.state.lock:
            self.state.faults.append(Fault("QUESTION", message_id, 200, text, count))

    def count(self, method: str, pattern: str) -> int:
        with self.state.lock:
            return sum(1 for _, m, p, _, _ in self.state.log if m == method and fnmatch.fnmatch(p, pattern))

    def requests(self, method: str | None = None, pattern: str = "*") -> list[tuple[float, str, str, int, dict]]:
        with self.state.lock:
            return [r for r in self.state.log if (method is None or r[1] == method) and fnmatch.fnmatch(r[2], pattern)]

    def reset_stats(self) -> None:
        with self.state.lock:
            s = self.state
            s.arrivals.clear()
            s.peak_rps = s.peak_history_in_flight = s.rate_limited = 0
            s.counts.clear()
            s.log.clear()

    def stats(self) -> dict:
        with self.state.lock:
            s = self.state
            return {"requests": len(s.log), "peak_requests_per_second": s.peak_rps,
                    "peak_history_in_flight": s.peak_history_in_flight, "rate_limited": s.rate_limited,
                    "counts": dict(s.counts), "orders": len(s.orders), "auth_state": s.auth_state}

    def orders_with_coid(self, coid: str) -> list[EmuOrder]:
        with self.state.lock:
            return [o for o in self.state.orders.values() if o.coid == coid]

    def children_of(self, order_id: int) -> list[EmuOrder]:
        with self.state.lock:
            return [o for o in self.state.orders.values() if o.parent_id == order_id]

    # -------------------------------------------------------------- app
    def _build_app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        methods = ["GET", "POST", "DELETE", "PUT"]
        return Starlette(routes=[Route("/{path:path}", self._handle, methods=methods)])

    async def _handle(self, request):
        path = "/" + request.path_params["path"]
        if path.startswith(CONTROL):
            return await self._control(request, path[len(CONTROL):])
        if not path.startswith(API):
            return _json({"error": "Resource not found"}, 404)
        path = path[len(API):] or "/"
        method = request.method
        s = self.state
        now = time.monotonic()
        client_ip = request.client.host if request.client else "unknown"
        with s.lock:
            s.arrivals.append(now)
            while s.arrivals and now - s.arrivals[0] >= 1.0:
                s.arrivals.popleft()
            s.peak_rps = max(s.peak_rps, len(s.arrivals))
            s.counts[f"{method} {path}"] += 1
            entry_index = len(s.log)
            s.log.append((time.time(), method, path, 0, dict(request.query_params)))
        if not any(fnmatch.fnmatch(client_ip, pattern) for pattern in self.config.allow_ips):
            return self._logged(entry_index, _plain("Access Denied", 403))
        if method in ("POST", "PUT") and "content-length" not in request.headers:
            return self._logged(entry_index, _plain("Length Required", 411))
        limited = self._pacing(method, path, now)
        if limited is not None:
            return self._logged(entry_index, limited)
        fault = self._take_fault(method, path)
        if fault is not None and not fault.process and fault.transform is None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            return self._logged(entry_index, fault.response())
        history = path == "/iserver/marketdata/history"
        if history:
            with s.lock:
                s.history_in_flight += 1
                s.peak_history_in_flight = max(s.peak_history_in_flight, s.history_in_flight)
                over = self.config.enforce_pacing and s.history_in_flight > self.config.history_concurrency
            if over:
                with s.lock:
                    s.history_in_flight -= 1
                    s.rate_limited += 1
                return self._logged(entry_index, _json({"error": "Too many requests"}, 429))
        try:
            if self.config.latency_ms:
                await asyncio.sleep(self.config.latency_ms / 1000)
            try:
                body = await request.json() if method in ("POST", "PUT") and await request.body() else None
            except ValueError:
                return self._logged(entry_index, _error("Bad Request: invalid JSON", 400))
            response = await asyncio.to_thread(self._dispatch_locked, method, path, dict(request.query_params), body)
            if fault is not None and fault.transform is not None:
                import json

                answer = json.loads(response.body) if response.body else None
                response = _json(fault.transform(answer), response.status_code)
            elif fault is not None and fault.process:
                await asyncio.sleep(fault.delay)
                if fault.body is not None or fault.raw is not None or fault.status != 200:
                    response = fault.response()
            return self._logged(entry_index, response)
        finally:
            if history:
                with s.lock:
                    s.history_in_flight -= 1

    def _logged(self, index: int, response):
        with self.state.lock:
            t, m, p, _, q = self.state.log[index]
            self.state.log[index] = (t, m, p, response.status_code, q)
        return response

    def _pacing(self, method: str, path: str, now: float):
        s, c = self.state, self.config
        if not c.enforce_pacing:
            return None
        with s.lock:
            limited = now < s.penalty_until or len(s.arrivals) > c.requests_per_second
            key = (method, path)
            interval = c.slow_interval if key in SLOW else c.tickle_interval if path == "/tickle" else 0.0
            if not limited and interval:
                last = s.last_slow.get(key)
                limited = last is not None and now - last < interval
                if not limited:
                    s.last_slow[key] = now
            if limited:
                s.rate_limited += 1
                if c.penalty_seconds:
                    s.penalty_until = max(s.penalty_until, now + c.penalty_seconds)
                return _json(None, 429)  # IBKR's 429 has an empty body and no Retry-After
        return None

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.state.lock:
            for fault in self.state.faults:
                if fault.count > 0 and (fault.method in (None, method)) and fnmatch.fnmatch(path, fault.path):
                    fault.count -= 1
                    return fault
        return None

    async def _control(self, request, path: str):
        if path == "/stats":
            return _json(self.stats())
        if path == "/state" and request.method == "POST":
            data = await request.json()
            if "auth_state" in data:
                self.set_auth_state(data["auth_state"])
            for symbol, price in (data.get("prices") or {}).items():
                self.set_price(symbol, price)
            return _json(self.stats())
        return _json({"error": "unknown control endpoint"}, 404)

    # -------------------------------------------------------------- endpoints
    def _dispatch_locked(self, method: str, path: str, query: dict, body):
        if path == "/iserver/marketdata/history" and query.get("conid", "").isdigit():
            conid = int(query["conid"])  # generate the bars outside the state lock (cached afterwards)
            _daily_bars(conid, self.config.seed)
            if query.get("bar") == "1w":
                _weekly_bars(conid, self.config.seed, self.config.weekly_anchor)
        with self.state.lock:
            return self._dispatch(method, path, query, body)

    def _dispatch(self, method: str, path: str, query: dict, body):
        s = self.state
        s.advance()
        if not path.startswith("/iserver/reply/") and s.pending:
            s.voided.update(s.pending)  # any other request voids a pending question (IBKR: reply straight away)
            s.pending.clear()
        if s.auth_state == "logged_out":
            return _json({"error": "not authenticated"}, 401) if path != "/tickle" else _json(None, 401)
        session_paths = ("/iserver/auth/status", "/iserver/auth/ssodh/init", "/tickle", "/logout",
                         "/sso/validate", "/iserver/reauthenticate")
        if path.startswith("/iserver") and path not in session_paths and s.auth_state != "authenticated":
            return _json({"error": "Bad Request: no bridge", "statusCode": 400}, 400)
        if s.auth_state == "expired" and path.startswith(("/portfolio", "/trsrv")):
            return _json({"error": "not authenticated"}, 401)
        if path.startswith(PREFLIGHT_NEEDED) and s.preflight_epoch != s.session_epoch:
            return _error("Please query /accounts first", 400)
        routes = [
            ("POST", r"/iserver/auth/status", self.auth_status),
            ("POST", r"/iserver/auth/ssodh/init", self.ssodh_init),
            ("POST", r"/iserver/reauthenticate", self.reauthenticate),
            ("GET|POST", r"/tickle", self.tickle),
            ("POST", r"/logout", self.logout),
            ("GET", r"/sso/validate", self.sso_validate),
            ("GET", r"/iserver/accounts", self.iserver_accounts),
            ("POST", r"/iserver/account", self.switch_account),
            ("GET", r"/trsrv/stocks", self.stocks),
            ("GET", r"/iserver/marketdata/history", self.history),
            ("GET", r"/iserver/marketdata/snapshot", self.snapshot),
            ("POST", r"/iserver/marketdata/unsubscribe", self.unsubscribe),
            ("GET", r"/portfolio/accounts", self.portfolio_accounts),
            ("POST", r"/portfolio/(?P<acct>[^/]+)/positions/invalidate", self.invalidate),
            ("GET", r"/portfolio/(?P<acct>[^/]+)/positions/(?P<page>\d+)", self.positions),
            ("GET", r"/portfolio/(?P<acct>[^/]+)/summary", self.summary),
            ("GET", r"/portfolio/(?P<acct>[^/]+)/ledger", self.ledger),
            ("GET", r"/iserver/account/pnl/partitioned", self.pnl),
            ("POST", r"/iserver/account/(?P<acct>[^/]+)/orders", self.place),
            ("POST", r"/iserver/reply/(?P<reply>[^/]+)", self.reply),
            ("GET", r"/iserver/account/orders", self.live_orders),
            ("GET", r"/iserver/account/order/status/(?P<order>\d+)", self.order_status),
            ("POST", r"/iserver/account/(?P<acct>[^/]+)/order/(?P<order>-?\d+)", self.modify),
            ("DELETE", r"/iserver/account/(?P<acct>[^/]+)/order/(?P<order>-?\d+)", self.cancel),
            ("GET", r"/iserver/account/trades", self.trades),
        ]
        for methods, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and method in methods.split("|"):
                return handler(query=query, body=body, **match.groupdict())
        return _json({"error": f"emulator: {method} {path} is not emulated"}, 404)

    # session
    def _auth_body(self) -> dict:
        state = self.state.auth_state
        return {"authenticated": state == "authenticated", "competing": state == "competing",
                "connected": state in ("authenticated", "connected", "competing"), "message": "",
                "MAC": "02:00:00:00:00:01", "fail": "",
                "serverInfo": {"serverName": "Emulator1", "serverVersion": "Build 10.25.0m, emulator"},
                "hardware_info": "emulator|02:00:00:00:00:01"}

    def auth_status(self, **_):
        return _json(self._auth_body())

    def ssodh_init(self, body, **_):
        s = self.state
        if not (body or {}).get("publish"):
            return _error("publish must be true", 500)
        opens = s.auth_state == "connected" or (s.auth_state == "competing" and (body or {}).get("compete"))
        if opens and not self.config.init_fails:
            s.auth_state = "authenticated"
            s.new_session()
        return _json(self._auth_body())

    def reauthenticate(self, **_):
        if self.state.auth_state == "connected" and not self.config.init_fails:
            self.state.auth_state = "authenticated"
            self.state.new_session()
        return _json({"message": "triggered"})

    def tickle(self, **_):
        state = self.state.auth_state
        return _json({"session": uuid.uuid4().hex, "ssoExpires": 585695, "collission": state == "competing",
                      "userId": 99996016, "hmds": {"error": "no bridge"}, "iserver": {"authStatus": self._auth_body()}})

    def logout(self, **_):
        self.state.auth_state = "logged_out"
        return _json({"status": True})

    def sso_validate(self, **_):
        return _json({"USER_ID": 99996016, "USER_NAME": "emulator", "RESULT": True, "AUTH_TIME": int(time.time() * 1000),
                      "EXPIRES": 585695, "LOGIN_TYPE": 1 if self.config.live else 2, "IS_MASTER": False})

    def iserver_accounts(self, **_):
        s = self.state
        s.preflight_epoch = s.session_epoch
        accounts = s.accounts
        return _json({"accounts": accounts,
                      "acctProps": {a: {"hasChildAccounts": False, "supportsCashQty": True, "supportsFractions": True,
                                        "allowCustomerTime": False} for a in accounts},
                      "aliases": {a: a for a in accounts}, "selectedAccount": accounts[0],
                      "isPaper": not self.config.live, "isFT": False, "sessionId": uuid.uuid4().hex,
                      "serverInfo": {"serverName": "Emulator1", "serverVersion": "emulator"}})

    def switch_account(self, body, **_):
        account = (body or {}).get("acctId")
        if account not in self.state.accounts:
            return _error(f"account {account} not found", 400)
        return _json({"set": True, "acctId": account})

    # contracts
    def stocks(self, query, **_):
        symbols = [x for x in (query.get("symbols") or "").split(",") if x]
        return _json({symbol: self.state.instruments(symbol) for symbol in symbols})

    # market data
    def history(self, query, **_):
        s = self.state
        try:
            conid = int(query.get("conid", ""))
        except ValueError:
            return _error("conid is required", 500)
        period, bar = query.get("period", "1w"), query.get("bar", "")
        try:
            hist.validate_history_request(period, bar)
        except Exception as exc:  # noqa: BLE001 - the emulator answers like the gateway
            return _error(f"Invalid period/bar: {getattr(exc, 'problem', exc)}", 500)
        if bar not in ("1d", "1w"):
            return _error(f"emulator: bar {bar} is not emulated (1d and 1w are)", 500)
        symbol, _, is_us, name = s.contracts.get(conid, (None, None, True, ""))
        if symbol is None:
            return _error("No data.")
        if symbol in self.config.nodata_symbols:
            return _error("No data.")
        daily = _daily_bars(conid, self.config.seed)
        bars = daily if bar == "1d" else _weekly_bars(conid, self.config.seed, self.config.weekly_anchor)
        now = pd.Timestamp.now(tz="UTC")
        anchor = now
        if query.get("startTime"):
            try:
                anchor = pd.Timestamp(datetime.strptime(query["startTime"], "%Y%m%d-%H:%M:%S"), tz="UTC")
            except ValueError:
                return _error("startTime must be YYYYMMDD-HH:mm:ss", 500)
        count, unit = hist.parse_period(period)
        begin = _period_start(anchor, count, unit, daily.index)
        window = bars.loc[(bars.index >= begin) & (bars.index < anchor) & (bars.index <= now)].tail(hist.MAX_POINTS)
        factor = 100.0 if is_us else 1.0
        volumes = (window["v"].to_numpy() / factor).round(2)
        stamps = window.index.as_unit("ms").asi8
        data = [{"o": o, "c": c, "h": h, "l": l, "v": v, "t": t} for o, c, h, l, v, t in zip(
            window["o"].tolist(), window["c"].tolist(), window["h"].tolist(), window["l"].tolist(),
            volumes.tolist(), stamps.tolist())]
        if not data:
            return _error("No data.")
        high_t = window["h"].idxmax()
        low_t = window["l"].idxmin()
        minutes = lambda t: int((t - window.index[0]).total_seconds() // 60)
        return _json({
            "serverId": str(zlib.crc32(f"{conid}{period}{bar}".encode()) % 100000), "symbol": symbol, "text": name,
            "priceFactor": 100, "chartAnnotations": "", "startTime": window.index[0].strftime("%Y%m%d-%H:%M:%S"),
            "high": f"{round(window['h'].max() * 100)}/{window.loc[high_t, 'v'] / factor:.2f}/{minutes(high_t)}",
            "low": f"{round(window['l'].min() * 100)}/{window.loc[low_t, 'v'] / factor:.2f}/{minutes(low_t)}",
            "timePeriod": period, "barLength": 86400 if bar == "1d" else 604800, "mdAvailability": "S",
            "mktDataDelay": 0, "outsideRth": query.get("outsideRth") == "true", "volumeFactor": 1,
            "priceDisplayRule": 1, "priceDisplayValue": "2", "negativeCapable": False, "messageVersion": 2,
            "data": data, "points": len(data) - 1, "travelTime": 7})

    def snapshot(self, query, **_):
        s = self.state
        conids = [int(c) for c in (query.get("conids") or "").split(",") if c.strip()]
        fields = [f for f in (query.get("fields") or "").split(",") if f]
        rows = []
        for conid in conids:
            if conid not in s.snapshot_warm:  # the first call only opens the stream
                s.snapshot_warm.add(conid)
                rows.append({"conid": conid, "conidEx": str(conid)})
                continue
            symbol = s.symbol_of(conid)
            last = s.price(conid)
            prior = float(_daily_bars(conid, self.config.seed)["c"].iloc[-2])
            values = {"31": (f"C{prior:.2f}" if symbol in self.config.prior_close_symbols else f"{last:.2f}"),
                      "55": symbol, "84": f"{last - 0.01:.2f}", "86": f"{last + 0.01:.2f}", "88": "1,300",
                      "85": "600", "7059": "100", "7762": "12345678", "87": "12.3M", "7295": f"{prior:.2f}",
                      "7741": f"{prior:.2f}", "6509": "RpB"}
            row = {"conid": conid, "conidEx": str(conid), "server_id": "q1", "_updated": int(time.time() * 1000),
                   "6119": "q1"}
            row.update({f: values[f] for f in fields if f in values})
            rows.append(row)
        return _json(rows)

    def unsubscribe(self, body, **_):
        conid = int((body or {}).get("conid", 0))
        if conid not in self.state.snapshot_warm:
            return _error("unknown", 500)
        self.state.snapshot_warm.discard(conid)
        return _json({"success": True})

    # portfolio
    def _portfolio_gate(self, acct: str):
        s = self.state
        if s.portfolio_epoch != s.session_epoch:
            return _error("Please query /portfolio/accounts first", 400)
        if acct not in s.accounts:
            return _error(f"account {acct} not found", 400)
        return None

    def portfolio_accounts(self, **_):
        s = self.state
        s.portfolio_epoch = s.session_epoch
        return _json([{"id": a, "accountId": a, "accountVan": a, "currency": "USD", "type": "DEMO",
                       "tradingType": "STKNOPT", "clearingStatus": "O", "faclient": False, "brokerageAccess": True,
                       "desc": a} for a in s.accounts])

    def invalidate(self, acct, **_):
        if (gate := self._portfolio_gate(acct)) is not None:
            return gate
        self.state.positions_cache = None
        return _json({"message": "success"})

    def positions(self, acct, page, **_):
        if (gate := self._portfolio_gate(acct)) is not None:
            return gate
        s = self.state
        if s.positions_cache is None:  # the gateway serves a cached copy until invalidated
            s.positions_cache = s.build_positions()
        page = int(page)
        return _json(s.positions_cache[page * 100:(page + 1) * 100])

    def summary(self, acct, **_):
        if (gate := self._portfolio_gate(acct)) is not None:
            return gate
        s = self.state
        stamp = int(time.time() * 1000)

        def value(amount):
            return {"amount": amount, "currency": "USD", "isNull": False, "timestamp": stamp, "value": None,
                    "severity": 0}
        nl = s.net_liquidation()
        return _json({"netliquidation": value(nl), "totalcashvalue": value(round(s.cash, 2)),
                      "availablefunds": value(round(s.cash, 2)), "buyingpower": value(round(4 * s.cash, 2)),
                      "equitywithloanvalue": value(nl), "excessliquidity": value(round(s.cash, 2)),
                      "initmarginreq": value(0.0), "maintmarginreq": value(0.0),
                      "accountcode": {"amount": 0.0, "currency": None, "isNull": False, "timestamp": stamp,
                                      "value": acct, "severity": 0}})

    def ledger(self, acct, **_):
        if (gate := self._portfolio_gate(acct)) is not None:
            return gate
        s = self.state
        nl = s.net_liquidation()
        row = {"cashbalance": round(s.cash, 2), "settledcash": round(s.cash, 2), "netliquidationvalue": nl,
               "stockmarketvalue": round(nl - s.cash, 2), "unrealizedpnl": 0.0, "realizedpnl": s.realized_today,
               "acctcode": acct, "key": "LedgerList", "timestamp": int(time.time()), "exchangerate": 1}
        return _json({"BASE": {**row, "currency": "BASE"}, "USD": {**row, "currency": "USD", "endofbundle": 1}})

    def pnl(self, **_):
        s = self.state
        if not self.config.pnl_available:
            return _json({"upnl": {}})
        nl = s.net_liquidation()
        return _json({"upnl": {f"{s.config.account_id}.Core": {"rowType": 1, "dpl": s.today_pnl(), "nl": nl,
                                                               "upl": 0.0, "el": round(s.cash, 2), "mv": 0.0}}})

    # orders
    def _validate_orders(self, orders) -> str | None:
        if not isinstance(orders, list) or not orders:
            return "the body must be {\"orders\": [...]}"
        coids = {o.get("cOID") for o in orders if isinstance(o, dict) and o.get("cOID")}
        for order in orders:
            if not isinstance(order, dict):
                return "each order must be an object"
            for key in ("conid", "orderType", "side", "quantity", "tif"):
                if key not in order:
                    return f"missing required field {key}"
            if not isinstance(order["conid"], int):
                return "conid must be an integer"
            if order["orderType"] not in ("LMT", "MKT", "STP", "STOP_LIMIT", "MIDPRICE", "TRAIL", "TRAILLMT"):
                return f"invalid orderType {order['orderType']}"
            if order["side"] not in ("BUY", "SELL"):
                return f"invalid side {order['side']}"
            if order["orderType"] in ("LMT", "STP", "STOP_LIMIT") and "price" not in order:
                return "price is required for this order type"
            if not order["quantity"] or order["quantity"] <= 0:
                return "quantity must be positive"
            if order["tif"] not in ("DAY", "GTC", "IOC", "OPG", "PAX", "OVT", "OND"):
                return f"invalid tif {order['tif']}"
            if "parentId" in order:
                if order.get("cOID"):
                    return "a bracket child must not carry a cOID"
                if order["parentId"] not in coids:
                    return f"parentId {order['parentId']} matches no order of this request"
        return None

    def place(self, acct, body, **_):
        s = self.state
        if acct not in s.accounts:
            return _error(f"account {acct} not found", 400)
        orders = (body or {}).get("orders") if isinstance(body, dict) else None
        problem = self._validate_orders(orders)
        if problem:
            return _error(problem, 500)  # bad request content gives 500
        cutoff = time.time() - 86_400
        for order in orders:
            coid = order.get("cOID")
            if coid and s.coids.get(coid, 0) > cutoff:
                return _error(f"Order couldn't be submitted: Local order ID={coid} is already registered.",
                              self.config.duplicate_status)
        questions = []
        if any(o["orderType"] == "STP" for o in orders):
            questions.append(("o10331", STOP_WARNING))
        for order in orders:
            if "parentId" not in order and order["orderType"] == "LMT":
                market = s.price(order["conid"])
                if abs(order["price"] - market) / market > 0.03:
                    questions.append(("o163", PRICE_WARNING.format(side=order["side"], qty=order["quantity"],
                                                                   sym=s.symbol_of(order["conid"]),
                                                                   price=order["price"])))
        for fault_question in [f for f in s.faults if f.method == "QUESTION" and f.count > 0]:
            fault_question.count -= 1
            questions.append((fault_question.path, str(fault_question.body)))
        return self._ask_or_accept({"kind": "place", "orders": orders, "questions": questions})

    def _ask_or_accept(self, pending: dict):
        s = self.state
        if pending["questions"]:
            message_id, text = pending["questions"].pop(0)
            reply_id = str(uuid.uuid4())
            s.pending[reply_id] = pending
            return _json([{"id": reply_id, "message": [text], "isSuppressed": False, "messageIds": [message_id]}])
        if pending["kind"] == "modify":
            order = pending["order"]
            order.price = float(pending["fields"].get("price", order.price))
            order.quantity = float(pending["fields"].get("quantity", order.quantity))
            order.last_time = time.time()
            s.advance()
            return _json([{"order_id": str(order.order_id), "order_status": order.status, "encrypt_message": "1"}])
        created, by_coid = [], {}
        for spec in pending["orders"]:
            parent = by_coid.get(spec.get("parentId")) if "parentId" in spec else None
            order = EmuOrder(s.next_order_id, spec["conid"], s.symbol_of(spec["conid"]), spec["side"],
                             spec["orderType"], float(spec["quantity"]), float(spec.get("price", 0.0)), spec["tif"],
                             spec.get("cOID"), parent.order_id if parent else None,
                             "PreSubmitted" if parent else "Submitted", time.time())
            s.next_order_id += 1
            s.orders[order.order_id] = order
            if order.coid:
                s.coids[order.coid] = time.time()
                by_coid[order.coid] = order
            created.append(order)
        return _json([{"order_id": str(o.order_id), "order_status": o.status, "encrypt_message": "1"}
                      for o in created])

    def reply(self, reply, body, **_):
        s = self.state
        pending = s.pending.pop(reply, None)
        if pending is None:
            if reply in s.voided:
                return _error("reply id not found (the question was voided by another request)", 503)
            return _error("reply id not found", 400)
        if not (body or {}).get("confirmed"):
            return _json([{"message": "Order not confirmed; it was discarded"}])
        return self._ask_or_accept(pending)

    def _live_row(self, order: EmuOrder) -> dict:
        row = {"acct": self.config.account_id, "account": self.config.account_id, "conid": order.conid,
               "conidex": str(order.conid), "orderId": order.order_id, "ticker": order.symbol, "secType": "STK",
               "side": order.side, "orderType": "Limit" if order.order_type == "LMT" else "Stop",
               "origOrderType": "LIMIT" if order.order_type == "LMT" else "STOP", "price": f"{order.price:.2f}",
               "totalSize": order.quantity, "filledQuantity": order.filled,
               "remainingQuantity": order.quantity - order.filled, "status": order.status,
               "order_ccp_status": order.status, "timeInForce": order.tif, "listingExchange": "NASDAQ",
               "outsideRTH": False, "sizeAndFills": f"{order.filled:g}/{order.quantity:g}",
               "lastExecutionTime_r": int(order.last_time * 1000),
               "lastExecutionTime": datetime.fromtimestamp(order.last_time, UTC).strftime("%y%m%d%H%M%S")}
        if order.avg_price is not None:
            row["avgPrice"] = f"{order.avg_price:.2f}"
        if order.coid:
            row["order_ref"] = order.coid
        if self.config.live_orders_parent_id and order.parent_id is not None:
            row["parentId"] = order.parent_id
        return row

    def live_orders(self, query, **_):
        s = self.state
        if query.get("force") == "true":
            s.live_orders_epoch = -1
            return _json({"orders": [], "snapshot": True})
        if s.live_orders_epoch != s.session_epoch:  # the first answer of a session is empty
            s.live_orders_epoch = s.session_epoch
            return _json({"orders": [], "snapshot": True})
        if query.get("accountId") not in s.accounts:  # no accountId: a false empty list
            return _json({"orders": [], "snapshot": True})
        return _json({"orders": [self._live_row(o) for o in s.orders.values()], "snapshot": True})

    def order_status(self, order, **_):
        s = self.state
        found = s.orders.get(int(order))
        if found is None:
            return _error(f"order {order} is not in this session", 503)
        if found.status == "PendingCancel":
            found.cancel_reads += 1
            if found.cancel_reads > self.config.cancel_polls:
                found.status = "Cancelled"
                for child in s.orders.values():
                    if child.parent_id == found.order_id and child.status not in ("Filled",):
                        child.status = "Cancelled"
        body = {"order_id": found.order_id, "conid": found.conid, "symbol": found.symbol,
                "side": "B" if found.side == "BUY" else "S",
                "order_type": "LIMIT" if found.order_type == "LMT" else "STOP",
                "total_size": f"{found.quantity:.1f}", "cum_fill": f"{found.filled:.1f}",
                "size": f"{found.quantity - found.filled:.1f}", "order_status": found.status,
                "order_ccp_status": "0", "order_status_description": f"Order {found.status}", "tif": found.tif,
                "order_time": datetime.fromtimestamp(found.created, UTC).strftime("%y%m%d%H%M%S"),
                "cannot_cancel_order": found.status in ("Filled", "Cancelled"),
                "order_not_editable": found.status in ("Filled", "Cancelled"), "listing_exchange": "NASDAQ",
                "account": self.config.account_id}
        body["limit_price" if found.order_type == "LMT" else "stop_price"] = f"{found.price:.2f}"
        if found.avg_price is not None:
            body["average_price"] = f"{found.avg_price:.2f}"
        return _json(body)

    def modify(self, acct, order, body, **_):
        s = self.state
        if acct not in s.accounts:
            return _error(f"account {acct} not found", 400)
        found = s.orders.get(int(order))
        if found is None:
            return _error(f"OrderID {order} doesn't exist")
        if not isinstance(body, dict) or "orders" in body:
            return _error("a modification is one order object, not wrapped in orders", 500)
        for key in ("conid", "orderType", "side", "quantity", "tif"):
            if key not in body:
                return _error(f"a modification must repeat every original field: {key} is missing", 500)
        if body["conid"] != found.conid or body["side"] != found.side or body["orderType"] != found.order_type:
            return _error("conid, side and orderType cannot change", 500)
        if found.status in ("Filled", "Cancelled"):
            return _error(f"order {order} is {found.status} and cannot be modified")
        questions = []
        if found.order_type == "LMT" and found.parent_id is None and "price" in body:
            market = s.price(found.conid)
            if abs(body["price"] - market) / market > 0.03:
                questions.append(("o163", PRICE_WARNING.format(side=found.side, qty=found.quantity,
                                                               sym=found.symbol, price=body["price"])))
        return self._ask_or_accept({"kind": "modify", "order": found, "fields": body, "questions": questions})

    def cancel(self, acct, order, **_):
        s = self.state
        found = s.orders.get(int(order))
        if found is None or acct not in s.accounts:
            return _error(f"OrderID {order} doesn't exist")
        if found.status not in ("Filled", "Cancelled"):
            found.status, found.cancel_reads = "PendingCancel", 0
        return _json({"msg": "Request was submitted", "order_id": found.order_id, "conid": found.conid,
                      "account": acct})

    def trades(self, query, **_):
        days = max(1, min(int(query.get("days") or 1), 7))
        since = time.time() - days * 86_400
        return _json([{k: v for k, v in e.items() if not k.startswith("_")} for e in self.state.executions
                      if e["trade_time_r"] / 1000 >= since])


def _plain(text: str, status: int):
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(text, status_code=status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local emulator of the IBKR Client Portal gateway (no account).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--https", action="store_true", help="serve TLS with a throwaway self-signed certificate, "
                        "like the real gateway (then the default IBKR_GATEWAY_URL works as is)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--auth-state", choices=AUTH_STATES, default="authenticated",
                        help="start authenticated, connected (brokerage session not open: ssodh/init opens it), "
                             "expired, logged_out (401) or competing")
    parser.add_argument("--live", action="store_true", help="emulate a live account (U1234567, isPaper=false)")
    parser.add_argument("--account", default=None, help="account id (default DU1234567, or U1234567 with --live)")
    parser.add_argument("--positions", type=int, default=3, help="synthetic positions held (over 100 = paging)")
    parser.add_argument("--cash", type=float, default=100_000.0)
    parser.add_argument("--penalty-seconds", type=float, default=0.0, help="429 penalty box after a pacing breach")
    parser.add_argument("--no-pacing", action="store_true", help="do not answer 429 to pacing breaches")
    parser.add_argument("--weekly-anchor", choices=("monday", "sunday", "first_session"), default="monday")
    args = parser.parse_args(argv)
    config = EmulatorConfig(account_id=args.account, live=args.live, auth_state=args.auth_state,
                            latency_ms=args.latency_ms, positions=args.positions, cash=args.cash,
                            penalty_seconds=args.penalty_seconds, enforce_pacing=not args.no_pacing,
                            weekly_anchor=args.weekly_anchor)
    emulator = IBKREmulator(config, host=args.host, port=args.port, https=args.https)
    emulator.start()
    kind = "live" if config.live else "paper"
    print(f"IBKR gateway emulator on {emulator.url} ({kind} account {config.account_id}, auth state "
          f"{config.auth_state}). Ctrl-C stops it.")
    print(f"  export IBKR_GATEWAY_URL={emulator.url}")
    try:
        while emulator._thread.is_alive():
            emulator._thread.join(timeout=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()


if __name__ == "__main__":
    main()
