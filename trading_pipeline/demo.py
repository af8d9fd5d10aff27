"""`make demo`: materialize the whole graph for every strategy symbol into the persistent local
Dagster home, then print the decisions and orders with their chart locations. Paper orders are
only placed (working) by then; when the run's as_of is in the past, the demo syncs the paper
portfolio up to now and shows what became of them (fills, stops, targets, realized R).

By default (paper broker, no --as-of, no TRADING_AS_OF) the demo replays STORY_AS_OF on the
simulated market: a point where a trade is decided, sent and later filled, so the first run shows
the whole loop every time. `--now` runs at the current time instead.

Usage: python -m trading_pipeline.demo [--as-of ISO_TIME | --now] [--symbols AAPL,MSFT]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from datetime import UTC, datetime, timedelta

from trading_pipeline.core.frames import TIMEFRAMES
from trading_pipeline.errors import UserError

# Tuesday 2026-09-01 after the close: on the simulated market (seed 0) SPY's BUY passes every gate,
# fills the next morning and reaches its target in October.
STORY_AS_OF = "2026-09-01T21:30:00+00:00"


def _load_dotenv() -> None:
    try:
        from dotenv import load_dotenv
    except ImportError:  # dagster ships python-dotenv; without it .env is simply not read
        return
    load_dotenv(".env", override=False)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _fmt(value, pattern="{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the whole first paragraph
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--as-of", help="point in time of the run (ISO 8601; default TRADING_AS_OF, else the story's "
                                      f"{STORY_AS_OF} on the simulated market, else now)")
    when.add_argument("--now", action="store_true", help="run at the current time (orders fill in later sessions)")
    parser.add_argument("--symbols", help="comma-separated subset of the strategies' symbols")
    args = parser.parse_args(argv)
    # Dagster's beta/preview notices about APIs we chose deliberately are noise in a terminal.
    warnings.filterwarnings("ignore", message=r".*(is currently in beta|is currently in preview).*")
    _load_dotenv()
    if not os.environ.get("DAGSTER_HOME"):
        print("DAGSTER_HOME is not set. Run `make demo`, or export DAGSTER_HOME=$PWD/.dagster_home first.",
              file=sys.stderr)
        return 2
    os.makedirs(os.environ["DAGSTER_HOME"], mode=0o700, exist_ok=True)  # runs, logs, asset values: this user only
    broker_mode = os.environ.get("TRADING_BROKER", "paper").strip().lower() or "paper"
    if broker_mode == "paper" and "TRADING_ORDERS_ENABLED" not in os.environ:
        # The paper broker only simulates fills in the local database: the demo turns orders on
        # for it. Any other broker keeps orders off unless the user said otherwise.
        os.environ["TRADING_ORDERS_ENABLED"] = "yes"
        print("demo: paper broker, so orders are on for this run (simulated fills, no real money)")

    try:
        from dagster import DagsterInstance

        from trading_pipeline import config
        from trading_pipeline.definitions import build_definitions
        from trading_pipeline.graph.partitions import strategies
        from trading_pipeline.graph.resources import resources_from_env

        story = (not args.now and not args.as_of and not os.environ.get("TRADING_AS_OF") and broker_mode == "paper"
                 and (os.environ.get("TRADING_MARKET_DATA") or "simulated").strip().lower() == "simulated")
        if args.as_of or os.environ.get("TRADING_AS_OF") or story:
            source = ((args.as_of, "--as-of") if args.as_of else
                      (os.environ["TRADING_AS_OF"], "TRADING_AS_OF") if os.environ.get("TRADING_AS_OF") else
                      (STORY_AS_OF, "STORY_AS_OF"))
            as_of = config.parse_as_of(*source)
        else:
            as_of = datetime.now(UTC).replace(microsecond=0)
        if story:
            print(f"demo: replaying {as_of:%a %Y-%m-%d %H:%M} UTC, after that session's close, on the simulated "
                  "market: a point where a trade is decided, sent, then filled. `make demo DEMO_ARGS=--now` "
                  "runs at the current time.")
        replay = broker_mode == "paper" and as_of < datetime.now(UTC) - timedelta(minutes=5)
        set_clock = replay and not os.environ.get("TRADING_AS_OF")
        if set_clock:
            # The paper deployment's clock is the replayed point while deciding and sending (a decision
            # is sent only while current); the sync afterwards runs at the real clock.
            os.environ["TRADING_AS_OF"] = as_of.isoformat()
        strategies_file = strategies()
        resources = resources_from_env()
        defs = build_definitions(strategies_file, resources)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    symbols = strategies_file.symbols()
    if args.symbols is not None:
        wanted = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
        if not wanted:
            print(f"error: --symbols {args.symbols!r} names no symbol; give some of {', '.join(symbols)} "
                  "(comma-separated), or leave --symbols out for all", file=sys.stderr)
            return 2
        unknown = sorted(set(wanted) - set(symbols))
        if unknown:
            print(f"error: {', '.join(unknown)} not in the strategies file (it has {', '.join(symbols)})",
                  file=sys.stderr)
            return 2
        symbols = wanted

    # Entered, the instance is also the one Dagster's definitions state is read from while loading jobs.
    with DagsterInstance.get() as instance:
        return _run(defs, resources, instance, symbols, as_of, broker_mode, set_clock)


def _run(defs, resources, instance, symbols: list[str], as_of: datetime, broker_mode: str,
         set_clock: bool = False) -> int:
    """Materialize the graph for the symbols, print the table, then what became of the orders."""
    from dagster import MultiPartitionKey

    from trading_pipeline.graph.assets import AS_OF_TAG
    from trading_pipeline.graph.pools import configure_pools

    configure_pools(instance)
    # Failures the demo prints itself at the end, as problem and fix, without Dagster's stack traces.
    analyze = defs.resolve_job_def("analyze_timeframe").with_logger_defs({"console": _console_logger()})
    decide = defs.resolve_job_def("decide_and_order").with_logger_defs({"console": _console_logger()})
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

    from trading_pipeline.adapters.chart_store import chart_key

    store = resources["chart_store"].store()

    def link(symbol: str, timeframe: str) -> str:  # http(s): a browser opens it (not file:// from a web page)
        return store.public_url(chart_key(symbol, timeframe, as_of))

    rows = []
    for symbol, (decision, order) in results.items():
        charts = decision.charts
        rows.append([symbol, f"{decision.proposed_action.value}→{decision.action.value}",
                     _fmt(decision.entry), _fmt(decision.stop), _fmt(decision.targets[0] if decision.targets else None),
                     _fmt(decision.r_multiple), _fmt(decision.profit_margin, "{:.1%}"), str(decision.quantity),
                     order.status, link(symbol, "1d") if "1d" in charts else "-"])
    print()
    print(_table(rows, ["symbol", "proposed→decided", "entry", "stop", "target", "R", "margin", "qty",
                        "order", "daily chart"]))
    print()
    for symbol, (decision, order) in results.items():
        # An accepted decision that was not sent says why not (orders off, kill switch, ...), not its rationale.
        print(f"{symbol}: {order.reason if order.status != 'not_sent' or decision.actionable else decision.rationale[:300]}")
        for timeframe in decision.charts:
            print(f"    {timeframe} chart: {link(symbol, timeframe)}")
    placed = {symbol: order for symbol, (_, order) in results.items()
              if order.client_order_id and order.status in ("submitted", "filled", "already_sent")}
    if set_clock:
        os.environ.pop("TRADING_AS_OF", None)  # back to the real clock for the sync up to now
    if placed:
        print()
        print(_what_became_of_the_orders(defs, resources, instance, broker_mode, as_of, placed, quiet))
    print(f"\n{len(results)} of {len(symbols)} symbols done in {time.perf_counter() - started:.1f} s. "
          "Open the UI on these runs with `make dev` (http://127.0.0.1:3000); it also serves the chart links"
          + (f" ({store.base_url})." if getattr(store, "base_url", None) else "."))
    for symbol, (where, text) in failures.items():
        print(f"\n{symbol} failed at {where}:\n{text}", file=sys.stderr)
    return 1 if failures else 0


def _now() -> datetime:  # one place to travel in time in tests
    return datetime.now(UTC).replace(microsecond=0)


def _what_became_of_the_orders(defs, resources, instance, broker_mode: str, as_of: datetime,
                               placed: dict, run_config: dict) -> str:
    """The orders are working at the broker, not filled: fills come from later market data. With
    the paper broker and an as_of whose first session has closed by now, run the portfolio sync
    up to now and tell each order's story; otherwise say how to see the fills."""
    from trading_pipeline.adapters.broker import first_live_session
    from trading_pipeline.core import market_calendar
    from trading_pipeline.graph.assets import AS_OF_TAG

    how_to_follow = ("run the sync_portfolio job (`make dev`, Launchpad) or turn on order_status_sensor "
                     "to record the fills")
    if broker_mode != "paper":
        return f"The orders are at the broker: {how_to_follow}."
    session = first_live_session(as_of)
    session_close = market_calendar.calendar().session_close(session)
    now = _now()
    if now < session_close:
        close_text = session_close.tz_convert("America/New_York").strftime("%a %Y-%m-%d %H:%M %Z")
        return (f"Paper orders are working, not filled: they can fill from the session of {session.date()} on. "
                f"After its close ({close_text}), {how_to_follow}.")
    result = defs.resolve_job_def("sync_portfolio").execute_in_process(
        instance=instance, run_config=run_config, raise_on_error=False,
        tags={AS_OF_TAG: now.isoformat(), "trading/launched_by": "demo"})
    if not result.success:
        return f"The portfolio sync up to now failed:\n{_failure_text(result)}"
    trades = {t["decision_id"]: t for t in result.output_for_node("portfolio_sync", "executions")}
    positions = {p["symbol"]: p for p in result.output_for_node("portfolio_sync", "positions")}
    account = result.output_for_node("portfolio_sync", "account_summary")
    rows = [_order_story(resources["trading_db"].sessions(), order.decision_id, trades.get(order.decision_id),
                         positions.get(symbol)) for symbol, order in placed.items()]
    heading = (f"What became of the paper orders (daily bars from the session of {session.date()} up to now, "
               f"{now.isoformat()}; the sync_portfolio job):")
    table = _table([[symbol, *row] for symbol, row in zip(placed, rows)], ["symbol", "entry", "exit", "realized R", "P&L"])
    summary = (f"Paper account: equity {account['equity']:,.2f}, cash {account['cash']:,.2f}, "
               f"{account['open_positions']} open position(s).")
    return f"{heading}\n{table}\n{summary}"


