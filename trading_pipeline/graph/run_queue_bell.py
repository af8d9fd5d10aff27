"""A queued run is launched as soon as it is queued, not at the daemon's next check of the queue.

Dagster's run queue daemon checks the queue, then sleeps in steps of 0.5 s: a run queued just
after a check waits up to ~0.5 s, and the 1d and 1w refreshes, queued 0.2 s apart, often went
one check apart (bench/daemon.py's timelines: the second run launched 0.6 s after it was queued).

Here a process that queues a run (the daemon's schedules and sensors, the webserver's launches)
rings a bell: it appends a byte to a file in DAGSTER_HOME (the file's size tells a ring apart
even where modification times are whole seconds). The daemon's queue loop waits for that bell
instead of sleeping: each check of the queue begins by waiting until the bell rings or the check
interval has passed, whichever comes first, and ends early when the daemon stops. The wait lasts
at least `LOOP_INTERVAL_S`, the loop's own interval with the bell, so the loop never sleeps after
a check (a quick one included), and checks come at most ~20 times a second however often the
bell rings. A bell that cannot ring (a webserver in another container, without the daemon's
DAGSTER_HOME) only leaves the interval, as before.

The wait is placed where Dagster's loop asks the run coordinator for the queue's limits, once
at the start of each check (`QueuedRunCoordinatorDaemon.run_iteration` ->
`DagsterInstance.get_concurrency_config` -> `get_run_queue_config`). It is used only when each
link of that chain is there in the installed Dagster (`loop_can_wait_here`); otherwise the
coordinator reports the configured interval and the loop sleeps as Dagster's does.
trading_pipeline_tests/graph/test_run_queue_bell.py runs the real loop to hold both.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

BELL_FILE = ".run-queue-bell"
POLL_S = 0.01  # a stat() per poll: ~0.1% of a core while the queue is idle
# The loop's own interval with the bell: each wait lasts at least this long, so a check that
# waited is never shorter and Dagster's loop does not sleep after it (it sleeps 0.5 s steps after
# a check shorter than its interval).
LOOP_INTERVAL_S = 0.05
RING_LIMIT_BYTES = 4096  # the ring that makes the file this long empties it


def bell_path(dagster_home: str | os.PathLike) -> Path:
    return Path(dagster_home) / BELL_FILE


def ring(path: Path) -> None:
    """Tell the daemon's queue loop a run was queued. Never fails the caller: a bell that cannot
    ring leaves the run to the next check of the queue."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, b".")  # one appended byte: a new size, whatever the clock's granularity
            if os.fstat(fd).st_size >= RING_LIMIT_BYTES:
                os.ftruncate(fd, 0)  # also a new size
        finally:
            os.close(fd)
    except OSError:
        pass


class Bell:
    """The daemon's side: `wait(timeout_s)` returns when the bell rang since the last wait ended,
    or after `timeout_s`."""

    def __init__(self, path: Path):
        self.path = path
        self._heard = self._rung_at()

    def _rung_at(self) -> tuple[int, int] | None:
        try:
            status = self.path.stat()
        except OSError:
            return None
        return status.st_size, status.st_mtime_ns

    def wait(self, timeout_s: float, at_least_s: float = 0.0, stop: threading.Event | None = None) -> bool:
        """True when the bell rang, False when the time ran out or `stop` was set. Returns no sooner
        than `at_least_s` unless stopped."""
        started = time.monotonic()
        earliest, deadline = started + at_least_s, started + max(timeout_s, at_least_s)
        rang = False
        while stop is None or not stop.is_set():
            rung = self._rung_at()
            if rung != self._heard:
                self._heard, rang = rung, True
            now = time.monotonic()
            if (rang and now >= earliest) or now >= deadline:
                return rang
            time.sleep(min(POLL_S, (earliest if rang else deadline) - now))
        return rang


def loop_can_wait_here(instance) -> bool:
    """The installed Dagster's queue loop asks for the queue's limits at the start of each check,
    and `instance` asks its run coordinator for them directly: the call chain
    `wait_at_the_start_of_a_queue_check` finds by its depth."""
    code = _run_iteration_code()
    reads_limits = getattr(type(instance).get_concurrency_config, "__code__", None)
    return (code is not None and "get_concurrency_config" in code.co_names
            and reads_limits is not None and "get_run_queue_config" in reads_limits.co_names)


def wait_at_the_start_of_a_queue_check(bell: Bell, interval_s: float) -> None:
    """Wait for `bell` (at most `interval_s`, at least `LOOP_INTERVAL_S`, until the daemon stops) when
    the caller of the caller's caller is the queue loop's check: `get_run_queue_config` <-
    `get_concurrency_config` <- `run_iteration`. Other reads of the limits (pool limits during a
    check, the other daemons, the UI) are not waited at."""
    code = _run_iteration_code()
    check = _caller(sys._getframe(0), 3)  # this function <- get_run_queue_config <- get_concurrency_config <- ?
    if code is None or check is None or check.f_code is not code:
        return
    bell.wait(interval_s, at_least_s=LOOP_INTERVAL_S, stop=_shutdown_event(check.f_back))


def _caller(frame, levels: int):
    for _ in range(levels):
        frame = frame.f_back if frame is not None else None
    return frame


def _shutdown_event(loop) -> threading.Event | None:
    """The daemon's shutdown event, from the loop (`IntervalDaemon.core_loop`) running the check."""
    from dagster._daemon.daemon import IntervalDaemon

    if loop is None or loop.f_code is not getattr(IntervalDaemon.core_loop, "__code__", None):
        return None
    event = loop.f_locals.get("shutdown_event")
    return event if isinstance(event, threading.Event) else None


def _run_iteration_code():
    try:
        from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
    except ImportError:
        return None
    return getattr(QueuedRunCoordinatorDaemon.run_iteration, "__code__", None)
