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
loads its tabs one after the other at start. `_warm_kaleido_class` keeps the pages loaded:
a tab is reloaded only after `TAB_RECYCLE_AFTER` figures or after a figure failed (a failed
render may leave the page dirty), and all tabs load in parallel. plotly.js removes the
graph it renders from the page, so a page's DOM and JS heap stay flat across renders. Chromium
is also started without the windows' New Tab Page and top-chrome WebUI pages (`EXTRA_ARGS`),
each a renderer process that costs a CPU-second or more at start and draws nothing of ours.
Both rely on kaleido/choreographer internals; where those are missing (another kaleido
version) the renderer falls back to stock behaviour (slower, still correct) and logs it:
`fast_path` says which is in use.

Chromium:
- found via BROWSER_PATH, else kaleido/choreographer's own search (its downloaded Chrome,
  then chrome/chromium/edge/... on PATH and in the usual install paths), else
  /usr/bin/chromium, chromium, chromium-browser, google-chrome on PATH;
- started by choreographer as
  `python _unix_pipe_chromium_wrapper.py <chromium> --headless --no-sandbox --disable-gpu
  --disable-dev-shm-usage --remote-debugging-pipe --user-data-dir=<tmp> ... EXTRA_ARGS` in
  its own process group. Choreographer passes `--no-sandbox` unless `enable_sandbox=True`;
  Chromium refuses to start as root without it, so the sandbox stays off (always off as root);
- offline: MathJax is disabled (kaleido would load it from a CDN), plotly.js is the copy
  shipped inside the plotly package, background networking is off, and with `offline=True`
  (default) all HTTP(S) goes to a dead loopback proxy, so the renderer never reaches the
  network.

kaleido, plotly and choreographer are imported lazily (inside methods): importing this
module is cheap.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import logging
import math
import os
import shutil
import signal
import struct
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Self

from trading_pipeline.errors import ChartRenderError

if TYPE_CHECKING:
    import subprocess

_log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_STARTUP_TIMEOUT_S = 30.0
DEFAULT_WIDTH = 1920
DEFAULT_HEIGHT = 1080
FALLBACK_BROWSERS: tuple[str, ...] = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
# Nothing listens on the discard port on loopback: any http(s) request fails immediately.
OFFLINE_PROXY = "http://127.0.0.1:9"
_CLOSE_GRACE_S = 5.0
_POLL_S = 0.25
# A tab's page is reloaded after this many figures (kaleido: after every one); see module doc.
TAB_RECYCLE_AFTER = 200
# Appended to choreographer's Chromium command line. The positional about:blank replaces the
# first window's New Tab Page; the features are the omnibox popup WebUIs Chromium preloads for
# every window (both are renderer processes loading a WebUI app). Unknown features are
# ignored by Chromium, so older/newer versions start fine with these.
EXTRA_ARGS: tuple[str, ...] = (
    "--disable-background-networking",
    "--disable-features=PreloadTopChromeWebUI,WebUIOmniboxPopup,WebUIOmniboxAimPopup",
    "about:blank",
)
# kaleido internals the warm subclass overrides or calls (kaleido 1.x).
_KALEIDO_HOOKS: tuple[str, ...] = (
    "_get_kaleido_tab", "_return_kaleido_tab", "populate_targets", "_conform_tabs", "_create_kaleido_tab",
)  # fmt: skip


class _BrowserDied(Exception):
    """Internal: the browser process exited while a render was waiting."""


INSTALL_FIX = (
    "Install Chromium: `apt-get install chromium` on Debian/Ubuntu (any Chrome/Chromium works), "
    "or let kaleido download one: run `plotly_get_chrome` (or `kaleido_get_chrome`) in a shell, "
    "or call `kaleido.get_chrome_sync()` in Python; or set BROWSER_PATH to the full path of a "
    "Chrome/Chromium executable."
)


