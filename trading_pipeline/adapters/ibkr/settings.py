"""IBKR settings from the environment, and their defaults. Light on purpose: the code location
validates these variables when it loads, without importing the client (httpx, pandas)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from trading_pipeline.adapters.ibkr.errors import IBKRConfigError
from trading_pipeline.adapters.ibkr.pacing import Pacing
from trading_pipeline.config import env_flag, env_number

DEFAULT_GATEWAY_URL = "https://localhost:5000/v1/api"
# Question ids confirmed without a human: warnings that are inherent to the pipeline's own orders.
#   o10331 / o10152: "stop order" warnings (every bracket has a STP stop-loss child)
#   o403: "order will fill immediately" (a marketable limit entry fills at its limit or better)
#   p12: the notice offering IBKR's price-management algo
#   o10151: "market order" warning: the pipeline's only market orders are exits (a stop turned into
#     a market order, or a standalone exit); declining it would leave a position the strategy
#     closes open (its stop still protects it, but the exit never happens)
# Everything else (o163 price >3% from market, o354 no market data, o383 size limit, o451 value
# limit, unknown ids) declines the order and raises IBKROrderRejected.
DEFAULT_AUTO_CONFIRM: tuple[str, ...] = ("o10331", "o10152", "o403", "p12", "o10151")


@dataclass(frozen=True)
class IBKRSwitches:
    """What widens what the IBKR client may send: orders on a live account, reply questions
    confirmed without a human. Set by the deployment, read when an order is sent or a question
    answered; never a client, resource or run setting."""

    allow_live: bool
    auto_confirm: tuple[str, ...]


def read_switches(environ: dict[str, str] | None = None) -> IBKRSwitches:
    """TRADING_ALLOW_LIVE and IBKR_AUTO_CONFIRM from the environment, now. The client calls this at
    every placement, modification and reply question (see IBKRClient `switches`). TRADING_ALLOW_LIVE
    is the deployment's safety switch (config.SafetySwitches); the allow-list is IBKR's own."""
    from trading_pipeline.config import SafetySwitches

    env = os.environ if environ is None else environ
    auto = env.get("IBKR_AUTO_CONFIRM")
    ids = DEFAULT_AUTO_CONFIRM if auto is None else auto.split(",")
    return IBKRSwitches(allow_live=SafetySwitches.read(env).allow_live,
                        auto_confirm=tuple(dict.fromkeys(i.strip() for i in ids if i.strip())))


def check_gateway_url(url: str) -> str:
    """IBKR_GATEWAY_URL, checked when the code location loads (and again by the client)."""
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


def check_ca_file(path: str | None) -> str | None:
    """IBKR_CA_FILE: a PEM file of the certificate (or its CA) the gateway's TLS must verify against;
    with it, verification is on whatever IBKR_VERIFY_SSL says. None when unset."""
    import ssl

    path = (path or "").strip()
    if not path:
        return None
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise IBKRConfigError(f"IBKR_CA_FILE={path!r} does not exist",
                              "give the path of the gateway's certificate (PEM), or unset IBKR_CA_FILE") from None
    except (ssl.SSLError, OSError, ValueError) as error:
        raise IBKRConfigError(f"IBKR_CA_FILE={path!r} is not a readable PEM certificate ({error})",
                              "give the gateway's certificate in PEM form (-----BEGIN CERTIFICATE-----), "
                              "e.g. exported with `openssl x509 -in cert.crt -out gateway.pem`") from None
    return path


def positive_number(env, name: str, default: float | None, example: str) -> float | None:
    """A number variable above 0, or `default` when unset (config.env_number, raising IBKRConfigError)."""
    return env_number(env, name, default, above=0, example=example, error=IBKRConfigError)


def settings_from_env(environ: dict[str, str] | None = None) -> dict:
    """Client keyword arguments from the environment (see IBKRClient.from_env). The safety switches
    (TRADING_ALLOW_LIVE, IBKR_AUTO_CONFIRM) are not among them: `read_switches` reads them at send
    time; they are checked here only so that a typo stops the code location when it loads."""
    env = os.environ if environ is None else environ

    def number(name: str, default: float) -> float:
        return positive_number(env, name, default, f"seconds, e.g. {default:g}")

    read_switches(env)  # a typo in TRADING_ALLOW_LIVE fails now, not at the first order
    exchanges = [e for e in (env.get("IBKR_EXCHANGES") or "").split(",") if e.strip()]
    overrides = {}
    for item in (env.get("IBKR_CONIDS") or "").split(","):
        if not item.strip():
            continue
        symbol, _, conid = item.partition("=")
        if not conid.strip().isdigit():
            raise IBKRConfigError(f"IBKR_CONIDS entry {item.strip()!r} is not SYMBOL=conid",
                                  "write it like IBKR_CONIDS=AAPL=265598,BRK.B=72063691")
        overrides[symbol.strip().upper()] = int(conid)
    # A count, not seconds: a fraction would be cut silently, 6 refused without the variable's name.
    concurrency = int(env_number(env, "IBKR_HISTORY_CONCURRENCY", 4, low=1, high=5, whole=True,
                                 example="4 (IBKR allows 5 history requests in flight)", error=IBKRConfigError))
    return {
        "gateway_url": check_gateway_url(env.get("IBKR_GATEWAY_URL") or DEFAULT_GATEWAY_URL),
        "account_id": env.get("IBKR_ACCOUNT_ID") or None,
        "verify_ssl": env_flag("IBKR_VERIFY_SSL", env),
        "ca_file": check_ca_file(env.get("IBKR_CA_FILE")),
        "connect_timeout": number("IBKR_CONNECT_TIMEOUT", 5.0),
        "read_timeout": number("IBKR_READ_TIMEOUT", 30.0),
        "exchanges": exchanges or None,
        "take_over_competing_session": env_flag("IBKR_TAKE_OVER_SESSION", env),
        "conid_overrides": overrides,
        "pacing": Pacing(history_concurrency=concurrency),
        "shared_pacing_dir": env.get("IBKR_STATE_DIR") or None,
    }
