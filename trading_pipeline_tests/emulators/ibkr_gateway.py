"""A local emulator of the IBKR Client Portal gateway endpoints the pipeline uses, with the
documented quirks (shared/reference/ibkr-client-portal-api.md), for tests, benchmarks and trying
the `ibkr` modes without an account:

    python -m trading_pipeline_tests.emulators.ibkr_gateway --port 5000 [--latency-ms 200] [--https]
        [--auth-state authenticated|connected|expired|logged_out|competing] [--live] [--account ID]

Quirks reproduced: the auth states (401 logged out, 400 'no bridge' without a brokerage session,
ssodh/init opening it, competing sessions, 403 for an IP outside the allow list); the
/iserver/accounts pre-flight of each session (before snapshots, live orders, order status, trades,
placing, modifying and cancelling); the empty first snapshot and live-orders answers; 1000 points per
history answer, period/bar checked against IBKR's table, US volumes in lots of 100; questions on
order placement and modification (o10331 for stops, o10151 for market orders, o163 for a limit >3% from
the market; a reply must come straight away: any other request voids it); `{"error": ...}`
bodies with status 200; 429 above 10 requests/s, above 5 history requests in flight and on the
1-per-5-s endpoints (optionally a penalty box); duplicate cOID rejection; order state progression
(Submitted -> Filled at the emulated market price, market orders while the market is open or at
the next open, bracket children activated, OCA with reduction on partial fills, modify with every
field repeated (a stop made a market order), PendingCancel -> Cancelled, order id -1 cancelling
every open order) with executions and
positions; the day rollover (`new_day`: finished orders leave the live list and their status answers
503, executions stay 7 days); after hours, a live list that misses working orders (ibind #43,
`after_hours_misses_working`); share classes under IBKR's spaced ticker (BRK.B is 'BRK B'); contract rules
(info-and-rules `increment`); cached positions until invalidated, and positions that lag the
fills (`lag_positions`).

Only this module imports starlette/uvicorn; the client never imports it. It serves 127.0.0.1 by
default. Test hooks: the `IBKREmulator` object (set_auth_state, set_price, inject, stats, ...)
and, for a running CLI instance, GET /__emulator__/stats and POST /__emulator__/state. `inject`
plays a hostile gateway for the next N matching requests: any status and JSON body, raw bytes
(HTML pages, empty or truncated bodies) with headers (a redirect's Location), a body streamed a
byte at a time or without end (ibkr_gateway_state's `trickle`, `flood`), the normal answer
delayed or replaced after the request took effect, or the normal answer reshaped by a function.
Without injected faults it behaves as documented.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import threading
import time

from trading_pipeline_tests.emulators.ibkr_gateway_endpoints import GatewayEndpoints
from trading_pipeline_tests.emulators.ibkr_gateway_state import (
    API,
    AUTH_STATES,
    CONTROL,
    SLOW,
    EmulatorConfig,
    EmuOrder,
    Fault,
    GatewayState,
    _error,
    _json,
    _plain,
    _schedule,
)


class IBKREmulator(GatewayEndpoints):
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
            self.certificate = ssl["ssl_certfile"]  # what a client verifying it trusts (IBKR_CA_FILE)
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
               delay: float = 0.0, process: bool = False, raw=None,
               content_type: str = "text/html; charset=utf-8", transform=None,
               headers: dict[str, str] | None = None) -> None:
        """The next `count` requests matching (method, path pattern) get the fault (see Fault)."""
        with self.state.lock:
            self.state.faults.append(Fault(method, path, status, body, count, delay, process, raw, content_type,
                                           transform, headers))

    def lag_positions(self) -> None:
        """From now on the positions answer stays as it is now, invalidated or not, whatever fills
        come (IBKR's positions can lag its fills for a few seconds; the account summary does not),
        until `catch_up_positions`."""
        with self.state.lock:
            self.state.positions_lagging = self.state.build_positions()

    def catch_up_positions(self) -> None:
        with self.state.lock:
            self.state.positions_lagging = None

    def new_day(self) -> None:
        """The day rolls over: finished orders leave the live-orders list (it covers the current
        day only) and their status (IBKR answers 503 for orders that ended before this session);
        working orders (GTC) stay, as do the executions (7 days) and the 24 h cOID registry."""
        with self.state.lock:
            for order_id in [i for i, o in self.state.orders.items() if o.status in ("Filled", "Cancelled")]:
                del self.state.orders[order_id]

    def set_market_open(self, is_open: bool) -> None:
        """Open or close the simulated market; market orders waiting for the open execute when it
        opens, at the market price (set_price)."""
        with self.state.lock:
            self.state.market_hours = "open" if is_open else "closed"
            self.state.advance()

    def fill_partially(self, order_id: int, quantity: float, price: float | None = None) -> None:
        """Execute part of a working order now (at `price`, default the market): e.g. part of a
        take-profit, which reduces its one-cancels-other sibling by as much."""
        with self.state.lock:
            order = self.state.orders[int(order_id)]
            self.state.fill(order, round(price if price is not None else self.state.price(order.conid), 2),
                            time.time(), quantity)

    def trade_by_hand(self, symbol: str, side: str, quantity: float, price: float | None = None,
                      commission: str = "1.00") -> int:
        """A trade made outside the API (in TWS, say), filled at once at `price` (default the market):
        an order with no cOID, as IBKR lists one placed without: its execution in the trades list
        has no `order_ref`, only its own IBKR `order_id`. Returns that order id."""
        with self.state.lock:
            s = self.state
            s.instruments(symbol)
            conid = s.conid_for(symbol)
            now = time.time()
            order = EmuOrder(s.next_order_id, conid, s.symbol_of(conid), side.upper(), "MKT", float(quantity), 0.0,
                             "DAY", None, None, "Submitted", now)
            s.next_order_id += 1
            s.orders[order.order_id] = order
            s.fill(order, round(price if price is not None else s.price(conid), 2), now)
            s.executions[-1]["commission"] = commission
            return order.order_id

    def add_question(self, message_id: str, text: str, count: int = 1, on: str = "place") -> None:
        """The next `count` placements (on="place") or modifications (on="modify") also ask question
        `message_id` with `text`, after the questions the emulator asks by itself."""
        if on not in ("place", "modify"):
            raise ValueError("on must be place or modify")
        with self.state.lock:
            self.state.faults.append(Fault(f"QUESTION:{on}", message_id, 200, text, count))

    def answers(self) -> list[tuple[str, str, bool]]:
        """The questions replied to so far: (place|modify, question id, confirmed)."""
        with self.state.lock:
            return list(self.state.answers)

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
            if "market_open" in data:
                self.set_market_open(bool(data["market_open"]))
            if data.get("new_day"):
                self.new_day()
            return _json(self.stats())
        return _json({"error": "unknown control endpoint"}, 404)


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
    parser.add_argument("--market-hours", choices=("calendar", "open", "closed"), default="calendar",
                        help="when market orders execute: while an XNYS session is open (calendar), or as if the "
                             "market were always open / closed (POST /__emulator__/state {\"market_open\": ...})")
    parser.add_argument("--weekly-anchor", choices=("monday", "sunday", "first_session"), default="monday")
    args = parser.parse_args(argv)
    config = EmulatorConfig(account_id=args.account, live=args.live, auth_state=args.auth_state,
                            latency_ms=args.latency_ms, positions=args.positions, cash=args.cash,
                            penalty_seconds=args.penalty_seconds, enforce_pacing=not args.no_pacing,
                            weekly_anchor=args.weekly_anchor, market_hours=args.market_hours)
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
