"""Schedules and sensors. Those that lead to orders are off until the user turns them on (UI:
Automation) and say so; the failure alert and the strategies-file check are on by default. Times are America/New_York on the XNYS calendar.

- `daily_close_schedule`: after each regular close, analyze every symbol's 1d partition.
- `weekly_close_schedule`: after the last session of each week, analyze the 1w partitions.
- `market_open_sensor`: once per trading day at the open, decide and order for the symbols of
  strategies that trade at the open (PLACES ORDERS when orders are enabled).

Each requests ONE run covering all its partitions (Dagster's partition-range run tags), not a run
per partition: a run per partition costs a process, a Chromium and ~70 event-log writes each
(about 5 s) where a partition's own work is about 0.2 s. Every partition still gets its own
materialization, metadata and checks (graph/assets/batch.py).
- `run_failure_alert_sensor`: tells the user what failed and what to do (log + webhook).
- `strategies_file_sensor`: reports a bad edit of the strategies file without taking the code
  location down, and says when a reload would change the partitions.
"""

import functools
import os
import threading
from datetime import UTC, datetime

import dagster as dg

from trading_pipeline.core.strategies import StrategiesFile, load_strategies
from trading_pipeline.errors import UserError
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.assets.batch import RANGE_END_TAG, RANGE_START_TAG, contiguous_ranges, range_tags

NEW_YORK = "America/New_York"


def _now() -> datetime:  # one place to travel in time in tests
    return datetime.now(UTC)


def _timeframe_request(strategies_file: StrategiesFile, timeframe: str, session, as_of: datetime) -> dg.RunRequest:
    """One run for every symbol's partition of the timeframe (a partition range: each partition
    still gets its own materialization, metadata and checks)."""
    symbols = strategies_file.symbols()
    first, last = (str(dg.MultiPartitionKey({"symbol": s, "timeframe": timeframe})) for s in (symbols[0], symbols[-1]))
    return dg.RunRequest(
        run_key=f"{timeframe}:{session.date()}",
        tags={**range_tags(first, last), AS_OF_TAG: as_of.isoformat(),
              "trading/trigger": f"{timeframe}_close_schedule"})


@functools.cache  # one warm-up thread per process, however often the definitions are built
def _warm_calendar_in_background() -> None:
    def warm() -> None:
        from trading_pipeline.core import market_calendar

        market_calendar.is_open(datetime.now(UTC))

    threading.Thread(target=warm, name="exchange-calendar-warm-up", daemon=True).start()


