"""The code location: one Definitions with the six assets, their checks, jobs and resources.

Loading reads the strategies file (TRADING_STRATEGIES_FILE) and the mode variables; a bad file or
an unknown mode stops the load with a message naming the problem and the fix.
"""

from __future__ import annotations

import dagster as dg

from trading_pipeline.core.strategies import StrategiesFile
from trading_pipeline.graph.assets import build_assets
from trading_pipeline.graph.automation import build_automation
from trading_pipeline.graph.ibkr import ibkr_session_sensor
from trading_pipeline.graph.partitions import strategies, strategies_load_problem
from trading_pipeline.graph.strategies_asset import strategies_spec
from trading_pipeline.graph.portfolio import order_status_sensor, portfolio_sync, sync_portfolio_job
from trading_pipeline.graph.resources import resources_from_env

TIMEFRAME_ASSETS = ["market_bars", "indicator_frames", "chart_images", "ai_analyses"]
SYMBOL_ASSETS = ["trade_decisions", "orders"]


def build_definitions(strategies_file: StrategiesFile | None = None, resources: dict | None = None) -> dg.Definitions:
    strategies_file = strategies_file or strategies()
    assets = build_assets(strategies_file)
    analyze_timeframe = dg.define_asset_job(
        "analyze_timeframe", selection=dg.AssetSelection.assets(*TIMEFRAME_ASSETS),
        description="Bars → indicators → chart → analysis for one symbol × timeframe partition.")
    decide_and_order = dg.define_asset_job(
        "decide_and_order", selection=dg.AssetSelection.assets(*SYMBOL_ASSETS),
        # Never re-run a run that may have sent an order: exactly-once would hold, but a human
        # should look at a failed order step first.
        tags={"dagster/max_retries": "0"},
        description="Consolidate both timeframes' analyses, run the risk gates, send the order (once).")
    run_backtest = dg.define_asset_job("run_backtest", selection=dg.AssetSelection.groups("backtest"),
                                       description="Replay one strategy over history (set the window in the config).")
    schedules, sensors = build_automation(strategies_file)

    return dg.Definitions(
        assets=[strategies_spec(strategies_file, strategies_load_problem()), *assets, portfolio_sync],
        jobs=[analyze_timeframe, decide_and_order, sync_portfolio_job, run_backtest],
        schedules=schedules,
        sensors=[*sensors, order_status_sensor, ibkr_session_sensor],
        resources=resources if resources is not None else resources_from_env(),
        # Steps are small and I/O-bound; a process per step costs ~1.5 s here (dagster-notes.md).
        executor=dg.in_process_executor,
    )


defs = build_definitions()
