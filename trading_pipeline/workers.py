"""Threads for slow calls made several at a time (a source's requests, a model's answers) while
their results are used in order: `worker_pool`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor


@contextlib.contextmanager
def worker_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor | None]:
    """A pool of `workers` threads, or None when `workers` is 1 (the caller makes each call itself).

    Leaving normally waits for the calls (their results were used). Leaving by an exception, a
    Ctrl-C or a Dagster termination (a step's generator closed) cancels the calls not yet started
    and returns at once: the calls in flight end on their own timeouts, and a stopped step makes
    no more requests and does not wait for them."""
    if workers <= 1:
        yield None
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
