"""Render plotly figures to PNG bytes through ONE persistent headless Chromium (kaleido 1.x).

`fig.to_image()` starts and stops a whole Chromium for every image (seconds each). A
`ChartRenderer` starts the browser once, keeps `tabs` tabs with plotly.js loaded, and renders
every figure of a run through them; `render_many` renders a batch concurrently, one figure
per free tab.

How it works: kaleido's `Kaleido` (a choreographer `Browser`) lives on a private asyncio loop
in a daemon thread. Callers stay synchronous; every call waits on the loop with a deadline,
so a hung Chromium turns into a `ChartRenderError` instead of hanging the run. After a hang
or a crash the browser is killed (whole process group); the next call starts a new one.

Speed (see bench/charts.py). Stock kaleido reloads a tab's page (re-parsing the 4.6 MB
plotly.js) after every figure, which costs more than rendering the figure itself, and it
loads its tabs one after the other at start. `warm_kaleido_class` keeps the pages loaded:
a tab is reloaded only after `TAB_RECYCLE_AFTER` figures or after a figure failed (a failed
render may leave the page dirty), and all tabs load in parallel. plotly.js removes the
graph it renders from the page, so a page's DOM and JS heap stay flat across renders. Chromium
is also started without the windows' New Tab Page and top-chrome WebUI pages (`EXTRA_ARGS`),
each a renderer process that costs a CPU-second or more at start and draws nothing of ours.
Both rely on kaleido/choreographer internals; where those are missing (another kaleido
version) the renderer falls back to stock behaviour (slower, still correct) and logs it:
`fast_path` says which is in use.

Where things are: browser discovery, Chromium's extra arguments and process-group kills in
`chart_browser`; the warm kaleido subclass in `warm_kaleido`; PNG checks in `chart_png`; the
batch pipeline shared with the render service's client in `chart_batches`. The names are
re-exported here. `render_service` serves one `ChartRenderer` to many run processes over a Unix
socket (`render_client` is its client).

Offline: MathJax is disabled (kaleido would load it from a CDN), plotly.js is the copy shipped
inside the plotly package, background networking is off, and with `offline=True` (default) all
HTTP(S) goes to a dead loopback proxy, so the renderer never reaches the network.

kaleido, plotly and choreographer are imported lazily (inside methods): importing this
module is cheap.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Self

from trading_pipeline.adapters.chart_batches import render_each_pipelined
from trading_pipeline.adapters.chart_browser import (  # noqa: F401 - re-exported
    EXTRA_ARGS,
    FALLBACK_BROWSERS,
    INSTALL_FIX,
    OFFLINE_PROXY,
    add_chromium_args,
    find_chromium,
    hard_kill,
    has_exited,
    is_executable_file,
    make_devtools_writes_whole,
)
from trading_pipeline.adapters.chart_png import (  # noqa: F401 - re-exported
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    PNG_SIGNATURE,
    check_png,
    figure_dict,
    figure_size,
    png_size,
)
from trading_pipeline.adapters.warm_kaleido import TAB_RECYCLE_AFTER, warm_kaleido_class
from trading_pipeline.errors import ChartRenderError

if TYPE_CHECKING:
    import subprocess

_log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_STARTUP_TIMEOUT_S = 30.0
_CLOSE_GRACE_S = 5.0
_POLL_S = 0.25


class _BrowserDied(Exception):
    """Internal: the browser process exited while a render was waiting."""


class ChartRenderer:
    """Renders plotly figures to PNG through one persistent Chromium.

    Use as a context manager (or `start()` ... `close()`); a render on a renderer that is
    not running starts the browser first. Thread-safe: calls are serialised.

    timeout_s: longest any one figure may take; a batch of n figures gets
    timeout_s * ceil(n / tabs) + a small grace. startup_timeout_s bounds starting Chromium.
    tabs: how many figures render concurrently in one batch (default: one per core, at most 4).
    tab_recycle_after: a tab's page is reloaded after this many figures (and after any failed
    render); in between, plotly.js stays loaded (see the module doc).
    """

    def __init__(
        self,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        tabs: int | None = None,
        browser_path: str | None = None,
        offline: bool = True,
        tab_recycle_after: int = TAB_RECYCLE_AFTER,
    ) -> None:
        if timeout_s <= 0 or startup_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if tab_recycle_after < 1:
            raise ValueError(f"tab_recycle_after must be at least 1, got {tab_recycle_after}")
        self.tab_recycle_after = int(tab_recycle_after)
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.tabs = max(1, tabs if tabs is not None else min(4, os.cpu_count() or 1))
        self._explicit_browser_path = browser_path
        self.offline = offline
        self.browser_path: str | None = None  # the one actually started
        self.starts = 0  # how many browsers this renderer started (restarts after failures)
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._kaleido: Any = None
        self._atexit = None
        self.fast_path = False  # warm tabs + lean Chromium start in use (see module doc)

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_running(self) -> bool:
        proc = self._process()
        return self._kaleido is not None and proc is not None and not has_exited(proc)

    @property
    def tab_reloads(self) -> int:
        """Tab page reloads in the current browser (0 with stock kaleido, which does not count)."""
        return getattr(self._kaleido, "tab_reloads", 0)

    @property
    def browser_pid(self) -> int | None:
        """Pid of the browser's process-group leader (choreographer's wrapper), if running."""
        proc = self._process()
        return proc.pid if proc is not None and not has_exited(proc) else None

    def start(self) -> ChartRenderer:
        """Start Chromium (once). Raises ChartRenderError if it cannot be found or started."""
        with self._lock:
            if self._kaleido is not None:
                return self
            path = self._explicit_browser_path or find_chromium()
            if self._explicit_browser_path and not is_executable_file(path):
                raise ChartRenderError(
                    f"Chromium path {path!r} given to ChartRenderer is not an executable file.",
                    INSTALL_FIX,
                )
            try:
                import kaleido
            except ImportError as exc:
                raise ChartRenderError(
                    f"kaleido is not importable ({exc}); it renders plotly figures to PNG.",
                    "Install it into the project environment: `pip install 'kaleido>=1,<2'`.",
                ) from exc

            make_devtools_writes_whole()
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=_run_loop, args=(loop,), name="chart-render-loop", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
            kwargs: dict[str, Any] = {
                "n": self.tabs,
                # No kaleido-internal timeout: cancelling a render mid-write can leave the
                # devtools pipe half-written. Deadlines are enforced here, by killing Chromium.
                "timeout": None,
                "mathjax": False,  # kaleido would fetch MathJax from a CDN; charts need none
                "path": path,
            }
            if self.offline:
                kwargs["proxy_server"] = OFFLINE_PROXY
            kaleido_class = warm_kaleido_class()

            async def open_browser() -> Any:
                k = kaleido_class(**kwargs)
                k.recycle_after = self.tab_recycle_after
                args_added = add_chromium_args(k, EXTRA_ARGS)
                self.fast_path = args_added and kaleido_class is not kaleido.Kaleido
                self._kaleido = k  # visible to hard_kill even if open() hangs
                try:
                    await k.open()
                except Exception:
                    if _abandoned():
                        return None  # start() gave up already and reported it
                    raise
                return k

            fut = asyncio.run_coroutine_threadsafe(open_browser(), loop)
            try:
                fut.result(timeout=self.startup_timeout_s)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                self._teardown(graceful=False)
                raise ChartRenderError(
                    f"Chromium at {path} did not start within {self.startup_timeout_s:.0f} s.",
                    f"Check that it runs headless: `{path} --headless --no-sandbox "
                    "--dump-dom about:blank`; raise startup_timeout_s on a slow machine. " + INSTALL_FIX,
                ) from None
            except Exception as exc:
                self._teardown(graceful=False)
                raise ChartRenderError(
                    f"Chromium at {path} failed to start: {type(exc).__name__}: {_describe(exc)}",
                    f"Check that it runs headless: `{path} --headless --no-sandbox "
                    "--dump-dom about:blank` (missing shared libraries show up there). " + INSTALL_FIX,
                ) from exc
            self.browser_path = path
            self.starts += 1
            if self._atexit is None:
                ref = weakref.ref(self)
                self._atexit = lambda: (r := ref()) is not None and r.close()
                atexit.register(self._atexit)
            _log.info("chart renderer: Chromium %s started with %d tabs", path, self.tabs)
            return self

    def close(self) -> None:
        """Close Chromium and the loop thread. Safe to call twice."""
        with self._lock:
            self._teardown(graceful=True)
            if self._atexit is not None:
                atexit.unregister(self._atexit)
                self._atexit = None

    # ---- rendering ---------------------------------------------------------------------

    def render_png(self, fig: Any, width: int | None = None, height: int | None = None) -> bytes:
        """PNG bytes of `fig` at width x height px (default: the figure's layout size)."""
        return self.render_many([fig], width=width, height=height)[0]

    def render_many(self, figs: Iterable[Any], width: int | None = None, height: int | None = None) -> list[bytes]:
        """PNG bytes for each figure, in order, rendered concurrently in one browser."""
        specs = []
        for fig in figs:
            d = figure_dict(fig)
            w, h = figure_size(d, width, height)
            specs.append((d, w, h))
        if not specs:
            return []
        with self._lock:
            if self._kaleido is not None and not self.is_running:
                _log.warning("chart renderer: Chromium exited between renders; restarting it")
                self._teardown(graceful=False)
            self.start()
            results = self._render_batch(specs)
        for i, (data, (_, w, h)) in enumerate(zip(results, specs, strict=True)):
            check_png(data, w, h, i)
        return results

    def render_each(self, figs: Iterable[Any], width: int | None = None,
                    height: int | None = None) -> list[bytes | ChartRenderError]:
        """Like `render_many` (one batch, one browser), but one bad figure fails only itself: each
        result is the PNG or that figure's ChartRenderError. After a failed batch the figures are
        rendered one by one; after two failures in a row the browser itself is the problem, and the
        rest get the same error instead of waiting for their own timeouts."""
        figs = list(figs)
        try:
            return list(self.render_many(figs, width=width, height=height))
        except ChartRenderError as error:
            if len(figs) == 1:
                return [error]
            _log.warning("chart renderer: a batch of %d failed (%s); rendering them one by one", len(figs), error)
        results: list[bytes | ChartRenderError] = []
        failures_in_a_row = 0
        for fig in figs:
            if failures_in_a_row >= 2:
                results.append(results[-1])
                continue
            try:
                results.append(self.render_png(fig, width, height))
                failures_in_a_row = 0
            except ChartRenderError as error:
                results.append(error)
                failures_in_a_row += 1
        return results

    def render_each_pipelined(self, figs: Iterable[Any], width: int | None = None,
                              height: int | None = None) -> list[concurrent.futures.Future]:
        """`render_each` for figures the caller builds while the ones before them render: one Future
        per figure, in order, with its PNG or its ChartRenderError (see `chart_batches`)."""
        return render_each_pipelined(self.render_each, 2 * self.tabs, figs, width, height)

    def _render_batch(self, specs: Sequence[tuple[dict[str, Any], int, int]]) -> list[bytes]:
        k, loop = self._kaleido, self._loop
        assert k is not None and loop is not None

        async def batch() -> list[bytes]:
            tasks = [
                asyncio.create_task(k.calc_fig(d, opts={"format": "png", "width": w, "height": h, "scale": 1}))
                for d, w, h in specs
            ]
            try:
                return list(await asyncio.gather(*tasks))
            except Exception:
                if _abandoned():
                    return []  # the caller gave up already and reported it
                if hasattr(k, "reload_before_next_use"):
                    k.reload_before_next_use()  # a failed render may leave a page dirty
                raise
            finally:
                for t in tasks:
                    t.cancel()

        deadline = time.monotonic() + self.timeout_s * math.ceil(len(specs) / self.tabs)
        fut = asyncio.run_coroutine_threadsafe(batch(), loop)
        proc = self._process()
        try:
            # Wait in short slices so a dead browser is noticed at once, not at the deadline.
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise concurrent.futures.TimeoutError
                try:
                    return fut.result(timeout=min(_POLL_S, remaining))
                except concurrent.futures.TimeoutError:
                    if proc is not None and proc.poll() is not None and not fut.done():
                        raise _BrowserDied from None
        except concurrent.futures.TimeoutError:
            fut.cancel()
            self._teardown(graceful=False)
            raise self._timeout_error(len(specs)) from None
        except Exception as exc:
            code = proc.poll() if proc is not None else None
            if isinstance(exc, _BrowserDied) or code is not None or _is_browser_failure(exc):
                fut.cancel()
                self._teardown(graceful=False)
                detail = "" if isinstance(exc, _BrowserDied) else f"; {type(exc).__name__}: {exc}"
                raise ChartRenderError(
                    f"Chromium ({self.browser_path}) crashed or exited while rendering "
                    f"{len(specs)} chart(s) (exit code {code}{detail}).",
                    "Retry the run: the renderer starts a fresh browser on the next call. If it "
                    "keeps crashing, check memory (dmesg for the OOM killer) and that "
                    f"`{self.browser_path} --headless --no-sandbox --dump-dom about:blank` works.",
                ) from exc
            raise ChartRenderError(
                f"Rendering failed: {type(exc).__name__}: {exc}",
                "The figure is probably invalid for plotly.js: build it with "
                "build_chart_figure, or check the error above.",
            ) from exc

    def _timeout_error(self, n: int) -> ChartRenderError:
        return ChartRenderError(
            f"Rendering {n} chart(s) timed out (limit {self.timeout_s:g} s per chart); "
            f"Chromium ({self.browser_path}) was killed and restarts on the next call.",
            "If the machine is just slow or busy, raise timeout_s; if it hangs every time, "
            "check that Chromium runs: "
            f"`{self.browser_path} --headless --no-sandbox --dump-dom about:blank`.",
        )

    # ---- internals ---------------------------------------------------------------------

    def _process(self) -> subprocess.Popen[Any] | None:
        return getattr(self._kaleido, "subprocess", None) if self._kaleido is not None else None

    def _teardown(self, *, graceful: bool) -> None:
        """Stop the browser (politely if `graceful`, always killing leftovers) and the loop."""
        k, loop, thread = self._kaleido, self._loop, self._thread
        self._kaleido = self._loop = self._thread = None
        if loop is None:
            return
        if k is not None:
            if not graceful:
                hard_kill(k)
            fut = None
            try:
                fut = asyncio.run_coroutine_threadsafe(k.close(), loop)
            except RuntimeError:  # loop already closed
                pass
            if fut is not None:
                try:
                    fut.result(timeout=_CLOSE_GRACE_S)
                except Exception as exc:  # noqa: BLE001 - best effort
                    _log.debug("chart renderer: browser close failed: %r", exc)
                    hard_kill(k)  # unblocks the close (its pipe threads) so the loop can stop
                    try:
                        fut.result(timeout=_CLOSE_GRACE_S)
                    except Exception:  # noqa: BLE001 - best effort
                        fut.cancel()
            hard_kill(k)  # no-op if it closed cleanly
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass
        if thread is not None:
            thread.join(timeout=_CLOSE_GRACE_S)
            if thread.is_alive():
                _log.warning("chart renderer: loop thread did not stop; abandoning it")


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=2))
    finally:
        loop.close()



def _abandoned() -> bool:
    """In a task: has the waiting thread cancelled it? (Then nobody reads its exception.)"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _describe(exc: BaseException) -> str:
    """choreographer packs sentences into exception args; join them readably."""
    if len(exc.args) > 1 and all(isinstance(a, str) for a in exc.args):
        return " ".join(a.strip() for a in exc.args)
    return str(exc)


def _is_browser_failure(exc: BaseException) -> bool:
    try:
        from choreographer.channels import ChannelClosedError
        from choreographer.errors import BrowserClosedError, BrowserFailedError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(
        exc,
        (
            BrowserClosedError,
            BrowserFailedError,
            ChannelClosedError,
            asyncio.CancelledError,
            concurrent.futures.CancelledError,
        ),
    )

