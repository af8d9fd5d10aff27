"""IBKRClient: a synchronous, thread-safe client of the Client Portal Web API (CP gateway).

Built to the documented behaviour of the real gateway (shared/reference/ibkr-client-portal-api.md):

Session   `POST /iserver/auth/status`; `ssodh/init` when connected but not authenticated;
          `/tickle` keepalive; `GET /iserver/accounts` pre-flight once per brokerage session;
          a competing session is reported (taken over only if configured).
Errors    gateway not running, not logged in (401 / 'no session' / a redirect to a login page), IP
          not allowed (403), TLS, '{"error": ...}' bodies with status 200, 400 'no bridge' -> clear
          `IBKRError`s. An answer that is not the documented JSON (HTML, empty, plain text,
          truncated, wrongly shaped) is asked again (reads), then named (IBKRMalformedAnswer); for
          an order it is IBKROrderStateUnknown (reconciled by cOID), never a rejection.
Shapes    read as documented and as hostile gateways vary them: conids and numbers as strings,
          flags as "true"/"false" (a doubtful isPaper is live, a doubtful authenticated is not),
          a dict where a list is documented (order answers, one account), `error: null` next to data.
Pacing    <= 10 requests/s overall, <= 4 (max 5) history requests in flight, 1 per 5 s on the
          slow endpoints, 1/s tickle; a 429 holds every thread and backs off; reads and transport
          errors are retried with backoff; an order request is never retried.
Orders    place (single or bracket: children by `parentId`, no cOID of their own), the reply loop
          with an allow-list policy, status, live orders (the empty first answer is re-asked),
          modify, cancel (polled until Cancelled), executions; a live account is refused unless
          `allow_live` (TRADING_ALLOW_LIVE=yes).

Nothing here logs or raises a credential: the gateway holds the login; the `/tickle` session
token and `/iserver/accounts` sessionId are never kept or printed.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from trading_pipeline.adapters.ibkr import history as hist
from trading_pipeline.adapters.ibkr.errors import (
    LOGIN_FIX,
    IBKRAccessDenied,
    IBKRAccountError,
    IBKRCompetingSession,
    IBKRConfigError,
    IBKRContractError,
    IBKRDuplicateOrder,
    IBKRError,
    IBKRGatewayUnreachable,
    IBKRHistoryRequestError,
    IBKRLiveAccountRefused,
    IBKRMalformedAnswer,
    IBKRNotLoggedIn,
    IBKROrderRejected,
    IBKROrderStateUnknown,
    IBKRRateLimited,
    IBKRRequestError,
    IBKRSessionError,
    IBKRTimeout,
    IBKRTLSError,
)
from trading_pipeline.adapters.ibkr.pacing import HistorySlots, OrderGate, Pacer, Pacing
from trading_pipeline.adapters.ibkr.settings import DEFAULT_AUTO_CONFIRM, DEFAULT_GATEWAY_URL, settings_from_env

log = logging.getLogger(__name__)

HISTORY_PATH = "/iserver/marketdata/history"
FINAL_ORDER_STATES = {"Filled", "Cancelled", "Inactive"}
SNAPSHOT_FIELDS = ("31", "55", "84", "85", "86", "88", "7059", "7762", "7295", "7741", "6509")
_DUPLICATE_RE = re.compile(r"Local order ID=(?P<coid>.+?) is already registered", re.IGNORECASE)
_TRANSIENT_HISTORY = ("chart data is not available", "too many history charts requests")
_SHAPES = {dict: "a JSON object", list: "a JSON list", (dict, list): "a JSON object or list"}


class NotJSON(str):
    """A response body that did not parse as JSON (an HTML page, plain text, truncated JSON),
    kept as the text received so that it can be described, never parsed further."""


def describe_body(body: Any) -> str:
    """A short description of an answer body for error messages: what it is, never the whole page
    (and never the values of a JSON object, which may hold a session token)."""
    if body is None:
        return "an empty body"
    if isinstance(body, NotJSON):
        text = body.strip()
        if not text:
            return "an empty body"
        if text[:1] == "<":
            found = (re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
                     or re.search(r"<h1[^>]*>(.*?)</h1>", text, re.IGNORECASE | re.DOTALL))
            name = " ".join(re.sub(r"<[^>]+>", " ", found.group(1)).split())[:80] if found else ""
            return "an HTML page" + (f" ({name!r})" if name else "")
        if text[:1] in "{[":
            return f"truncated or malformed JSON ({len(text)} characters)"
        return f"plain text {' '.join(text.split())[:120]!r}"
    if isinstance(body, dict):
        keys = [str(k) for k in body][:8]
        return f"a JSON object with keys {', '.join(keys)}" if keys else "an empty JSON object"
    if isinstance(body, list):
        return f"a JSON list of {len(body)} item(s)"
    return f"a JSON {type(body).__name__}"


def parse_flag(value: Any) -> bool | None:
    """IBKR's booleans as a hostile gateway might send them: true/false, "true"/"false", 1/0.
    None when missing or unrecognizable (callers decide which way that fails closed)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
    return None


def parse_conid(value: Any) -> int | None:
    """A conid as IBKR sends it: an int almost everywhere, a string in secdef/search (and from
    other gateways anywhere). None unless it is a positive whole number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, float):
        return int(value) if value.is_integer() and value > 0 else None
    text = str(value).strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


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


def parse_number(value: Any) -> float | None:
    """IBKR's string numbers: '1,300', '168.42', 'C168.42' (prior close), 'H...' (halted),
    '1.2M' / '35.5K' (formatted volume). None for missing or unparseable values."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().replace(",", "")
    if not text:
        return None
    if text[0] in "CH" and len(text) > 1:
        text = text[1:]
    text = text.removesuffix("%")
    scale = 1.0
    if text and text[-1] in "KMB":
        scale = {"K": 1e3, "M": 1e6, "B": 1e9}[text[-1]]
        text = text[:-1]
    try:
        return float(text) * scale
    except ValueError:
        return None


_contract_cache: dict[tuple, Contract] = {}
_contract_cache_lock = threading.Lock()