def _is_executable_file(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_chromium() -> str:
    """Path of the Chrome/Chromium to use, or ChartRenderError saying what to install.

    Order: BROWSER_PATH (if set it must be valid: no silent fallback), then what
    kaleido/choreographer finds, then FALLBACK_BROWSERS.
    """
    env = os.environ.get("BROWSER_PATH", "").strip()
    if env:
        if _is_executable_file(env):
            return env
        raise ChartRenderError(
            f"BROWSER_PATH={env!r} is not an executable Chrome/Chromium "
            f"({'not executable' if os.path.exists(env) else 'no such file'}).",
            "Point BROWSER_PATH at a Chrome/Chromium executable (e.g. /usr/bin/chromium), or "
            "unset it to let the renderer search. " + INSTALL_FIX,
        )
    try:
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
    except Exception as exc:  # noqa: BLE001 - best effort
        _log.debug("choreographer browser search failed: %s", exc)
        found = None
    if found and _is_executable_file(found):
        return found
    for name in FALLBACK_BROWSERS:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and _is_executable_file(path):
            return path
    raise ChartRenderError(
        "No Chrome/Chromium browser found to render charts (searched BROWSER_PATH, kaleido's "
        f"downloaded Chrome, PATH and {', '.join(FALLBACK_BROWSERS)}).",
        INSTALL_FIX,
    )


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ValueError if `data` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG (bad signature or no IHDR chunk)")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _figure_dict(fig: Any) -> dict[str, Any]:
    if hasattr(fig, "to_dict"):
        return fig.to_dict()
    if isinstance(fig, dict) and "data" in fig:
        return fig
    raise TypeError(f"expected a plotly Figure or figure dict, got {type(fig).__name__}")


def _figure_size(fig: dict[str, Any], width: int | None, height: int | None) -> tuple[int, int]:
    layout = fig.get("layout") or {}
    w = width or layout.get("width") or DEFAULT_WIDTH
    h = height or layout.get("height") or DEFAULT_HEIGHT
    return int(w), int(h)


@functools.cache
def _warm_kaleido_class() -> type:
    """kaleido.Kaleido, subclassed to keep tab pages loaded and load them in parallel.

    Returns stock kaleido.Kaleido (and logs why) if this kaleido lacks the internals used.
    """
    import kaleido

    base = kaleido.Kaleido
    missing = [name for name in _KALEIDO_HOOKS if not callable(getattr(base, name, None))]
    if missing:
        _log.warning(
            "chart renderer: kaleido %s has no %s; using its stock tab handling (a page reload "
            "per figure: slower, still correct)",
            getattr(kaleido, "__version__", "?"), ", ".join(missing),
        )  # fmt: skip
        return base

    class WarmKaleido(base):  # type: ignore[misc, valid-type]
        """Reloads a tab's page only after `recycle_after` figures or after a failed render."""

        recycle_after = TAB_RECYCLE_AFTER

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.tab_reloads = 0  # page reloads done (kaleido would do one per figure)
            self._renders_since_load: dict[int, int] = {}  # id(tab) -> figures since its page loaded
            self._stale: set[int] = set()  # tabs to reload before their next figure

        async def populate_targets(self) -> None:
            # kaleido's version loads the first tab's page, and only then creates and loads the
            # others: do it all at once (each tab is its own renderer process).
            await super(base, self).populate_targets()  # choreographer: adopt existing tabs
            existing = list(self.tabs.values())
            jobs = [self._create_kaleido_tab() for _ in range(max(0, self._n - len(existing)))]
            if existing:
                jobs.append(self._conform_tabs(existing))
            await asyncio.gather(*jobs)

        async def _get_kaleido_tab(self) -> Any:
            tab = await super()._get_kaleido_tab()
            key = id(tab)
            if key in self._stale or self._renders_since_load.get(key, 0) >= self.recycle_after:
                try:
                    await tab.reload()
                except BaseException:
                    self._stale.add(key)
                    self.tabs_ready.put_nowait(tab)  # keep it in the pool; retried next time
                    raise
                self.tab_reloads += 1
                self._stale.discard(key)
                self._renders_since_load[key] = 0
            self._renders_since_load[key] = self._renders_since_load.get(key, 0) + 1
            return tab

        async def _return_kaleido_tab(self, tab: Any) -> None:
            await self.tabs_ready.put(tab)  # no reload: the page stays warm

        def reload_before_next_use(self) -> None:
            """After a failed render: every tab that rendered gets a fresh page first."""
            self._stale.update(self._renders_since_load)

    return WarmKaleido


def _add_chromium_args(k: Any, args: Sequence[str]) -> bool:
    """Append `args` to the command line choreographer starts Chromium with (before open())."""
    impl = getattr(k, "_browser_impl", None)
    get_cli = getattr(impl, "get_cli", None)
    if not callable(get_cli):
        _log.warning("chart renderer: cannot add Chromium arguments (choreographer internals changed)")
        return False
    impl.get_cli = lambda: [*get_cli(), *args]
    return True


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
        return self._kaleido is not None and proc is not None and proc.poll() is None

    @property
    def tab_reloads(self) -> int:
        """Tab page reloads in the current browser (0 with stock kaleido, which does not count)."""
        return getattr(self._kaleido, "tab_reloads", 0)

    @property
    def browser_pid(self) -> int | None:
        """Pid of the browser's process-group leader (choreographer's wrapper), if running."""
        proc = self._process()
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> ChartRenderer:
        """Start Chromium (once). Raises ChartRenderError if it cannot be found or started."""
        with self._lock:
            if self._kaleido is not None:
                return self
            path = self._explicit_browser_path or find_chromium()
            if self._explicit_browser_path and not _is_executable_file(path):
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
            kaleido_class = _warm_kaleido_class()

            async def open_browser() -> Any:
                k = kaleido_class(**kwargs)
                k.recycle_after = self.tab_recycle_after
                args_added = _add_chromium_args(k, EXTRA_ARGS)
                self.fast_path = args_added and kaleido_class is not kaleido.Kaleido
                self._kaleido = k  # visible to _hard_kill even if open() hangs
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
            d = _figure_dict(fig)
            w, h = _figure_size(d, width, height)
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
            _check_png(data, w, h, i)
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
        """`render_each` for figures the caller builds while the ones before them render.

        Figures are taken from `figs` (a generator that builds them, typically) and rendered in
        batches of two per tab on a background thread as soon as a batch is complete; returns,
        once `figs` is exhausted, one Future per figure, in order, giving its PNG or its
        ChartRenderError. So building the figures, rendering them and whatever the caller does
        with the first PNGs (thumbnails, storing) overlap instead of following one another.
        After two batches in a row fail entirely, the browser itself is the problem: the rest get
        the same error instead of waiting for their own timeouts."""
        batch_size = 2 * self.tabs
        failed_batches: list[ChartRenderError] = []  # consecutive batches where every figure failed

        def render(batch: list[Any]) -> list[bytes | ChartRenderError]:
            if len(failed_batches) >= 2:
                return [failed_batches[-1]] * len(batch)
            results = self.render_each(batch, width=width, height=height)
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
                _hard_kill(k)
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
                    _hard_kill(k)  # unblocks the close (its pipe threads) so the loop can stop
                    try:
                        fut.result(timeout=_CLOSE_GRACE_S)
                    except Exception:  # noqa: BLE001 - best effort
                        fut.cancel()
            _hard_kill(k)  # no-op if it closed cleanly
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


def _hard_kill(k: Any) -> None:
    """Kill the browser and close kaleido's devtools pipe.

    The pipe must be closed by us: choreographer keeps both ends of both pipes open in this
    process, so after Chromium dies its reader/writer threads would block until then (and
    kaleido's close() waits for those threads).
    """
    _kill(getattr(k, "subprocess", None))
    channel = getattr(k, "_channel", None)
    if channel is not None:
        try:
            channel.close()
        except Exception as exc:  # noqa: BLE001 - best effort
            _log.debug("chart renderer: closing the devtools pipe failed: %r", exc)


def _kill(proc: subprocess.Popen[Any] | None) -> None:
    """SIGKILL the browser's whole process group (wrapper, chromium, its helpers).

    Only while the wrapper is unreaped: then its pid is certainly still our process group
    (choreographer starts it with start_new_session=True), never a recycled pid.
    """
    if proc is None or proc.poll() is not None:
        return
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # pragma: no cover - Windows
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except Exception as exc:  # noqa: BLE001 - best effort
        _log.debug("chart renderer: browser did not exit after SIGKILL: %r", exc)


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


def _check_png(data: Any, width: int, height: int, index: int) -> None:
    if not isinstance(data, bytes | bytearray):
        raise ChartRenderError(
            f"Chart {index}: the renderer returned {type(data).__name__}, not PNG bytes.",
            "Check that kaleido 1.x is installed (`pip install 'kaleido>=1,<2'`).",
        )
    try:
        size = png_size(bytes(data))
    except ValueError:
        raise ChartRenderError(
            f"Chart {index}: the renderer returned {len(data)} bytes that are not a PNG "
            f"(starts with {bytes(data[:8])!r}).",
            "Check that kaleido 1.x and plotly match (`pip install -U kaleido plotly`).",
        ) from None
    if size != (width, height):
        raise ChartRenderError(
            f"Chart {index}: PNG is {size[0]}x{size[1]} px, expected {width}x{height}.",
            "Render with scale=1 and the figure's width/height; check kaleido is 1.x.",
        )
