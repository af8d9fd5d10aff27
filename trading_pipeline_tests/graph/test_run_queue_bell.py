"""The run queue bell (graph/run_queue_bell.py), through Dagster's real run queue loop: a queued run
is launched when it is queued, not at the next check, and an idle queue is still checked only once
per interval (no busy loop). The interval here is 5 s, so the launch's speed cannot come from a
check that happened to fall right after the submission."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from contextlib import contextmanager

import dagster as dg
import pytest
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.launcher import RunLauncher
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._core.remote_origin import GrpcServerCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.test_utils import create_run_for_test, create_test_daemon_workspace_context
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.controller import create_daemon_of_type
from dagster._daemon.daemon import SpanMarker
from dagster._serdes import ConfigurableClass

from trading_pipeline.graph import run_launcher, run_queue_bell

INTERVAL_S = 5.0
LAUNCHED: dict[str, float] = {}  # run id -> when the launcher was asked (the launcher is built from config)


class RecordingLauncher(RunLauncher, ConfigurableClass):
    """Records when each run is launched; starts nothing."""

    def __init__(self, inst_data=None):
        self._inst_data = inst_data

    @property
    def inst_data(self):
        return self._inst_data

    @classmethod
    def config_type(cls):
        return {}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data)

    def launch_run(self, context) -> None:
        LAUNCHED[context.dagster_run.run_id] = time.monotonic()

    def terminate(self, run_id: str) -> bool:
        return False


def queued_run(instance, workspace) -> dg.DagsterRun:
    """A run submitted to the queue as a launch from the UI submits it (with the job's origin; the
    recording launcher never reaches that code location)."""
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(
        GrpcServerCodeLocationOrigin(host="127.0.0.1", port=9, location_name="trading_pipeline"), "__repository__"),
        "analyze_timeframe")
    code = JobPythonOrigin("analyze_timeframe", RepositoryPythonOrigin(
        sys.executable, ModuleCodePointer("trading_pipeline.definitions", "defs", working_directory=None)))
    run = create_run_for_test(instance, job_name="analyze_timeframe", status=dg.DagsterRunStatus.NOT_STARTED,
                              remote_job_origin=origin, job_code_origin=code)
    return instance.submit_run(run.run_id, workspace.create_request_context())


def instance_yaml(tmp_path) -> None:
    (tmp_path / "dagster.yaml").write_text(
        "run_coordinator:\n  module: trading_pipeline.graph.run_launcher\n  class: WarmingQueuedRunCoordinator\n"
        f"  config:\n    dequeue_interval_seconds: {INTERVAL_S}\n"
        f"run_launcher:\n  module: {__name__}\n  class: RecordingLauncher\n")


class QueueLoop:
    """Dagster's run queue loop (`IntervalDaemon.core_loop`) running in a thread, as in the daemon's
    process; `markers` holds each (time, marker) it yielded."""

    def __init__(self, instance, workspace):
        self.instance, self.workspace = instance, workspace
        self.markers: list[tuple[float, object]] = []
        self.stop = threading.Event()
        queue = create_daemon_of_type("QUEUED_RUN_COORDINATOR", instance)

        def loop() -> None:
            for marker in queue.core_loop(workspace, self.stop):
                self.markers.append((time.monotonic(), marker))
                if self.stop.is_set():
                    return

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def checks(self) -> list[float]:
        """When each check of the queue began."""
        return [at for at, marker in list(self.markers) if marker is SpanMarker.START_SPAN]

    def sleeps_after_checks(self) -> list[int]:
        """For each check followed by another, the 0.5 s steps the loop slept between them (after a
        check the loop yields once per step slept, then once more)."""
        sleeps, between = [], None
        for _, marker in list(self.markers):
            if marker is SpanMarker.END_SPAN:
                between = 0
            elif marker is SpanMarker.START_SPAN and between is not None:
                sleeps.append(between - 1)
                between = None
            elif between is not None:
                between += 1
        return sleeps

    def ring(self) -> None:
        run_queue_bell.ring(run_queue_bell.bell_path(self.instance.root_directory))


@contextmanager
def queue_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(run_launcher, "_in_daemon_process", lambda: True)
    instance_yaml(tmp_path)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance, \
            create_test_daemon_workspace_context(EmptyWorkspaceTarget(), instance) as workspace:
        loop = QueueLoop(instance, workspace)
        try:
            yield loop
        finally:
            loop.stop.set()
            loop.thread.join(timeout=INTERVAL_S + 5)


@pytest.fixture
def daemon_loop(tmp_path, monkeypatch):
    with queue_loop(tmp_path, monkeypatch) as loop:
        yield loop


def test_the_installed_dagster_reads_the_queue_limits_where_the_bell_waits():
    with dg.instance_for_test() as instance:
        assert run_queue_bell.loop_can_wait_here(instance)


def test_a_queued_run_is_launched_at_once_and_an_idle_queue_is_checked_once_per_interval(daemon_loop):
    instance, workspace, checks = daemon_loop.instance, daemon_loop.workspace, daemon_loop.checks
    # The bell paces the loop, not Dagster's sleep (which, should the wait not happen, checks every 0.5 s).
    assert instance.run_coordinator.dequeue_interval_seconds == run_queue_bell.LOOP_INTERVAL_S
    time.sleep(1.5)
    idle_checks = len(checks())
    assert 1 <= idle_checks <= 2, f"{idle_checks} checks of an idle queue in 1.5 s: the loop must wait between checks"

    submitted = time.monotonic()
    run = queued_run(instance, workspace)
    deadline = submitted + INTERVAL_S / 2
    while run.run_id not in LAUNCHED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.run_id in LAUNCHED, f"the run was not launched within {INTERVAL_S / 2} s of being queued"
    assert LAUNCHED[run.run_id] - submitted < 1.0

    time.sleep(1.0)  # the bell is heard once: the loop goes back to waiting
    assert len(checks()) <= idle_checks + 3


def test_after_a_check_the_bell_woke_the_loop_does_not_sleep(daemon_loop):
    """A check the bell woke can be quick (nothing left to launch: the run went in the check before;
    a run blocked by a limit; a launch of a few ms). The loop must not then sleep its 0.5 s step deaf
    to the bell: a run queued 0.15 s after two queued together waited ~0.35 s for that sleep."""
    time.sleep(0.2)
    for _ in range(5):  # two rings 20 ms apart (two runs queued together), with an empty queue: the
        daemon_loop.ring()  # second check begins at once or nearly, and is as quick as a check can be
        time.sleep(0.02)
        daemon_loop.ring()
        time.sleep(0.6)
    assert len(daemon_loop.checks()) >= 6, "the rings did not wake the queue's checks"
    assert daemon_loop.sleeps_after_checks() == [0] * len(daemon_loop.sleeps_after_checks()), (
        f"the loop slept {daemon_loop.sleeps_after_checks()} 0.5 s steps after its checks")


def test_the_loop_ends_soon_after_the_daemon_stops(tmp_path, monkeypatch):
    """Stopping the daemon (Ctrl-C, SIGTERM, `make dev` ending) ends the wait for the bell: Dagster's own
    loop notices within its 0.5 s step, whatever the interval (the daemon joins each loop for 30 s,
    then disposes the run launcher under a loop still running)."""
    with queue_loop(tmp_path, monkeypatch) as loop:
        time.sleep(0.3)  # the loop is waiting for the bell, up to INTERVAL_S
        stopped = time.monotonic()
        loop.stop.set()
        loop.thread.join(timeout=INTERVAL_S + 5)
        assert not loop.thread.is_alive() and time.monotonic() - stopped < 1.5, (
            f"the loop ended {time.monotonic() - stopped:.1f} s after the daemon stopped")


def test_a_dagster_that_reads_the_limits_through_another_call_keeps_its_own_interval(tmp_path, monkeypatch):
    """Should a Dagster release put a call between the queue's check and the coordinator (here a
    decorator on the instance's `get_concurrency_config`, and a loaded machine's 60 ms read), the bell
    cannot wait there: the coordinator then reports the configured interval, and the loop checks once
    per interval as Dagster's does, not back to back with no sleep between checks."""
    original = dg.DagsterInstance.get_concurrency_config

    @functools.wraps(original)
    def traced(self):
        time.sleep(0.06)
        return original(self)

    monkeypatch.setattr(dg.DagsterInstance, "get_concurrency_config", traced)
    with queue_loop(tmp_path, monkeypatch) as loop:
        assert loop.instance.run_coordinator.dequeue_interval_seconds == INTERVAL_S
        time.sleep(1.5)
        assert len(loop.checks()) <= 2, f"{len(loop.checks())} checks of an idle queue in 1.5 s"


