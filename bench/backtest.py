"""Backtest speed: 20 symbols × 10 years × {1d, 1w} with the rules analyst and full statistics,
in one process; then the live graph making the same kind of decision, as a ratio.

Prints the wall time (bars, indicators, loop, statistics, report), the core loop's decisions per
second (one `decide` per symbol and session; the per-timeframe analyses counted too), and the
live graph's time per decision (bars -> indicators -> chart -> analysis per timeframe, then the
decision, materialized in process) for a sample of one symbol-year's sessions, extrapolated to
the year and set against the backtest's time for that symbol-year.
Run: `.venv/bin/python bench/backtest.py [--symbols 20 --years 10 --live-samples 3]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from datetime import date

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--years", type=int, default=10)
    parser.add_argument("--live-samples", type=int, default=3, help="live-graph decisions to time (0: skip)")
    args = parser.parse_args()

    from trading_pipeline.backtest import runner
    from trading_pipeline.backtest.report import text_report
    from trading_pipeline.backtest.settings import BacktestSettings
    from trading_pipeline.backtest.statistics import summarize
    from trading_pipeline.core.strategies import parse_strategies

    symbols = [f"BENCH{i:02d}" for i in range(args.symbols)]
    strategies = parse_strategies(
        "strategies:\n  - name: bench\n    symbols: [" + ", ".join(symbols) + "]\n"
        "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n")
    end = date(2024, 12, 31)
    settings = BacktestSettings(strategy="bench", start=date(end.year - args.years + 1, 1, 1), end=end)

    started = time.perf_counter()
    loaded = runner.load(settings, strategies_file=strategies)
    loaded_at = time.perf_counter()
    result = runner.run_backtest(settings, loaded=loaded)
    ran_at = time.perf_counter()
    summary = summarize(result, result.extra_benchmarks)
    text_report(result, summary)
    wall = time.perf_counter() - started

    decisions = len(result.decisions)
    core = result.core_loop_seconds
    print(f"{args.symbols} symbols x {args.years} years x {{1d, 1w}}, rules analyst, full statistics")
    print(f"wall time {wall:.2f} s (bars {loaded_at - started:.2f} s, run {ran_at - loaded_at:.2f} s of which core "
          f"loop {core:.2f} s, statistics and report {wall - (ran_at - started):.2f} s)")
    cpu = result.core_loop_cpu_seconds
    print(f"core loop: {decisions:,} decisions ({result.analyses:,} per-timeframe analyses) = "
          f"{decisions / core:,.0f} decisions/s, {(decisions + result.analyses) / core:,.0f} decisions+analyses/s "
          f"(CPU time {cpu:.2f} s: {decisions / cpu:,.0f} decisions/s on a core of its own)")
    print(f"closed trades {summary['trades']['trades']:,}; result digest {summary['result_digest'][:16]}")

    if args.live_samples:
        per_decision = live_graph_seconds(args.live_samples)
        symbol_year = 252
        backtest_symbol_year = core / decisions * symbol_year
        print(f"live graph: {per_decision:.2f} s per decision (mean of {args.live_samples}, bars -> chart -> "
              f"analysis for both timeframes, then the decision); one symbol-year ({symbol_year} decisions) "
              f"~{per_decision * symbol_year:,.0f} s vs {backtest_symbol_year:.3f} s in the backtest's core loop: "
              f"{per_decision * symbol_year / backtest_symbol_year:,.0f}x")


def live_graph_seconds(samples: int) -> float:
    import logging

    import dagster as dg

    from trading_pipeline.core import market_calendar
    from trading_pipeline.core.strategies import parse_strategies
    from trading_pipeline.definitions import build_definitions
    from trading_pipeline.graph.assets import AS_OF_TAG
    from trading_pipeline.graph.resources import resources_from_env

    strategies = parse_strategies("strategies:\n  - name: live\n    symbols: [BENCH00]\n"
                                  "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n")
    logging.getLogger("dagster").setLevel(logging.WARNING)
    sessions = market_calendar.calendar().sessions_in_range("2024-03-01", "2024-12-31")
    with tempfile.TemporaryDirectory() as folder:
        defs = build_definitions(strategies, resources_from_env({"TRADING_DATA_DIR": folder}))
        with dg.instance_for_test(temp_dir=folder) as instance:
            def decide_at(session) -> None:
                tags = {AS_OF_TAG: market_calendar.calendar().session_close(session).isoformat()}
                for timeframe in ("1d", "1w"):
                    key = dg.MultiPartitionKey({"symbol": "BENCH00", "timeframe": timeframe})
                    assert defs.resolve_job_def("analyze_timeframe").execute_in_process(
                        partition_key=key, instance=instance, tags=tags, raise_on_error=True).success
                assert defs.resolve_job_def("decide_and_order").execute_in_process(
                    partition_key="BENCH00", instance=instance, tags=tags, raise_on_error=True).success

            decide_at(sessions[0])  # warm: imports, Chromium, first numba call
            started = time.perf_counter()
            for session in sessions[1:samples + 1]:
                decide_at(session)
            return (time.perf_counter() - started) / samples


if __name__ == "__main__":
    main()
