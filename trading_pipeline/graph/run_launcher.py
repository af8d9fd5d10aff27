"""`WarmRunLauncher`: Dagster's default run launcher, with each run forked from a warm worker.

Configured in the laptop instance (deploy/local/dagster.yaml). The daemon's launcher keeps one
`run_worker` process (imports and first use done once) and has it fork each run's process, which
runs `dagster api execute_run`; so a run starts in tens of milliseconds instead of 2-3 s. The run
is the same as under `DefaultRunLauncher`: same command, same instance, same code location loaded
fresh by the run (its strategies file and environment read when the run starts).

When the warm worker cannot be used, the run goes through `DefaultRunLauncher` unchanged (the code
server starts a new interpreter), and the event log says why: the run's code is not this
pipeline's code location; the source files changed since the worker warmed up (it is restarted
for the next run, so a run never executes older code than on disk); the worker failed to start or
to answer. A run never waits more than `start_timeout_seconds` for the worker.

Termination sends the run's process SIGINT (what Dagster's own run termination raises in it), and
the run monitor's health check looks the process up: both from the run's tags (pid, host, process
start time), so they work from the webserver's process too, on the same machine.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster._core.launcher import DefaultRunLauncher, LaunchRunContext
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._serdes import ConfigurableClassData

from trading_pipeline.graph import run_queue_bell
from trading_pipeline.graph.run_worker import source_fingerprint

WORKER_PID_TAG = "trading/run_worker_pid"
WORKER_HOST_TAG = "trading/run_worker_host"
WORKER_START_TAG = "trading/run_worker_start"  # the process's start time, so a reused pid is not taken for it
CODE_MODULE = "trading_pipeline.definitions"

log = logging.getLogger(__name__)


def process_start_ticks(pid: int) -> str | None:
    """The process's start time since boot (clock ticks, /proc/<pid>/stat), or None if it is gone
    or already exited (a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    state, start = fields[0], fields[19]
    return None if state in ("Z", "X") else start


class WarmWorker:
    """The `run_worker` process and its line protocol (one request at a time), and the render
    service its runs draw their charts with (one warm Chromium for all runs, instead of one
    started per run: TRADING_RENDER_SOCKET in the worker's environment, inherited by each run)."""

    def __init__(self, start_timeout_s: float):
        self.start_timeout_s = start_timeout_s
        self.fingerprint: str | None = None
        self.process: subprocess.Popen[str] | None = None
        self.render_service = None  # adapters.render_service.RenderServiceProcess once started
        self._render_directory: Path | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # shutdown() was called: start nothing more

    def _read_line(self, timeout_s: float) -> dict:
        process = self.process
        assert process and process.stdout
        deadline = time.monotonic() + timeout_s
        while True:  # in slices, so that a shutdown does not wait for a worker still warming up
            ready, _, _ = select.select([process.stdout], [], [], min(0.5, max(0.0, deadline - time.monotonic())))
            if ready:
                break
            if self._stopping.is_set():
                raise RuntimeError("the daemon is stopping")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the warm run worker did not answer in {timeout_s:.0f} s")
        line = process.stdout.readline()
        if not line:
            raise ConnectionError(f"the warm run worker exited (exit code {process.poll()})")
        return json.loads(line)

    def _start(self) -> None:
        from trading_pipeline.adapters.render_service import RENDER_SOCKET_ENV, SOCKET_NAME

        # The worker and the render service warm up side by side; the socket's path is known before.
        self._render_directory = Path(tempfile.mkdtemp(prefix="trading-render-"))  # mode 0700
        environment = {**os.environ, RENDER_SOCKET_ENV: str(self._render_directory / SOCKET_NAME)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trading_pipeline.graph.run_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1, cwd=os.getcwd(), env=environment)
        if self._stopping.is_set():  # a shutdown came while the worker started
            raise RuntimeError("the daemon is stopping")
        self._start_render_service()
        if self._stopping.is_set():  # a shutdown came while the render service started
            raise RuntimeError("the daemon is stopping")
        hello = self._read_line(self.start_timeout_s)
        if "ready" not in hello:
            raise RuntimeError(f"the warm run worker refused to serve: {hello.get('error', hello)}")
        self.fingerprint = hello["ready"]

    def _start_render_service(self) -> None:
        """Start (or restart) the render service; if it cannot start, each run renders with its own
        Chromium and says so in its log (the client falls back), so this is a warning, not a stop."""
        from trading_pipeline.adapters.render_service import start_render_service
        from trading_pipeline.errors import ChartRenderError

        if self.render_service is not None:
            self.render_service.close()
        try:
            self.render_service = start_render_service(self._render_directory, timeout_s=self.start_timeout_s,
                                                       stop=self._stopping)
        except ChartRenderError as error:
            self.render_service = None
            if not self._stopping.is_set():
                log.warning(f"the render service did not start; runs start their own Chromium: {error}")

    def close(self) -> None:
        ready = self.fingerprint is not None
        process, self.process, self.fingerprint = self.process, None, None
        service, self.render_service = self.render_service, None
        if service is not None:
            service.close()
        if self._render_directory is not None:
            shutil.rmtree(self._render_directory, ignore_errors=True)
            self._render_directory = None
        if process is None:
            return
        try:
            if not ready:  # still warming up: no runs of its own, and it reads its input only once warm
                process.kill()
            if process.stdin:
                process.stdin.close()  # it exits at end of input; its runs go on
            process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()

    def shutdown(self) -> None:
        """Stop for good (the daemon is stopping), at once: a daemon slow to exit has Dagster restart
        its code server, which then outlives it. A worker still warming up has nothing to finish and
        is killed; a start in progress gives up at its next step and closes what it started (if
        this process is gone first, the render service follows its parent and the worker ends at
        the end of its input)."""
        self._stopping.set()
        self.close()

    def prestart(self) -> None:
        """Start and warm the worker now, so the first run does not wait for it (in the background)."""
        def start() -> None:
            with self._lock:
                if self.process is None and not self._stopping.is_set():
                    try:
                        self._start()
                    except Exception as error:  # noqa: BLE001 - the first launch retries and reports it
                        if not self._stopping.is_set():
                            log.warning(f"the warm run worker did not start: {error}")
                        self.close()

        threading.Thread(target=start, name="warm-run-worker-start", daemon=True).start()

    def fork_run(self, input_json: str) -> tuple[int, str | None]:
        """(pid of the run's process, why the warm worker was restarted or None). Raises when the
        worker cannot start the run: the caller then launches it the default way."""
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the daemon is stopping")
            restarted = None
            current = source_fingerprint()
            if self.process is not None and self.process.poll() is not None:
                restarted = f"the warm run worker had exited (exit code {self.process.returncode})"
                self.close()
            elif self.process is not None and self.fingerprint != current:
                restarted = "the pipeline's source files changed since the warm run worker started"
                self.close()
            if self.process is None:
                try:
                    self._start()
                except Exception:
                    self.close()
                    raise
                if self.fingerprint != current:  # changed while it warmed up: not this run
                    raise RuntimeError("the pipeline's source files changed while the warm run worker started")
            elif self.render_service is not None and not self.render_service.is_alive():
                restarted = "the render service had exited; it was restarted"
                self._start_render_service()
            try:
                assert self.process and self.process.stdin
                self.process.stdin.write(json.dumps({"input_json": input_json}) + "\n")
                self.process.stdin.flush()
                answer = self._read_line(self.start_timeout_s)
            except Exception:
                self.close()
                raise
            if "pid" not in answer:
                raise RuntimeError(f"the warm run worker did not start the run: {answer.get('error', answer)}")
            return int(answer["pid"]), restarted


class WarmRunLauncher(DefaultRunLauncher):
    """Runs of this pipeline's code location start forked from a warm worker; others, and any run
    the worker cannot start, go through Dagster's `DefaultRunLauncher`."""

    def __init__(self, inst_data: ConfigurableClassData | None = None, start_timeout_seconds: float = 60.0):
        super().__init__(inst_data=inst_data)
        self._worker = WarmWorker(start_timeout_seconds)
        self._config = {"start_timeout_seconds": start_timeout_seconds}

    @classmethod
    def config_type(cls):
        from dagster import Field

        return {"start_timeout_seconds": Field(float, is_required=False, default_value=60.0,
                                               description="Longest wait for the warm worker to start or answer; "
                                                           "after it the run starts the default way.")}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data, **config_value)

    def prestart(self) -> None:
        self._worker.prestart()

    def launch_run(self, context: LaunchRunContext) -> None:
        from dagster._core.events import EngineEventData
        from dagster._grpc.types import ExecuteRunArgs
        from dagster._serdes import serialize_value

        run = context.dagster_run
        origin = run.job_code_origin
        pointer = origin.repository_origin.code_pointer if origin else None
        if getattr(pointer, "module", None) != CODE_MODULE:
            super().launch_run(context)
            return
        input_json = serialize_value(ExecuteRunArgs(job_origin=origin, run_id=run.run_id,
                                                    instance_ref=self._instance.get_ref()))
        started = time.perf_counter()
        try:
            pid, restarted = self._worker.fork_run(input_json)
        except Exception as error:  # noqa: BLE001 - the default launcher still starts the run
            self._instance.report_engine_event(
                f"Warm run worker not used ({error}); starting the run in a new process instead.", run,
                EngineEventData(), cls=self.__class__)
            super().launch_run(context)
            return
        start_ticks = process_start_ticks(pid)
        self._instance.add_run_tags(run.run_id, {WORKER_PID_TAG: str(pid), WORKER_HOST_TAG: socket.gethostname(),
                                                 WORKER_START_TAG: start_ticks or ""})
        self._instance.report_engine_event(
            f"Run process {pid} forked from the warm run worker {self._worker.process.pid} "
            f"in {(time.perf_counter() - started) * 1000:.0f} ms"
            + (f" (restarted it first: {restarted})" if restarted else "") + ".",
            run, EngineEventData(), cls=self.__class__)

    def _worker_process(self, run) -> int | None:
        """The run's forked process if it is still running on this machine, else None."""
        tags = run.tags
        if WORKER_PID_TAG not in tags or tags.get(WORKER_HOST_TAG) != socket.gethostname():
            return None
        pid = int(tags[WORKER_PID_TAG])
        start = process_start_ticks(pid)
        return pid if start is not None and start == tags.get(WORKER_START_TAG) else None

    def terminate(self, run_id: str) -> bool:
        import signal

        run = self._instance.get_run_by_id(run_id)
        if run is None or WORKER_PID_TAG not in run.tags:
            return super().terminate(run_id)
        pid = self._worker_process(run)
        if pid is None:
            self._instance.report_engine_event(
                f"Could not terminate the run: its process {run.tags[WORKER_PID_TAG]} is not running "
                f"on this machine ({socket.gethostname()}).", run, cls=self.__class__)
            return False
        self._instance.report_run_canceling(run)
        os.kill(pid, signal.SIGINT)
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        # Anything but RUNNING makes the run monitor fail the run: a run this machine cannot look up
        # (started the default way, before its tags were written, or on another host) is not failed.
        if WORKER_PID_TAG not in run.tags or run.tags.get(WORKER_HOST_TAG) != socket.gethostname():
            return CheckRunHealthResult(WorkerStatus.RUNNING, "not a warm run worker's process on this machine")
        if self._worker_process(run) is None:
            return CheckRunHealthResult(WorkerStatus.FAILED,
                                        f"its process {run.tags[WORKER_PID_TAG]} is no longer running")
        return CheckRunHealthResult(WorkerStatus.RUNNING)

    def dispose(self) -> None:
        self._worker.shutdown()
        super().dispose()


