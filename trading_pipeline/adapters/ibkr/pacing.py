"""Thread-safe pacing for the Client Portal gateway (reference section 3).

- `SlidingWindowLimiter`: at most N request starts in any window (10/s overall; a small margin
  on the window keeps the gateway's own count under the limit despite network jitter).
- `MinIntervalLimiter`: per-endpoint spacing (1 per 5 s for live orders, trades, P&L and
  portfolio accounts; 1/s for /tickle; 1/min for /sso/validate).
- `Cooldown`: after a 429 every thread waits, so a penalty box is never hammered by the others.
- `OrderGate`: an order placement and its reply loop run alone: IBKR voids a pending question
  when any other request arrives before the reply, and the next order must wait until the
  current one is acknowledged.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field

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
    window_seconds: float = 1.05  # 1 s plus a margin for jitter between us and the gateway
    history_concurrency: int = 4  # IBKR allows 5 in flight; ibind sees throttling above 4
    slow_endpoint_interval: float = 5.0  # "1 per 5 s" endpoints (SLOW_ENDPOINTS)
    tickle_interval: float = 1.0
    sso_validate_interval: float = 60.0
    # 429: IBKR puts the IP in a penalty box for 10-15 min; wait long, try few times, then stop.
    rate_limit_backoff: float = 5.0
    rate_limit_retries: int = 3
    # reads only (GET and idempotent POSTs): transport errors and 5xx
    read_retries: int = 3
    read_backoff: float = 0.5
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


class SlidingWindowLimiter:
    def __init__(self, max_events: int, window: float, clock=time.monotonic, sleep=time.sleep):
        self._max = max_events
        self._window = window
        self._starts: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                while self._starts and now - self._starts[0] >= self._window:
                    self._starts.popleft()
                if len(self._starts) < self._max:
                    self._starts.append(now)
                    return
                wait = self._window - (now - self._starts[0])
            self._sleep(max(wait, 0.001))


class MinIntervalLimiter:
    """Spaces the *sends* to one endpoint (key) by at least its interval plus a margin.

    `run(key, interval, prepare)` holds a per-key lock, waits until the interval since the last
    send has passed, runs `prepare` (global cooldown and rate limiter) and marks the send time
    only then, so a wait in the rate limiter can never shrink the spacing the gateway sees."""

    def __init__(self, margin: float = 0.1, clock=time.monotonic, sleep=time.sleep):
        self._last: dict[str, float] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._margin = margin
        self._clock = clock
        self._sleep = sleep

    def run(self, key: str, interval: float, prepare) -> None:
        if interval <= 0:
            prepare()
            return
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            last = self._last.get(key)
            if last is not None:
                wait = last + interval + self._margin - self._clock()
                if wait > 0:
                    self._sleep(wait)
            prepare()
            self._last[key] = self._clock()


class Cooldown:
    """A global hold after a 429: no thread sends anything until it ends."""

    def __init__(self, clock=time.monotonic, sleep=time.sleep):
        self._until = 0.0
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, self._clock() + seconds)

    def wait(self) -> None:
        while True:
            with self._lock:
                remaining = self._until - self._clock()
            if remaining <= 0:
                return
            self._sleep(remaining)


class OrderGate:
    """Readers-writer gate, writer-preferring: ordinary requests share it; an order sequence
    (place + reply loop, modify + reply loop) holds it alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._local = threading.local()

    def in_exclusive(self) -> bool:
        return getattr(self._local, "exclusive", False)

    @contextlib.contextmanager
    def shared(self):
        if self.in_exclusive():  # the order sequence's own requests
            yield
            return
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
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
        self._local.exclusive = True
        try:
            yield
        finally:
            self._local.exclusive = False
            with self._cond:
                self._writer = False
                self._cond.notify_all()