def build_automation(strategies_file: StrategiesFile) -> tuple[list, list]:
    # Every tick reads the exchange calendar, whose first use costs ~0.6 s (exchange_calendars and
    # the schedule to 2040): built in the background when the code location loads, the first
    # schedule or sensor tick after a (re)start does not wait for it.
    _warm_calendar_in_background()
    @dg.schedule(job_name="analyze_timeframe", cron_schedule="15 16 * * 1-5", execution_timezone=NEW_YORK,
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description="16:15 New York on weekdays: if the session has closed, analyze every symbol's 1d bars "
                             "(one run for all symbols).")
    def daily_close_schedule(context: dg.ScheduleEvaluationContext):
        from trading_pipeline.core import market_calendar  # exchange_calendars: only when evaluated

        tick = context.scheduled_execution_time
        session = market_calendar.closed_session(tick)
        if session is None:
            return dg.SkipReason(f"{tick:%Y-%m-%d} is not a trading day: no daily analysis")
        return [_timeframe_request(strategies_file, "1d", session, tick)]

    @dg.schedule(job_name="analyze_timeframe", cron_schedule="30 16 * * 1-5", execution_timezone=NEW_YORK,
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description="16:30 New York on weekdays: after the week's last session, analyze the 1w bars.")
    def weekly_close_schedule(context: dg.ScheduleEvaluationContext):
        from trading_pipeline.core import market_calendar

        tick = context.scheduled_execution_time
        session = market_calendar.closed_session(tick)
        if session is None or not market_calendar.is_last_session_of_week(session):
            return dg.SkipReason(f"{tick:%Y-%m-%d} is not the last session of its week: no weekly analysis")
        return [_timeframe_request(strategies_file, "1w", session, tick)]

    at_open = [s for strategy in strategies_file.strategies if strategy.trade_at_open for s in strategy.symbols]

    @dg.sensor(job_name="decide_and_order", minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Once per trading day at the open: decide and (if orders are enabled) send orders "
                           "for the symbols of strategies with trade_at_open. Places orders: off until you turn it on.")
    def market_open_sensor(context: dg.SensorEvaluationContext):
        from trading_pipeline.core import market_calendar

        now = _now()
        session = market_calendar.opened_session(now)
        if session is None:
            return dg.SkipReason(f"market closed at {now.isoformat(timespec='minutes')}")
        if context.cursor == str(session.date()):
            return dg.SkipReason(f"already fired for the session of {session.date()}")
        # One run for all of them (one per stretch of the partition order if they are not adjacent).
        ranges = contiguous_ranges(strategies_file.symbols(), at_open)
        requests = [dg.RunRequest(run_key=f"open:{session.date()}:{first}..{last}",
                                  tags={**range_tags(first, last), AS_OF_TAG: now.isoformat(),
                                        "trading/trigger": "market_open_sensor"})
                    for first, last in ranges]
        return dg.SensorResult(run_requests=requests, cursor=str(session.date()))

    # The two sensors below never place orders: on by default, so a failure or a bad edit is reported.
    @dg.run_failure_sensor(default_status=dg.DefaultSensorStatus.RUNNING,
                           description="Tells you what failed and what to do: the log, and TRADING_ALERT_WEBHOOK_URL.")
    def run_failure_alert_sensor(context: dg.RunFailureSensorContext):
        from trading_pipeline.adapters.alerts import send_alert

        send_alert(failure_message(context), logger=context.log)

    @dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Checks the strategies file; reports a bad edit, or a valid one that needs a reload.")
    def strategies_file_sensor(context: dg.SensorEvaluationContext):
        from trading_pipeline.adapters.alerts import send_alert

        path = os.environ.get("TRADING_STRATEGIES_FILE") or None
        try:
            current = load_strategies(path)
        except UserError as error:
            if context.cursor != f"bad:{error}":
                send_alert(f"strategies file edit rejected; the running code location keeps the last good "
                           f"version.\n{error}", logger=context.log)
            context.update_cursor(f"bad:{error}")
            return dg.SkipReason(f"strategies file invalid (code location unchanged): {error}")
        added = sorted(set(current.symbols()) - set(strategies_file.symbols()))
        removed = sorted(set(strategies_file.symbols()) - set(current.symbols()))
        context.update_cursor("ok")
        if added or removed or current != strategies_file:
            return dg.SkipReason(
                f"strategies file changed (added: {', '.join(added) or 'none'}; removed: {', '.join(removed) or 'none'}): "
                "reload the code location (Deployment → Reload) to apply it")
        return dg.SkipReason("strategies file unchanged and valid")

    schedules = [daily_close_schedule, weekly_close_schedule]
    sensors = [market_open_sensor, run_failure_alert_sensor, strategies_file_sensor]
    return schedules, sensors


FIXES = {
    "BarDataError": "check the market data source for that symbol, or remove the symbol from the strategies file",
    "ChartRenderError": "install Chromium (apt-get install chromium) or set BROWSER_PATH",
    "ConfigError": "correct the variable named above in .env and reload the code location",
    "StrategiesFileError": "fix the strategies file at the line named above",
}


def failure_message(context: dg.RunFailureSensorContext) -> str:
    run = context.dagster_run
    partition = run.tags.get("dagster/partition", "")
    if not partition and run.tags.get(RANGE_START_TAG):  # a batched run
        partition = f"{run.tags[RANGE_START_TAG]} to {run.tags.get(RANGE_END_TAG, '?')}"
    text = f"run {run.run_id[:8]} of {run.job_name}{f' for {partition}' if partition else ''} failed"
    failures = context.get_step_failure_events()
    if failures:
        event = failures[0]
        data = event.step_failure_data
        error = data.error
        if data.user_failure_data and data.user_failure_data.description:
            # Our own failures carry the problem and the fix in their description.
            text += f" at step {event.step_key}: {data.user_failure_data.description}"
            return text + "\n  Open the run in the Dagster UI for its full logs."
        first = error.message.strip().splitlines()[0] if error else "unknown error"
        text += f" at step {event.step_key}: {first}"
        cause = error.cause if error else None
        while cause is not None:
            text += f"\n  caused by: {cause.message.strip().splitlines()[0]}"
            for name, fix in FIXES.items():
                if name in (cause.cls_name or ""):
                    text += f"\n  what to do: {fix}"
            cause = cause.cause
    elif context.failure_event.message:
        text += f": {context.failure_event.message}"
    return text + "\n  Open the run in the Dagster UI for its full logs."


