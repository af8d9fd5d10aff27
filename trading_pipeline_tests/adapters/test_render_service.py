"""The render service (one warm Chromium for many run processes) and its client, against a real
service process and real Chromium (skipped when none is installed), plus hostile fake services.

One service is shared by the module; the tests that kill a service start their own. Waits are
bounded (futures with timeouts) so a hang fails a test instead of stalling the suite; nothing
asserts how fast anything is.
"""

from __future__ import annotations

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from trading_pipeline.adapters import render_protocol as wire
from trading_pipeline.adapters.chart_png import PNG_SIGNATURE, png_size
from trading_pipeline.adapters.chart_render import ChartRenderer
from trading_pipeline.adapters.render_client import RenderServiceClient
from trading_pipeline.adapters.render_service import (
    RENDER_SOCKET_ENV,
    check_socket_path,
    start_render_service,
)
from trading_pipeline.core.chart_figure import build_chart_figure
from trading_pipeline.errors import ChartRenderError
from trading_pipeline_tests.adapters.test_chart_render import _gone, needs_chromium
from trading_pipeline_tests.core.test_chart_figure import AS_OF, make_indicator_frame

BAD_FIGURE = {"data": "not a list", "layout": {"width": 300, "height": 200}}  # plotly.js refuses it
WAIT_S = 120  # bounds every wait so a hang fails the test; not a speed requirement


def _private_dir(base: Path) -> Path:
    base.mkdir(mode=0o700, exist_ok=True)
    base.chmod(0o700)
    return base


@pytest.fixture(scope="module")
def figures():
    small = [build_chart_figure(make_indicator_frame(120, "1d", seed=seed), f"S{seed}", "1d", AS_OF,
                                width=640, height=400) for seed in range(6)]
    daily = build_chart_figure(make_indicator_frame(400, "1d"), "AAPL", "1d", AS_OF)
    return small, daily


@pytest.fixture(scope="module")
def local():
    with ChartRenderer(timeout_s=60) as renderer:
        yield renderer


@pytest.fixture(scope="module")
def expected(local, figures):
    small, daily = figures
    return local.render_many(small), local.render_png(daily)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with start_render_service(tmp_path_factory.mktemp("rs"), timeout_s=WAIT_S) as started:
        yield started


def _no_fallback():
    raise AssertionError("the client fell back to a local renderer")


# ---- the real service -----------------------------------------------------------------------


@needs_chromium
def test_service_renders_the_same_pngs_as_the_local_renderer(service, figures, expected):
    small, daily = figures
    client = RenderServiceClient(str(service.socket_path), fallback=_no_fallback)
    assert client.using_service and client.tabs == service.info["tabs"]
    assert client.render_many(small) == expected[0]  # rendering is deterministic: same bytes
    png = client.render_png(daily)
    assert png == expected[1] and png_size(png) == (1920, 1080) and png.startswith(PNG_SIGNATURE)
    assert png_size(client.render_png(daily, 800, 500)) == (800, 500)


@needs_chromium
def test_socket_is_private_and_the_service_keeps_one_browser(service):
    mode = service.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(service.socket_path.parent.stat().st_mode) == 0o700
    info = wire.ping(str(service.socket_path))
    assert info["pid"] == service.pid and info["browser_running"] and info["starts"] == 1
    # it was ready only once every tab had drawn warm-up charts (a tab's first charts cost more)
    assert service.info["warm"] and service.info["warm_up_charts"] == 2 * info["tabs"]
    assert service.env() == {RENDER_SOCKET_ENV: str(service.socket_path)}


@needs_chromium
def test_two_concurrent_clients_each_get_their_charts_in_order(service, figures, expected):
    small, _ = figures

    def run(order):
        client = RenderServiceClient(str(service.socket_path), fallback=_no_fallback)
        futures = client.render_each_pipelined(small[i] for i in order)
        return [future.result(timeout=WAIT_S) for future in futures]

    orders = [[0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4]]
    with ThreadPoolExecutor(2) as pool:
        results = [job.result(timeout=WAIT_S) for job in [pool.submit(run, order) for order in orders]]
    for order, pngs in zip(orders, results, strict=True):
        assert pngs == [expected[0][i] for i in order]
    assert wire.ping(str(service.socket_path))["starts"] == 1


@needs_chromium
def test_bad_figure_is_that_charts_error_not_a_fallback(service, figures, expected):
    small, _ = figures
    client = RenderServiceClient(str(service.socket_path), fallback=_no_fallback)
    results = client.render_each([small[0], BAD_FIGURE, small[1]])
    assert results[0] == expected[0][0] and results[2] == expected[0][1]
    assert isinstance(results[1], ChartRenderError) and "Rendering failed" in results[1].problem
    assert "build_chart_figure" in results[1].fix
    with pytest.raises(ChartRenderError):
        client.render_many([small[0], BAD_FIGURE])
    with pytest.raises(TypeError):  # not a figure at all: refused before it is sent, as locally
        client.render_png(["not a figure"])
    assert client.using_service