class IBKRClient:
    """One client per gateway; share it between threads (all pacing is per client instance)."""

    def __init__(
        self,
        gateway_url: str = DEFAULT_GATEWAY_URL,
        account_id: str | None = None,
        verify_ssl: bool = False,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        allow_live: bool = False,
        auto_confirm: Iterable[str] = DEFAULT_AUTO_CONFIRM,
        exchanges: Iterable[str] | None = None,
        take_over_competing_session: bool = False,
        conid_overrides: dict[str, int] | None = None,
        pacing: Pacing | None = None,
        shared_pacing_dir: str | os.PathLike | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        self.gateway_url = self._check_url(gateway_url)
        self.account_id_setting = (account_id or "").strip() or None
        self.allow_live = allow_live
        self.auto_confirm = tuple(dict.fromkeys(i.strip() for i in auto_confirm if i.strip()))
        # None = US listings (isUS); else the listing exchanges accepted, in order of preference.
        self.exchanges = tuple(e.strip().upper() for e in exchanges) if exchanges else None
        self.take_over_competing_session = take_over_competing_session
        self.conid_overrides = {k.upper(): int(v) for k, v in (conid_overrides or {}).items()}
        self.pacing = pacing or Pacing()
        self.verify_ssl = verify_ssl
        self._http = httpx.Client(
            base_url=self.gateway_url, verify=verify_ssl, transport=transport,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            headers={"User-Agent": "trading_pipeline-ibkr/1", "Accept": "application/json"},
        )
        # One gateway, one budget: with `shared_pacing_dir` every process using that folder (e.g. the
        # Dagster runs of one deployment) shares the rate window, the 429 hold, the history slots and
        # the order gate; without it, the threads of this process do.
        shared = Path(shared_pacing_dir) if shared_pacing_dir else None
        self._pacer = Pacer(self.pacing.requests_per_second, self.pacing.window_seconds,
                            state_file=shared / "pacing.json" if shared else None)
        self._history_slots = HistorySlots(self.pacing.history_concurrency, shared)
        self._gate = OrderGate(shared)
        # Locks: `_state` guards short, non-blocking bookkeeping only (never held across a request);
        # `_session_lock` / `_accounts_lock` serialize the session check and the pre-flight and may be
        # held across requests. A thread inside an order sequence (OrderGate.exclusive) takes none of
        # them, so a thread waiting at the gate while holding one cannot deadlock it.
        self._state = threading.RLock()
        self._session_lock = threading.Lock()
        self._accounts_lock = threading.Lock()
        self._session_checked_at: float | None = None
        self._session_epoch = 0  # bumped whenever a new brokerage session is (re)opened
        self._accounts: AccountsInfo | None = None
        self._accounts_epoch = -1
        self._portfolio_epoch = -1
        self._live_orders_epoch = -1
        self._orders_cache: tuple[float, list[dict]] | None = None
        self._trades_cache: tuple[float, int, list[dict]] | None = None

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _check_url(url: str) -> str:
        url = (url or DEFAULT_GATEWAY_URL).strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise IBKRConfigError(f"IBKR_GATEWAY_URL={url!r} is not an http(s) URL",
                                  f"set it like {DEFAULT_GATEWAY_URL} (the gateway's address plus /v1/api)")
        if parts.username or parts.password:
            raise IBKRConfigError("IBKR_GATEWAY_URL contains a user name or password",
                                  "remove them: the gateway keeps the login, the URL must not carry credentials")
        if not parts.path.endswith("/v1/api"):
            raise IBKRConfigError(f"IBKR_GATEWAY_URL={url!r} does not end with /v1/api",
                                  f"append /v1/api, e.g. {parts.scheme}://{parts.netloc}/v1/api")
        return url

    @property
    def login_url(self) -> str:
        parts = urlsplit(self.gateway_url)
        return f"{parts.scheme}://{parts.netloc}"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> IBKRClient:
        """IBKR_GATEWAY_URL, IBKR_ACCOUNT_ID, IBKR_VERIFY_SSL, IBKR_CONNECT_TIMEOUT,
        IBKR_READ_TIMEOUT, IBKR_AUTO_CONFIRM, IBKR_EXCHANGES, IBKR_CONIDS,
        IBKR_TAKE_OVER_SESSION, IBKR_HISTORY_CONCURRENCY, IBKR_STATE_DIR and TRADING_ALLOW_LIVE."""
        settings = settings_from_env(environ)
        settings.update(overrides)
        return cls(**settings)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, *, params: dict | None = None, json: Any = None,
                 order: bool = False, ensure: bool = True, retry_no_bridge: bool = True,
                 expect: type | tuple[type, ...] | None = None) -> tuple[int, Any]:
        """Send one request under every pacing rule. Reads are retried (transport errors, 5xx,
        429 with a long global hold, and, with `expect`, a 2xx answer that is not the documented
        JSON shape: an HTML page, an empty body, truncated JSON); an order request (`order=True`)
        is sent exactly once. A read whose answer stays malformed raises IBKRMalformedAnswer; an
        `{"error": ...}` body is returned for the caller to judge."""
        if ensure and not order and not self._gate.in_exclusive():
            self.ensure_session()
        attempts_5xx = attempts_429 = attempts_transport = attempts_malformed = 0
        while True:
            try:
                status, body, location = self._send(method, path, params=params, json=json)
            except httpx.ConnectError as exc:
                if self._is_tls_error(exc):
                    raise self._tls_error(exc) from None
                if order or attempts_transport >= self.pacing.read_retries:
                    raise self._unreachable(exc, order) from None
                attempts_transport += 1
                time.sleep(self._backoff(self.pacing.read_backoff, attempts_transport))
                continue
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if order:
                    raise IBKROrderStateUnknown(
                        f"{method} {path} failed in transit ({type(exc).__name__}): the order may or may not "
                        "have reached IBKR; it was not sent again",
                        "do not re-send by hand: the next run looks the order up by its cOID at IBKR before "
                        "sending anything (or check the gateway's order list)") from None
                if isinstance(exc, httpx.ConnectTimeout) and attempts_transport >= self.pacing.read_retries:
                    raise self._unreachable(exc, order) from None
                if attempts_transport >= self.pacing.read_retries:
                    raise IBKRRequestError(
                        f"{method} {path} failed {attempts_transport + 1} times in transit ({type(exc).__name__})",
                        "check that the gateway is responsive; raise IBKR_READ_TIMEOUT for slow history requests") \
                        from None
                attempts_transport += 1
                time.sleep(self._backoff(self.pacing.read_backoff, attempts_transport))
                continue

            if status == 429 or (path == HISTORY_PATH and self._error_text(body).lower().startswith(
                    "too many history charts")):
                attempts_429 += 1
                wait = self._backoff(self.pacing.rate_limit_backoff, attempts_429)
                self._pacer.hold(wait)  # every thread (and process) waits: nobody hammers the penalty box
                if order or attempts_429 > self.pacing.rate_limit_retries:
                    raise IBKRRateLimited(
                        f"IBKR answered 429 'too many requests' to {method} {path}"
                        + (" (an order request is never retried)" if order else
                           f" {attempts_429} times in a row"),
                        "IBKR puts the gateway's IP in a penalty box for 10-15 minutes after a burst: wait, "
                        "make sure no other program uses the same gateway, then run again") from None
                log.warning("IBKR 429 on %s %s; every request waits %.1f s", method, path, wait)
                continue
            if status == 401:
                with self._state:
                    self._session_checked_at = None
                raise self._not_logged_in("the gateway answered 401 (no authenticated session)")
            if 300 <= status < 400:  # the gateway answers; a redirect is its (or a proxy's) login page
                target = urlsplit(location).path if location else "(no Location header)"
                if any(word in target.lower() for word in ("login", "sso", "auth")):
                    with self._state:
                        self._session_checked_at = None
                    raise self._not_logged_in(f"{method} {path} was redirected (HTTP {status}) to the login page "
                                              f"{target}" + (" (the order was not placed)" if order else ""))
                raise IBKRRequestError(
                    f"{method} {path}: the gateway redirected (HTTP {status}) to {target} instead of answering",
                    f"check that IBKR_GATEWAY_URL is the gateway's own address plus /v1/api (scheme, host, port), "
                    f"not a proxy or a web page; and that you are logged in at {self.login_url}", status=status)
            if status == 403:
                raise IBKRAccessDenied(
                    f"the gateway at {self.login_url} refused this machine (403 Access Denied): its IP is not "
                    "in the gateway's allow list",
                    "add this machine's IP to ips.allow in the gateway's root/conf.yaml (e.g. 172.17.0.* for "
                    "Docker's bridge network) and restart the gateway")
            text = self._error_text(body)
            if text.lower() == "no session":
                raise self._not_logged_in("the gateway has no session ('no session')")
            if status == 400 and "no bridge" in text.lower():
                with self._state:
                    self._session_checked_at = None
                if retry_no_bridge and not order:
                    self.ensure_session(force=True)
                    if path != "/iserver/accounts":
                        self.accounts()  # a reopened session needs its pre-flight before the retry
                    retry_no_bridge = False
                    continue
                raise IBKRSessionError(
                    f"{method} {path}: the brokerage session is not open ('no bridge')",
                    f"the session is being reopened; run again. If it persists, log in again at {self.login_url}")
            if status >= 500 and not order and status != 501:
                transient = (path != HISTORY_PATH or not text or isinstance(body, NotJSON)
                             or any(t in text.lower() for t in _TRANSIENT_HISTORY))
                if transient and attempts_5xx < self.pacing.read_retries:
                    attempts_5xx += 1
                    time.sleep(self._backoff(self.pacing.read_backoff, attempts_5xx))
                    continue
            if (expect is not None and not order and status < 300 and not self._error_field(body)
                    and not isinstance(body, expect)):
                if attempts_malformed < self.pacing.read_retries:
                    attempts_malformed += 1
                    log.warning("IBKR %s %s answered %s with %s; asking again", method, path, status,
                                describe_body(body))
                    time.sleep(self._backoff(self.pacing.read_backoff, attempts_malformed))
                    continue
                raise self._malformed(f"{method} {path}", status, body, expect,
                                      tries=attempts_malformed + 1)
            return status, body

    def _send(self, method: str, path: str, *, params=None, json=None) -> tuple[int, Any, str]:
        """(status, body, Location header). The body is the parsed JSON, None when empty, or a
        `NotJSON` string (HTML, plain text, truncated JSON), whatever the Content-Type says."""
        slot = self._history_slots.slot() if path == HISTORY_PATH else contextlib.nullcontext()
        with self._gate.shared(), slot:
            self._pacer.before_send(path, self.pacing.interval_for(path))
            if method == "POST" and json is None:
                json = {}  # the gateway refuses a POST without a body length (411)
            response = self._http.request(method, path, params=params, json=json)
        body: Any
        if not response.content.strip():
            body = None
        else:
            try:
                body = jsonlib.loads(response.content)
            except ValueError:  # also UnicodeDecodeError
                body = NotJSON(response.content.decode("utf-8", errors="replace"))
        log.debug("IBKR %s %s -> %s", method, path, response.status_code)
        return response.status_code, body, response.headers.get("location", "")

    @staticmethod
    def _backoff(base: float, attempt: int, factor: float = 2.0) -> float:
        return base * factor ** (attempt - 1)

    @staticmethod
    def _error_field(body: Any) -> str:
        """The text of an `{"error": ...}` answer (also `[{"error": ...}]`); "" if there is none.
        A null or empty `error` next to real data is not an error."""
        value = None
        if isinstance(body, dict):
            value = body.get("error")
        elif isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict):
            value = body[0].get("error")
        if value is None or value == "" or value is False:
            return ""
        return " ".join(value.split())[:300] if isinstance(value, str) else jsonlib.dumps(value)[:300]

    @classmethod
    def _error_text(cls, body: Any) -> str:
        """IBKR's error text: the `error` field, else a plain-text body, else a description of an
        HTML page or broken JSON (never the page itself)."""
        text = cls._error_field(body)
        if text:
            return text
        if isinstance(body, NotJSON):
            stripped = body.strip()
            return describe_body(body) if stripped[:1] in "<{[" else " ".join(stripped.split())[:300]
        if isinstance(body, str):
            return body.strip()[:300]
        return ""

    @staticmethod
    def _strings(body: Any):
        """Every string in an answer (for texts IBKR may put in any field, e.g. a duplicate cOID)."""
        if isinstance(body, str):
            yield body
        elif isinstance(body, dict):
            for value in body.values():
                yield from IBKRClient._strings(value)
        elif isinstance(body, list):
            for value in body:
                yield from IBKRClient._strings(value)

    def _malformed(self, what: str, status: int, body: Any, expected: Any = None, tries: int = 1) -> IBKRMalformedAnswer:
        shape = _SHAPES.get(expected, "JSON") if expected is not None else "JSON"
        return IBKRMalformedAnswer(
            f"{what}: the gateway answered HTTP {status} with {describe_body(body)} where IBKR documents {shape}"
            + (f" ({tries} tries)" if tries > 1 else ""),
            "this is not an answer of the Client Portal gateway's API: check that IBKR_GATEWAY_URL points at the "
            "gateway itself plus /v1/api (not a proxy, a load balancer or a web page) and that the gateway is up "
            "to date; if it worked before, IBKR may be restarting its servers (nightly about 00:00-01:00 local, "
            "Saturday evening): run again later", status=status)

    @staticmethod
    def _is_tls_error(exc: Exception) -> bool:
        text = str(exc)
        return "CERTIFICATE_VERIFY_FAILED" in text or "WRONG_VERSION_NUMBER" in text or "[SSL" in text

    def _tls_error(self, exc: Exception) -> IBKRTLSError:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return IBKRTLSError(
                f"TLS verification of the gateway at {self.login_url} failed (certificate verify failed)",
                "the gateway's bundled certificate is self-signed: set IBKR_VERIFY_SSL=no (the default), or "
                "install your own certificate in the gateway (sslCert in root/conf.yaml)")
        return IBKRTLSError(
            f"the TLS handshake with {self.login_url} failed ({text[:120]})",
            "the gateway normally speaks https (listenSsl: true); if yours, or the emulator, runs without TLS, "
            "set IBKR_GATEWAY_URL to http://...; otherwise check the port")

    def _unreachable(self, exc: Exception, order: bool) -> IBKRGatewayUnreachable:
        sent = " The order was not sent." if order else ""
        return IBKRGatewayUnreachable(
            f"nothing answers at {self.gateway_url} ({type(exc).__name__}): the Client Portal gateway is not "
            f"running there, or IBKR's nightly/weekend maintenance is under way.{sent}",
            "start the gateway (bin/run.sh root/conf.yaml, or the IBeam container) and log in, and check "
            "IBKR_GATEWAY_URL (host, port 5000/5001, https and the /v1/api suffix)")

    def _not_logged_in(self, what: str) -> IBKRNotLoggedIn:
        return IBKRNotLoggedIn(f"the gateway at {self.login_url} runs, but nobody is logged in: {what}",
                               LOGIN_FIX.format(login_url=self.login_url))

    def _check_error_body(self, what: str, status: int, body: Any, fix: str | None = None) -> Any:
        text = self._error_text(body)
        if status >= 400 or self._error_field(body):
            raise IBKRRequestError(
                f"{what}: IBKR answered {status}" + (f" with error {text!r}" if text else ""),
                fix or "check the request; IBKR restarts its servers nightly (about 00:00-01:00 local) and on "
                       "Saturday evening, so retry later if it was working before",
                status=status, ibkr_text=text or None)
        if isinstance(body, NotJSON):
            raise self._malformed(what, status, body)
        return body

    # ------------------------------------------------------------------ session
    def auth_status(self) -> AuthStatus:
        status, body = self._request("POST", "/iserver/auth/status", ensure=False, retry_no_bridge=False,
                                     expect=dict)
        body = self._check_error_body("auth status", status, body)
        return self._auth_from(body or {})

    @staticmethod
    def _auth_from(body: Any) -> AuthStatus:
        """Flags read strictly (a string "false" is false): a missing or unreadable `authenticated`
        or `connected` counts as not authenticated / not connected, so the session is never taken
        for healthy on a doubtful answer."""
        body = body if isinstance(body, dict) else {}
        server = body.get("serverInfo") if isinstance(body.get("serverInfo"), dict) else {}
        return AuthStatus(parse_flag(body.get("authenticated")) is True, parse_flag(body.get("connected")) is True,
                          parse_flag(body.get("competing")) is True, str(body.get("message") or ""),
                          str(body.get("fail") or ""), str(server.get("serverName") or ""))

    def tickle(self) -> AuthStatus:
        """Keepalive (`POST /tickle`, 1/s at most); returns the brokerage auth state it reports.
        The session token in the answer is deliberately dropped."""
        status, body = self._request("POST", "/tickle", ensure=False, retry_no_bridge=False, expect=dict)
        body = self._check_error_body("tickle", status, body)
        body = body if isinstance(body, dict) else {}
        iserver = body.get("iserver") if isinstance(body.get("iserver"), dict) else {}
        state = self._auth_from(iserver.get("authStatus"))
        if parse_flag(body.get("collission")):  # IBKR's spelling
            state = AuthStatus(state.authenticated, state.connected, True, state.message, state.fail,
                               state.server_name)
        return state

    def _open_brokerage_session(self) -> AuthStatus:
        status, body = self._request("POST", "/iserver/auth/ssodh/init", json={"publish": True, "compete": True},
                                     ensure=False, retry_no_bridge=False)
        self._check_error_body("ssodh/init", status, body,
                               fix=f"log in again at {self.login_url}, then run again")
        state = self._auth_from(body if isinstance(body, dict) else {})
        for _ in range(self.pacing.session_polls):
            if state.authenticated and state.connected and not state.competing:
                break
            time.sleep(self.pacing.poll_interval)
            state = self.auth_status()
        with self._state:
            self._session_epoch += 1  # a new brokerage session: pre-flights are due again
        return state

    def ensure_session(self, force: bool = False) -> AuthStatus | None:
        """Make sure a healthy brokerage session exists; re-checked at most every
        `session_check_interval` seconds unless forced. Opens it with ssodh/init when the gateway is
        connected but not authenticated; reports a competing session unless configured to take over."""
        with self._session_lock:
            fresh = (self._session_checked_at is not None
                     and time.monotonic() - self._session_checked_at < self.pacing.session_check_interval)
            if fresh and not force:
                return None
            state = self.auth_status()
            if state.competing:
                if not self.take_over_competing_session:
                    raise IBKRCompetingSession(
                        "another session holds the IBKR brokerage session for this username (TWS, IBKR Mobile, "
                        "or another Client Portal login)",
                        "log out of the other session, or set IBKR_TAKE_OVER_SESSION=yes to let the pipeline take "
                        "the session over (which logs the other one out)")
                log.warning("IBKR: taking over a competing brokerage session (IBKR_TAKE_OVER_SESSION=yes)")
                state = self._open_brokerage_session()
            elif not state.authenticated:
                if not state.connected:
                    raise self._not_logged_in("the session expired or was logged out (connected=false, "
                                              "authenticated=false)")
                log.info("IBKR: connected but not authenticated; opening the brokerage session (ssodh/init)")
                state = self._open_brokerage_session()
            if not state.healthy:
                raise IBKRSessionError(
                    "the IBKR brokerage session could not be opened (authenticated="
                    f"{state.authenticated}, connected={state.connected}, competing={state.competing}"
                    + (f", message {state.message!r}" if state.message else "") + ")",
                    f"log in again at {self.login_url}; if TWS or IBKR Mobile uses the same username, log it out")
            self._session_checked_at = time.monotonic()
            return state

    def session_health(self) -> SessionHealth:
        """For the session-health sensor: tickle (keepalive), then check/repair the session.
        Never raises for gateway problems: they are the unhealthy answer."""
        recovered = False
        try:
            tickled = self.tickle()
            before = self._session_epoch
            state = self.ensure_session(force=True) or tickled
            recovered = self._session_epoch != before
            self.accounts()
            return SessionHealth(True, "authenticated, connected, not competing"
                                 + ("; reopened the brokerage session (ssodh/init)" if recovered else ""),
                                 state.authenticated, state.connected, state.competing, recovered=recovered)
        except IBKRError as error:
            return SessionHealth(False, error.problem, competing=isinstance(error, IBKRCompetingSession),
                                 recovered=recovered)

    # ------------------------------------------------------------------ accounts (pre-flight)
    def accounts(self, refresh: bool = False) -> AccountsInfo:
        """`GET /iserver/accounts`: IBKR's pre-flight, once per brokerage session (before snapshot,
        orders, order status, modify, cancel). Chooses the account and detects paper vs live."""
        self.ensure_session()
        with self._accounts_lock:
            if self._accounts is not None and self._accounts_epoch == self._session_epoch and not refresh:
                return self._accounts
            epoch = self._session_epoch
            status, body = self._request("GET", "/iserver/accounts", expect=dict)
            body = self._check_error_body("accounts", status, body)
            listed = body.get("accounts")
            if isinstance(listed, str):  # a single account not wrapped in a list
                listed = [listed]
            if listed is not None and not isinstance(listed, list):
                raise self._malformed("accounts", status, listed, list)
            accounts = tuple(dict.fromkeys(str(a).strip() for a in listed or () if str(a or "").strip()))
            if not accounts:
                raise IBKRAccountError("the gateway lists no brokerage account for this login",
                                       f"log in at {self.login_url} with a username that has an account")
            if self.account_id_setting:
                match = next((a for a in accounts if a.upper() == self.account_id_setting.upper()), None)
                if match is None:
                    raise IBKRAccountError(
                        f"IBKR_ACCOUNT_ID={self.account_id_setting} is not an account of this login "
                        f"(accounts: {', '.join(accounts)})",
                        "set IBKR_ACCOUNT_ID to one of those accounts, or log the gateway in with the right user")
                account = match
            elif len(accounts) == 1:
                account = accounts[0]
            else:
                raise IBKRAccountError(f"this login has several accounts ({', '.join(accounts)})",
                                       "set IBKR_ACCOUNT_ID to the account the pipeline should use")
            selected = str(body.get("selectedAccount") or accounts[0])
            if len(accounts) > 1 and selected != account:
                status, switched = self._request("POST", "/iserver/account", json={"acctId": account})
                self._check_error_body(f"switching to account {account}", status, switched)
                selected = account
            raw_paper = body.get("isPaper")
            reported = parse_flag(raw_paper)
            if raw_paper is not None and reported is None:
                reported = False  # present but unreadable (e.g. "maybe"): not a confirmation of paper
            # Paper only if both say so: a DU... id and isPaper not false. Anything else is treated as live.
            is_paper = account.upper().startswith("DU") and reported is not False
            self._accounts = AccountsInfo(accounts, selected, account, is_paper, reported)
            self._accounts_epoch = epoch
            return self._accounts

    @property
    def account_id(self) -> str:
        return self.accounts().account_id

    def check_may_trade(self) -> AccountsInfo:
        """Re-check the session now (not the last minute's answer), then raise IBKRLiveAccountRefused
        unless the account is paper or live trading is allowed."""
        self.ensure_session(force=True)
        info = self.accounts()
        if not info.is_paper and not self.allow_live:
            reported = "isPaper=false" if info.reported_is_paper is False else "not a DU... paper account"
            raise IBKRLiveAccountRefused(
                f"account {info.account_id} is a live IBKR account ({reported}): real money. Orders on a live "
                "account are refused by default, so nothing was sent",
                "set TRADING_ALLOW_LIVE=yes to allow orders on this live account, or log the gateway in with "
                "your paper trading username (a DU... account)")
        return info

    # ------------------------------------------------------------------ contracts
    def _cache_key(self, symbol: str) -> tuple:
        return (self.gateway_url, self.exchanges, symbol)

    def resolve(self, symbol: str) -> Contract:
        return self.resolve_many([symbol])[symbol]

    def resolve_many(self, symbols: Iterable[str]) -> dict[str, Contract]:
        """Symbols -> contracts via `GET /trsrv/stocks` (batched, cached per process). US listings
        (isUS) by default; with `exchanges` the first listing exchange in that order; IBKR_CONIDS
        overrides win. Exactly one match is required, else IBKRContractError with the candidates."""
        wanted = list(dict.fromkeys(s.strip().upper() for s in symbols))
        found: dict[str, Contract] = {}
        missing = []
        with _contract_cache_lock:
            for symbol in wanted:
                if symbol in self.conid_overrides:
                    found[symbol] = Contract(symbol, self.conid_overrides[symbol], self.exchanges[0]
                                             if self.exchanges else "SMART", self.exchanges is None)
                elif (cached := _contract_cache.get(self._cache_key(symbol))) is not None:
                    found[symbol] = cached
                else:
                    missing.append(symbol)
        for start in range(0, len(missing), 50):
            chunk = missing[start:start + 50]
            answer = self._stocks([self._ibkr_symbol(s) for s in chunk])
            retry = []
            for symbol in chunk:
                entries = answer.get(self._ibkr_symbol(symbol)) or answer.get(symbol)
                if not entries and "." in symbol:
                    retry.append(symbol)
                    continue
                found[symbol] = self._pick_contract(symbol, entries or [])
            if retry:  # IBKR writes share classes with a space: BRK.B is 'BRK B'
                spaced = self._stocks([s.replace(".", " ") for s in retry])
                for symbol in retry:
                    found[symbol] = self._pick_contract(symbol, spaced.get(symbol.replace(".", " ")) or [])
        with _contract_cache_lock:
            for symbol in missing:
                _contract_cache[self._cache_key(symbol)] = found[symbol]
        return {s: found[s] for s in wanted}

    @staticmethod
    def _ibkr_symbol(symbol: str) -> str:
        return symbol.upper()

    def _stocks(self, symbols: list[str]) -> dict:
        status, body = self._request("GET", "/trsrv/stocks", params={"symbols": ",".join(symbols)}, expect=dict)
        body = self._check_error_body(f"contract lookup for {', '.join(symbols)}", status, body)
        return body if isinstance(body, dict) else {}

    def _pick_contract(self, symbol: str, entries: Any) -> Contract:
        """Candidates from IBKR's instruments -> contracts; a contract without a usable conid (missing,
        not a whole number; IBKR sends it as an int here and a string elsewhere) is left out."""
        if isinstance(entries, dict):  # one instrument, not wrapped in a list
            entries = [entries]
        candidates, unusable = [], 0
        for instrument in entries if isinstance(entries, list) else []:
            if not isinstance(instrument, dict) or str(instrument.get("assetClass") or "STK").upper() != "STK":
                continue
            contracts = instrument.get("contracts")
            for contract in contracts if isinstance(contracts, list) else []:
                conid = parse_conid(contract.get("conid")) if isinstance(contract, dict) else None
                if conid is None:
                    unusable += 1
                    continue
                candidates.append(Contract(symbol, conid, str(contract.get("exchange") or ""),
                                           parse_flag(contract.get("isUS")) is True, str(instrument.get("name") or "")))
        if unusable:
            log.warning("IBKR listed %d contract(s) of %s without a usable conid; ignored", unusable, symbol)
        if self.exchanges is None:
            matches = [c for c in candidates if c.is_us]
            policy = "US listings (isUS)"
        else:
            matches = []
            for exchange in self.exchanges:
                matches = [c for c in candidates if c.exchange.upper() == exchange]
                if matches:
                    break
            policy = f"exchanges {', '.join(self.exchanges)}"
        listing = "; ".join(f"{c.conid} {c.exchange} {c.name!r}" for c in candidates) or "none"
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise IBKRContractError(
                f"IBKR has no stock contract for {symbol!r} among {policy} (candidates: {listing})",
                "check the symbol (IBKR writes share classes with a space, e.g. 'BRK B'), set IBKR_EXCHANGES "
                f"to the listing exchange, or pin the contract with IBKR_CONIDS={symbol}=<conid>")
        raise IBKRContractError(
            f"symbol {symbol!r} matches {len(matches)} stock contracts among {policy}: "
            + "; ".join(f"{c.conid} {c.exchange} {c.name!r}" for c in matches),
            f"pin the one you mean with IBKR_CONIDS={symbol}=<conid>, or narrow IBKR_EXCHANGES")

    # ------------------------------------------------------------------ market data
    def history(self, conid: int, period: str, bar: str, start_time: datetime | None = None,
                outside_rth: bool = False) -> dict:
        """`GET /iserver/marketdata/history`; (period, bar) validated against IBKR's table first.
        At most `history_concurrency` of these are in flight per client. 'Chart data is not
        available' is retried (transient); 'No data.' raises IBKRHistoryRequestError."""
        hist.validate_history_request(period, bar)
        params = {"conid": str(conid), "period": period, "bar": bar, "outsideRth": str(bool(outside_rth)).lower()}
        if start_time is not None:
            params["startTime"] = hist.format_start_time(start_time)
        for attempt in range(2):
            status, body = self._request("GET", HISTORY_PATH, params=params, expect=dict)
            text = self._error_text(body)
            if text and "chart data is not available" in text.lower() and attempt == 0:
                time.sleep(self.pacing.read_backoff)
                continue
            break
        if text and "no data" in text.lower():
            raise IBKRHistoryRequestError(
                f"IBKR has no {bar} history for conid {conid} (period {period}"
                + (f", startTime {params['startTime']}" if "startTime" in params else "") + f"): {text!r}",
                "check the symbol and that the account has market data for it")
        body = self._check_error_body(f"history of conid {conid} ({period}, {bar})", status, body,
                                      fix="check the conid, period and bar; 'Chart data is not available' "
                                          "usually clears within minutes")
        data = body.get("data")
        if data is not None and not isinstance(data, list):
            raise self._malformed(f"history of conid {conid} ({period}, {bar}): its 'data'", status, data, list)
        return body

    def snapshot(self, items: Iterable[Contract | int], fields: Iterable[str] = SNAPSHOT_FIELDS) -> dict[int, Snapshot]:
        """`GET /iserver/marketdata/snapshot` with the pre-flight re-poll: the first call for a
        conid only opens the stream and returns no values, so it is asked again until the fields
        arrive. String values are parsed ('1,300', 'C168.42', '1.2M')."""
        items = list(items)
        contracts = {(i.conid if isinstance(i, Contract) else int(i)): i for i in items}
        conids = list(contracts)
        fields = tuple(fields)
        if len(conids) > 100 or len(fields) > 50:
            raise IBKRRequestError("a snapshot takes at most 100 conids and 50 fields", "split the request")
        self.accounts()  # pre-flight
        params = {"conids": ",".join(map(str, conids)), "fields": ",".join(fields)}
        rows: dict[int, dict] = {}
        for attempt in range(self.pacing.snapshot_polls):
            status, body = self._request("GET", "/iserver/marketdata/snapshot", params=params, expect=list)
            body = self._check_error_body("market data snapshot", status, body)
            for row in body:
                conid = parse_conid(row.get("conid")) if isinstance(row, dict) else None
                if conid is not None:
                    rows[conid] = row
            if all(any(f in rows.get(c, {}) for f in fields) for c in conids):
                break
            time.sleep(self.pacing.poll_interval)
        result = {}
        for conid in conids:
            row = rows.get(conid, {})
            contract = contracts[conid]
            lots = 100.0 if isinstance(contract, Contract) and contract.is_us else 1.0  # sizes in lots of 100
            last_text = str(row.get("31") or "").strip()

            def size(key, row=row, lots=lots):
                value = parse_number(row.get(key))
                return None if value is None else value * lots

            result[conid] = Snapshot(
                conid, parse_number(row.get("31")), last_text.startswith("C"), last_text.startswith("H"),
                parse_number(row.get("84")), parse_number(row.get("86")), size("88"), size("85"), size("7059"),
                parse_number(row.get("7762")), parse_number(row.get("7295")), parse_number(row.get("7741")),
                str(row.get("6509") or ""), raw=dict(row))
        return result

    def unsubscribe(self, conid: int) -> None:
        status, body = self._request("POST", "/iserver/marketdata/unsubscribe", json={"conid": int(conid)})
        if status not in (200, 404, 500):  # 404/500 'unknown': it was not subscribed
            self._check_error_body(f"unsubscribe {conid}", status, body)

    # ------------------------------------------------------------------ portfolio
    def _portfolio_ready(self) -> str:
        account = self.account_id
        with self._state:
            if self._portfolio_epoch == self._session_epoch:
                return account
            epoch = self._session_epoch
        status, body = self._request("GET", "/portfolio/accounts", expect=list)  # required before /portfolio/*
        self._check_error_body("portfolio accounts", status, body)
        with self._state:
            self._portfolio_epoch = epoch
        return account

    def portfolio_accounts(self) -> list[dict]:
        self.accounts()
        status, body = self._request("GET", "/portfolio/accounts", expect=list)
        with self._state:
            self._portfolio_epoch = self._session_epoch
        return self._check_error_body("portfolio accounts", status, body) or []

    def invalidate_positions(self) -> None:
        account = self._portfolio_ready()
        status, body = self._request("POST", f"/portfolio/{account}/positions/invalidate")
        self._check_error_body("positions invalidate", status, body)

    def positions(self, fresh: bool = True, max_pages: int = 200) -> list[dict]:
        """Every position: pages 0, 1, ... until an empty page (IBKR pages hold up to 100). The
        portfolio data is cached by the gateway: `fresh` invalidates it first."""
        account = self._portfolio_ready()
        if fresh:
            self.invalidate_positions()
        result: list[dict] = []
        for page in range(max_pages):
            status, body = self._request("GET", f"/portfolio/{account}/positions/{page}", expect=list)
            body = self._check_error_body(f"positions page {page}", status, body)
            if not body:  # `[]`: the end (an empty *body* is not an end: it was retried, then refused)
                return result
            if not all(isinstance(row, dict) for row in body):
                raise self._malformed(f"positions page {page}", status, body, list)
            result.extend(body)
        raise IBKRRequestError(f"positions did not end after {max_pages} pages", "report this: IBKR kept paging")

    def summary(self) -> dict:
        account = self._portfolio_ready()
        status, body = self._request("GET", f"/portfolio/{account}/summary", expect=dict)
        return self._check_error_body("account summary", status, body)

    def ledger(self) -> dict:
        account = self._portfolio_ready()
        status, body = self._request("GET", f"/portfolio/{account}/ledger", expect=dict)
        return self._check_error_body("account ledger", status, body)

    def pnl(self) -> dict | None:
        """This account's row of `GET /iserver/account/pnl/partitioned` ({'dpl': daily P&L, 'nl',
        'upl', ...}), or None when IBKR has no row for it yet."""
        account = self.account_id
        status, body = self._request("GET", "/iserver/account/pnl/partitioned", expect=dict)
        body = self._check_error_body("account P&L", status, body)
        rows = body.get("upnl")
        for key, row in (rows.items() if isinstance(rows, dict) else ()):
            if str(key).split(".")[0] == account and isinstance(row, dict):
                return row
        return None

    # ------------------------------------------------------------------ orders
    def place_orders(self, orders: list[dict]) -> list[dict]:
        """`POST /iserver/account/{acct}/orders` plus the reply loop; returns IBKR's accepted
        answer ([{'order_id', 'order_status', ...}]). Sent once, never retried. Raises
        IBKRDuplicateOrder, IBKROrderRejected (IBKR's text), IBKROrderStateUnknown (transport),
        IBKRLiveAccountRefused (live account without allow_live)."""
        info = self.check_may_trade()
        foreign = sorted({str(o["acctId"]) for o in orders if o.get("acctId") not in (None, "", info.account_id)})
        if foreign:
            raise IBKRAccountError(
                f"an order names account {', '.join(foreign)}, but the checked account is {info.account_id}; "
                "nothing was sent", "build orders for the account the client chose (IBKR_ACCOUNT_ID)")
        coid = next((o.get("cOID") for o in orders if o.get("cOID")), "")
        with self._gate.exclusive():  # nothing else may reach the gateway until the reply loop ends
            status, body = self._request("POST", f"/iserver/account/{info.account_id}/orders",
                                         json={"orders": orders}, order=True)
            try:
                return self._confirm_loop(status, body, coid, f"order {coid or '(no cOID)'}")
            finally:
                self._invalidate_order_caches()

    def _confirm_loop(self, status: int, body: Any, coid: str, what: str) -> list[dict]:
        """Judge each answer of a placement/modification and its replies. An answer that may hide an
        accepted order (5xx without IBKR's reason, a 2xx that is not JSON or has no order id) is
        IBKROrderStateUnknown, never a rejection: a rejection is final for the order desk, while
        an unknown state is reconciled by cOID before anything is sent again."""
        unknown_fix = ("do not re-send by hand: the next run looks the order up by its cOID at IBKR before sending "
                       "anything (or check the order list in Client Portal)")
        for _ in range(self.pacing.reply_rounds + 1):
            for text in self._strings(body):  # ibind looks for this anywhere in the body; so do we
                duplicate = _DUPLICATE_RE.search(text)
                if duplicate:
                    raise IBKRDuplicateOrder(duplicate.group("coid").strip() or coid, " ".join(text.split())[:300])
            if isinstance(body, NotJSON) or (body is None and status < 400):
                if 400 <= status < 500:
                    raise IBKROrderRejected(f"IBKR refused {what} with HTTP {status} and {describe_body(body)}",
                                            "check the gateway log; nothing was accepted",
                                            ibkr_text=self._error_text(body))
                raise IBKROrderStateUnknown(
                    f"the gateway answered {what} with HTTP {status} and {describe_body(body)} instead of IBKR's "
                    "JSON answer: the order may or may not have been accepted; it was not sent again", unknown_fix)
            items = body if isinstance(body, list) else [body] if isinstance(body, dict) else []
            accepted = [i for i in items if isinstance(i, dict) and i.get("order_id") not in (None, "")]
            text = "" if accepted else (self._error_field(body)
                                        or next((self._error_field(i) for i in items if self._error_field(i)), ""))
            if text:
                raise IBKROrderRejected(
                    f"IBKR rejected {what} (HTTP {status}): {text}",
                    "read IBKR's reason; fix the order or the account's precautionary settings (Client Portal > "
                    "Settings > Order Presets), then run again", ibkr_text=text)
            if status >= 500:  # no error text: the gateway or IBKR's backend failed mid-way
                raise IBKROrderStateUnknown(
                    f"IBKR answered {status} without an explanation to {what}: it may or may not have been "
                    "accepted; it was not sent again", unknown_fix)
            if status >= 400:
                raise IBKROrderRejected(f"IBKR answered {status} to {what} with {describe_body(body)}",
                                        "check the gateway log; nothing was accepted", ibkr_text=describe_body(body))
            questions = [i for i in items if isinstance(i, dict) and i.get("id") not in (None, "")
                         and ("message" in i or "messageIds" in i)]
            if not questions:
                if not accepted:
                    raise IBKROrderStateUnknown(
                        f"IBKR's answer to {what} has neither an order id nor a question ({describe_body(body)})",
                        unknown_fix)
                return accepted
            ids: list[str] = []
            messages: list[str] = []
            for question in questions:  # IBKR asks one at a time; should several come, all must be allowed
                raw_ids = question.get("messageIds")
                raw_ids = raw_ids.split(",") if isinstance(raw_ids, str) else raw_ids if isinstance(raw_ids, list) else []
                ids.extend(str(i).strip() for i in raw_ids if str(i).strip())
                message = question.get("message")
                messages.append(" ".join(str(m) for m in message) if isinstance(message, list) else str(message or ""))
            ids = list(dict.fromkeys(ids))
            message = " ".join(" ".join(messages).split())
            reply_id = str(questions[0]["id"])
            if ids and all(i in self.auto_confirm for i in ids):
                log.info("IBKR asked %s for %s; auto-confirmed (allow-list)", ",".join(ids), what)
                status, body = self._request("POST", f"/iserver/reply/{reply_id}", json={"confirmed": True},
                                             order=True)
                continue
            try:  # decline straight away: the order is thrown away
                self._request("POST", f"/iserver/reply/{reply_id}", json={"confirmed": False}, order=True)
            except IBKRError as exc:
                log.warning("declining IBKR question %s failed (%s); the order is void anyway", ids, exc.problem)
            ids = tuple(ids)
            raise IBKROrderRejected(
                f"IBKR asked to confirm {what} with message {', '.join(ids) or '(no id)'}: {message!r}. That id is "
                "not in the auto-confirm list, so the order was declined and nothing was placed",
                "if orders with this warning are acceptable without a human, add the id to IBKR_AUTO_CONFIRM "
                f"(now: {', '.join(self.auto_confirm) or 'none'}); otherwise review and place the order by hand",
                ibkr_text=message, message_ids=ids)
        raise IBKROrderRejected(f"IBKR kept asking questions about {what} after {self.pacing.reply_rounds} replies",
                                "place the order by hand in Client Portal and review its warnings")

    def _invalidate_order_caches(self) -> None:
        with self._state:
            self._orders_cache = None
            self._trades_cache = None

    def live_orders(self, max_age: float = 0.0) -> list[dict]:
        """`GET /iserver/account/orders?accountId=...` (1 per 5 s). The first call of a brokerage
        session can come back empty or incomplete, so it is asked twice; later calls trust the
        answer. `max_age` reuses an answer that recent (none of our own order actions since)."""
        account = self.accounts().account_id
        with self._state:
            cached = self._orders_cache
            if cached and max_age > 0 and time.monotonic() - cached[0] <= max_age:
                return cached[1]
        orders: list[dict] = []
        for _ in range(3):
            status, body = self._request("GET", "/iserver/account/orders", params={"accountId": account},
                                         expect=(dict, list))
            body = self._check_error_body("live orders", status, body)
            listed = body.get("orders") if isinstance(body, dict) else body  # documented: {"orders": [...]}
            if listed is not None and not isinstance(listed, list):
                raise self._malformed("live orders: their 'orders'", status, listed, list)
            orders = [o for o in listed or () if isinstance(o, dict)]
            with self._state:  # the session this answer came from (a re-open during the call counts)
                first = self._live_orders_epoch != self._session_epoch
                self._live_orders_epoch = self._session_epoch
            incomplete = isinstance(body, dict) and parse_flag(body.get("snapshot")) is False
            if not (first or incomplete):
                break
        with self._state:
            self._orders_cache = (time.monotonic(), orders)
        return orders

    def order_status(self, order_id: int | str) -> dict:
        self.accounts()  # pre-flight
        status, body = self._request("GET", f"/iserver/account/order/status/{order_id}", expect=dict)
        return self._check_error_body(f"status of order {order_id}", status, body,
                                      fix="IBKR answers 503 for orders that ended before this session")

    def trades(self, days: int = 7, max_age: float = 0.0) -> list[dict]:
        """Executions of the last `days` (1-7) via `GET /iserver/account/trades` (1 per 5 s)."""
        days = max(1, min(int(days), 7))
        self.accounts()
        with self._state:
            cached = self._trades_cache
            if cached and max_age > 0 and cached[1] >= days and time.monotonic() - cached[0] <= max_age:
                return cached[2]
        status, body = self._request("GET", "/iserver/account/trades", params={"days": str(days)}, expect=list)
        rows = [row for row in self._check_error_body("trades", status, body) if isinstance(row, dict)]
        with self._state:
            self._trades_cache = (time.monotonic(), days, rows)
        return rows

    @staticmethod
    def order_fields_from_status(status: dict) -> dict:
        """The original order's fields, rebuilt from `order/status` (a modify must repeat them all)."""
        types = {"LIMIT": "LMT", "LMT": "LMT", "STOP": "STP", "STP": "STP", "MARKET": "MKT", "MKT": "MKT",
                 "STOP_LIMIT": "STOP_LIMIT", "STOP LIMIT": "STOP_LIMIT"}
        order_type = types.get(str(status.get("order_type") or status.get("orderType") or "").upper())
        if order_type is None:
            raise IBKRRequestError(f"cannot modify an order of type {status.get('order_type')!r}",
                                   "modify it in Client Portal")
        side = {"B": "BUY", "S": "SELL"}.get(str(status.get("side")), str(status.get("side")))
        conid = parse_conid(status.get("conid"))
        if conid is None:
            raise IBKRMalformedAnswer(f"IBKR's status of the order has no usable conid ({status.get('conid')!r})",
                                      "modify the order in Client Portal, or pass its original fields")
        fields = {"conid": conid, "orderType": order_type, "side": side,
                  "quantity": parse_number(status.get("total_size") or status.get("size")),
                  "tif": str(status.get("tif") or "DAY")}
        price = parse_number(status.get("limit_price")) if order_type in ("LMT", "STOP_LIMIT") else \
            parse_number(status.get("stop_price") or status.get("limit_price"))
        if price is not None:
            fields["price"] = price
        aux = parse_number(status.get("stop_price")) if order_type == "STOP_LIMIT" else None
        if aux:
            fields["auxPrice"] = aux
        if fields["quantity"] is not None and float(fields["quantity"]).is_integer():
            fields["quantity"] = int(fields["quantity"])
        return fields

    def modify_order(self, order_id: int | str, original: dict | None = None, **changes) -> list[dict]:
        """`POST /iserver/account/{acct}/order/{orderId}`: one object repeating every original field
        with only `changes` different; the answer may ask questions (same policy as placing)."""
        info = self.check_may_trade()
        fields = dict(original) if original else self.order_fields_from_status(self.order_status(order_id))
        fields.pop("cOID", None)
        fields.update(changes)
        with self._gate.exclusive():
            status, body = self._request("POST", f"/iserver/account/{info.account_id}/order/{order_id}",
                                         json=fields, order=True)
            try:
                return self._confirm_loop(status, body, "", f"modification of order {order_id}")
            finally:
                self._invalidate_order_caches()

    def cancel_order(self, order_id: int | str, timeout: float | None = None) -> dict:
        """`DELETE /iserver/account/{acct}/order/{orderId}` (which only says 'Request was submitted'),
        then poll the order status until Cancelled (or another final state). Returns that status."""
        account = self.accounts().account_id
        status, body = self._request("DELETE", f"/iserver/account/{account}/order/{order_id}", order=True)
        self._invalidate_order_caches()
        if status < 300 and (body is None or isinstance(body, NotJSON)):
            # the cancel may or may not have arrived: the order's own status tells (polled below)
            log.warning("IBKR answered the cancel of order %s with %s; polling its status", order_id,
                        describe_body(body))
        else:
            self._check_error_body(f"cancel of order {order_id}", status, body,
                                   fix="check the order id (an unknown id answers \"OrderID ... doesn't exist\")")
        deadline = time.monotonic() + (self.pacing.cancel_timeout if timeout is None else timeout)
        last = ""
        while True:
            current = self.order_status(order_id)
            last = str(current.get("order_status") or current.get("status") or "")
            if last in FINAL_ORDER_STATES:
                self._invalidate_order_caches()
                return current
            if time.monotonic() >= deadline:
                raise IBKRTimeout(f"order {order_id} was not cancelled in time (last status {last!r})",
                                  "check it in Client Portal; a cancel of a working order usually completes in "
                                  "seconds, a filled order cannot be cancelled")
            time.sleep(self.pacing.poll_interval)
