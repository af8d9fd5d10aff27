"""Dagster resources: one per concern of the mode table, each picking its implementation.

`resources_from_env()` reads the environment (see .env.example); fields can also be set in the
Dagster launchpad, except the safety switches, which only the deployment sets (BrokerResource). Heavy libraries (boto3, kaleido, openai) are imported only when used.
"""


import functools
import logging
import os
import threading
from pathlib import Path

import dagster as dg
from pydantic import Field

from trading_pipeline import config
from trading_pipeline.adapters import alerts
from trading_pipeline.errors import ConfigError
from trading_pipeline.graph.ibkr import IBKRResource
from trading_pipeline.graph.io_managers import BatchFilesystemIOManager, batch_s3_pickle_io_manager


class TradingDatabaseResource(dg.ConfigurableResource):
    """The trading database (SQLAlchemy URL). SQLite file by default; the schema is created on first use."""

    url: str

    def sessions(self):
        from trading_pipeline.adapters.trading_db import session_factory

        return session_factory(config.normalize_database_url(self.url))

    def describe(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)


def csv_dir_missing() -> ConfigError:
    return ConfigError("TRADING_MARKET_DATA=csv needs a folder of CSV files, and TRADING_CSV_DIR is not set",
                       "set TRADING_CSV_DIR to the folder holding <SYMBOL>_<timeframe>.csv files")


class MarketDataResource(dg.ConfigurableResource):
    """Where bars come from: simulated (default), csv, ibkr."""

    mode: str = "simulated"
    seed: int = 0
    csv_dir: str | None = None
    ibkr: IBKRResource

    def source(self):
        from trading_pipeline.adapters import market_data

        if self.mode == "simulated":
            return market_data.SimulatedMarketData(seed=self.seed)
        if self.mode == "csv":
            if not self.csv_dir:
                raise csv_dir_missing()
            return market_data.CsvMarketData(Path(self.csv_dir))
        if self.mode == "ibkr":
            return self.ibkr.market_data()
        raise ConfigError(f"market data mode {self.mode!r} is unknown", "use TRADING_MARKET_DATA=simulated, csv or ibkr")


class AnalystResource(dg.ConfigurableResource):
    """Who reads the charts: rules (deterministic, default) or openai (vision model). The OpenAI
    settings and key are read from the environment at run time, never stored as resource config
    (config shows in the launchpad)."""

    mode: str = "rules"

    def for_run(self, sessions, run_id: str, run_tags):
        if self.mode == "rules":
            from trading_pipeline.core.rules_analyst import RulesAnalyst

            return RulesAnalyst()
        if self.mode == "openai":
            from trading_pipeline.adapters.openai_analyst import OpenAIAnalyst

            # With OPENAI_ANONYMIZE_CHARTS the analyst draws the model's chart itself, in the process's one Chromium.
            return OpenAIAnalyst.from_env(os.environ, sessions, run_id=run_id, run_tags=run_tags,
                                          render_png=lambda figure: ChartRendererResource().renderer().render_png(figure))
        raise ConfigError(f"analyst mode {self.mode!r} is unknown", "use TRADING_ANALYST=rules or openai")


class ChartStoreResource(dg.ConfigurableResource):
    """Where chart PNGs go: a local folder (default) or S3/MinIO through dagster-aws S3Resource."""

    mode: str = "local"
    local_dir: str = ""
    s3_bucket: str = "trading-charts"
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    # browser links to charts (chart_store.chart_base_url); None: presigned links (S3 only)
    base_url: str | None = None

    def store(self):
        from trading_pipeline.adapters.chart_store import LocalChartStore, S3ChartStore

        if self.mode == "local":
            return LocalChartStore(Path(self.local_dir), self.base_url)
        from dagster_aws.s3 import S3Resource

        # Credentials and region come from the usual AWS_* variables (boto3's own lookup).
        client = S3Resource(endpoint_url=self.s3_endpoint_url).get_client()
        return S3ChartStore(client, self.s3_bucket, self.s3_prefix, self.base_url)