@needs_chromium
def test_dead_browser_is_restarted_by_the_service(tmp_path, figures, expected):
    small, _ = figures
    with start_render_service(_private_dir(tmp_path / "rs"), timeout_s=WAIT_S) as own:
        client = RenderServiceClient(str(own.socket_path), fallback=_no_fallback)
        browser = wire.ping(str(own.socket_path))["browser_pid"]
        # Already gone (seen once on a loaded machine: ProcessLookupError) is the dead browser wanted.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser, signal.SIGKILL)
        assert _gone(browser, WAIT_S)
        assert client.render_png(small[0]) == expected[0][0]
        info = wire.ping(str(own.socket_path))
        assert info["starts"] == 2 and info["browser_pid"] != browser and client.using_service


@needs_chromium
def test_service_killed_mid_batch_falls_back_and_every_chart_arrives(tmp_path, figures, expected, local, caplog):
    small, _ = figures
    own = start_render_service(_private_dir(tmp_path / "rs"), timeout_s=WAIT_S)
    browser = own.info["browser_pid"]
    client = RenderServiceClient(str(own.socket_path), fallback=lambda: local)
    batch = 2 * client.tabs

    def figures_killing_the_service_after_the_first_batch():
        for i, fig in enumerate(small):
            if i == batch:
                os.killpg(browser, signal.SIGSTOP)  # the first batch is certainly still rendering...
                time.sleep(0.5)
                os.kill(own.pid, signal.SIGKILL)  # ...when the service dies
            yield fig

    try:
        with caplog.at_level(logging.WARNING, logger="trading_pipeline.adapters.render_client"):
            futures = client.render_each_pipelined(figures_killing_the_service_after_the_first_batch())
            pngs = [future.result(timeout=WAIT_S) for future in futures]
    finally:
        own.close()
        try:
            os.killpg(browser, signal.SIGKILL)  # the killed service could not close its browser
        except ProcessLookupError:
            pass
    assert pngs == expected[0]
    assert not client.using_service
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(own.socket_path) in warnings[0] and RENDER_SOCKET_ENV in warnings[0]


@needs_chromium
def test_unreachable_service_falls_back_at_once(tmp_path, figures, expected, local, caplog):
    with caplog.at_level(logging.WARNING, logger="trading_pipeline.adapters.render_client"):
        client = RenderServiceClient(str(tmp_path / "nothing.sock"), fallback=lambda: local)
        assert not client.using_service
        assert client.render_png(figures[0][0]) == expected[0][0]
    assert len(caplog.records) == 1 and "nothing.sock" in caplog.records[0].getMessage()


@needs_chromium
def test_resource_renders_through_the_service_when_the_variable_is_set(service, monkeypatch, figures, expected):
    from trading_pipeline.graph import resources

    resources._service_client.cache_clear()
    monkeypatch.setenv(RENDER_SOCKET_ENV, str(service.socket_path))
    try:
        renderer = resources.ChartRendererResource().renderer()
        assert isinstance(renderer, RenderServiceClient) and renderer.using_service
        assert renderer is resources.ChartRendererResource().renderer()  # one client per process
        before = wire.ping(str(service.socket_path))["figures"]
        assert renderer.render_png(figures[0][0]) == expected[0][0]
        assert wire.ping(str(service.socket_path))["figures"] == before + 1  # rendered by the service
    finally:
        resources._service_client.cache_clear()


def test_resource_renders_locally_without_the_variable(monkeypatch):
    from trading_pipeline.graph import resources

    monkeypatch.delenv(RENDER_SOCKET_ENV, raising=False)
    monkeypatch.setattr(resources, "_shared_renderer", lambda timeout: ("local", timeout))
    assert resources.ChartRendererResource(timeout_seconds=7).renderer() == ("local", 7)


# ---- lifecycle and the socket path ---------------------------------------------------------------


def test_service_exits_and_removes_its_socket_when_its_parent_dies(tmp_path):
    directory = _private_dir(tmp_path / "rs")
    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from trading_pipeline.adapters.render_service import start_render_service\n"
        f"service = start_render_service(Path({str(directory)!r}), wait_for_browser=False, timeout_s={WAIT_S})\n"
        "print(service.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "BROWSER_PATH": "/bin/false"})  # no browser needed
    try:
        service_pid = int(parent.stdout.readline())
        assert (directory / "render.sock").exists()
    finally:
        parent.kill()
        parent.wait()
    assert _gone(service_pid, WAIT_S)
    assert not (directory / "render.sock").exists()


def test_sigterm_stops_the_service_and_removes_its_socket(tmp_path):
    service = start_render_service(_private_dir(tmp_path / "rs"), wait_for_browser=False, timeout_s=WAIT_S,
                                   env={**os.environ, "BROWSER_PATH": "/bin/false"})
    assert service.is_alive() and service.socket_path.exists()
    service.close()
    assert service.process.returncode == 0 and not service.is_alive()
    assert not service.socket_path.exists()


