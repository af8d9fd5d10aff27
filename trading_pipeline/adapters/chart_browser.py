"""Find, start-argument and kill the Chromium that `ChartRenderer` renders charts with.

Chromium:
- found via BROWSER_PATH, else kaleido/choreographer's own search (its downloaded Chrome,
  then chrome/chromium/edge/... on PATH and in the usual install paths), else
  /usr/bin/chromium, chromium, chromium-browser, google-chrome on PATH;
- started by choreographer as
  `python _unix_pipe_chromium_wrapper.py <chromium> --headless --no-sandbox --disable-gpu
  --disable-dev-shm-usage --remote-debugging-pipe --user-data-dir=<tmp> ... EXTRA_ARGS` in
  its own process group. Choreographer passes `--no-sandbox` unless `enable_sandbox=True`;
  Chromium refuses to start as root without it, so the sandbox stays off (always off as root);
- offline: with `OFFLINE_PROXY` all HTTP(S) goes to a dead loopback port, so the renderer
  never reaches the network.

Imports nothing heavy at module level (choreographer lazily).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trading_pipeline.errors import ChartRenderError

if TYPE_CHECKING:
    import subprocess

_log = logging.getLogger("trading_pipeline.adapters.chart_render")

FALLBACK_BROWSERS: tuple[str, ...] = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
# Nothing listens on the discard port on loopback: any http(s) request fails immediately.
OFFLINE_PROXY = "http://127.0.0.1:9"
# Appended to choreographer's Chromium command line. The positional about:blank replaces the
# first window's New Tab Page; the features are the omnibox popup WebUIs Chromium preloads for
# every window (both are renderer processes loading a WebUI app). Unknown features are
# ignored by Chromium, so older/newer versions start fine with these.
EXTRA_ARGS: tuple[str, ...] = (
    "--disable-background-networking",
    "--disable-features=PreloadTopChromeWebUI,WebUIOmniboxPopup,WebUIOmniboxAimPopup",
    "about:blank",
)

INSTALL_FIX = (
    "Install Chromium: `apt-get install chromium` on Debian/Ubuntu (any Chrome/Chromium works), "
    "or let kaleido download one: run `plotly_get_chrome` (or `kaleido_get_chrome`) in a shell, "
    "or call `kaleido.get_chrome_sync()` in Python; or set BROWSER_PATH to the full path of a "
    "Chrome/Chromium executable."
)


def is_executable_file(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_chromium() -> str:
    """Path of the Chrome/Chromium to use, or ChartRenderError saying what to install.

    Order: BROWSER_PATH (if set it must be valid: no silent fallback), then what
    kaleido/choreographer finds, then FALLBACK_BROWSERS.
    """
    env = os.environ.get("BROWSER_PATH", "").strip()
    if env:
        if is_executable_file(env):
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
    if found and is_executable_file(found):
        return found
    for name in FALLBACK_BROWSERS:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and is_executable_file(path):
            return path
    raise ChartRenderError(
        "No Chrome/Chromium browser found to render charts (searched BROWSER_PATH, kaleido's "
        f"downloaded Chrome, PATH and {', '.join(FALLBACK_BROWSERS)}).",
        INSTALL_FIX,
    )



class _WholeWrites:
    """`os` for choreographer's pipe module, except that `write` writes all it is given.

    Choreographer sends each DevTools message with one `os.write` and only logs a short write. A
    write to a pipe can be short when a signal interrupts it once part is written (seen on loaded
    machines and under ptrace): Chromium then reads a message cut at 64 KiB, answers "JSON: comma
    or array end expected at position 65536", and that render fails as a crash."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def write(fd: int, data: bytes) -> int:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        return written


def make_devtools_writes_whole() -> bool:
    """Give choreographer's pipe module `_WholeWrites` (once per process; idempotent). False, with
    a warning, where choreographer's internals are not the ones this knows."""
    try:
        from choreographer.channels import pipe
    except ImportError:
        pipe = None
    current = getattr(pipe, "os", None)
    if current is not os and not isinstance(current, _WholeWrites):
        _log.warning("chart renderer: cannot make DevTools pipe writes whole (choreographer internals changed)")
        return False
    pipe.os = _WholeWrites()
    return True


def add_chromium_args(k: Any, args: Sequence[str]) -> bool:
    """Append `args` to the command line choreographer starts Chromium with (before open())."""
    impl = getattr(k, "_browser_impl", None)
    get_cli = getattr(impl, "get_cli", None)
    if not callable(get_cli):
        _log.warning("chart renderer: cannot add Chromium arguments (choreographer internals changed)")
        return False
    impl.get_cli = lambda: [*get_cli(), *args]
    return True


def has_exited(proc: subprocess.Popen[Any]) -> bool:
    """Whether the browser process has exited. `Popen.poll()` alone answers "running" while another
    thread waits on the same process (choreographer does, when it closes a browser whose pipe
    ended): Popen lets one thread at a time reap it. So a browser killed between two renders could
    look alive, and the next batch was sent to it and failed instead of starting a new browser.
    The kernel is asked too, without reaping the process (waitid with WNOWAIT, where Python has it)."""
    if proc.poll() is not None:
        return True
    waitid = getattr(os, "waitid", None)
    if waitid is None:  # pragma: no cover - macOS before Python 3.13
        return False
    try:
        return waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped meanwhile by the other thread
        return True


def hard_kill(k: Any) -> None:
    """Kill the browser and close kaleido's devtools pipe.

    The pipe must be closed by us: choreographer keeps both ends of both pipes open in this
    process, so after Chromium dies its reader/writer threads would block until then (and
    kaleido's close() waits for those threads).
    """
    kill_process_group(getattr(k, "subprocess", None))
    channel = getattr(k, "_channel", None)
    if channel is not None:
        try:
            channel.close()
        except Exception as exc:  # noqa: BLE001 - best effort
            _log.debug("chart renderer: closing the devtools pipe failed: %r", exc)


def kill_process_group(proc: subprocess.Popen[Any] | None) -> None:
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

