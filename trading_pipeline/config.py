"""Settings from the environment: which implementation serves each concern, and where data lives.

Every variable is documented in .env.example and docs/modes-and-variables.md. Unknown values stop
the code location from loading with a message that names the variable and the accepted values.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from trading_pipeline.errors import ConfigError

MODES: dict[str, tuple[str, ...]] = {
    "TRADING_MARKET_DATA": ("simulated", "csv", "ibkr"),
    "TRADING_ANALYST": ("rules", "openai"),
    "TRADING_BROKER": ("paper", "ibkr"),
    "TRADING_CHART_STORE": ("local", "s3"),
    "TRADING_IO_MANAGER": ("fs", "s3"),
    "TRADING_EXECUTOR": ("in_process", "celery"),
}
YES_VALUES = ("yes", "true", "1", "on")
NO_VALUES = ("no", "false", "0", "off")


def env_mode(variable: str, environ: dict[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    allowed = MODES[variable]
    value = environ.get(variable, "").strip().lower() or allowed[0]
    if value not in allowed:
        raise ConfigError(
            f"{variable}={environ.get(variable)!r} is not a known mode",
            f"set {variable} to one of: {', '.join(allowed)} (default {allowed[0]}), or unset it",
        )
    return value


def env_flag(variable: str, environ: dict[str, str] | None = None, default: bool = False) -> bool:
    """A yes/no variable. Anything else stops with the accepted values: a typo in a safety switch
    must not silently mean "no" (or "yes")."""
    environ = os.environ if environ is None else environ
    value = environ.get(variable, "").strip().lower()
    if not value:
        return default
    if value in YES_VALUES:
        return True
    if value in NO_VALUES:
        return False
    raise ConfigError(f"{variable}={environ.get(variable)!r} is neither yes nor no",
                      f"set {variable} to yes or no (also accepted: {', '.join(YES_VALUES + NO_VALUES)})")


def data_dir(environ: dict[str, str] | None = None) -> Path:
    """Where the embedded defaults keep their files (charts, SQLite trading database)."""
    environ = os.environ if environ is None else environ
    if environ.get("TRADING_DATA_DIR"):
        return Path(environ["TRADING_DATA_DIR"]).expanduser().resolve()
    if environ.get("DAGSTER_HOME"):
        return Path(environ["DAGSTER_HOME"]).expanduser().resolve() / "trading"
    return Path.home() / ".trading_pipeline"


def database_url(environ: dict[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    url = environ.get("TRADING_DATABASE_URL") or f"sqlite:///{data_dir(environ) / 'trading.db'}"
    return normalize_database_url(url)


def check_database_url(url: str) -> None:
    """The trading database is SQLite or PostgreSQL; say so at load, not as a driver import error."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme.split("+", 1)[0] not in ("sqlite", "postgresql", "postgres"):
        shown = f"{scheme}://…" if scheme else "a value that is not a URL"
        raise ConfigError(
            f"TRADING_DATABASE_URL is {shown}: the trading database is SQLite or PostgreSQL",
            "set it to a URL like postgresql://user:password@host:5432/trading, or unset it for "
            "the SQLite file in $TRADING_DATA_DIR")


