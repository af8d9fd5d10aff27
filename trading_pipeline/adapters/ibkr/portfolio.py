"""Portfolio requests: positions (every page, invalidated first), summary, ledger, daily P&L."""

from __future__ import annotations

from trading_pipeline.adapters.ibkr.errors import IBKRPnLUnavailable, IBKRRequestError


class PortfolioRequests:
    """Portfolio and P&L requests (mixed into IBKRClient)."""

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
        'upl', ...}), or None when IBKR has no row for it yet. A 404 raises IBKRPnLUnavailable: the
        gateway does not serve the endpoint, and asking again will not change that."""
        account = self.account_id
        status, body = self._request("GET", "/iserver/account/pnl/partitioned", expect=dict)
        if status == 404:
            raise IBKRPnLUnavailable(
                f"the gateway at {self.login_url} answered 404 to /iserver/account/pnl/partitioned: it does not "
                "serve IBKR's daily P&L, so the daily-loss limit cannot be checked and no new entry is sent "
                "(exits and stops go on)",
                "update the Client Portal gateway to IBKR's current build (clientportal.gw) or IBeam image and log "
                "in again; check that IBKR_GATEWAY_URL is the gateway itself plus /v1/api, not a proxy that "
                "forwards only some paths. Running again without that will fail the same way")
        body = self._check_error_body("account P&L", status, body)
        rows = body.get("upnl")
        for key, row in (rows.items() if isinstance(rows, dict) else ()):
            if str(key).split(".")[0] == account and isinstance(row, dict):
                return row
        return None
