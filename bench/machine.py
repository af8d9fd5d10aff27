"""One line saying what machine and interpreter a benchmark ran on, so its figures can be set
against another run's: the core count, the load, the Python build, and the time of a fixed piece
of pure-Python work (the same machine kind has measured 2x apart between sessions, and a Python
built without profile-guided optimization runs this 2x slower than a distribution's)."""

from __future__ import annotations

import os
import platform
import sys
import time


def describe() -> str:
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        sum(range(1_000_000))
        timings.append(time.perf_counter() - started)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"machine: {os.cpu_count()} cores, load {load:.1f}; Python {platform.python_version()} "
            f"({os.path.realpath(sys.executable)}); sum(range(10**6)) {min(timings) * 1000:.1f} ms (best of 20)")


def busy_share(seconds: float) -> float:
    """The share of the machine's CPU time (all cores) spent busy over the next `seconds` (/proc/stat)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    total, idle = read()
    time.sleep(seconds)
    total_after, idle_after = read()
    return 1 - (idle_after - idle) / max(1, total_after - total)


def wait_until_quiet(timeout_s: float, below: float = 0.2, window_s: float = 1.0) -> tuple[float, float]:
    """Wait until the machine is less than `below` busy over a `window_s` window, at most
    `timeout_s`: (seconds waited, the last window's busy share)."""
    started = time.perf_counter()
    while True:
        share = busy_share(window_s)
        waited = time.perf_counter() - started
        if share < below or waited >= timeout_s:
            return waited, share