def _order_story(sessions, decision_id: str, trade: dict | None, position: dict | None) -> list[str]:
    """One decision's legs as the trading database has them after the sync: entry, exit, R, P&L."""
    from sqlalchemy import select

    from trading_pipeline.adapters.trading_db import ExecutionRow, OrderEventRow, OrderRow

    with sessions() as session:
        legs = {row.role: row for row in session.scalars(select(OrderRow).where(OrderRow.decision_id == decision_id))}
        fill_day = {e.client_order_id: e.executed_at.date() for e in session.scalars(
            select(ExecutionRow).where(ExecutionRow.client_order_id.in_([leg.client_order_id for leg in legs.values()])))}
        entry = legs["entry"]
        last_detail = session.scalars(select(OrderEventRow.detail).where(
            OrderEventRow.client_order_id == entry.client_order_id).order_by(OrderEventRow.id.desc())).first()

    def filled(leg) -> str:
        return f"@ {leg.average_fill_price:.2f} on {fill_day.get(leg.client_order_id, '?')}"

    if entry.status == "Filled":
        entry_text = f"{entry.side} {entry.quantity} filled {filled(entry)}"
    elif entry.status == "Cancelled":
        entry_text = (last_detail or "cancelled").removeprefix("sync: ")
    else:
        entry_text = f"working ({entry.status}): no bar has reached {entry.price:.2f} yet"
    stop, target = legs.get("stop_loss"), legs.get("take_profit")
    if stop is not None and stop.status == "Filled":
        exit_text = f"stopped out {filled(stop)}"
    elif target is not None and target.status == "Filled":
        exit_text = f"target hit {filled(target)}"
    elif entry.status == "Filled" and stop is not None and target is not None:
        exit_text = f"open: stop {stop.price:.2f} and target {target.price:.2f} working"
    else:
        exit_text = "-"
    if trade is not None and trade["status"] == "closed":
        return [entry_text, exit_text, _fmt(trade["r_multiple"]), f"{trade['realized_pnl']:+,.2f}"]
    unrealized = f"{position['unrealized_pnl']:+,.2f} unrealized" if trade is not None and position else "-"
    return [entry_text, exit_text, "-", unrealized]


