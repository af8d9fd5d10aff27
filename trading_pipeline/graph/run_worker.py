"""The warm run worker: a process that imports the pipeline once and forks one child per run.

Dagster's default launcher starts every run in a new interpreter, which imports Dagster, pandas,
plotly, SQLAlchemy and the pipeline and then pays their first use (the exchange calendar, plotly's
figure machinery): 2-3 s per run, most of a 20-symbol run's own work (docs/production.md). This
process does that once (`warm_up`), then waits for run requests from `WarmRunLauncher` on stdin
and forks a child per request that runs `dagster api execute_run` on it in-process: the command
Dagster's Docker and Kubernetes launchers run in their containers, here without the start-up.

What is never done before the fork, so no child shares it: load the code location
(`trading_pipeline.definitions` reads the strategies file and the environment: each run loads it
itself, as with a new interpreter), open a database, a socket or a browser (a run draws its
charts through the launcher's render service, TRADING_RENDER_SOCKET, or starts its own
Chromium), or start a thread.

Protocol (one JSON object per line): request {"input_json": <ExecuteRunArgs serialized>}; answer
{"pid": <child pid>} or {"error": <text>}. The first line written is {"ready": <source
fingerprint>, "pid": <own pid>} once warm. The worker exits when stdin closes (its launcher's
process is gone); runs already forked keep running, as runs of a stopped daemon do.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def source_fingerprint(package_dir: Path = PACKAGE_DIR) -> str:
    """A digest of the pipeline's source files (path, size, modification time): a worker whose
    fingerprint differs from the files on disk holds old code and must not start runs."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(package_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def warm_up() -> None:
    """Import what a run imports and pay each library's first use, without keeping any handle."""
    from datetime import UTC, datetime

    import dagster._cli.api
    import dagster._core.storage.runs.sqlite  # noqa: F401
    import PIL.PngImagePlugin  # noqa: F401 - the thumbnails
    import sqlalchemy  # noqa: F401
    from upath import UPath  # noqa: F401 - the IO manager's paths and fsspec, imported at a run's first output

    import trading_pipeline.adapters.chart_render
    import trading_pipeline.adapters.chart_store
    import trading_pipeline.adapters.records
    import trading_pipeline.adapters.trading_db
    import trading_pipeline.graph.assets
    import trading_pipeline.graph.automation
    import trading_pipeline.graph.instance_storage
    import trading_pipeline.graph.io_managers
    import trading_pipeline.graph.portfolio
    import trading_pipeline.graph.resources
    import trading_pipeline.graph.strategies_asset
    import trading_pipeline.migrations  # noqa: F401
    from trading_pipeline.adapters.render_service import warm_up_figures
    from trading_pipeline.core import market_calendar

    # First use: the calendar's schedule, TA-Lib, pandas' indexing, plotly's figure classes.
    market_calendar.is_open(datetime(2026, 1, 9, 21, 30, tzinfo=UTC))
    warm_up_figures(2, width=800, height=600)


def _answer(out, message: dict) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _reap() -> None:
    """Collect exited children so none stays a zombie (their exit status is in the event log)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _run_child(input_json: str, protocol_fds: tuple[int, ...]) -> None:
    """In the forked child: become an ordinary run process and run `dagster api execute_run`."""
    code = 1
    try:
        for fd in protocol_fds:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Dagster's termination is a SIGINT
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        from dagster._cli.api import execute_run_command

        try:
            execute_run_command.callback(input_json, None)  # the click command's own function
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - the run's own failures are in its event log; this is the rest
        traceback.print_exc()
        _fail_unstarted_run(input_json, traceback.format_exc())
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _fail_unstarted_run(input_json: str, error: str) -> None:
    """A run whose process failed before the run began would otherwise stay STARTING: mark it failed."""
    try:
        from dagster import DagsterInstance, DagsterRunStatus
        from dagster._grpc.types import ExecuteRunArgs
        from dagster._serdes import deserialize_value

        args = deserialize_value(input_json, ExecuteRunArgs)
        with DagsterInstance.from_ref(args.instance_ref) as instance:
            run = instance.get_run_by_id(args.run_id)
            if run is not None and run.status in (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING):
                instance.report_run_failed(run, f"The run's process (forked from the warm run worker) failed "
                                                f"before the run started:\n{error}")
    except BaseException:  # noqa: BLE001 - nothing more to report with; the traceback is on stderr
        traceback.print_exc()


def serve() -> None:
    # The protocol runs on private copies of stdin/stdout; fd 1 becomes stderr so that whatever a
    # run prints goes where the launcher's own output goes, never into the protocol.
    requests_fd, answers_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    requests = os.fdopen(requests_fd, "r", encoding="utf-8")
    answers = os.fdopen(answers_fd, "w", encoding="utf-8")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for the daemon, which stops us
    warm_up()
    # Reap each run as it ends: an unreaped child would still look alive to the health check.
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    threads = threading.active_count()
    if threads != 1 or "trading_pipeline.definitions" in sys.modules:
        _answer(answers, {"error": f"not safe to fork: {threads} threads running after warm-up, code location "
                                   f"loaded: {'trading_pipeline.definitions' in sys.modules}"})
        return
    _answer(answers, {"ready": source_fingerprint(), "pid": os.getpid()})
    for line in requests:
        try:
            input_json = json.loads(line)["input_json"]
            if not isinstance(input_json, str):
                raise TypeError("input_json must be a string")
        except (ValueError, KeyError, TypeError) as error:
            _answer(answers, {"error": f"bad request: {error}"})
            continue
        try:
            pid = os.fork()
        except OSError as error:
            _answer(answers, {"error": f"fork failed: {error}"})
            continue
        if pid == 0:
            _run_child(input_json, (requests_fd, answers_fd))
        _answer(answers, {"pid": pid})
    _reap()


if __name__ == "__main__":
    serve()