def test_start_fails_clearly_when_the_browser_cannot_start(tmp_path):
    with pytest.raises(ChartRenderError) as info:
        start_render_service(_private_dir(tmp_path / "rs"), timeout_s=WAIT_S,
                             env={**os.environ, "BROWSER_PATH": "/nonexistent/chromium"})
    assert "browser did not start" in info.value.problem and "/nonexistent/chromium" in info.value.problem
    assert not (tmp_path / "rs" / "render.sock").exists()


def test_socket_path_checks(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(ChartRenderError, match="not private"):
        check_socket_path(open_dir / "render.sock")
    with pytest.raises(ChartRenderError, match="does not exist"):
        check_socket_path(tmp_path / "missing" / "render.sock")
    private = _private_dir(tmp_path / "private")
    (private / "file").write_text("not a socket")
    with pytest.raises(ChartRenderError, match="not a socket"):
        check_socket_path(private / "file")
    assert (private / "file").exists()
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(private / "live.sock"))
    live.listen()
    with pytest.raises(ChartRenderError, match="Another process is listening"):
        check_socket_path(private / "live.sock")
    live.close()  # now stale: nothing listens there
    check_socket_path(private / "live.sock")
    assert not (private / "live.sock").exists()


def test_service_refuses_a_directory_others_can_read(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "trading_pipeline.adapters.render_service",
                           "--socket", str(open_dir / "render.sock")], capture_output=True, text=True, timeout=WAIT_S,
                          check=False)
    assert done.returncode == 2 and "not private" in done.stderr
    assert not (open_dir / "render.sock").exists()


# ---- hostile or broken services ---------------------------------------------------------------

_PNG_800x600_HEAD = PNG_SIGNATURE + b"\x00\x00\x00\rIHDR" + (640).to_bytes(4, "big") + (400).to_bytes(4, "big")


class _FakeService(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Answers pings properly and every render (of two charts) with `answer(sock)`: one bad
    answer, then whatever it sends or nothing (the second chart's error then says so)."""

    daemon_threads = True

    def __init__(self, path: str, answer):
        self.answer = answer

        class Handler(socketserver.BaseRequestHandler):
            def handle(handler) -> None:
                sock = handler.request
                kind, payload = wire.receive_message(sock)
                if kind == wire.PING:
                    wire.send_json(sock, wire.PING, {"protocol": wire.PROTOCOL_VERSION, "tabs": 1})
                    return
                for _ in range(wire.decode_json(payload, "header")["count"]):
                    wire.receive_message(sock)
                self.answer(sock)

        super().__init__(path, Handler)


def _truncated_then_closed(sock):
    sock.sendall(wire._HEADER.pack(wire.PNG, 1000) + b"x" * 10)


def _truncated_then_silent(sock):
    sock.sendall(wire._HEADER.pack(wire.PNG, 1000) + b"x" * 10)
    time.sleep(5)


GARBAGE = {
    "non-PNG": (lambda sock: wire.send_message(sock, wire.PNG, b"GIF89a" + b"\0" * 40), "not a PNG"),
    "PNG cut off": (lambda sock: wire.send_message(sock, wire.PNG, _PNG_800x600_HEAD + b"\0" * 100), "cut off"),
    "wrong size": (lambda sock: wire.send_message(sock, wire.PNG, _PNG_800x600_HEAD.replace(
        (400).to_bytes(4, "big"), (401).to_bytes(4, "big"))), "expected 640x400"),
    "truncated frame, then closed": (_truncated_then_closed, "connection closed after 10 of 1000 bytes"),
    "truncated frame, then silence": (_truncated_then_silent, "TimeoutError"),
    "huge length": (lambda sock: sock.sendall(wire._HEADER.pack(wire.PNG, 2**32 - 1)), "claims 4294967295 bytes"),
    "unknown kind": (lambda sock: sock.sendall(b"Z\0\0\0\0"), "unknown message kind"),
    "a ping answer": (lambda sock: wire.send_message(sock, wire.PING), "answered chart 0"),
    "error without fix": (lambda sock: wire.send_json(sock, wire.ERROR, {"problem": "x"}), "without problem and fix"),
    "error not JSON": (lambda sock: wire.send_message(sock, wire.ERROR, b"\xff{"), "not JSON"),
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_garbled_answer_is_a_clear_chart_render_error_not_a_hang(tmp_path, figures, garbage):
    answer, says = GARBAGE[garbage]
    server = _FakeService(str(tmp_path / "fake.sock"), answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = RenderServiceClient(str(tmp_path / "fake.sock"), fallback=_no_fallback, idle_timeout_s=1)
        with ThreadPoolExecutor(1) as pool:
            results = pool.submit(client.render_each, [figures[0][0], figures[0][1]]).result(timeout=WAIT_S)
    finally:
        server.shutdown()
        server.server_close()
    assert all(isinstance(result, ChartRenderError) for result in results), results
    problems = " | ".join(result.problem for result in results)
    assert says in problems, problems
    assert client.using_service  # the service answers pings: a bad answer is the chart's error, not a fallback
