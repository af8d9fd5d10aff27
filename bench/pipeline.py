"""End-to-end refresh of 50 symbols × 2 timeframes on the embedded defaults.

Prints wall time, time per partition, the share spent outside our own asset code (Dagster
run/step overhead and process costs) and the import time of trading_pipeline.definitions.
Run: `make bench` or `.venv/bin/python bench/pipeline.py [--symbols N]`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def import_time() -> float:
    code = "import time; t=time.perf_counter(); import trading_pipeline.definitions; print(time.perf_counter()-t)"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--symbols", type=int, default=50)
    args = parser.parse_args()
    import dagster as dg

    from trading_pipeline.core.strategies import parse_strategies
    from trading_pipeline.definitions import build_definitions
    from trading_pipeline.graph.assets import AS_OF_TAG
    from trading_pipeline.graph.resources import resources_from_env

    symbols = [f"BENCH{i:02d}" for i in range(args.symbols)]
    strategies = parse_strategies(
        "strategies:\n  - name: bench\n    symbols: [" + ", ".join(symbols) + "]\n"
        "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n    orders: {enabled: true}\n")
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    with tempfile.TemporaryDirectory() as tmp:
        environment = {"TRADING_DATA_DIR": str(Path(tmp) / "data"), "TRADING_ORDERS_ENABLED": "yes"}
        defs = build_definitions(strategies, resources_from_env(environment))
        analyze = defs.resolve_job_def("analyze_timeframe")
        decide = defs.resolve_job_def("decide_and_order")
        tags = {AS_OF_TAG: "2026-09-01T21:30:00+00:00"}
        with dg.instance_for_test(temp_dir=tmp) as instance:
            # Warm-up outside the measurement: Chromium start, numba JIT, calendar load.
            analyze.execute_in_process(partition_key=dg.MultiPartitionKey({"symbol": symbols[0], "timeframe": "1d"}),
                                       instance=instance, tags=tags, run_config=quiet)
            run_ids = []
            started = time.perf_counter()
            for symbol in symbols:
                for timeframe in ("1d", "1w"):
                    result = analyze.execute_in_process(
                        partition_key=dg.MultiPartitionKey({"symbol": symbol, "timeframe": timeframe}),
                        instance=instance, tags=tags, run_config=quiet)
                    assert result.success, f"{symbol} {timeframe} failed"
                    run_ids.append(result.run_id)
                result = decide.execute_in_process(partition_key=symbol, instance=instance, tags=tags,
                                                   run_config=quiet)
                assert result.success, f"{symbol} decision failed"
                run_ids.append(result.run_id)
            wall = time.perf_counter() - started
            step_seconds = 0.0
            for run_id in run_ids:
                for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS):
                    step_seconds += record.dagster_event.event_specific_data.duration_ms / 1000
    partitions = len(symbols) * 2
    print(f"symbols × timeframes      {len(symbols)} × 2 = {partitions} partitions (+{len(symbols)} decision runs)")
    print(f"wall time                 {wall:.1f} s")
    print(f"per symbol×timeframe      {wall / partitions:.3f} s (all 6 assets amortized)")
    print(f"inside asset steps        {step_seconds:.1f} s")
    print(f"outside our asset code    {wall - step_seconds:.1f} s = {(wall - step_seconds) / wall:.0%} of wall time")
    print(f"import definitions        {import_time():.2f} s")


if __name__ == "__main__":
    main()
