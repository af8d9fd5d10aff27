"""Dagster side of IBKR: the `ibkr` resource, the history concurrency pool, the session-health
sensor, and the hold the orders asset checks before placing anything.

- `IBKRResource` (resource key "ibkr") serves the `ibkr` market data source (`market_data()`) and
  the `ibkr` broker (`broker()`) from one client per process and configuration, so all steps of a
  run share its pacing (<= 10 requests/s, <= 4 history requests in flight).
- History steps across runs are limited by the `market_data` pool on `market_bars` (4 by default,
  graph/pools.py), so parallel runs never have more history requests in flight than IBKR allows.
- `ibkr_session_sensor` (default STOPPED; turn it on in the UI): every 60 s it tickles the
  gateway (keepalive), re-opens the brokerage session if it timed out (ssodh/init), and records
  the status in its cursor and in a small JSON file.
- `order_placement_held()` reads that file: it returns why orders are held while the last
  recorded status (at most `max_age_seconds` old) is unhealthy, else None.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from trading_pipeline.adapters.ibkr.settings import DEFAULT_GATEWAY_URL

SESSION_STATUS_FILE = "ibkr_session.json"
SENSOR_INTERVAL_SECONDS = 60  # IBKR: tickle about every 60 s; the session dies after ~6 min idle
STATUS_MAX_AGE_SECONDS = 300


def default_status_path(environ: dict[str, str] | None = None) -> Path:
    """IBKR_SESSION_STATUS_FILE, else <TRADING_DATA_DIR>/ibkr_session.json."""
    from trading_pipeline import config

    environ = os.environ if environ is None else environ
    if environ.get("IBKR_SESSION_STATUS_FILE"):
        return Path(environ["IBKR_SESSION_STATUS_FILE"]).expanduser()
    return config.data_dir(environ) / SESSION_STATUS_FILE


class IBKRResource(dg.ConfigurableResource):
    """The IBKR Client Portal gateway (IBKR_GATEWAY_URL, IBKR_ACCOUNT_ID, IBKR_VERIFY_SSL, ...).

    No safety switch is a field: TRADING_ALLOW_LIVE and IBKR_AUTO_CONFIRM widen what may be sent,
    so the client reads them from the deployment's environment at every send, and no run config
    can set them."""

    gateway_url: str = DEFAULT_GATEWAY_URL
    account_id: str | None = None
    verify_ssl: bool = False
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 30.0
    exchanges: list[str] = []  # noqa: RUF012 - pydantic copies field defaults
    conids: dict[str, int] = {}  # noqa: RUF012 - pydantic copies field defaults
    take_over_session: bool = False
    history_concurrency: int = 4
    volume_multiplier: float | None = None
    status_file: str | None = None
    state_dir: str | None = None  # shared by every process: default <TRADING_DATA_DIR>/ibkr/<url hash>
    in_use: bool = True  # does a mode (market data or broker) use IBKR? Else the session sensor idles.

    def _key(self) -> tuple:
        return (self.gateway_url, self.account_id, self.verify_ssl, self.connect_timeout_seconds,
                self.read_timeout_seconds, tuple(self.exchanges),
                tuple(sorted(self.conids.items())), self.take_over_session, self.history_concurrency,
                str(self.resolved_state_dir()))

    def resolved_state_dir(self) -> Path:
        """Where the processes talking to this gateway share their pacing (rate window, 429 hold,
        history slots, order gate) and the map of cOIDs to IBKR order ids."""
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        from trading_pipeline import config

        return config.data_dir() / "ibkr" / f"gateway-{zlib.crc32(self.gateway_url.encode()):08x}"

    def client(self):
        """The process-wide client for this configuration (shared pacing and session state)."""
        return _shared_client(self._key())

    def market_data(self):
        from trading_pipeline.adapters.ibkr.market_data import IBKRMarketData

        return IBKRMarketData(self.client(), volume_multiplier=self.volume_multiplier)

    def broker(self, symbols: Iterable[str] = ()):
        """The `ibkr` broker; `symbols` are the strategies' symbols, under which it reports positions
        and executions (matched by conid: IBKR's ticker for BRK.B is 'BRK B')."""
        from trading_pipeline.adapters.ibkr.broker import IBKRBroker

        return IBKRBroker(self.client(), id_map_path=self.resolved_state_dir() / "order-ids.json",
                          symbols=symbols)

    def status_path(self) -> Path:
        return Path(self.status_file).expanduser() if self.status_file else default_status_path()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> IBKRResource:
        """Built from the same variables as IBKRClient.from_env (errors name the variable)."""
        from trading_pipeline import config
        from trading_pipeline.adapters.ibkr.settings import positive_number, settings_from_env

        environ = dict(os.environ if environ is None else environ)
        settings = settings_from_env(environ)
        multiplier = positive_number(environ, "IBKR_HISTORY_VOLUME_MULTIPLIER", None,
                                     "100 (IBKR's history volumes of US stocks are in lots of 100)")
        return cls(
            gateway_url=settings["gateway_url"], account_id=settings["account_id"],
            verify_ssl=settings["verify_ssl"], connect_timeout_seconds=settings["connect_timeout"],
            read_timeout_seconds=settings["read_timeout"], exchanges=list(settings["exchanges"] or []),
            conids=settings["conid_overrides"], take_over_session=settings["take_over_competing_session"],
            history_concurrency=settings["pacing"].history_concurrency,
            volume_multiplier=multiplier,
            status_file=environ.get("IBKR_SESSION_STATUS_FILE") or None,
            state_dir=settings["shared_pacing_dir"],
            in_use="ibkr" in (config.env_mode("TRADING_MARKET_DATA", environ), config.env_mode("TRADING_BROKER", environ)))


@functools.lru_cache(maxsize=8)
def _shared_client(key: tuple):
    from trading_pipeline.adapters.ibkr.client import IBKRClient
    from trading_pipeline.adapters.ibkr.pacing import Pacing

    (url, account, verify, connect, read, exchanges, conids, take_over, concurrency, state_dir) = key
    return IBKRClient(url, account_id=account, verify_ssl=verify, connect_timeout=connect, read_timeout=read,
                      exchanges=exchanges or None,
                      take_over_competing_session=take_over, conid_overrides=dict(conids),
                      pacing=Pacing(history_concurrency=concurrency), shared_pacing_dir=state_dir)


# ------------------------------------------------------------------------------------------------
# Session status: written by the sensor, read before placing orders
# ------------------------------------------------------------------------------------------------

def write_session_status(path: Path, record: dict) -> None:
    """Atomically replace the status file (readers never see a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".ibkr_session.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(record, stream, sort_keys=True)
    os.replace(temporary, path)


def read_session_status(path: Path | None = None) -> dict | None:
    path = path or default_status_path()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def order_placement_held(status_path: Path | None = None, max_age_seconds: float = STATUS_MAX_AGE_SECONDS,
                         now: datetime | None = None) -> str | None:
    """Why IBKR order placement is held, or None.

    Held while the session-health sensor's last record (at most `max_age_seconds` old) says the
    session is unhealthy. No record, or an older one (the sensor is off), holds nothing: the
    broker checks the session itself right before sending.
    """
    record = read_session_status(status_path)
    if not record or "healthy" not in record:
        return None
    try:
        checked = datetime.fromisoformat(str(record["checked_at"]))
    except (KeyError, ValueError):
        return None
    now = now or datetime.now(UTC)
    age = (now - checked).total_seconds()
    if age > max_age_seconds or record["healthy"]:
        return None
    return (f"IBKR session unhealthy at {checked.isoformat(timespec='seconds')} ({age:.0f} s ago, "
            f"ibkr_session_sensor): {record.get('detail') or 'no detail'}. Order placement is held until the "
            "sensor records a healthy session (it re-checks every minute)")


@dg.sensor(
    name="ibkr_session_sensor",
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Keeps the IBKR gateway session alive (tickle), reopens a timed-out brokerage session, records "
                "its health (cursor + status file); orders are held while it is unhealthy.",
)
def ibkr_session_sensor(context: dg.SensorEvaluationContext, ibkr: IBKRResource):
    if not ibkr.in_use:  # no gateway to keep alive: never tickle (or alert about) a default URL
        return dg.SkipReason("IBKR not in use: neither TRADING_MARKET_DATA nor TRADING_BROKER is ibkr; "
                             "turn this sensor off, or set one of them to ibkr")
    health = ibkr.client().session_health()
    record = {**health.as_dict(), "gateway_url": ibkr.gateway_url}
    write_session_status(ibkr.status_path(), record)
    previous = json.loads(context.cursor) if context.cursor else {}
    context.update_cursor(json.dumps(record, sort_keys=True))
    if previous.get("healthy") != health.healthy:
        if health.healthy:
            context.log.info(f"IBKR session healthy: {health.detail}")
        else:
            from trading_pipeline.adapters.alerts import send_alert

            send_alert(f"IBKR session UNHEALTHY, order placement held: {health.detail}", logger=context.log)
    state = "healthy" if health.healthy else "unhealthy, order placement held"
    return dg.SkipReason(f"IBKR session {state}: {health.detail}")