def _console_logger():
    """Dagster's console logger, less the failures of a user error (a `Failure` with its problem and
    fix, such as no IBKR gateway answering): the demo prints those once, at the end, where they were
    preceded by two stack traces through Dagster's internals. Any other error keeps its trace."""
    import dagster as dg
    from dagster._utils.log import create_console_logger

    def told_at_the_end(record) -> bool:
        event = (getattr(record, "dagster_meta", None) or {}).get("dagster_event")
        if event is None or not (event.is_step_failure or event.is_run_failure):
            return True
        data = event.event_specific_data
        error = getattr(data, "error", None)
        return not (getattr(data, "user_failure_data", None) is not None
                    or (error is not None and error.cls_name == "Failure"))

    @dg.logger({"log_level": dg.Field(str, is_required=False, default_value="INFO"),
                "name": dg.Field(str, is_required=False, default_value="dagster")})
    def console(init_context):
        log = create_console_logger(init_context.logger_config["name"], init_context.logger_config["log_level"])
        log.addFilter(told_at_the_end)
        return log

    return console


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
                return f"blocking check {evaluation.check_name} failed: {_check_text(evaluation.metadata)}"
    return "the run failed; see the Dagster UI for its logs"


def _check_text(metadata) -> str:
    """A check's metadata as words: its problem, then "Fix: ..." (the values, not their reprs)."""
    values = {key: getattr(value, "value", value) for key, value in metadata.items()}
    problem, fix = values.pop("problem", None), values.pop("fix", None)
    lines = [str(problem)] if problem is not None else []
    lines += [f"{key}: {value}" for key, value in values.items()]
    if fix is not None:
        lines.append(f"Fix: {fix}")
    return "\n".join(lines)


def _error_chain(error) -> str:
    messages = []
    while error is not None:
        messages.append(error.message.strip())
        error = error.cause
    return "\n".join(messages)


if __name__ == "__main__":
    sys.exit(main())
