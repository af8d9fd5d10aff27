"""The gateway transport: one request under every pacing rule, with IBKR's failure modes
(unreachable, TLS, 401/redirect to a login page, 403, 'no bridge', 429, 5xx, malformed answers,
answers that never end) turned into `IBKRError`s that name the problem and the fix. Reads are
retried; an order request is sent exactly once."""

from __future__ import annotations

import contextlib
import json as jsonlib
import logging
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from trading_pipeline.adapters.bounded_http import deadline_exceeded, response_too_large
from trading_pipeline.adapters.ibkr import parsing
from trading_pipeline.adapters.ibkr.errors import (
    LOGIN_FIX,
    IBKRAccessDenied,
    IBKRConfigError,
    IBKRError,
    IBKRGatewayUnreachable,
    IBKRMalformedAnswer,
    IBKRNotLoggedIn,
    IBKROrderStateUnknown,
    IBKRRateLimited,
    IBKRRequestError,
    IBKRSessionError,
    IBKRTLSError,
)
from trading_pipeline.adapters.ibkr.parsing import _SHAPES, NotJSON, describe_body
from trading_pipeline.adapters.ibkr.settings import check_gateway_url

log = logging.getLogger("trading_pipeline.adapters.ibkr.client")

HISTORY_PATH = "/iserver/marketdata/history"
_TRANSIENT_HISTORY = ("chart data is not available", "too many history charts requests")
# The client's bounds on an answer (client.py sets them up): past IBKR_READ_TIMEOUT, or 8 MB.
ANSWER_TOO_LATE = deadline_exceeded(httpx)
ANSWER_TOO_LARGE = response_too_large(httpx)
ORDER_UNKNOWN_FIX = ("do not re-send by hand: the next run looks the order up by its cOID at IBKR before sending "
                     "anything (or check the gateway's order list)")