def normalize_database_url(url: str) -> str:
    """A bare postgresql:// (or Heroku-style postgres://) URL means the psycopg2 driver we ship;
    SQLAlchemy 2.1 would otherwise pick psycopg 3, which is not installed."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def is_loopback_host(host: str | None) -> bool:
    """Whether `host` (a URL's hostname) is this machine: localhost, 127.0.0.0/8 or ::1."""
    import ipaddress

    host = (host or "").strip().lower().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_as_of(text: str, source: str = "as_of") -> datetime:
    """Parse an ISO-8601 time; naive times are taken as UTC. `source` names where it came from."""
    try:
        value = datetime.fromisoformat(text.strip())  # "Z" too, since Python 3.11
    except ValueError:
        raise ConfigError(
            f"{source} {text!r} is not an ISO-8601 time",
            "use a time like 2026-11-20T21:30:00Z (UTC) or 2026-11-20T16:30:00-05:00",
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@dataclass(frozen=True)
class KillSwitch:
    """Stops new entries (exits, which only reduce a position, still go out): TRADING_KILL_SWITCH=yes,
    or a file named KILL_SWITCH in the data dir."""

    engaged: bool
    reason: str

    @classmethod
    def read(cls, environ: dict[str, str] | None = None) -> KillSwitch:
        environ = os.environ if environ is None else environ
        if env_flag("TRADING_KILL_SWITCH", environ):
            return cls(True, "TRADING_KILL_SWITCH is set; unset it to allow new entries")
        file = data_dir(environ) / "KILL_SWITCH"
        if file.exists():
            return cls(True, f"kill-switch file {file} exists; delete it to allow new entries")
        return cls(False, "")


@dataclass(frozen=True)
class SafetySwitches:
    """What widens what may be sent: orders on, a live account allowed. Set by the deployment
    (environment) and read when an order is about to be sent; no run's config can change them."""

    orders_enabled: bool
    allow_live: bool

    @classmethod
    def read(cls, environ: dict[str, str] | None = None) -> SafetySwitches:
        return cls(orders_enabled=env_flag("TRADING_ORDERS_ENABLED", environ),
                   allow_live=env_flag("TRADING_ALLOW_LIVE", environ))


RUN_SET_SWITCH = ("{field} is a safety switch of the deployment ({variable}), not a run setting: this run's "
                  "config tried to set it, so the run was refused and nothing was sent")


def simulated_clock(environ: dict[str, str] | None = None) -> datetime | None:
    """TRADING_AS_OF: the deployment's simulated 'now' (paper broker only; refused with IBKR)."""
    environ = os.environ if environ is None else environ
    raw = environ.get("TRADING_AS_OF", "").strip()
    return parse_as_of(raw, "TRADING_AS_OF") if raw else None


def trading_now(environ: dict[str, str] | None = None) -> datetime:
    """The time an order is sent: the real clock, or the simulated one a paper deployment sets."""
    return simulated_clock(environ) or datetime.now(UTC)


def check_real_prices_for_a_trading_broker(environ: dict[str, str]) -> None:
    """A broker that trades receives only decisions made on real, current prices."""
    if env_mode("TRADING_BROKER", environ) != "ibkr":
        return
    if env_mode("TRADING_MARKET_DATA", environ) == "simulated":
        raise ConfigError(
            "TRADING_BROKER=ibkr with TRADING_MARKET_DATA=simulated (the default) would send real orders "
            "decided on made-up prices",
            "set TRADING_MARKET_DATA=ibkr (or csv with current files), or use TRADING_BROKER=paper")
    if environ.get("TRADING_AS_OF", "").strip():
        raise ConfigError(
            f"TRADING_AS_OF={environ['TRADING_AS_OF']!r} is set with TRADING_BROKER=ibkr: a broker that trades "
            "only receives decisions made now, never a replay of the past",
            "unset TRADING_AS_OF (a leftover in .env?); replay the past with the backtest or TRADING_BROKER=paper")


def env_number(environ, name: str, default: float | None, *, low: float = -math.inf, high: float = math.inf,
               above: float | None = None, whole: bool = False, example: str | None = None,
               error: type[ConfigError] = ConfigError) -> float | None:
    """The number variable `name`, or `default` when it is unset or empty. A word, nan or inf, a
    value outside [low, high] (or not above `above`), or a fraction when `whole`, raises `error`
    naming the variable, what it must be and the fix."""
    raw = (environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if (math.isfinite(value) and low <= value <= high and (above is None or value > above)
            and (not whole or value.is_integer())):
        return value
    kind = "a whole number" if whole else "a number"
    if above is not None:
        bounds = f" above {above:g}"
    elif math.isfinite(low) and math.isfinite(high):
        bounds = f" from {low:g} to {high:g}"
    else:
        bounds = f" ≥ {low:g}" if math.isfinite(low) else ""
    unset = "unset it" if default is None else f"unset it for {default:g}"
    raise error(f"{name}={raw!r} is not {kind}{bounds}",
                f"set {name} to {kind}{bounds}" + (f", e.g. {example}" if example else "") + f", or {unset}")


def paper_costs(environ: dict[str, str] | None = None) -> tuple[str, float]:
    """The paper broker's commission model and slippage: TRADING_PAPER_COMMISSION (ibkr_fixed,
    the default | ibkr_tiered | none) and TRADING_PAPER_SLIPPAGE_BPS (basis points on stop and
    market fills, default 0)."""
    from trading_pipeline.core.costs import COMMISSION_MODELS

    environ = os.environ if environ is None else environ
    model = environ.get("TRADING_PAPER_COMMISSION", "").strip().lower() or COMMISSION_MODELS[0]
    if model not in COMMISSION_MODELS:
        raise ConfigError(f"TRADING_PAPER_COMMISSION={environ.get('TRADING_PAPER_COMMISSION')!r} is not a known "
                          "commission model",
                          f"set TRADING_PAPER_COMMISSION to one of: {', '.join(COMMISSION_MODELS)} "
                          f"(default {COMMISSION_MODELS[0]}), or unset it")
    slippage = env_number(environ, "TRADING_PAPER_SLIPPAGE_BPS", 0.0, low=0, example="5 basis points for 0.05%")
    return model, slippage
