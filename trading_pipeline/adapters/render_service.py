"""A render service: one warm `ChartRenderer` serving PNG renders to many run processes.

Each Dagster run is a new process; with a local renderer each pays a Chromium start (about
1.3 s) before its first chart. The run launcher starts ONE service per daemon
(`start_render_service`) and gives every run its socket in TRADING_RENDER_SOCKET;
`ChartRendererResource` then renders through `RenderServiceClient` (render_client.py).

    python -m trading_pipeline.adapters.render_service --socket DIR/render.sock [--parent-pid PID]

The socket is a Unix domain socket, mode 0600, in a directory only the user may enter (the
service refuses a directory others can read, and a path that exists and is not a stale socket).
Each connection is served by its own thread; every batch goes through the one renderer, whose
tabs render the figures of a batch concurrently (concurrent runs' batches take turns at the
browser). A dead browser is restarted by the renderer on the next render, as in a run process.
The service exits on SIGTERM/SIGINT, and when its parent process (or --parent-pid) is gone,
removing its socket. The wire protocol is in render_protocol.py.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from trading_pipeline.adapters import render_protocol as wire
from trading_pipeline.adapters.chart_png import DEFAULT_HEIGHT, DEFAULT_WIDTH
from trading_pipeline.errors import ChartRenderError

_log = logging.getLogger(__name__)

RENDER_SOCKET_ENV = "TRADING_RENDER_SOCKET"
SOCKET_NAME = "render.sock"
LOG_NAME = "render_service.log"
_PARENT_POLL_S = 0.5
_REQUEST_READ_TIMEOUT_S = 60.0  # a client that connects and sends nothing does not hold a thread forever
_MAX_SOCKET_PATH = 107  # sun_path on Linux, without its NUL


# ---- the service ---------------------------------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    server: _RenderServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(_REQUEST_READ_TIMEOUT_S)
        try:
            kind, payload = wire.receive_message(sock)
            if kind == wire.PING:
                wire.send_json(sock, wire.PING, self.server.info())
            elif kind == wire.RENDER:
                self._render(sock, payload)
            else:
                raise wire.ProtocolError(f"a request starts with a ping or a render, not {kind!r}")
        except wire.ProtocolError as error:
            _log.warning("render service: unreadable request: %s", error)
            with contextlib.suppress(OSError):
                wire.send_json(sock, wire.ERROR, {"problem": f"The render service could not read the request: {error}",
                                                  "fix": "Client and service must be the same version of trading_pipeline."})
        except (wire.ConnectionBroken, OSError) as error:
            _log.info("render service: a client went away: %s", error)

    def _render(self, sock: socket.socket, payload: bytes) -> None:
        header = wire.decode_json(payload, "the render header")
        try:
            count, width, height = int(header["count"]), header.get("width"), header.get("height")
        except (TypeError, KeyError, ValueError) as error:
            raise wire.ProtocolError(f"bad render header {str(header)[:200]}: {error!r}") from None
        if not 0 < count <= wire.MAX_FIGURES:
            raise wire.ProtocolError(f"a render of {count} figures (1 to {wire.MAX_FIGURES})")
        figures = []
        for i in range(count):
            kind, figure = wire.receive_message(sock)
            if kind != wire.FIGURE:
                raise wire.ProtocolError(f"figure {i} came as a {kind!r} message")
            figures.append(wire.decode_json(figure, f"figure {i}"))
        with self.server.count_lock:
            self.server.figures += count
        outcome: list[Any] = []
        done = threading.Event()

        def render() -> None:
            try:
                outcome.extend(self.server.renderer.render_each(figures, width=width, height=height))
            except Exception as error:  # noqa: BLE001 - becomes every figure's error, sent to the client
                failure = error if isinstance(error, ChartRenderError) else ChartRenderError(
                    f"The render service failed to render {count} chart(s): {type(error).__name__}: {error}",
                    "Check the figures (build them with build_chart_figure) and the render service's log.")
                outcome.extend([failure] * count)
            finally:
                done.set()

        threading.Thread(target=render, name="render-service-batch", daemon=True).start()
        while not done.wait(wire.HEARTBEAT_S):
            wire.send_message(sock, wire.WORKING)
        for result in outcome:
            if isinstance(result, ChartRenderError):
                wire.send_json(sock, wire.ERROR, {"problem": result.problem, "fix": result.fix})
            else:
                wire.send_message(sock, wire.PNG, bytes(result))


class _RenderServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, socket_path: str, renderer: Any) -> None:
        self.renderer = renderer
        self.browser_error: str | None = None  # why the warm-up's browser start failed, if it did
        self.warm = False  # the warm-up is over (done, or failed and logged)
        self.warm_up_charts = 0  # charts the warm-up rendered (not counted in `figures`)
        self.figures = 0  # figures asked for (monitoring; the tests check runs really use the service)
        self.count_lock = threading.Lock()
        super().__init__(socket_path, _Handler, bind_and_activate=False)

    def server_bind(self) -> None:
        # Created 0600 from the start (no window where others could connect), then made sure of.
        old = os.umask(0o177)
        try:
            super().server_bind()
        finally:
            os.umask(old)
        os.chmod(self.server_address, 0o600)

    def info(self) -> dict[str, Any]:
        r = self.renderer
        return {"protocol": wire.PROTOCOL_VERSION, "pid": os.getpid(), "tabs": r.tabs,
                "browser_running": r.is_running, "browser_pid": r.browser_pid, "starts": r.starts,
                "figures": self.figures, "warm": self.warm,
                "warm_up_charts": self.warm_up_charts,
                "browser_error": self.browser_error}


def check_socket_path(socket_path: Path) -> None:
    """Refuse (ChartRenderError) a socket path others could reach or that is in use; remove a stale socket."""
    if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
        raise ChartRenderError(f"Render service socket path {socket_path} is longer than {_MAX_SOCKET_PATH} bytes.",
                               "Use a shorter directory (Unix socket paths are limited), e.g. under /tmp.")
    directory = socket_path.parent
    try:
        st = directory.stat()
    except FileNotFoundError:
        raise ChartRenderError(f"Render service directory {directory} does not exist.",
                               f"Create it for this user only: `mkdir -m 700 {directory}`.") from None
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ChartRenderError(
            f"Render service directory {directory} is not private (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}): other users could reach the socket.",
            f"Use a directory owned by this user with mode 0700 (`chmod 700 {directory}`).")
    try:
        st = socket_path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ChartRenderError(f"{socket_path} exists and is not a socket; the render service will not replace it.",
                               "Choose another socket path or remove that file.")
    try:
        wire.connect(str(socket_path), 1.0).close()
    except ConnectionRefusedError:
        socket_path.unlink()  # stale: left by a service that died
        _log.info("render service: removed the stale socket %s", socket_path)
        return
    except OSError:
        pass
    raise ChartRenderError(f"Another process is listening on {socket_path}.",
                           "Stop that render service first, or choose another socket path.")


def serve(socket_path: Path, parent_pid: int, renderer: Any) -> None:
    """Serve `renderer` at `socket_path` until SIGTERM/SIGINT or the parent's death; then clean up."""
    check_socket_path(socket_path)
    server = _RenderServer(str(socket_path), renderer)
    parent_alive = _parent_watch(parent_pid)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.server_bind()
    bound = socket_path.stat().st_ino
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="render-service",
                               daemon=True)
    try:
        server.server_activate()
        serving.start()
        # Start the browser now, so the first run's chart does not wait for it.
        threading.Thread(target=_warm_up, args=(server,), name="render-service-warm-up", daemon=True).start()
        _log.info("render service: pid %d serving %s (parent %d)", os.getpid(), socket_path, parent_pid)
        while not stop.wait(_PARENT_POLL_S):
            if not parent_alive():
                _log.info("render service: parent %d is gone; exiting", parent_pid)
                break
    finally:
        if serving.is_alive():
            server.shutdown()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            if socket_path.stat().st_ino == bound:  # ours, not a successor's
                socket_path.unlink()
        renderer.close()
        _log.info("render service: stopped")


