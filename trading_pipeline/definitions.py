"""The code location: one Definitions with the six assets, their checks, jobs and resources.

Loading reads the strategies file (TRADING_STRATEGIES_FILE) and the mode variables; a bad file or
an unknown mode stops the load with a message naming the problem and the fix.

Runs: the schedules and the market-open sensor start one run per phase over many partitions
(graph/automation.py). Decide-and-order runs jump the run queue (`dagster/priority`) and the
instance keeps a run slot free for them (`trading/phase` limits in dagster.yaml), so orders at
the open never wait behind analysis runs.

Steps run in the run's own process (in_process_executor), or on Celery workers when
TRADING_EXECUTOR=celery (broker TRADING_CELERY_BROKER, e.g. redis://127.0.0.1:6379/0; start
workers with `dagster-celery worker start -A dagster_celery.app -y deploy/celery.yaml`).
"""

from __future__ import annotations

import os
import warnings

import dagster as dg

# Beta and preview APIs used on purpose (the symbol-from-symbol×timeframe partition mapping, single-run
# backfill policies, pools): their notices at every load are noise in `make dev`, not news.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

from trading_pipeline.core.strategies import StrategiesFile
from trading_pipeline.graph.assets import build_assets
from trading_pipeline.graph.automation import build_automation
from trading_pipeline.graph.ibkr import ibkr_session_sensor
from trading_pipeline.graph.partitions import strategies, strategies_load_problem
from trading_pipeline.graph.portfolio import order_status_sensor, portfolio_sync, sync_portfolio_job
from trading_pipeline.graph.resources import resources_from_env
from trading_pipeline.graph.strategies_asset import strategies_spec

TIMEFRAME_ASSETS = ["market_bars", "indicator_frames", "chart_images", "ai_analyses"]
SYMBOL_ASSETS = ["trade_decisions", "orders"]
PHASE_TAG = "trading/phase"  # analyze | decide: dagster.yaml limits analysis runs so a decision never waits


def executor_from_env(environ: dict[str, str] | None = None):
    """in_process_executor (default), or Celery workers (TRADING_EXECUTOR=celery)."""
    from trading_pipeline import config
    from trading_pipeline.errors import ConfigError

    environ = os.environ if environ is None else environ
    if config.env_mode("TRADING_EXECUTOR", environ) != "celery":
        # Steps are small and I/O-bound; a process per step costs ~1.5 s here (dagster-notes.md).
        return dg.in_process_executor
    if not environ.get("TRADING_CELERY_BROKER"):
        raise ConfigError("TRADING_EXECUTOR=celery needs the Celery broker's URL",
                          "set TRADING_CELERY_BROKER, e.g. redis://127.0.0.1:6379/0 (the workers use the same one)")
    from dagster_celery import celery_executor

    # By name, not value: a broker URL may carry a password, and executor config shows in the UI.
    # Step results go back through the same server (as deploy/celery.yaml tells the workers).
    return celery_executor.configured({"broker": {"env": "TRADING_CELERY_BROKER"},
                                       "backend": {"env": "TRADING_CELERY_BROKER"}}, name="celery_executor")


def build_definitions(strategies_file: StrategiesFile | None = None, resources: dict | None = None,
                      executor=None) -> dg.Definitions:
    strategies_file = strategies_file or strategies()
    assets = build_assets(strategies_file)
    analyze_timeframe = dg.define_asset_job(
        "analyze_timeframe", selection=dg.AssetSelection.assets(*TIMEFRAME_ASSETS),
        tags={PHASE_TAG: "analyze"},
        description="Bars → indicators → chart → analysis for symbol × timeframe partitions (the schedules: one "
                    "run for every symbol of a timeframe).")
    decide_and_order = dg.define_asset_job(
        "decide_and_order", selection=dg.AssetSelection.assets(*SYMBOL_ASSETS),
        # Never re-run a run that may have sent an order: exactly-once would hold, but a human
        # should look at a failed order step first.
        tags={"dagster/max_retries": "0", PHASE_TAG: "decide",
              # Orders at the open first: dequeued before any waiting analysis run (and on Celery,
              # its steps before theirs).
              "dagster/priority": "10", "dagster-celery/run_priority": "10"},
        description="Consolidate both timeframes' analyses, run the risk gates, send the order (once); the sensor "
                    "at the open: one run for all its symbols, orders placed in symbol order.")
    run_backtest = dg.define_asset_job("run_backtest", selection=dg.AssetSelection.groups("backtest"),
                                       description="Replay one strategy over history (set the window in the config).")
    schedules, sensors = build_automation(strategies_file)

    return dg.Definitions(
        assets=[strategies_spec(strategies_file, strategies_load_problem()), *assets, portfolio_sync],
        jobs=[analyze_timeframe, decide_and_order, sync_portfolio_job, run_backtest],
        schedules=schedules,
        sensors=[*sensors, order_status_sensor, ibkr_session_sensor],
        resources=resources if resources is not None else resources_from_env(),
        executor=executor if executor is not None else executor_from_env(),
    )


defs = build_definitions()
