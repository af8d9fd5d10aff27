"""The warm run launcher's parts without a daemon: the worker process and its protocol, the code
fingerprint that retires an outdated worker, and the health check and termination that find a
run's process from its tags. (deploy/test_warm_runs.py runs real runs through the daemon.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.launcher.base import WorkerStatus
from dagster._core.test_utils import create_run_for_test

from trading_pipeline.graph import run_launcher
from trading_pipeline.graph.run_launcher import (
    WORKER_HOST_TAG,
    WORKER_PID_TAG,
    WORKER_START_TAG,
    WarmRunLauncher,
    WarmWorker,
    process_start_ticks,
)
from trading_pipeline.graph.run_worker import source_fingerprint


def wait_until_gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process_start_ticks(pid) is None:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def worker():
    started = WarmWorker(start_timeout_s=120)
    started.prestart()
    deadline = time.monotonic() + 120
    while started.fingerprint is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.fingerprint is not None, "the warm run worker did not become ready"
    yield started
    started.close()


def test_worker_is_warm_single_threaded_and_fingerprints_the_source(worker):
    assert worker.fingerprint == source_fingerprint()
    # Warm: the pipeline and its libraries are imported in it, the code location is not.
    with open(f"/proc/{worker.process.pid}/maps") as maps:
        modules = maps.read()
    assert "talib" in modules.lower()


@pytest.mark.parametrize(("warm_up", "refusal"), [
    ("import threading, time; threading.Thread(target=time.sleep, args=(30,), daemon=True).start()", "2 threads"),
    ("import trading_pipeline.definitions", "code location loaded: True"),
])
def test_a_worker_that_would_fork_a_thread_or_a_loaded_code_location_refuses_to_serve(warm_up, refusal):
    """A fork copies one thread only (another's locks stay held forever in the child), and the code
    location must be loaded by each run (it reads the strategies file then)."""
    script = ("from trading_pipeline.graph import run_worker\n"
              f"run_worker.warm_up = lambda: exec({warm_up!r})\nrun_worker.serve()\n")
    process = subprocess.run([sys.executable, "-c", script], input="", capture_output=True, text=True, timeout=120,
                             check=False)
    answer = json.loads(process.stdout.splitlines()[0])
    assert "not safe to fork" in answer["error"] and refusal in answer["error"]


def test_runs_get_the_render_service_in_their_environment_and_a_dead_service_is_restarted(worker):
    from trading_pipeline.adapters.render_protocol import ping

    with open(f"/proc/{worker.process.pid}/environ", "rb") as environ:
        variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
    socket_path = variables[b"TRADING_RENDER_SOCKET"].decode()
    assert socket_path == str(worker.render_service.socket_path)
    assert os.stat(os.path.dirname(socket_path)).st_mode & 0o077 == 0  # only this user can reach it
    assert ping(socket_path)["starts"] >= 1  # its Chromium is up before the first run
    first = worker.render_service.pid
    worker.render_service.process.kill()
    worker.render_service.process.wait()
    pid, restarted = worker.fork_run("{}")
    assert "render service had exited" in restarted and wait_until_gone(pid)
    assert worker.render_service.pid != first and ping(socket_path)["starts"] >= 1


def test_a_run_request_forks_a_child_that_is_reaped_and_a_bad_one_fails_its_run_not_the_worker(worker):
    # Not a serialized ExecuteRunArgs: the child fails at once (the traceback goes to stderr).
    pid, restarted = worker.fork_run("not json at all")
    assert restarted is None and pid != worker.process.pid
    assert wait_until_gone(pid), "the failed child was not reaped (it would look alive to the health check)"
    # The worker is still serving.
    second, _ = worker.fork_run("{}")
    assert second != pid and wait_until_gone(second)
    assert worker.process.poll() is None


def test_a_malformed_request_line_is_answered_with_an_error_and_the_worker_goes_on(worker):
    with worker._lock:
        worker.process.stdin.write("{\"no_input\": 1}\n")
        worker.process.stdin.flush()
        answer = worker._read_line(30)
    assert "bad request" in answer["error"]
    pid, _ = worker.fork_run("{}")
    assert wait_until_gone(pid)


def test_changed_source_or_a_dead_worker_gets_a_fresh_worker_first(monkeypatch):
    fresh = WarmWorker(start_timeout_s=120)
    try:
        pid, restarted = fresh.fork_run("{}")
        assert restarted is None and wait_until_gone(pid)
        first = fresh.process.pid
        # The files on disk changed after the worker imported them: it must not start the next run.
        monkeypatch.setattr(run_launcher, "source_fingerprint", lambda: "changed-on-disk")
        monkeypatch.setattr(fresh, "_start", lambda: _started_with(fresh, "changed-on-disk"))
        pid, restarted = fresh.fork_run("{}")
        assert "source files changed" in restarted
        assert wait_until_gone(first), "the outdated worker was not stopped"
        assert wait_until_gone(pid)
        monkeypatch.undo()
        # A worker that died is replaced as well.
        fresh.close()
        fresh.fork_run("{}")
        fresh.process.kill()
        fresh.process.wait()
        pid, restarted = fresh.fork_run("{}")
        assert "had exited" in restarted and wait_until_gone(pid)
    finally:
        fresh.close()


def _started_with(worker: WarmWorker, fingerprint: str) -> None:
    """`WarmWorker._start`, claiming the given fingerprint (as a worker that imported newer files would)."""
    WarmWorker._start(worker)
    worker.fingerprint = fingerprint


def test_a_worker_that_cannot_start_raises_so_the_run_goes_the_default_way(monkeypatch):
    broken = WarmWorker(start_timeout_s=5)
    monkeypatch.setattr(run_launcher.sys, "executable", "/bin/false")
    with pytest.raises(ConnectionError, match="exited"):
        broken.fork_run("{}")
    assert broken.process is None


def test_process_start_ticks_tells_a_running_process_from_an_exited_one():
    assert process_start_ticks(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child.pid}/stat"):
        with open(f"/proc/{child.pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    assert process_start_ticks(child.pid) is None  # exited, not yet reaped: a zombie is not running
    child.wait()
    assert process_start_ticks(child.pid) is None


@pytest.mark.parametrize(("argv0", "daemon"), [
    ("/app/.venv/bin/dagster-daemon", True),
    ("/app/.venv/lib/python3.11/site-packages/dagster/_daemon/__main__.py", True),
    ("/app/.venv/bin/dagster-webserver", False),
    ("/app/.venv/bin/dagster", False),
    ("", False),
])
def test_only_the_daemon_warms_the_worker_at_start(monkeypatch, argv0, daemon):
    monkeypatch.setattr(run_launcher.sys, "argv", [argv0, "run"])
    assert run_launcher._in_daemon_process() is daemon


@pytest.mark.parametrize("command", ["liveness-check", "wipe", "debug"])
def test_the_daemons_other_commands_are_not_the_daemon(monkeypatch, command):
    monkeypatch.setattr(run_launcher.sys, "argv", ["/app/.venv/bin/dagster-daemon", command])
    assert run_launcher._in_daemon_process() is False


def test_a_liveness_check_starts_no_worker(tmp_path, monkeypatch):
    """`dagster-daemon liveness-check` (a container's health probe, every few seconds) reads the
    instance's run coordinator too: it must not start a warm worker and a Chromium each time."""
    from click.testing import CliRunner
    from dagster._daemon.cli import liveness_check_command

    (tmp_path / "dagster.yaml").write_text(
        "run_coordinator:\n  module: trading_pipeline.graph.run_launcher\n  class: WarmingQueuedRunCoordinator\n"
        "run_launcher:\n  module: trading_pipeline.graph.run_launcher\n  class: WarmRunLauncher\n")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setattr(run_launcher.sys, "argv", ["/app/.venv/bin/dagster-daemon", "liveness-check"])
    prestarted = []
    monkeypatch.setattr(WarmRunLauncher, "prestart", lambda self: prestarted.append(self))
    result = CliRunner().invoke(liveness_check_command)
    assert "Daemon(s) not running" in result.output  # it did read the instance (no daemon here)
    assert prestarted == []


@pytest.fixture
def instance():
    with dg.instance_for_test(overrides={"run_launcher": {"module": "trading_pipeline.graph.run_launcher",
                                                          "class": "WarmRunLauncher"}}) as test_instance:
        yield test_instance


def run_with_worker(instance, pid: int, host: str | None = None, start: str | None = None):
    return create_run_for_test(instance, job_name="analyze_timeframe", status=dg.DagsterRunStatus.STARTED,
                               tags={WORKER_PID_TAG: str(pid), WORKER_HOST_TAG: host or socket.gethostname(),
                                     WORKER_START_TAG: start if start is not None else process_start_ticks(pid) or ""})


def test_health_check_finds_the_run_process_by_pid_and_start_time(instance):
    launcher = instance.run_launcher
    assert isinstance(launcher, WarmRunLauncher) and launcher.supports_check_run_worker_health
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = run_with_worker(instance, sleeper.pid)
        assert launcher.check_run_worker_health(alive).status == WorkerStatus.RUNNING
        # The same pid with another start time is another process (the pid was reused): the run's is gone.
        reused = run_with_worker(instance, sleeper.pid, start="1")
        assert launcher.check_run_worker_health(reused).status == WorkerStatus.FAILED
        # Another machine's process, or a run started the default way, cannot be looked up: never failed.
        elsewhere = run_with_worker(instance, sleeper.pid, host="another-host")
        assert launcher.check_run_worker_health(elsewhere).status == WorkerStatus.RUNNING
        default = create_run_for_test(instance, job_name="analyze_timeframe", status=dg.DagsterRunStatus.STARTED)
        assert launcher.check_run_worker_health(default).status == WorkerStatus.RUNNING
    finally:
        sleeper.kill()
        sleeper.wait()
    assert launcher.check_run_worker_health(alive).status == WorkerStatus.FAILED


def test_terminate_interrupts_the_run_process_and_marks_the_run_canceling(instance):
    # A stand-in for a run process: Dagster terminates a run by raising KeyboardInterrupt in it.
    script = ("import sys, time\nprint('ready', flush=True)\ntry:\n    time.sleep(60)\n"
              "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n    sys.exit(3)\n")
    stand_in = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert stand_in.stdout.readline().strip() == "ready"
        run = run_with_worker(instance, stand_in.pid)
        assert instance.run_launcher.terminate(run.run_id) is True
        assert stand_in.wait(timeout=30) == 3 and stand_in.stdout.readline().strip() == "interrupted"
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELING
        # Its process is gone: terminating again signals nothing and says so in the run's log.
        assert instance.run_launcher.terminate(run.run_id) is False
        assert any("is not running" in event_text(event) for event in instance.all_logs(run.run_id))
    finally:
        if stand_in.poll() is None:
            stand_in.send_signal(signal.SIGKILL)
            stand_in.wait()


def event_text(event) -> str:
    return (event.dagster_event.message if event.dagster_event else event.user_message) or ""


def test_worker_protocol_first_line_is_ready_with_the_fingerprint():
    process = subprocess.Popen([sys.executable, "-m", "trading_pipeline.graph.run_worker"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        hello = json.loads(process.stdout.readline())
        assert hello == {"ready": source_fingerprint(), "pid": process.pid}
    finally:
        process.stdin.close()  # end of input: the worker exits
        assert process.wait(timeout=30) == 0


@pytest.mark.parametrize("configured, checked_every", [("0.5", 0.5), ("2", 2.0), (None, 5.0)])
def test_the_queue_can_be_checked_every_half_second(tmp_path, configured, checked_every):
    """A fraction of a second is accepted (Dagster's own coordinator takes whole seconds only) and is
    what the daemon's run queue loop waits between checks; whole seconds and the default still work."""
    from dagster._daemon.controller import create_daemon_of_type

    config = "" if configured is None else f"\n  config:\n    dequeue_interval_seconds: {configured}"
    (tmp_path / "dagster.yaml").write_text(
        "run_coordinator:\n  module: trading_pipeline.graph.run_launcher\n  class: WarmingQueuedRunCoordinator"
        + config + "\n")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.run_coordinator.dequeue_interval_seconds == checked_every
        assert create_daemon_of_type("QUEUED_RUN_COORDINATOR", instance).interval_seconds == checked_every


def test_a_queue_check_interval_of_zero_is_refused():
    with pytest.raises(ValueError, match="dequeue_interval_seconds must be above 0"):
        run_launcher.WarmingQueuedRunCoordinator(dequeue_interval_seconds=0)


def _children(marks: tuple[str, ...]) -> list[int]:
    """This process's live children whose command line holds one of `marks`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] not in ("Z", "X") and any(m in command for m in marks):
            found.append(int(pid))
    return found


@pytest.mark.parametrize("after_s", [0.0, 1.0, 4.0])
def test_a_shutdown_during_the_start_leaves_no_worker_or_render_service_behind(after_s):
    """Ctrl-C on the daemon while its worker and render service are still starting (the daemon
    starts them when it starts): the start gives up and nothing it started outlives the shutdown."""
    marks = ("trading_pipeline.graph.run_worker", "trading_pipeline.adapters.render_service")
    before = set(_children(marks))  # the module's own warm worker, if it runs

    def started_here() -> set[int]:
        return set(_children(marks)) - before

    worker = WarmWorker(start_timeout_s=120)
    worker.prestart()
    time.sleep(after_s)
    started = time.monotonic()
    worker.shutdown()
    assert time.monotonic() - started < 2  # the daemon exits at once (Dagster restarts a slow one's code server)
    # The start runs in a thread holding the worker's lock from before its first process until it
    # has closed what it started. Until it lets go, a process may be forked and not yet exec'd (its
    # command line still pytest's): looking for children before then can miss one and find it later.
    assert worker._lock.acquire(timeout=20), "the start in progress did not give up within 20 s"
    worker._lock.release()
    deadline = time.monotonic() + 20
    while started_here() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in started_here()}
    assert left == {}
    while (worker.process or worker.render_service) and time.monotonic() < deadline:
        time.sleep(0.1)  # the start in progress, if any, closed what it had started
    assert worker.process is None and worker.render_service is None
    with pytest.raises(RuntimeError, match="stopping"):
        worker.fork_run("{}")