def _warm_up(server: _RenderServer) -> None:
    """Start the browser, then render a few charts through every tab: a fresh browser's first charts
    cost it more CPU while V8 compiles plotly.js (15-20 % more over its first 40, measured), which
    the first refresh after the daemon started would otherwise pay."""
    try:
        try:
            server.renderer.start()
        except ChartRenderError as error:
            server.browser_error = str(error)
            _log.error("render service: the browser did not start (each render will say so): %s", error)
            return
        try:
            results = server.renderer.render_each(warm_up_figures(2 * server.renderer.tabs))
        except Exception as error:  # noqa: BLE001 - a cold first chart is slower, not wrong
            results = [error]
        failed = [result for result in results if isinstance(result, Exception)]
        server.warm_up_charts = len(results) - len(failed)
        if failed:
            _log.warning("render service: the warm-up render failed (the first charts will be slower): %s", failed[0])
    finally:
        server.warm = True


def warm_up_figures(count: int, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT) -> list[Any]:
    """`count` charts as the chart step builds them (simulated daily and weekly bars, indicators),
    for warming up a browser or an interpreter."""
    from datetime import UTC, datetime

    from trading_pipeline.adapters.market_data import SimulatedMarketData
    from trading_pipeline.core.chart_figure import build_chart_figure
    from trading_pipeline.core.indicators import compute_indicators
    from trading_pipeline.core.strategies import TimeframeSettings

    as_of = datetime(2026, 1, 9, 21, 30, tzinfo=UTC)
    figures = []
    for i in range(count):
        timeframe, period = (("1d", "1y"), ("1w", "2y"))[i % 2]
        symbol = f"WARM{i}"
        frame = compute_indicators(SimulatedMarketData().fetch(symbol, timeframe, TimeframeSettings(period=period),
                                                               as_of))
        figures.append(build_chart_figure(frame, symbol, timeframe, as_of, width=width, height=height))
    return figures


