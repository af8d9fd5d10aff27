"""Thread-safe pacing for the Client Portal gateway (reference section 3).

- `Pacer`: at most 10 sends in any window (a margin on the window keeps the gateway's own count
  under the limit despite jitter); per-endpoint spacing (1 per 5 s for live orders, trades, P&L
  and portfolio accounts; 1/s for /tickle; 1/min for /sso/validate); after a 429 everybody
  waits, so a penalty box is never hammered. Shared across processes through a state file.
- `HistorySlots`: at most 4 (max 5) history requests in flight, across processes too.
- `OrderGate`: an order placement and its reply loop run alone: IBKR voids a pending question
  when any other request arrives before the reply, and the next order must wait until the
  current one is acknowledged. Across processes too, with the shared directory.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: pacing is shared by the threads of one process only
    fcntl = None

# Per-endpoint minimum spacing in seconds (path -> interval); from IBKR's pacing table.
SLOW_ENDPOINTS = (
    "/iserver/account/orders",
    "/iserver/account/trades",
    "/iserver/account/pnl/partitioned",
    "/portfolio/accounts",
    "/portfolio/subaccounts",
)


@dataclass(frozen=True)
class Pacing:
    """Limits and retry policy. The defaults are IBKR's documented limits; tests may shrink the
    waits (never the structure)."""

    requests_per_second: int = 10
    # 10 per 1.2 s: the margin absorbs up to 200 ms of scheduling/network jitter between our send and
    # the gateway's count (measured needed on a loaded 2-core machine); a 429 costs far more.
    window_seconds: float = 1.2
    history_concurrency: int = 4  # IBKR allows 5 in flight; ibind sees throttling above 4
    slow_endpoint_interval: float = 5.0  # "1 per 5 s" endpoints (SLOW_ENDPOINTS)
    tickle_interval: float = 1.0
    sso_validate_interval: float = 60.0
    # 429: IBKR puts the IP in a penalty box for 10-15 min; wait long, try few times, then stop.
    rate_limit_backoff: float = 5.0
    rate_limit_retries: int = 3
    # reads only (GET and idempotent POSTs): transport errors and 5xx
    read_retries: int = 3
    read_backoff: float = 0.25
    backoff_factor: float = 2.0
    poll_interval: float = 0.5  # snapshot re-poll, ssodh/init, cancel confirmation
    snapshot_polls: int = 10
    session_polls: int = 10
    cancel_timeout: float = 30.0
    session_check_interval: float = 60.0
    reply_rounds: int = 20  # ibind's limit for the question/reply loop
    extra_intervals: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not 1 <= self.history_concurrency <= 5:
            from trading_pipeline.adapters.ibkr.errors import IBKRConfigError

            raise IBKRConfigError(
                f"history concurrency {self.history_concurrency} is outside 1-5",
                "IBKR allows at most 5 history requests in flight; use 4 (the default) or less")
        if self.requests_per_second > 10:
            from trading_pipeline.adapters.ibkr.errors import IBKRConfigError

            raise IBKRConfigError(f"{self.requests_per_second} requests/s exceeds the gateway's 10/s",
                                  "use 10 or less")

    def interval_for(self, path: str) -> float:
        if path in self.extra_intervals:
            return self.extra_intervals[path]
        if path in SLOW_ENDPOINTS:
            return self.slow_endpoint_interval
        if path == "/tickle":
            return self.tickle_interval
        if path == "/sso/validate":
            return self.sso_validate_interval
        return 0.0


class Pacer:
    """Decides, atomically, when a request may be sent: after any 429 hold, after its endpoint's
    interval since that endpoint's last send (plus a margin), and within the sliding window of
    N sends per `window` seconds. With `state_file` the decision is shared by every thread and
    every process using that file (fcntl.flock), so several Dagster run processes talking to one
    gateway stay within its limits together; without it, by the threads of this process."""

    def __init__(self, max_events: int, window: float, margin: float = 0.1, state_file: Path | None = None,
                 clock=time.time, sleep=time.sleep):
        self._max = max_events
        self._window = window
        self._margin = margin
        self._file = Path(state_file) if state_file is not None and fcntl is not None else None
        self._memory: dict = {"starts": [], "last": {}, "hold": 0.0}
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        if self._file is not None:
            self._file.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _state(self):
        with self._lock:
            if self._file is None:
                yield self._memory
                return
            with open(self._file, "a+", encoding="utf-8") as stream:
                fcntl.flock(stream, fcntl.LOCK_EX)
                try:
                    stream.seek(0)
                    try:
                        state = json.loads(stream.read() or "{}")
                    except ValueError:
                        state = {}
                    state.setdefault("starts", [])
                    state.setdefault("last", {})
                    state.setdefault("hold", 0.0)
                    yield state
                    stream.seek(0)
                    stream.truncate()
                    stream.write(json.dumps(state))
                    stream.flush()
                finally:
                    fcntl.flock(stream, fcntl.LOCK_UN)

    def before_send(self, key: str, interval: float = 0.0) -> None:
        while True:
            with self._state() as state:
                now = self._clock()
                starts = [t for t in state["starts"] if now - t < self._window]
                state["starts"] = starts
                last = state["last"].get(key) if interval > 0 else None
                if state["hold"] > now:
                    wait = state["hold"] - now
                elif last is not None and last + interval + self._margin > now:
                    wait = last + interval + self._margin - now
                elif len(starts) >= self._max:
                    wait = self._window - (now - starts[0])
                else:
                    starts.append(now)
                    if interval > 0:
                        state["last"][key] = now
                    return
            self._sleep(max(wait, 0.001))

    def hold(self, seconds: float) -> None:
        """After a 429: nobody sends anything for `seconds`."""
        with self._state() as state:
            state["hold"] = max(state["hold"], self._clock() + seconds)


class HistorySlots:
    """At most N history requests in flight: a semaphore, or N lock files shared by processes."""

    def __init__(self, count: int, directory: Path | None = None, sleep=time.sleep):
        self._count = count
        self._semaphore = threading.BoundedSemaphore(count)
        self._dir = Path(directory) if directory is not None and fcntl is not None else None
        self._sleep = sleep
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def slot(self):
        with self._semaphore:
            if self._dir is None:
                yield
                return
            handle = None
            while handle is None:
                for index in range(self._count):
                    stream = open(self._dir / f"history-slot-{index}.lock", "a+")  # noqa: SIM115 - held past this block
                    try:
                        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        handle = stream
                        break
                    except OSError:
                        stream.close()
                if handle is None:
                    self._sleep(0.01)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()


class OrderGate:
    """Readers-writer gate, writer-preferring: ordinary requests share it; an order sequence
    (place + reply loop, modify + reply loop) holds it alone. With `directory`, processes share it
    through flock: a turnstile file (held by a waiting writer, so new readers queue behind it) and
    a gate file (LOCK_SH per request, LOCK_EX for the order sequence)."""

    def __init__(self, directory: Path | None = None):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._local = threading.local()
        self._dir = Path(directory) if directory is not None and fcntl is not None else None
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)

    def in_exclusive(self) -> bool:
        return getattr(self._local, "exclusive", False)

    def _open(self, name: str):
        return open(self._dir / name, "a+")  # type: ignore[operator]

    @contextlib.contextmanager
    def shared(self):
        if self.in_exclusive():  # the order sequence's own requests
            yield
            return
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        gate = None
        try:
            if self._dir is not None:
                with self._open("order-turnstile.lock") as turnstile:
                    fcntl.flock(turnstile, fcntl.LOCK_EX)  # blocks while another process places an order
                    fcntl.flock(turnstile, fcntl.LOCK_UN)
                gate = self._open("order-gate.lock")
                fcntl.flock(gate, fcntl.LOCK_SH)
            yield
        finally:
            if gate is not None:
                fcntl.flock(gate, fcntl.LOCK_UN)
                gate.close()
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        turnstile = gate = None
        try:
            if self._dir is not None:
                turnstile = self._open("order-turnstile.lock")
                fcntl.flock(turnstile, fcntl.LOCK_EX)
                gate = self._open("order-gate.lock")
                fcntl.flock(gate, fcntl.LOCK_EX)  # waits for other processes' requests in flight
            self._local.exclusive = True
            yield
        finally:
            self._local.exclusive = False
            for handle in (gate, turnstile):
                if handle is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    handle.close()
            with self._cond:
                self._writer = False
                self._cond.notify_all()
