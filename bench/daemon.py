"""The production path, measured: the Dagster daemon and webserver, the schedules and the open.

Starts `dagster-webserver` and `dagster-daemon` (127.0.0.1 only) on a fresh DAGSTER_HOME holding
the repository's dagster.yaml, with a temporary strategies file of N symbols on the simulated
market, paper orders on, and the paper deployment's simulated clock (TRADING_AS_OF) at the
measured open, so the decisions' orders are sent as at that open. Then, per repeat (each a later
week, on a fresh instance with its own clock):

- refresh: evaluates the daily and the weekly close schedules over GraphQL (`scheduleDryRun`, what
  the UI's "Test schedule" and the daemon's tick evaluate) and launches their run requests
  (`launchRun`, into the run queue), then waits for every run;
- open: evaluates the market-open sensor at the next session's open (in this process, at that
  time) and launches its run requests the same way; timed from the sensor's tick; counts the
  orders sent.

Then the same work in one process (`execute_in_process`, same run tags, an instance from the same
dagster.yaml), and prints wall times,
runs, time per symbol × timeframe and the ratios to it and to the unavoidable work (bars,
indicators, figure and a warm batched render per chart, no Dagster), measured before the daemon
starts and again at the end (the smaller one counts: other work on the machine only inflates it).
With --repeats, min and median of each. Also, for the first repeat, each run's timeline
(creation, start, steps, end), and the CPU seconds each role used (Chromium, run processes,
webserver, daemon, other work on the machine) during the unavoidable work, the refresh and the
decide: on 2 cores they share, so the roles' sum, not one process, sets the wall time (`CpuByRole`).

Run: `.venv/bin/python bench/daemon.py [--symbols 20] [--repeats 1]` (PYTHONPATH=<checkout> to
measure a worktree).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout this file is in, also for trading_pipeline_tests

from machine import describe as describe_machine  # bench/machine.py, beside this file
from machine import wait_until_quiet

from trading_pipeline_tests.deploy.processes import ProcessSet, free_port

BIN = Path(sys.executable).parent
NEW_YORK = ZoneInfo("America/New_York")
FIRST_FRIDAY = datetime(2026, 9, 4, tzinfo=NEW_YORK)
ISOLATED_PREFIXES = ("TRADING_", "DAGSTER_", "AWS_", "OPENAI_", "IBKR_")
LOCATION = {"repositoryLocationName": "trading_pipeline", "repositoryName": "__repository__"}

DRY_RUN = """
mutation DryRun($selector: ScheduleSelector!, $timestamp: Float) {
  scheduleDryRun(selectorData: $selector, timestamp: $timestamp) {
    __typename
    ... on DryRunInstigationTick { evaluationResult { runRequests { runKey jobName tags { key value } }
                                                      skipReason error { message } } }
    ... on PythonError { message }
  }
}"""
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
STEPS = """
query Steps($runId: ID!) { runOrError(runId: $runId) { ... on Run { stepStats { stepKey startTime endTime } } } }"""
LOCATIONS = """
query { workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


class Instance:
    """The webserver and daemon on a fresh DAGSTER_HOME; `close()` kills them and all they started."""

    def __init__(self, tmp: Path, symbols: list[str], instance_config: Path, postgres_db: str | None,
                 clock: datetime):
        self.tmp = tmp
        home = tmp / "home"
        home.mkdir()
        shutil.copy(instance_config, home / "dagster.yaml")
        strategies = tmp / "strategies.yaml"
        strategies.write_text("strategies:\n  - name: bench\n    symbols: [" + ", ".join(symbols) + "]\n"
                              "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n    orders: {enabled: true}\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(ISOLATED_PREFIXES)}
        self.env.update({"DAGSTER_HOME": str(home), "TRADING_STRATEGIES_FILE": str(strategies),
                         "TRADING_DATA_DIR": str(tmp / "data"), "TRADING_ORDERS_ENABLED": "yes",
                         # The paper deployment's simulated clock: orders go out as at the measured open
                         # (docs/modes-and-variables.md); each run's own time is its trading/as_of tag.
                         "TRADING_AS_OF": clock.astimezone(UTC).isoformat(),
                         "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
        if postgres_db:  # deploy/dagster.yaml reads its PostgreSQL from these (docker compose sets them)
            self.env.update({"DAGSTER_POSTGRES_HOST": "127.0.0.1", "DAGSTER_POSTGRES_PORT": "5432",
                             "DAGSTER_POSTGRES_USER": "postgres", "DAGSTER_POSTGRES_PASSWORD": "",
                             "DAGSTER_POSTGRES_DB": postgres_db})
        self.processes = ProcessSet(tmp / "logs")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # One connection for all queries: a new client per query (TLS context, connection) cost this
        # process about 3 s of CPU in a 15 s refresh, taken from the two cores the runs use.
        self.client = httpx.Client(base_url=self.url, timeout=120)
        self._instance = None
        self.settled: tuple[float, float] = (0.0, 0.0)  # (seconds waited for start-up work to end, busy share then)

    def start(self) -> float:
        from trading_pipeline import config
        from trading_pipeline.adapters.trading_db import get_engine

        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trading_pipeline.graph.pools"], env=self.env, cwd=self.tmp,
                       check=True, capture_output=True)
        # The trading database as a running deployment has it, migrated (its first run did it, or
        # `make demo`): otherwise the first runs measured would each spend ~1 s migrating it.
        get_engine(config.database_url(self.env)).dispose()
        target = ["-w", str(REPO / "workspace.yaml")]
        self.processes.start("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port),
                                           *target], self.env, cwd=self.tmp)
        self.processes.start("daemon", [str(BIN / "dagster-daemon"), "run", *target], self.env, cwd=self.tmp)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            for name in ("webserver", "daemon"):
                self.processes.assert_running(name)
            try:
                entries = self.graphql(LOCATIONS)["workspaceOrError"]["locationEntries"]
                if any(e["loadStatus"] == "LOADED" and e["locationOrLoadError"]["__typename"] == "RepositoryLocation"
                       for e in entries):
                    ready = time.perf_counter() - started
                    # The daemon goes on starting after the webserver has loaded the code: its code
                    # server, the warm run worker's imports, the render service's Chromium and warm-up
                    # charts (2 cores busy for ~7 s here). A deployment's daemon has been up for hours
                    # when the close comes: measured during that start, the first refresh shared the
                    # cores with it.
                    self.settled = wait_until_quiet(timeout_s=60)
                    return ready
            except (httpx.HTTPError, KeyError, TypeError):
                pass
            time.sleep(0.5)
        raise SystemExit("the webserver did not load the code location in 180 s:\n"
                         + self.processes.log_tail("webserver"))

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        response = self.client.post("/graphql", json={"query": query, "variables": variables or {}}, timeout=120)
        if response.status_code != 200:
            raise RuntimeError(f"GraphQL answered {response.status_code}: {response.text[:2000]}")
        body = response.json()
        if body.get("errors"):
            raise RuntimeError(body["errors"])
        return body["data"]

    def schedule_requests(self, name: str, tick: datetime) -> list[dict]:
        result = self.graphql(DRY_RUN, {"selector": {**LOCATION, "scheduleName": name},
                                        "timestamp": tick.timestamp() - 1})["scheduleDryRun"]
        evaluation = result.get("evaluationResult") or {}
        if evaluation.get("error") or result["__typename"] != "DryRunInstigationTick":
            raise RuntimeError(f"{name}: {evaluation.get('error') or result}")
        return [{"job": r["jobName"] or "analyze_timeframe", "tags": {t["key"]: t["value"] for t in r["tags"]}}
                for r in evaluation["runRequests"] or []]

    def launch(self, job: str, tags: dict[str, str]) -> str:
        params = {"selector": {**LOCATION, "jobName": job}, "runConfigData": {},
                  "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}}
        result = self.graphql(LAUNCH, {"params": params})["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"launch of {job} failed: {result}")
        return result["run"]["runId"]

    def wait(self, run_ids: list[str], timeout: float = 1200) -> list[dict]:
        """Reads the runs' status column from the instance's run storage every 0.2 s, and the runs
        themselves once they are all finished: asking the webserver cost it ~10 ms of CPU a query,
        and reading whole run records ~10 ms here, on the two cores the runs use."""
        import sqlalchemy as sa
        from dagster import DagsterRunStatus, RunsFilter
        from dagster._core.storage.runs.schema import RunsTable

        finished = {s.value for s in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)}
        statuses = sa.select(RunsTable.c.run_id, RunsTable.c.status).where(RunsTable.c.run_id.in_(run_ids))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.dagster_instance().run_storage.connect() as conn:
                status = dict(conn.execute(statuses).all())
            if len(status) < len(run_ids) or not finished.issuperset(status.values()):
                for name in ("webserver", "daemon"):
                    self.processes.assert_running(name)
                time.sleep(0.2)
                continue
            records = {r.dagster_run.run_id: r for r in self.dagster_instance().get_run_records(RunsFilter(run_ids=run_ids))}
            if len(records) == len(run_ids) and all(r.dagster_run.is_finished for r in records.values()):
                failed = [run_id for run_id in run_ids if records[run_id].dagster_run.status.value != "SUCCESS"]
                if failed:
                    raise SystemExit(f"runs {failed} did not succeed; see the UI at {self.url} "
                                     f"(DAGSTER_HOME {self.env['DAGSTER_HOME']})")
                return [{"runId": run_id, "status": records[run_id].dagster_run.status.value,
                         "creationTime": records[run_id].create_timestamp.timestamp(),
                         "startTime": records[run_id].start_time, "endTime": records[run_id].end_time,
                         "tags": [{"key": k, "value": v} for k, v in records[run_id].dagster_run.tags.items()]}
                        for run_id in run_ids]
            for name in ("webserver", "daemon"):
                self.processes.assert_running(name)
            time.sleep(0.2)
        raise SystemExit(f"runs not finished after {timeout:.0f} s")

    def timeline(self, runs: list[dict], since: float) -> str:
        """Each run's creation, start, steps and end, in seconds from `since` (the phase's start)."""
        from dagster import DagsterEventType

        lifecycle = {DagsterEventType.RUN_ENQUEUED: "queued", DagsterEventType.RUN_DEQUEUED: "dequeued",
                     DagsterEventType.RUN_STARTING: "launched", DagsterEventType.RUN_START: "running"}
        lines = []
        for run in runs:
            steps = self.graphql(STEPS, {"runId": run["runId"]})["runOrError"]["stepStats"]
            # Where a run's start goes: the queue (to the daemon's next check), the launch (the warm
            # worker's fork), the run process's own start-up until RUN_START.
            events = {lifecycle[entry.dagster_event_type]: entry.timestamp - since
                      for entry in self.dagster_instance().all_logs(run["runId"], of_type=set(lifecycle))}
            lines.append(f"  {run['runId'][:8]}: created {run['creationTime'] - since:.2f}, " + "".join(
                f"{name} {events[name]:.2f}, " for name in ("queued", "dequeued", "launched") if name in events)
                + f"running {run['startTime'] - since:.2f}, " + ", ".join(
                             f"{step['stepKey']} {step['startTime'] - since:.1f}-{step['endTime'] - since:.1f}"
                             for step in steps if step["startTime"] and step["endTime"])
                         + f", ended {run['endTime'] - since:.1f}")
        return "\n".join(lines)

    def dagster_instance(self):
        """The instance (from its dagster.yaml and the variables it reads), opened in this process."""
        if self._instance is None:
            import dagster as dg

            saved = dict(os.environ)
            os.environ.update({k: v for k, v in self.env.items() if k.startswith("DAGSTER_")})
            try:
                self._instance = dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])
            finally:
                os.environ.clear()
                os.environ.update(saved)
        return self._instance

    def close(self) -> None:
        if self._instance is not None:
            self._instance.dispose()
        self.client.close()
        self.processes.kill_all()


class CpuByRole:
    """CPU seconds every process on the machine used between `start()` and `stop()`, by role.

    /proc is read every 0.25 s on a thread (~6 ms of CPU each time, counted as "bench"): a
    process counts what it used between the first and the last time it was seen, from zero if it
    was born after `start()`, so a run process that ended counts up to its last 0.25 s. (The
    time of reaped children is not used: a shell reaping a long job would count all of it.)
    On 2 cores a phase of T seconds has 2T CPU seconds: what the roles add up to shows what
    shares them, and "other" is work not ours that inflates every figure."""

    ROLES = (("chromium", ("chrom", "kaleido")), ("render service", ("render_service",)),
             ("run processes", ("run_worker", "execute_run", "api execute_run")),
             ("daemon", ("dagster-daemon",)), ("webserver", ("dagster-webserver",)),
             ("code server", ("grpc", "code-server", "code_server")))
    INTERVAL_S = 0.25

    def __init__(self):
        self.first: dict[tuple[str, int], float] = {}
        self.last: dict[tuple[str, int], float] = {}
        self.roles: dict[tuple[str, int], str] = {}
        self.seconds: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self, initial: bool) -> None:
        ticks = os.sysconf("SC_CLK_TCK")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rfind(")") + 2:].split()
                key = (pid, int(fields[19]))
                if key not in self.roles:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    self.roles[key] = self._role(int(pid), command or stat[stat.find("(") + 1:stat.rfind(")")])
            except (OSError, IndexError, ValueError):
                continue
            cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
            self.first.setdefault(key, cpu if initial else 0.0)
            self.last[key] = cpu

    def _role(self, pid: int, command: str) -> str:
        if pid == os.getpid():
            return "bench"
        return next((name for name, marks in self.ROLES if any(m in command for m in marks)), "other")

    def start(self) -> None:
        self._read(initial=True)

        def sample() -> None:
            while not self._stop.wait(self.INTERVAL_S):
                self._read(initial=False)

        self._thread = threading.Thread(target=sample, name="cpu-by-role", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._read(initial=False)
        self.seconds = {}
        for key, cpu in self.last.items():
            role = self.roles[key]
            self.seconds[role] = self.seconds.get(role, 0.0) + cpu - self.first[key]
        return self.seconds

    def describe(self) -> str:
        shown = sorted(((v, k) for k, v in self.seconds.items() if v >= 0.05), reverse=True)
        return ", ".join(f"{name} {value:.1f}" for value, name in shown) + f" (total {sum(self.seconds.values()):.1f})"


def at(day: datetime, hour: int, minute: int) -> datetime:
    return day.replace(hour=hour, minute=minute, second=0, microsecond=0)


class OpenSensor:
    """The market-open sensor of the bench's strategies, evaluated here at a chosen time (what the
    daemon's tick does at the open); definitions and a scratch instance are made beforehand."""

    def __init__(self, env: dict):
        import dagster as dg

        from trading_pipeline.core.strategies import load_strategies
        from trading_pipeline.definitions import build_definitions
        from trading_pipeline.graph.resources import resources_from_env

        self.defs = build_definitions(load_strategies(env["TRADING_STRATEGIES_FILE"]), resources_from_env(env))
        self._instance_context = dg.instance_for_test()
        self.instance = self._instance_context.__enter__()

    def requests(self, when: datetime) -> list[dict]:
        import dagster as dg

        from trading_pipeline.graph import automation

        real_now = automation._now
        automation._now = lambda: when
        try:
            result = self.defs.get_sensor_def("market_open_sensor").evaluate_tick(
                dg.build_sensor_context(instance=self.instance, repository_def=self.defs.get_repository_def()))
        finally:
            automation._now = real_now
        if not result.run_requests:
            raise RuntimeError(f"the open sensor requested nothing at {when}: {result.skip_message}")
        return [{"job": "decide_and_order", "tags": dict(r.tags)} for r in result.run_requests]

    def close(self) -> None:
        self._instance_context.__exit__(None, None, None)


def orders_sent(env: dict) -> tuple[int, int]:
    """(decisions whose entry or exit order was sent, BUY/SELL decisions) in the trading database."""
    from sqlalchemy import func, select

    from trading_pipeline import config
    from trading_pipeline.adapters.trading_db import DecisionRow, OrderRow, session_factory

    with session_factory(config.database_url(env))() as session:
        sent = session.scalar(select(func.count(func.distinct(OrderRow.decision_id))))
        actionable = session.scalar(select(func.count()).select_from(DecisionRow)
                                    .where(DecisionRow.action.in_(["BUY", "SELL"])))
    return sent or 0, actionable or 0


def opening_after(friday: datetime) -> datetime:
    """Five minutes into the first session after `friday`'s close: when the open sensor fires."""
    from trading_pipeline.core import market_calendar

    return market_calendar.next_open(at(friday, 17, 0)).to_pydatetime().astimezone(UTC) + timedelta(minutes=5)


def daemon_repeat(instance: Instance, symbols: list[str], week: int) -> dict:
    friday = FIRST_FRIDAY + timedelta(weeks=week)
    opening = opening_after(friday)
    sensor = OpenSensor(instance.env)
    refresh_cpu, decide_cpu = CpuByRole(), CpuByRole()
    refresh_cpu.start()
    started, refresh_start = time.perf_counter(), time.time()
    requests = (instance.schedule_requests("daily_close_schedule", at(friday, 16, 15))
                + instance.schedule_requests("weekly_close_schedule", at(friday, 16, 30)))
    evaluated = time.perf_counter()
    run_ids = [instance.launch(r["job"], r["tags"]) for r in requests]
    launched = time.perf_counter()
    runs = instance.wait(run_ids)
    # to the last run's end as the run storage has it: not quantized by the 0.2 s polling
    refresh = max(run["endTime"] for run in runs) - refresh_start
    refresh_cpu.stop()
    decide_cpu.start()
    steps = {"schedules": evaluated - started, "refresh launch": launched - evaluated}
    started, decide_start = time.perf_counter(), time.time()
    requests = sensor.requests(opening)
    evaluated = time.perf_counter()
    decide_ids = [instance.launch(r["job"], r["tags"]) for r in requests]
    steps.update({"sensor": evaluated - started, "decide launch": time.perf_counter() - evaluated})
    decide_runs = instance.wait(decide_ids)
    decide = max(run["endTime"] for run in decide_runs) - decide_start
    decide_cpu.stop()
    sensor.close()
    sent, actionable = orders_sent(instance.env)
    # The warm run launcher tags each run it forked (docs/production.md, Warm run workers).
    warm = sum(any(tag["key"] == "trading/run_worker_pid" for tag in run["tags"]) for run in runs + decide_runs)
    return {"refresh": refresh, "refresh_runs": len(run_ids), "decide": decide, "decide_runs": len(decide_ids),
            "warm": warm,
            "queued": max(r["startTime"] - r["creationTime"] for r in runs + decide_runs),
            "open": opening, "sent": sent, "actionable": actionable, "steps": steps,
            "cpu": {"refresh": refresh_cpu, "decide": decide_cpu},
            "timeline": {"refresh": instance.timeline(runs, refresh_start),
                         "decide": instance.timeline(decide_runs, decide_start)}}


def in_one_process(symbols: list[str], env: dict, friday: datetime, opening: datetime,
                   instance_config: Path) -> tuple[float, float]:
    """The same three runs (1d, 1w, decide; same tags) with execute_in_process, after a warm-up, on
    a fresh instance made from the same dagster.yaml as the daemon's (and its environment)."""
    import dagster as dg

    from trading_pipeline.core.strategies import load_strategies
    from trading_pipeline.definitions import build_definitions
    from trading_pipeline.graph.assets import AS_OF_TAG
    from trading_pipeline.graph.assets.batch import range_tags
    from trading_pipeline.graph.resources import resources_from_env

    with tempfile.TemporaryDirectory() as tmp:
        local = {**env, "TRADING_DATA_DIR": str(Path(tmp) / "data"), "TRADING_AS_OF": opening.isoformat()}
        os.environ["TRADING_AS_OF"] = local["TRADING_AS_OF"]  # the send-time clock is read from the process
        defs = build_definitions(load_strategies(env["TRADING_STRATEGIES_FILE"]), resources_from_env(local))
        quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
        home = Path(tmp) / "home"
        home.mkdir()
        shutil.copy(instance_config, home / "dagster.yaml")
        dagster_env = {k: v for k, v in env.items() if k.startswith("DAGSTER_")}
        os.environ.update({**dagster_env, "DAGSTER_HOME": str(home)})  # the instance file reads them
        with dg.DagsterInstance.from_config(str(home)) as instance:
            analyze, decide = defs.resolve_job_def("analyze_timeframe"), defs.resolve_job_def("decide_and_order")
            warm_as_of = (friday - timedelta(weeks=1)).astimezone(UTC)
            analyze.execute_in_process(instance=instance, run_config=quiet, tags={
                **range_tags(f"{symbols[0]}|1d", f"{symbols[0]}|1d"), AS_OF_TAG: warm_as_of.isoformat()})
            started = time.perf_counter()
            for timeframe, minute in (("1d", 15), ("1w", 30)):
                as_of = at(friday, 16, minute).astimezone(UTC).isoformat()
                assert analyze.execute_in_process(instance=instance, run_config=quiet, tags={
                    **range_tags(f"{symbols[0]}|{timeframe}", f"{symbols[-1]}|{timeframe}"), AS_OF_TAG: as_of}).success
            refresh = time.perf_counter() - started
            started = time.perf_counter()
            assert decide.execute_in_process(instance=instance, run_config=quiet, tags={
                **range_tags(symbols[0], symbols[-1]), AS_OF_TAG: opening.isoformat()}).success
            return refresh, time.perf_counter() - started


def unavoidable(symbols: list[str], friday: datetime) -> tuple[float, float, CpuByRole]:
    """Bars + indicators + figure + render (warm Chromium, batches as the chart step renders) per
    chart, for every symbol × timeframe; the one-time browser start; the CPU the first used."""
    from trading_pipeline.adapters.chart_render import ChartRenderer
    from trading_pipeline.adapters.market_data import SimulatedMarketData
    from trading_pipeline.adapters.render_service import warm_up_figures
    from trading_pipeline.core.chart_figure import build_chart_figure
    from trading_pipeline.core.indicators import compute_indicators
    from trading_pipeline.core.strategies import TimeframeSettings

    source = SimulatedMarketData()
    periods = {"1d": TimeframeSettings(period="2y"), "1w": TimeframeSettings(period="6y")}
    started = time.perf_counter()
    with ChartRenderer() as renderer:
        startup = time.perf_counter() - started
        compute_indicators(source.fetch(symbols[0], "1d", periods["1d"], friday))  # numba JIT, calendar
        # As warm as the daemon's render service when it reports ready: the same warm-up charts.
        renderer.render_many(warm_up_figures(2 * renderer.tabs), 1920, 1080)
        cpu = CpuByRole()
        cpu.start()
        started = time.perf_counter()
        for timeframe, minute in (("1d", 15), ("1w", 30)):
            as_of = at(friday, 16, minute)
            figures = []
            for symbol in symbols:
                frame = compute_indicators(source.fetch(symbol, timeframe, periods[timeframe], as_of))
                figures.append(build_chart_figure(frame, symbol, timeframe, as_of, width=1920, height=1080))
            renderer.render_many(figures, 1920, 1080)
        seconds = time.perf_counter() - started
        cpu.stop()
        return seconds, startup, cpu


def postgres(verb: str, name: str) -> None:
    """CREATE or DROP a database on the local PostgreSQL (127.0.0.1:5432, user postgres)."""
    import sqlalchemy as sa

    engine = sa.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"' if verb == "CREATE"
                                   else f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f} s"
    return f"min {min(values):.1f} s, median {statistics.median(values):.1f} s ({len(values)} runs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="measure each phase this many times (later weeks)")
    parser.add_argument("--instance-config", type=Path, default=REPO / "deploy/local/dagster.yaml",
                        help="the dagster.yaml to measure (deploy/dagster.yaml: docker compose's, on PostgreSQL)")
    args = parser.parse_args()
    symbols = [f"B{i:03d}" for i in range(args.symbols)]
    loads = {"start": os.getloadavg()[0]}
    machine_line = describe_machine()  # before anything starts: the load is the machine's own
    # Before the daemon and again at the end: other work on the machine only ever inflates it, so
    # the smaller one is the fairer yardstick for the daemon's ratio.
    floor = [unavoidable(symbols, FIRST_FRIDAY)]
    repeats, startups, settles, envs, tmps = [], [], [], [], []
    for week in range(args.repeats):  # each on a fresh instance whose simulated clock is that week's open
        tmp = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
        tmps.append(tmp)
        postgres_db = None
        if "postgres" in args.instance_config.read_text():
            postgres_db = f"bench_daemon_{os.getpid()}_{week}"
            postgres("CREATE", postgres_db)
        instance = Instance(tmp, symbols, args.instance_config, postgres_db,
                            clock=opening_after(FIRST_FRIDAY + timedelta(weeks=week)))
        try:
            startups.append(instance.start())
            settles.append(instance.settled)
            repeats.append(daemon_repeat(instance, symbols, week))
        finally:
            instance.close()
            if postgres_db:
                postgres("DROP", postgres_db)
        envs.append(instance.env)
    loads["daemon done"] = os.getloadavg()[0]
    friday, opening = FIRST_FRIDAY, repeats[0]["open"]
    os.environ.update({k: v for k, v in envs[0].items() if k.startswith("TRADING_")})
    local = []
    for week in range(args.repeats):
        postgres_db = None
        if "postgres" in args.instance_config.read_text():
            postgres_db = f"bench_daemon_{os.getpid()}_local_{week}"
            postgres("CREATE", postgres_db)
        try:
            env = {**envs[0], **({"DAGSTER_POSTGRES_DB": postgres_db} if postgres_db else {})}
            local.append(in_one_process(symbols, env, friday, opening, args.instance_config))
        finally:
            if postgres_db:
                postgres("DROP", postgres_db)
    floor.append(unavoidable(symbols, friday))
    loads["end"] = os.getloadavg()[0]
    for tmp in tmps:
        shutil.rmtree(tmp, ignore_errors=True)

    partitions = len(symbols) * 2
    refresh = [r["refresh"] for r in repeats]
    decide = [r["decide"] for r in repeats]
    local_refresh, local_decide = [r for r, _ in local], [d for _, d in local]
    floor_work = [f for f, _, _ in floor]
    best = min(refresh)
    print(machine_line)
    print(f"symbols × timeframes        {len(symbols)} × 2 = {partitions} partitions; instance {args.instance_config}")
    settled = max(waited for waited, _ in settles)
    print(f"webserver + daemon ready    {min(startups):.1f} s, then up to {settled:.1f} s until the daemon's start-up "
          f"work was over (machine under 20% busy: {', '.join(f'{share:.0%}' for _, share in settles)}; "
          "not counted below)")
    print(f"daemon: refresh 1d + 1w     {spread(refresh)}; {repeats[0]['refresh_runs']} runs; "
          f"{best / partitions * 1000:.0f} ms per symbol × timeframe")
    print(f"daemon: decide and order    {spread(decide)} from the open sensor's tick; {repeats[0]['decide_runs']} run(s); "
          f"orders sent for {repeats[0]['sent']} of {repeats[0]['actionable']} BUY/SELL decisions "
          f"(clock TRADING_AS_OF {repeats[0]['open']:%Y-%m-%d %H:%M} UTC)")
    print(f"longest wait in the queue   {max(r['queued'] for r in repeats):.1f} s (run created → its process running)")
    print(f"run processes               {sum(r['warm'] for r in repeats)} of "
          f"{sum(r['refresh_runs'] + r['decide_runs'] for r in repeats)} forked from the warm run worker "
          "(the others: a new interpreter each)")
    print("evaluation and launch       " + ", ".join(f"{name} {value:.1f} s" for name, value in repeats[0]["steps"].items())
          + " (GraphQL from here; included above)")
    print(f"one process: refresh        {spread(local_refresh)}; decide and order {spread(local_decide)}")
    print(f"unavoidable work            {' and '.join(f'{f:.1f} s' for f in floor_work)} (before and after; "
          f"{min(floor_work) / partitions * 1000:.0f} ms per chart: bars, indicators, figure, warm render; "
          f"browser start {min(s for _, s, _ in floor):.1f} s once)")
    print(f"ratio daemon / one process  refresh {best / min(local_refresh):.2f}×, "
          f"decide {min(decide) / min(local_decide):.2f}×")
    print(f"ratio daemon / unavoidable  refresh {best / min(floor_work):.2f}×")
    print(f"CPU seconds, unavoidable    {min(floor, key=lambda f: f[0])[2].describe()}")
    print(f"CPU seconds, daemon refresh {repeats[0]['cpu']['refresh'].describe()}")
    print(f"CPU seconds, daemon decide  {repeats[0]['cpu']['decide'].describe()}")
    print("timeline of the first refresh (s from the schedules' tick):\n" + repeats[0]["timeline"]["refresh"])
    print("timeline of the first decide (s from the sensor's tick):\n" + repeats[0]["timeline"]["decide"])
    print("machine load (1 min avg)    " + ", ".join(f"{value:.1f} at {name}" for name, value in loads.items())
          + f"; {os.cpu_count()} cores: above the core count, every figure above is inflated by other work")


if __name__ == "__main__":
    main()
