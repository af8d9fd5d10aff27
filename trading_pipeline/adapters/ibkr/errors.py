"""What can go wrong talking to the IBKR Client Portal gateway, each with the problem and the fix.

Every error a user can cause or repair is an `IBKRError`, a `UserError`: its message alone says
what happened and what to do. No error ever carries a credential: the gateway keeps the login,
this package never sees a password or a session cookie, and the `session` token that `/tickle`
returns is never copied into a message.
"""

from __future__ import annotations

from trading_pipeline.errors import ConfigError, OrderRejectedError, UserError

LOGIN_FIX = (
    "open {login_url} in a browser on the machine that runs the gateway and log in (2FA included); "
    "for a paper account use the paper trading username (Client Portal > Settings > Paper Trading Account)"
)


class IBKRError(UserError):
    """Base of every IBKR adapter error."""


class IBKRConfigError(IBKRError, ConfigError):
    """An IBKR_* variable is wrong (URL, account id, timeouts, auto-confirm list, ...)."""


class IBKRGatewayUnreachable(IBKRError):
    """Nothing answers at the gateway URL (not started, wrong port, or down for maintenance)."""


class IBKRTLSError(IBKRError):
    """TLS verification failed: the gateway's bundled certificate is self-signed."""


class IBKRNotLoggedIn(IBKRError):
    """The gateway runs, but nobody is logged in (401, 'no session', or the session expired)."""


class IBKRAccessDenied(IBKRError):
    """403 'Access Denied': this machine's IP is not in the gateway's `ips.allow` list."""


class IBKRCompetingSession(IBKRError):
    """The same username holds the brokerage session elsewhere (TWS, IBKR Mobile, another portal)."""


class IBKRSessionError(IBKRError):
    """The brokerage (/iserver) session could not be opened or was lost."""


class IBKRAccountError(IBKRError, ConfigError):
    """The account to trade cannot be chosen (missing, unknown or ambiguous IBKR_ACCOUNT_ID)."""


class IBKRLiveAccountRefused(IBKRError):
    """An order was about to go to a live (real-money) account without TRADING_ALLOW_LIVE=yes."""


class IBKRContractError(IBKRError):
    """A symbol has no, or more than one, matching IBKR contract."""


class IBKRHistoryRequestError(IBKRError):
    """A history request IBKR would refuse (period/bar outside its table) or that returned no bars."""


class IBKRRateLimited(IBKRError):
    """IBKR kept answering 429: the gateway's IP is in IBKR's penalty box."""


class IBKRRequestError(IBKRError):
    """IBKR answered an error we cannot recover from (error body or unexpected status)."""

    def __init__(self, problem: str, fix: str, status: int | None = None, ibkr_text: str | None = None):
        super().__init__(problem, fix)
        self.status = status
        self.ibkr_text = ibkr_text


class IBKRPnLUnavailable(IBKRError):
    """The gateway does not serve the partitioned P&L endpoint (404): the daily-loss limit has no
    daily P&L to check. Not transient: asking again gets the same answer. The account read takes it
    as an unknown P&L (entries refused), never as a failure of the read."""


class IBKRMalformedAnswer(IBKRRequestError):
    """The gateway answered something its documented API never returns: an HTML page, an empty
    body, plain text, truncated JSON, or JSON of the wrong shape (e.g. a list where an object is
    documented, a bar without a time). Reads were retried before this is raised."""


class IBKROrderRejected(IBKRError, OrderRejectedError):
    """IBKR rejected the order, or asked a question the policy does not allow confirming
    (the order was then declined). Nothing is working at IBKR for it."""

    def __init__(self, problem: str, fix: str, ibkr_text: str = "", message_ids: tuple[str, ...] = ()):
        super().__init__(problem, fix)
        self.ibkr_text = ibkr_text
        self.message_ids = message_ids


class IBKRDuplicateOrder(IBKROrderRejected):
    """IBKR already has an order with this cOID ('Local order ID=... is already registered')."""

    def __init__(self, client_order_id: str, ibkr_text: str):
        super().__init__(
            f"IBKR already has an order with client order id {client_order_id!r} ({ibkr_text.strip()})",
            "nothing to do: the order was sent before; reconcile it by its cOID instead of sending it again",
            ibkr_text=ibkr_text)
        self.client_order_id = client_order_id


class IBKROrderStateUnknown(IBKRError):
    """A transport failure hit an order request: it may or may not have reached IBKR.
    It is never retried blindly; the next attempt reconciles by cOID first."""


class IBKRTimeout(IBKRError):
    """IBKR did not reach the expected state in time (e.g. a cancel not confirmed)."""