class GatewayTransport:
    """Requests to the gateway (mixed into IBKRClient, which sets up the HTTP client and pacing)."""

    _scheme_probe: bool | None = None  # http:// URL answered by a TLS server? (probed on failure)
    _probe_timeout: float = 5.0

    @staticmethod
    def _check_url(url: str) -> str:
        return check_gateway_url(url)

    @property
    def login_url(self) -> str:
        parts = urlsplit(self.gateway_url)
        return f"{parts.scheme}://{parts.netloc}"

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, *, params: dict | None = None, json: Any = None,
                 order: bool = False, ensure: bool = True, retry_no_bridge: bool = True,
                 expect: type | tuple[type, ...] | None = None, retry_5xx: bool = True) -> tuple[int, Any]:
        """Send one request under every pacing rule. Reads are retried (transport errors, 5xx,
        429 with a long global hold, and, with `expect`, a 2xx answer that is not the documented
        JSON shape: an HTML page, an empty body, truncated JSON); an order request (`order=True`)
        is sent exactly once. A read whose answer stays malformed raises IBKRMalformedAnswer; an
        `{"error": ...}` body is returned for the caller to judge. `retry_5xx=False` returns a 5xx
        answer at once (one IBKR gives by design, such as 503 for an order ended before this session)."""
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
            except ANSWER_TOO_LARGE as exc:  # the gateway answered: asking again gets the same
                raise self._too_large(method, path, exc, order) from None
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if self._plain_http_to_tls():
                    raise self._scheme_error(order) from None
                if isinstance(exc, ANSWER_TOO_LATE):
                    if order or attempts_transport >= self.pacing.read_retries:
                        raise self._too_late(method, path, exc, order, attempts_transport + 1) from None
                elif order:
                    raise IBKROrderStateUnknown(
                        f"{method} {path} failed in transit ({type(exc).__name__}): the order may or may not "
                        "have reached IBKR; it was not sent again", ORDER_UNKNOWN_FIX) from None
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
                self._session_ended()
                raise self._not_logged_in("the gateway answered 401 (no authenticated session)")
            if 300 <= status < 400:  # the gateway answers; a redirect is its (or a proxy's) login page
                target = urlsplit(location).path if location else "(no Location header)"
                if any(word in target.lower() for word in ("login", "sso", "auth")):
                    self._session_ended()
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
                self._session_ended()
                raise self._not_logged_in("the gateway has no session ('no session')")
            if status == 400 and "no bridge" in text.lower():
                self._session_ended()
                if retry_no_bridge and not order:
                    self.ensure_session(force=True)
                    if path != "/iserver/accounts":
                        self.accounts()  # a reopened session needs its pre-flight before the retry
                    retry_no_bridge = False
                    continue
                raise IBKRSessionError(
                    f"{method} {path}: the brokerage session is not open ('no bridge')",
                    f"the session is being reopened; run again. If it persists, log in again at {self.login_url}")
            if status >= 500 and not order and status != 501 and retry_5xx:
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

    def _too_late(self, method: str, path: str, exc: Exception, order: bool, tries: int) -> IBKRError:
        """An answer still arriving IBKR_READ_TIMEOUT after its request (a byte now and then): cut off."""
        late = (f"{method} {path}: the gateway's answer was still arriving {exc.timeout_s:g} s after the request "
                f"({exc.received:,} bytes received; IBKR_READ_TIMEOUT bounds the whole answer, not only each read)")
        slow = f"raise IBKR_READ_TIMEOUT (now {exc.timeout_s:g} s) if the gateway is slow rather than stuck"
        if order:
            return IBKROrderStateUnknown(f"{late}, so it was cut off: the order may or may not have reached IBKR; "
                                         "it was not sent again", f"{ORDER_UNKNOWN_FIX}; {slow}")
        return IBKRRequestError(
            late + (f"; cut off {tries} times" if tries > 1 else "; cut off"),
            "check that the gateway (or a proxy in front of it) is responsive: restart it if it keeps answering "
            f"this slowly; {slow}, e.g. for long history requests")

    def _too_large(self, method: str, path: str, exc: Exception, order: bool) -> IBKRError:
        """An answer larger than MAX_RESPONSE_BYTES: the gateway's are a few KB; cut off unread."""
        large = (f"{method} {path}: the gateway answered HTTP {exc.status_code} with a body larger than {exc} "
                 "(IBKR's answers are a few KB); it was cut off unread")
        not_api = ("check that IBKR_GATEWAY_URL points at the gateway itself plus /v1/api (not a proxy, a load "
                   "balancer or a web page) and that the gateway is up to date")
        if order:
            return IBKROrderStateUnknown(f"{large}: the order may or may not have reached IBKR; it was not sent again",
                                         f"{ORDER_UNKNOWN_FIX}; {not_api}")
        return IBKRMalformedAnswer(large, f"this is not an answer of the Client Portal gateway's API: {not_api}",
                                   status=exc.status_code)

    @staticmethod
    def _backoff(base: float, attempt: int, factor: float = 2.0) -> float:
        return base * factor ** (attempt - 1)

    _error_field = staticmethod(parsing.error_field)
    _error_text = staticmethod(parsing.error_text)
    _strings = staticmethod(parsing.strings)

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
                "the gateway's bundled certificate is self-signed: set IBKR_CA_FILE to the certificate the "
                "gateway serves (PEM; it must name the gateway's host), or IBKR_VERIFY_SSL=no (the default, "
                "for a gateway on this host), or install your own certificate in the gateway (sslCert in "
                "root/conf.yaml)")
        return IBKRTLSError(
            f"the TLS handshake with {self.login_url} failed ({text[:120]})",
            "the gateway normally speaks https (listenSsl: true); if yours, or the emulator, runs without TLS, "
            "set IBKR_GATEWAY_URL to http://...; otherwise check the port")

    def _plain_http_to_tls(self) -> bool:
        """Whether an http:// gateway URL points at a server that speaks TLS (the gateway's default,
        listenSsl: true). Such a server drops a plain request or answers it with TLS bytes, which
        looks like a transit failure; a TLS handshake on the same port tells them apart. Probed
        once per client, only after a transport failure on an http:// URL."""
        parts = urlsplit(self.gateway_url)
        if parts.scheme != "http":
            return False
        if self._scheme_probe is None:
            port = parts.port or 80
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # only asking whether it speaks TLS at all
            try:
                with socket.create_connection((parts.hostname, port), timeout=self._probe_timeout) as raw, \
                        context.wrap_socket(raw, server_hostname=parts.hostname):
                    self._scheme_probe = True
            except (OSError, ssl.SSLError):
                self._scheme_probe = False
        return self._scheme_probe

    def _scheme_error(self, order: bool) -> IBKRConfigError:
        parts = urlsplit(self.gateway_url)
        https = parts._replace(scheme="https").geturl()
        return IBKRConfigError(
            f"IBKR_GATEWAY_URL={self.gateway_url} uses http://, but the gateway at {parts.netloc} speaks TLS "
            "(https): it dropped the plain-HTTP request" + (" (so the order never reached IBKR)" if order else ""),
            f"use https:// : set IBKR_GATEWAY_URL={https} (the gateway's certificate is self-signed: keep "
            "IBKR_VERIFY_SSL=no, the default)")

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