def test_other_reads_of_the_queue_limits_never_wait(daemon_loop):
    instance = daemon_loop.instance
    started = time.monotonic()
    for _ in range(3):
        assert instance.get_concurrency_config().run_queue_config is not None
    assert time.monotonic() - started < 1.0


def test_outside_the_daemon_a_submission_rings_and_the_interval_is_the_configured_one(tmp_path):
    instance_yaml(tmp_path)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance, \
            create_test_daemon_workspace_context(EmptyWorkspaceTarget(), instance) as workspace:
        assert instance.run_coordinator.dequeue_interval_seconds == INTERVAL_S
        bell = run_queue_bell.Bell(run_queue_bell.bell_path(tmp_path))
        run = queued_run(instance, workspace)
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.QUEUED
        assert bell.wait(0.0), "submitting a run did not ring the bell"
        assert not bell.wait(0.05), "the bell is heard once per ring"


def test_a_bell_that_cannot_ring_leaves_the_submission_alone(tmp_path):
    run_queue_bell.ring(tmp_path / "missing" / run_queue_bell.BELL_FILE)  # no folder: nothing raised
    bell = run_queue_bell.Bell(tmp_path / "missing" / run_queue_bell.BELL_FILE)
    started = time.monotonic()
    assert not bell.wait(0.1)
    assert 0.1 <= time.monotonic() - started < 1.0


def test_a_ring_is_heard_where_modification_times_are_whole_seconds(tmp_path):
    """On a filesystem keeping whole seconds (ext3, HFS+, FAT, some network mounts), or with the
    kernel's coarse clock, two rings in one tick leave the same modification time: the second ring
    (the weekly run, queued 0.2 s after the daily one) must still be heard."""
    path = run_queue_bell.bell_path(tmp_path)
    second = 1_700_000_000 * 10**9

    def ring_on_a_whole_second_filesystem() -> None:
        run_queue_bell.ring(path)
        os.utime(path, ns=(second, second))

    ring_on_a_whole_second_filesystem()
    bell = run_queue_bell.Bell(path)  # the daemon starting in the same second as a ring
    ring_on_a_whole_second_filesystem()
    assert bell.wait(0.0), "a ring in the second the bell was made in was not heard"
    ring_on_a_whole_second_filesystem()
    assert bell.wait(0.0), "a second ring in the same second was not heard"
    assert not bell.wait(0.0)