def _in_daemon_process() -> bool:
    """This process is `dagster-daemon run` (or `python -m dagster._daemon run`, as `dagster dev` starts
    it); not the daemon's other commands (`liveness-check`, a health probe, reads the coordinator too)."""
    program = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    daemon = os.path.basename(program) == "dagster-daemon" or program.endswith(os.path.join("dagster", "_daemon",
                                                                                             "__main__.py"))
    return daemon and sys.argv[1:2] == ["run"]


class WarmingQueuedRunCoordinator(QueuedRunCoordinator):
    """Dagster's queued run coordinator that, in the daemon, warms the run launcher's worker when the
    daemon starts (the coordinator is made then; the launcher only at the first launch). Without
    it, the first run after each daemon start would wait for the worker's imports.

    `dequeue_interval_seconds` may be a fraction here (Dagster's takes whole seconds, at least 1).
    Submitting a run rings the run queue bell, and in the daemon the queue loop waits for the bell
    or the interval, whichever comes first, instead of sleeping (`run_queue_bell`): a run is
    launched as soon as it is queued, and an idle queue is checked once per interval."""

    def __init__(self, *args: Any, dequeue_interval_seconds: float | None = None, **kwargs: Any):
        if dequeue_interval_seconds is not None and not dequeue_interval_seconds > 0:
            raise ValueError(f"dequeue_interval_seconds must be above 0 seconds, not {dequeue_interval_seconds}")
        whole = None if dequeue_interval_seconds is None else max(1, round(dequeue_interval_seconds))
        super().__init__(*args, dequeue_interval_seconds=whole, **kwargs)
        self._dequeue_interval = (float(dequeue_interval_seconds) if dequeue_interval_seconds is not None
                                  else float(self._dequeue_interval_seconds))
        self._bell_path: Path | None = None
        self._bell: run_queue_bell.Bell | None = None  # in the daemon: what its queue loop waits for

    @property
    def dequeue_interval_seconds(self) -> float:  # read by the daemon when it makes its run queue loop
        # With the bell, each check waits for it (at most the interval) and the loop need not sleep too.
        return run_queue_bell.LOOP_INTERVAL_S if self._bell is not None else self._dequeue_interval

    def get_run_queue_config(self):
        config = super().get_run_queue_config()
        if self._bell is not None:
            run_queue_bell.wait_at_the_start_of_a_queue_check(self._bell, self._dequeue_interval)
        return config

    def submit_run(self, context):
        run = super().submit_run(context)
        if self._bell_path is not None:
            run_queue_bell.ring(self._bell_path)
        return run

    @classmethod
    def config_type(cls):
        from dagster import Field, Float

        schema = dict(super().config_type())
        schema["dequeue_interval_seconds"] = Field(
            Float, is_required=False,
            description="How often, in seconds, the daemon checks the run queue when no run is queued (fractions "
                        "allowed): a queued run rings the run queue bell and is launched at once.")
        return schema

    def register_instance(self, instance) -> None:
        super().register_instance(instance)
        self._bell_path = run_queue_bell.bell_path(instance.root_directory)
        if _in_daemon_process() and run_queue_bell.loop_can_wait_here(instance):
            self._bell = run_queue_bell.Bell(self._bell_path)
        launcher = instance.run_launcher
        if isinstance(launcher, WarmRunLauncher) and _in_daemon_process():
            launcher.prestart()
