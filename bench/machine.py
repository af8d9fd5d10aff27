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