def _parent_watch(parent_pid: int):
    """A check that `parent_pid` still lives. For our own parent: are we still its child (a dead
    parent's pid may be reused, or linger as a zombie)? For another process: does the pid exist?"""
    if parent_pid == os.getppid():
        return lambda: os.getppid() == parent_pid

    def alive() -> bool:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:
            with open(f"/proc/{parent_pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True

    return alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trading_pipeline.adapters.render_service",
                                     description="Serve chart renders from one warm Chromium over a Unix socket.")
    parser.add_argument("--socket", required=True, type=Path, help="socket path, in a directory with mode 0700")
    parser.add_argument("--parent-pid", type=int, default=os.getppid(),
                        help="exit when this process is gone (default: the parent process)")
    parser.add_argument("--timeout-seconds", type=float, default=60.0, help="longest one chart may take")
    parser.add_argument("--tabs", type=int, default=None, help="figures rendered at once (default: one per core, at most 4)")
    args = parser.parse_args(argv)
    # Our lines at INFO; kaleido/choreographer log every tab hand-out at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("trading_pipeline").setLevel(logging.INFO)
    from trading_pipeline.adapters.chart_render import ChartRenderer

    try:
        serve(args.socket, args.parent_pid, ChartRenderer(timeout_s=args.timeout_seconds, tabs=args.tabs))
    except ChartRenderError as error:
        print(f"render service: {error}", file=sys.stderr)
        return 2
    return 0


# ---- for the run launcher ----------------------------------------------------------------


@dataclass
class RenderServiceProcess:
    """A started render service. Give runs `env()` (TRADING_RENDER_SOCKET); `close()` stops it."""

    socket_path: Path
    process: subprocess.Popen
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)  # its first ping answer

    @property
    def pid(self) -> int:
        return self.process.pid

    def env(self) -> dict[str, str]:
        return {RENDER_SOCKET_ENV: str(self.socket_path)}

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def close(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; the service removes its socket (we do if it could not)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                self.socket_path.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_render_service(directory: Path, env: dict[str, str] | None = None, *, timeout_s: float = 30.0,
                         chart_timeout_s: float = 60.0, wait_for_browser: bool = True,
                         stop: threading.Event | None = None) -> RenderServiceProcess:
    """Start a render service with its socket at `directory`/render.sock (the directory is created
    with mode 0700 if missing) and its log at `directory`/render_service.log; returns once it
    answers a ping and (`wait_for_browser`) its Chromium has started and rendered its warm-up charts,
    so the first run's charts are warm. ChartRenderError (with the log's tail) if it exits, its browser
    cannot start, or it is not ready within `timeout_s`, or if `stop` is set meanwhile (then it is
    stopped too). `env`: the service's environment (default: this process's). It exits by itself when
    this process dies."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    socket_path, log_path = directory / SOCKET_NAME, directory / LOG_NAME
    command = [sys.executable, "-m", "trading_pipeline.adapters.render_service", "--socket", str(socket_path),
               "--parent-pid", str(os.getpid()), "--timeout-seconds", str(chart_timeout_s)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    service = RenderServiceProcess(socket_path, process, log_path)
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            service.close()
            raise ChartRenderError("The render service's start was stopped.", "Nothing to do: its owner is stopping.")
        if process.poll() is not None:
            raise ChartRenderError(f"The render service exited at start (code {process.returncode}): "
                                   f"{_tail(log_path)}", f"See {log_path}.")
        try:
            service.info = wire.ping(str(socket_path), timeout_s=max(0.1, min(2.0, deadline - time.monotonic())))
        except (OSError, wire.ConnectionBroken, wire.ProtocolError) as error:
            last_error = error
        else:
            if not wait_for_browser:
                return service
            if service.info.get("browser_error"):
                service.close()
                raise ChartRenderError(f"The render service's browser did not start: {service.info['browser_error']}",
                                       f"See {log_path}.")
            if service.info.get("warm"):
                return service
            last_error = RuntimeError("its browser is still starting or warming up")
        time.sleep(0.05)
    service.close()
    raise ChartRenderError(f"The render service at {socket_path} did not answer a ping within {timeout_s:g} s "
                           f"(last: {last_error}); it was stopped. {_tail(log_path)}",
                           f"See {log_path}; on a slow or busy machine raise timeout_s.")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
