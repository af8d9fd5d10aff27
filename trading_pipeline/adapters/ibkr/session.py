"""The brokerage session: auth status, ssodh/init, keepalive, the /iserver/accounts pre-flight
(account choice, paper vs live) and the live-account check before anything is sent."""

from __future__ import annotations

import logging
import time
from typing import Any

from trading_pipeline.adapters.ibkr.errors import (
    IBKRAccountError,
    IBKRCompetingSession,
    IBKRError,
    IBKRLiveAccountRefused,
    IBKRSessionError,
)
from trading_pipeline.adapters.ibkr.models import AccountsInfo, AuthStatus, SessionHealth
from trading_pipeline.adapters.ibkr.parsing import parse_flag

log = logging.getLogger("trading_pipeline.adapters.ibkr.client")


class SessionRequests:
    """Session and account requests (mixed into IBKRClient)."""

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

    def _session_ended(self) -> None:
        """The brokerage session is gone (401, 'no session', a login redirect, 'no bridge', an auth
        status that is not healthy). Whatever session answers next is a new one, opened by us or by
        a new login, and IBKR wants its pre-flights again: /iserver/accounts before orders,
        /portfolio/accounts before /portfolio/*, the live orders asked twice."""
        with self._state:
            self._session_checked_at = None
            self._session_epoch += 1

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
            if not state.healthy:
                self._session_ended()
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
            if state.authenticated and not state.connected and not state.competing:
                raise IBKRSessionError(
                    f"the gateway at {self.login_url} is logged in but cannot reach IBKR's servers "
                    "(/iserver/auth/status: authenticated=true, connected=false)",
                    "IBKR restarts its servers nightly (about 00:00-01:00 local) and on Saturday evening: run again "
                    "later. If it persists, check the network of the gateway's machine and the gateway's log")
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
        unless the account is paper or live trading is allowed (TRADING_ALLOW_LIVE, read now)."""
        self.ensure_session(force=True)
        info = self.accounts()
        if not info.is_paper and not self.switches().allow_live:
            reported = "isPaper=false" if info.reported_is_paper is False else "not a DU... paper account"
            raise IBKRLiveAccountRefused(
                f"account {info.account_id} is a live IBKR account ({reported}): real money. Orders on a live "
                "account are refused by default, so nothing was sent",
                "set TRADING_ALLOW_LIVE=yes to allow orders on this live account, or log the gateway in with "
                "your paper trading username (a DU... account)")
        return info
