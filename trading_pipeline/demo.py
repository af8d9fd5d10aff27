"""`make demo`: materialize the whole graph for every strategy symbol into the persistent local
Dagster home, then print the decisions and orders with their chart locations.

Usage: python -m trading_pipeline.demo [--as-of ISO_TIME] [--symbols AAPL,MSFT]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from datetime import datetime, timezone

from trading_pipeline.core.frames import TIMEFRAMES
from trading_pipeline.errors import UserError


def _load_dotenv() -> None:
    try:
        from dotenv import load_dotenv
    except ImportError:  # dagster ships python-dotenv; without it .env is simply not read
        return
    load_dotenv(".env", override=False)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _fmt(value, pattern="{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--as-of", help="point in time of the run (ISO 8601; default TRADING_AS_OF, else now)")
    parser.add_argument("--symbols", help="comma-separated subset of the strategies' symbols")
    args = parser.parse_args(argv)
    # Dagster's beta/preview notices about APIs we chose deliberately are noise in a terminal.
    warnings.filterwarnings("ignore", message=r".*(is currently in beta|is currently in preview).*")
    _load_dotenv()
    if not os.environ.get("DAGSTER_HOME"):
        print("DAGSTER_HOME is not set. Run `make demo`, or export DAGSTER_HOME=$PWD/.dagster_home first.",
              file=sys.stderr)
        return 2
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
    broker_mode = os.environ.get("TRADING_BROKER", "paper").strip().lower() or "paper"
    if broker_mode == "paper" and "TRADING_ORDERS_ENABLED" not in os.environ:
        # The paper broker only simulates fills in the local database: the demo turns orders on
        # for it. Any other broker keeps orders off unless the user said otherwise.
        os.environ["TRADING_ORDERS_ENABLED"] = "yes"
        print("demo: paper broker, so orders are on for this run (simulated fills, no real money)")

    try:
        from dagster import DagsterInstance, MultiPartitionKey

        from trading_pipeline import config
        from trading_pipeline.definitions import build_definitions
        from trading_pipeline.graph.assets import AS_OF_TAG
        from trading_pipeline.graph.partitions import strategies

        if args.as_of or os.environ.get("TRADING_AS_OF"):
            as_of = config.parse_as_of(*((args.as_of, "--as-of") if args.as_of else
                                         (os.environ["TRADING_AS_OF"], "TRADING_AS_OF")))
        else:
            as_of = datetime.now(timezone.utc).replace(microsecond=0)
        strategies_file = strategies()
        defs = build_definitions(strategies_file)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    symbols = strategies_file.symbols()
    if args.symbols:
        wanted = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(symbols))
        if unknown:
            print(f"error: {', '.join(unknown)} not in the strategies file (it has {', '.join(symbols)})",
                  file=sys.stderr)
            return 2
        symbols = wanted

    instance = DagsterInstance.get()
    from trading_pipeline.graph.pools import configure_pools

    configure_pools(instance)
    analyze = defs.resolve_job_def("analyze_timeframe")
    decide = defs.resolve_job_def("decide_and_order")
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the UI keeps the full logs
    tags = {AS_OF_TAG: as_of.isoformat(), "trading/launched_by": "demo"}
    print(f"demo: {len(symbols)} symbols × {len(TIMEFRAMES)} timeframes as of {as_of.isoformat()}; "
          f"Dagster home {os.environ['DAGSTER_HOME']}")
    results, failures = {}, {}
    started = time.perf_counter()
    for n, symbol in enumerate(symbols, 1):
        t0 = time.perf_counter()
        failed_step = None
        for timeframe in TIMEFRAMES:
            key = MultiPartitionKey({"symbol": symbol, "timeframe": timeframe})
            result = analyze.execute_in_process(partition_key=key, instance=instance, tags=tags, run_config=quiet,
                                                raise_on_error=False)
            if not result.success:
                failed_step = (timeframe, result)
                break
        if failed_step is None:
            result = decide.execute_in_process(partition_key=symbol, instance=instance, tags=tags, run_config=quiet,
                                               raise_on_error=False)
            if result.success:
                results[symbol] = (result.output_for_node("trade_decisions"), result.output_for_node("orders"))
            else:
                failed_step = ("decision", result)
        if failed_step is not None:
            where, result = failed_step
            failures[symbol] = (where, _failure_text(result))
        status = "ok" if symbol in results else f"FAILED at {failures[symbol][0]}"
        print(f"  [{n}/{len(symbols)}] {symbol}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)

    rows = []
    for symbol, (decision, order) in results.items():
        charts = decision.charts
        rows.append([symbol, f"{decision.proposed_action.value}→{decision.action.value}",
                     _fmt(decision.entry), _fmt(decision.stop), _fmt(decision.targets[0] if decision.targets else None),
                     _fmt(decision.r_multiple), _fmt(decision.profit_margin, "{:.1%}"), str(decision.quantity),
                     order.status, charts["1d"].uri if "1d" in charts else "-"])
    print()
    print(_table(rows, ["symbol", "proposed→decided", "entry", "stop", "target", "R", "margin", "qty",
                        "order", "daily chart"]))
    print()
    for symbol, (decision, order) in results.items():
        print(f"{symbol}: {order.reason if order.status != 'not_sent' else decision.rationale[:300]}")
        for timeframe, chart in decision.charts.items():
            print(f"    {timeframe} chart: {chart.uri}")
    print(f"\n{len(results)} of {len(symbols)} symbols done in {time.perf_counter() - started:.1f} s. "
          "Open the UI on these runs with `make dev` (http://127.0.0.1:3000).")
    for symbol, (where, text) in failures.items():
        print(f"\n{symbol} failed at {where}:\n{text}", file=sys.stderr)
    return 1 if failures else 0


def _failure_text(result) -> str:
    """The failing step's own message (a Failure's description carries problem and fix)."""
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            return (data.user_failure_data.description if data.user_failure_data and data.user_failure_data.description
                    else _error_chain(data.error) if data.error else "step failed")
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if not evaluation.passed and evaluation.blocking:
                return f"blocking check {evaluation.check_name} failed: {dict(evaluation.metadata)}"
    return "the run failed; see the Dagster UI for its logs"


def _error_chain(error) -> str:
    messages = []
    while error is not None:
        messages.append(error.message.strip())
        error = error.cause
    return "\n".join(messages)


if __name__ == "__main__":
    sys.exit(main())
