"""Rendering figures in batches while the caller is still building the next ones.

Shared by the local `ChartRenderer` and the render service's client (`RenderServiceClient`), which
differ only in how one batch is rendered (`render_each`: a PNG or that figure's ChartRenderError
per figure)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable
from typing import Any

from trading_pipeline.errors import ChartRenderError

RenderEach = Callable[..., list[bytes | ChartRenderError]]


def render_each_pipelined(render_each: RenderEach, batch_size: int, figs: Iterable[Any], width: int | None = None,
                          height: int | None = None) -> list[concurrent.futures.Future]:
    """`render_each` for figures the caller builds while the ones before them render.

    Figures are taken from `figs` (a generator that builds them, typically) and rendered in
    batches of `batch_size` (two per tab) on a background thread as soon as a batch is complete;
    returns, once `figs` is exhausted, one Future per figure, in order, giving its PNG or its
    ChartRenderError. So building the figures, rendering them and whatever the caller does
    with the first PNGs (thumbnails, storing) overlap instead of following one another.
    After two batches in a row fail entirely, the browser itself is the problem: the rest get
    the same error instead of waiting for their own timeouts."""
    failed_batches: list[ChartRenderError] = []  # consecutive batches where every figure failed

    def render(batch: list[Any]) -> list[bytes | ChartRenderError]:
        if len(failed_batches) >= 2:
            return [failed_batches[-1]] * len(batch)
        results = render_each(batch, width=width, height=height)
        if all(isinstance(result, ChartRenderError) for result in results):
            failed_batches.append(results[-1])
        else:
            failed_batches.clear()
        return results

    futures: list[concurrent.futures.Future] = []
    batches = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chart-render-batches")

    def submit(batch: list[Any], batch_futures: list[concurrent.futures.Future]) -> None:
        def settle(done: concurrent.futures.Future) -> None:
            error = done.exception()
            for i, future in enumerate(batch_futures):
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(done.result()[i])

        batches.submit(render, batch).add_done_callback(settle)

    try:
        batch, batch_futures = [], []
        for fig in figs:
            batch.append(fig)
            batch_futures.append(concurrent.futures.Future())
            if len(batch) == batch_size:
                submit(batch, batch_futures)
                futures.extend(batch_futures)
                batch, batch_futures = [], []
        if batch:
            submit(batch, batch_futures)
            futures.extend(batch_futures)
    finally:
        batches.shutdown(wait=False)  # the thread renders what was submitted, then ends
    return futures
