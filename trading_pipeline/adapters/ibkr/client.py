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
Bounds    every answer whole within IBKR_READ_TIMEOUT of its request and at most 8 MB
          (adapters/bounded_http.py), not only each read: a read past either fails naming the
          endpoint; an order request past either is IBKROrderStateUnknown.
Pacing    <= 10 requests/s overall, <= 4 (max 5) history requests in flight, 1 per 5 s on the
          slow endpoints, 1/s tickle; a 429 holds every thread and backs off; reads and transport
          errors are retried with backoff; an order request is never retried.
Orders    place (single or bracket: children by `parentId`, no cOID of their own), the reply loop
          with an allow-list policy, status, live orders (the empty first answer is re-asked),
          modify, cancel (polled until Cancelled), executions; a live account is refused unless
          TRADING_ALLOW_LIVE=yes. The safety switches (TRADING_ALLOW_LIVE, IBKR_AUTO_CONFIRM) are
          read from the environment at every send and question (`switches`), never frozen here.

Modules, one job each: transport.py (requests, pacing, failure modes), session.py (auth, pre-flight,
live check), contracts.py (symbols -> conids, contract rules), data.py (history, snapshots),
portfolio.py (positions, summary, P&L), execution.py (orders), parsing.py (reading answers),
models.py (values); this module assembles them into IBKRClient.

Nothing here logs or raises a credential: the gateway holds the login; the `/tickle` session
token and `/iserver/accounts` sessionId are never kept or printed.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from trading_pipeline.adapters.bounded_http import bounded_hooks
from trading_pipeline.adapters.ibkr.contracts import ContractRequests, _contract_cache, _tick_cache
from trading_pipeline.adapters.ibkr.data import SNAPSHOT_FIELDS, MarketDataRequests
from trading_pipeline.adapters.ibkr.execution import FINAL_ORDER_STATES, OrderRequests
from trading_pipeline.adapters.ibkr.models import AccountsInfo, AuthStatus, Contract, SessionHealth, Snapshot
from trading_pipeline.adapters.ibkr.pacing import HistorySlots, OrderGate, Pacer, Pacing
from trading_pipeline.adapters.ibkr.parsing import NotJSON, describe_body, parse_conid, parse_flag, parse_number
from trading_pipeline.adapters.ibkr.portfolio import PortfolioRequests
from trading_pipeline.adapters.ibkr.session import SessionRequests
from trading_pipeline.adapters.ibkr.settings import DEFAULT_GATEWAY_URL, IBKRSwitches, read_switches, settings_from_env
from trading_pipeline.adapters.ibkr.transport import HISTORY_PATH, GatewayTransport
from trading_pipeline.config import is_loopback_host

__all__ = ["FINAL_ORDER_STATES", "HISTORY_PATH", "SNAPSHOT_FIELDS", "AccountsInfo", "AuthStatus", "Contract",
           "IBKRClient", "NotJSON", "SessionHealth", "Snapshot", "_contract_cache", "_tick_cache", "describe_body",
           "parse_conid", "parse_flag", "parse_number"]


log = logging.getLogger("trading_pipeline.adapters.ibkr")
_WARNED_UNVERIFIED: set[str] = set()  # gateway URLs warned about (no TLS verification across a network)

class IBKRClient(GatewayTransport, SessionRequests, ContractRequests, MarketDataRequests, PortfolioRequests,
                 OrderRequests):
    """One client per gateway; share it between threads (all pacing is per client instance)."""

    def __init__(
        self,
        gateway_url: str = DEFAULT_GATEWAY_URL,
        account_id: str | None = None,
        verify_ssl: bool = False,
        ca_file: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        exchanges: Iterable[str] | None = None,
        take_over_competing_session: bool = False,
        conid_overrides: dict[str, int] | None = None,
        pacing: Pacing | None = None,
        shared_pacing_dir: str | os.PathLike | None = None,
        transport: httpx.BaseTransport | None = None,
        switches: Callable[[], IBKRSwitches] = read_switches,
    ):
        self.gateway_url = self._check_url(gateway_url)
        self.account_id_setting = (account_id or "").strip() or None
        # Read at every placement, modification and question: the deployment's environment decides.
        self.switches = switches
        # None = US listings (isUS); else the listing exchanges accepted, in order of preference.
        self.exchanges = tuple(e.strip().upper() for e in exchanges) if exchanges else None
        self.take_over_competing_session = take_over_competing_session
        self.conid_overrides = {k.upper(): int(v) for k, v in (conid_overrides or {}).items()}
        self.pacing = pacing or Pacing()
        # IBKR_CA_FILE: verify against the gateway's own certificate (its bundled one is self-signed).
        self.verify_ssl = verify_ssl or ca_file is not None
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=ca_file) if ca_file else verify_ssl
        host = urlsplit(self.gateway_url).hostname or ""
        # A single-label name (docker compose's ibkr-gateway) is a container on this host's private
        # network; a dotted name or an address other than loopback may be across a network.
        unverified = not self.verify_ssl or self.gateway_url.startswith("http://")
        if unverified and not is_loopback_host(host) and ("." in host or ":" in host) \
                and self.gateway_url not in _WARNED_UNVERIFIED:  # once per process: sensors make a client a tick
            _WARNED_UNVERIFIED.add(self.gateway_url)
            log.warning("the gateway at %s is reached without a verified TLS connection (plain http, or "
                        "IBKR_VERIFY_SSL=no): anyone on the way "
                        "could read and change its traffic, orders included. Fix: set IBKR_CA_FILE to the "
                        "gateway's certificate (PEM), or run the gateway on this host", self.gateway_url)
        self._probe_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._http = httpx.Client(
            base_url=self.gateway_url, verify=verify, transport=transport,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            # IBKR_READ_TIMEOUT bounds each read and also the whole answer: a gateway trickling its
            # answer, or sending one without end, cannot hold a request (and the order gate) for ever.
            event_hooks=bounded_hooks(httpx, read_timeout),
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
        self._session_epoch = 0  # bumped when a brokerage session is (re)opened or seen to end
        self._accounts: AccountsInfo | None = None
        self._accounts_epoch = -1
        self._portfolio_epoch = -1
        self._live_orders_epoch = -1
        self._orders_cache: tuple[float, list[dict]] | None = None
        self._live_orders_partial = ""  # why the last live-orders answer may lack orders, or ""
        self._trades_cache: tuple[float, int, list[dict]] | None = None


    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> IBKRClient:
        """IBKR_GATEWAY_URL, IBKR_ACCOUNT_ID, IBKR_VERIFY_SSL, IBKR_CA_FILE, IBKR_CONNECT_TIMEOUT,
        IBKR_READ_TIMEOUT, IBKR_EXCHANGES, IBKR_CONIDS, IBKR_TAKE_OVER_SESSION,
        IBKR_HISTORY_CONCURRENCY and IBKR_STATE_DIR. The switches (TRADING_ALLOW_LIVE,
        IBKR_AUTO_CONFIRM) are read from `environ` (default: the process environment) at send time."""
        settings = settings_from_env(environ)
        if environ is not None:
            settings["switches"] = lambda: read_switches(environ)
        settings.update(overrides)
        return cls(**settings)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