class ChartRendererResource(dg.ConfigurableResource):
    """Renders chart figures to PNG through one persistent Chromium, shared by every run in the
    process (the demo, tests, benchmarks and Celery workers run many in one process; it is closed
    at exit). A run that renders charts starts the browser when the run starts, in the background,
    so its start-up overlaps the market data and indicator steps.

    With TRADING_RENDER_SOCKET set (the run launcher sets it), the process renders through that
    render service's warm browser instead (adapters/render_service.py), and falls back to its own
    Chromium, with one warning, if the service does not answer or goes away."""

    width: int = 1920
    height: int = 1080
    timeout_seconds: float = 60.0

    def setup_for_execution(self, context) -> None:
        threading.Thread(target=self._warm_up, name="chart-renderer-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        try:
            self.renderer()
        except Exception as error:  # noqa: BLE001 - the render itself reports it, with the fix
            logging.getLogger(__name__).debug(f"chart renderer warm-up failed: {error}")

    def renderer(self):
        """The process's ChartRenderer, or a RenderServiceClient (same rendering methods)."""
        from trading_pipeline.adapters.render_service import RENDER_SOCKET_ENV

        with _RENDERER_LOCK:  # the warm-up thread and a render never start two browsers
            socket_path = os.environ.get(RENDER_SOCKET_ENV, "").strip()
            if socket_path:
                return _service_client(socket_path, self.timeout_seconds)
            return _shared_renderer(self.timeout_seconds)


_RENDERER_LOCK = threading.RLock()  # re-entered by a client that falls back while it is created


@functools.lru_cache(maxsize=2)
def _shared_renderer(timeout_seconds: float):
    from trading_pipeline.adapters.chart_render import ChartRenderer

    return ChartRenderer(timeout_s=timeout_seconds).start()


@functools.lru_cache(maxsize=2)
def _service_client(socket_path: str, timeout_seconds: float):
    from trading_pipeline.adapters.render_client import RenderServiceClient

    def local_renderer():
        with _RENDERER_LOCK:
            return _shared_renderer(timeout_seconds)

    return RenderServiceClient(socket_path, fallback=local_renderer)


class BrokerResource(dg.ConfigurableResource):
    """Where orders go: paper (simulated fills in the trading database, default) or ibkr.

    Whether orders may be sent at all (TRADING_ORDERS_ENABLED, and the strategy's `orders.enabled`)
    and whether a live account is allowed (TRADING_ALLOW_LIVE) are NOT fields here: they are read
    from the deployment's environment when an order is sent (config.SafetySwitches), so no run's
    config can turn them on. The two fields below exist only to refuse a run that tries.
    """

    mode: str = "paper"
    paper_equity: float = 100_000.0
    database: TradingDatabaseResource
    ibkr: IBKRResource
    orders_enabled: bool | None = Field(None, description="Refused: set TRADING_ORDERS_ENABLED in the deployment.")
    allow_live: bool | None = Field(None, description="Refused: set TRADING_ALLOW_LIVE in the deployment.")

    def setup_for_execution(self, context) -> None:
        refuse_run_set_switches(self, {"orders_enabled": "TRADING_ORDERS_ENABLED", "allow_live": "TRADING_ALLOW_LIVE"})

    def broker(self, symbols: tuple[str, ...] = ()):
        if self.mode == "paper":
            from trading_pipeline.adapters.broker import PaperBroker

            commission_model, slippage_bps = config.paper_costs()
            return PaperBroker(self.database.sessions(), self.paper_equity, commission_model=commission_model,
                               slippage_bps=slippage_bps, clock=config.trading_now)
        if self.mode == "ibkr":
            # Positions keyed by the strategies' symbols (matched by conid); a live account is
            # refused at send time unless the deployment sets TRADING_ALLOW_LIVE=yes.
            return self.ibkr.broker(symbols=symbols)
        raise ConfigError(f"broker mode {self.mode!r} is unknown", "use TRADING_BROKER=paper or ibkr")

    def placement_held(self) -> str | None:
        """Why orders must wait (an unhealthy IBKR session per ibkr_session_sensor), or None."""
        if self.mode != "ibkr":
            return None
        from trading_pipeline.graph.ibkr import order_placement_held

        return order_placement_held(self.ibkr.status_path())


def refuse_run_set_switches(resource: dg.ConfigurableResource, switches: dict[str, str]) -> None:
    """Fail the run before any step when its config sets a safety switch (they are the deployment's)."""
    for field, variable in switches.items():
        if getattr(resource, field, None) is not None:
            raise ConfigError(config.RUN_SET_SWITCH.format(field=field, variable=variable),
                              f"remove resources.…{field} from the run config; the operator sets {variable} "
                              "in the deployment's environment")


def resources_from_env(environ: dict[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    from_process = environ is None
    environ = dict(os.environ if environ is None else environ)
    for variable in config.MODES:
        config.env_mode(variable, environ)  # an unknown mode stops the load, naming the accepted ones
    if config.env_mode("TRADING_MARKET_DATA", environ) == "csv" and not environ.get("TRADING_CSV_DIR", "").strip():
        raise csv_dir_missing()  # at load, not in every run's market_bars step
    if config.env_mode("TRADING_ANALYST", environ) == "openai":
        from trading_pipeline.adapters.openai_analyst import OpenAISettings

        OpenAISettings.from_env(environ)  # a missing key or bad setting stops the load, with the fix
    from trading_pipeline.adapters.chart_store import chart_base_url

    if environ.get("TRADING_DATABASE_URL"):
        config.check_database_url(environ["TRADING_DATABASE_URL"])  # never echoes the URL (password)
    if environ.get("TRADING_AS_OF"):
        config.parse_as_of(environ["TRADING_AS_OF"], "TRADING_AS_OF")  # a bad time stops the load, not every run
    config.check_real_prices_for_a_trading_broker(environ)  # simulated prices or a replay never reach IBKR
    config.SafetySwitches.read(environ)  # a typo in a switch stops the load (read again when sending)
    config.env_flag("TRADING_KILL_SWITCH", environ)  # so does one in the kill switch (read at each decision)
    alerts.check_webhook_url(environ)  # a typo in the alert webhook shows now, not when the first alert is lost
    config.paper_costs(environ)  # so does an unknown commission model or a bad slippage
    # A PostgreSQL URL carries a password: hand Dagster the variable's name, not its value, so
    # the UI and the event log never show it.
    if from_process and environ.get("TRADING_DATABASE_URL"):
        database = TradingDatabaseResource(url=dg.EnvVar("TRADING_DATABASE_URL"))
    else:
        database = TradingDatabaseResource(url=config.database_url(environ))
    ibkr = IBKRResource.from_env(environ)  # builds settings only; never connects at load
    resources = {
        "trading_db": database,
        "ibkr": ibkr,
        "market_data": MarketDataResource(
            mode=config.env_mode("TRADING_MARKET_DATA", environ),
            seed=int(config.env_number(environ, "TRADING_SIM_SEED", 0, whole=True)),
            csv_dir=environ.get("TRADING_CSV_DIR") or None,
            ibkr=ibkr),
        "analyst": AnalystResource(mode=config.env_mode("TRADING_ANALYST", environ)),
        "chart_store": ChartStoreResource(
            mode=config.env_mode("TRADING_CHART_STORE", environ),
            base_url=chart_base_url(config.env_mode("TRADING_CHART_STORE", environ), environ),
            local_dir=str(config.data_dir(environ)),  # keys start with charts/
            s3_bucket=environ.get("TRADING_S3_BUCKET", "trading-charts"),
            s3_prefix=environ.get("TRADING_S3_PREFIX", ""),
            s3_endpoint_url=environ.get("AWS_ENDPOINT_URL") or None),
        "chart_renderer": ChartRendererResource(
            width=int(config.env_number(environ, "TRADING_CHART_WIDTH", 1920, low=100, high=10_000, whole=True)),
            height=int(config.env_number(environ, "TRADING_CHART_HEIGHT", 1080, low=100, high=10_000, whole=True))),
        "broker": BrokerResource(
            mode=config.env_mode("TRADING_BROKER", environ),
            paper_equity=config.env_number(environ, "TRADING_PAPER_EQUITY", 100_000.0, low=1, high=1e12),
            database=database,
            ibkr=ibkr),
    }
    # One value per asset partition, also for a batched run covering many partitions
    # (graph/io_managers.py); the layout is that of Dagster's own pickle IO managers.
    if config.env_mode("TRADING_IO_MANAGER", environ) == "s3":
        # Asset values in the bucket instead of DAGSTER_HOME/storage: what runs on several
        # machines (Docker or Kubernetes run launchers, Celery workers) need to read each other's outputs.
        from dagster_aws.s3 import S3Resource

        resources["io_manager"] = batch_s3_pickle_io_manager(
            s3_resource=S3Resource(endpoint_url=environ.get("AWS_ENDPOINT_URL") or None),
            s3_bucket=environ.get("TRADING_S3_BUCKET", "trading-charts"),
            s3_prefix=environ.get("TRADING_IO_PREFIX", "dagster"))
    else:
        resources["io_manager"] = BatchFilesystemIOManager()
    return resources
