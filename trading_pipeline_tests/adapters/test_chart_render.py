"""ChartRenderer against a real headless Chromium (skipped when none is installed).

Never downloads a browser (no kaleido.get_chrome): the missing-browser cases only check the
error message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from trading_pipeline.adapters import chart_browser, chart_render, warm_kaleido
from trading_pipeline.adapters.chart_render import ChartRenderer, find_chromium, png_size
from trading_pipeline.core.chart_figure import ChartFill, build_chart_figure, build_decision_figure
from trading_pipeline.errors import ChartRenderError
from trading_pipeline_tests.core.test_chart_figure import AS_OF, make_indicator_frame


def _have_chromium() -> bool:
    try:
        find_chromium()
    except ChartRenderError:
        return False
    return True


needs_chromium = pytest.mark.skipif(
    not _have_chromium(), reason="no Chrome/Chromium installed (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def figures():
    daily = build_chart_figure(make_indicator_frame(400, "1d"), "AAPL", "1d", AS_OF)
    weekly = build_chart_figure(make_indicator_frame(260, "1w"), "AAPL", "1w", AS_OF)
    small = build_chart_figure(make_indicator_frame(300, "1d", seed=3), "MSFT", "1d", AS_OF, width=800, height=600)
    return daily, weekly, small


@pytest.fixture(scope="module")
def renderer():
    if not _have_chromium():
        pytest.skip("no Chrome/Chromium installed")
    with ChartRenderer(timeout_s=60) as r:
        yield r


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """True once `pid` no longer exists (or is a zombie)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


# ---- pure helpers ----------------------------------------------------------------------


def test_png_size_parses_ihdr():
    header = chart_render.PNG_SIGNATURE + b"\x00\x00\x00\rIHDR" + (1920).to_bytes(4, "big")
    assert png_size(header + (1080).to_bytes(4, "big") + b"\x08\x06\x00\x00\x00") == (1920, 1080)
    with pytest.raises(ValueError):
        png_size(b"GIF89a" + b"\x00" * 30)


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="os.waitid (Linux; macOS from Python 3.13)")
def test_a_killed_browser_is_seen_exited_while_another_thread_waits_on_it():
    """Popen.poll() answers None ("running") while another thread holds the process's wait lock
    (choreographer waits on a closing browser in a thread): the renderer then took a killed browser
    for a live one and sent it the next batch, which failed, instead of starting a new browser."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc.kill()
        assert _gone(proc.pid, 10)  # a zombie: exited, not reaped
        with proc._waitpid_lock:  # another thread in proc.wait(), as choreographer's close is
            assert proc.poll() is None  # what the renderer used to ask
            assert chart_browser.has_exited(proc)
        assert chart_browser.has_exited(proc) and proc.returncode == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def test_import_is_cheap():
    code = (
        "import sys, trading_pipeline.adapters.chart_render\n"
        "heavy = [m for m in ('kaleido', 'plotly', 'choreographer') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_browser_path_pointing_nowhere_is_a_chart_render_error(monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chromium")
    with pytest.raises(ChartRenderError) as info:
        ChartRenderer().start()
    err = info.value
    assert "/nonexistent/chromium" in err.problem and "no such file" in err.problem
    assert "apt-get install chromium" in err.fix and "BROWSER_PATH" in err.fix
    assert "get_chrome" in err.fix


def test_no_browser_anywhere_names_what_to_install(monkeypatch, tmp_path):
    from choreographer.browsers.chromium import Chromium

    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # empty dir: nothing on PATH
    monkeypatch.setattr(Chromium, "find_browser", classmethod(lambda cls, **kw: None))
    monkeypatch.setattr(chart_browser, "FALLBACK_BROWSERS", (str(tmp_path / "chromium"), "chromium"))
    with pytest.raises(ChartRenderError) as info:
        find_chromium()
    assert "No Chrome/Chromium browser found" in info.value.problem
    fix = info.value.fix
    assert "apt-get install chromium" in fix and "kaleido.get_chrome_sync()" in fix
    assert "plotly_get_chrome" in fix and "BROWSER_PATH" in fix


def test_browser_path_env_wins(monkeypatch):
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("needs /usr/bin/chromium")
    monkeypatch.setenv("BROWSER_PATH", "/usr/bin/chromium")
    assert find_chromium() == "/usr/bin/chromium"


def test_browser_that_exits_at_once_is_a_start_error(tmp_path):
    with pytest.raises(ChartRenderError) as info:
        ChartRenderer(browser_path="/bin/false", startup_timeout_s=20).start()
    assert "failed to start" in info.value.problem and "/bin/false" in info.value.problem
    assert "--headless" in info.value.fix


def test_browser_that_never_answers_hits_the_startup_timeout(tmp_path):
    fake = tmp_path / "fake-chromium"
    fake.write_text("#!/bin/sh\nexec sleep 120\n")
    fake.chmod(0o755)
    r = ChartRenderer(browser_path=str(fake), startup_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(ChartRenderError) as info:
        r.start()
    assert time.monotonic() - t0 < 2 + 8
    assert "did not start within 2 s" in info.value.problem
    assert not r.is_running


# ---- real Chromium -----------------------------------------------------------------------


@needs_chromium
def test_renders_three_figures_in_one_session(renderer, figures):
    daily, weekly, small = figures
    pid = renderer.browser_pid
    pngs = renderer.render_many([daily, weekly, small])
    assert len(pngs) == 3
    for png in pngs:
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert [png_size(p) for p in pngs] == [(1920, 1080), (1920, 1080), (800, 600)]
    # single render, explicit size, still the same browser (one session, no restart)
    one = renderer.render_png(daily, 1280, 720)
    assert png_size(one) == (1280, 720)
    assert renderer.browser_pid == pid and renderer.starts == 1
    # the renderer is offline and the browser is not sandboxed (we run as root here)
    assert renderer.offline


@needs_chromium
def test_decision_charts_render(renderer):
    """The decision chart (zones, levels, fills in a slot after the last bar) and the no-trade
    variant are valid figures for plotly.js: PNGs of the requested size."""
    frame = make_indicator_frame(300, "1d")
    last = float(frame["close"].iloc[-1])
    fill_day = (frame.index[-1] + pd.Timedelta(days=1, hours=15)).to_pydatetime()
    trade = build_decision_figure(frame, "AAPL", AS_OF, action="BUY", entry=last, stop=last * 0.96,
                                  targets=[last * 1.08], r_multiple=2.0, width=1280, height=720,
                                  fills=[ChartFill(fill_day, last, "BUY", 100, "entry")])
    no_trade = build_decision_figure(frame, "AAPL", AS_OF, action="NO_TRADE", entry=None, stop=None,
                                     targets=[], r_multiple=None, width=1280, height=720)
    pngs = renderer.render_many([trade, no_trade])
    assert [png_size(p) for p in pngs] == [(1280, 720), (1280, 720)]
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert pngs[0] != pngs[1]


@needs_chromium
def test_render_many_keeps_order(renderer, figures):
    daily, _, small = figures
    pngs = renderer.render_many([small, daily, small])
    assert [png_size(p) for p in pngs] == [(800, 600), (1920, 1080), (800, 600)]
    assert pngs[0] == pngs[2]  # same figure, same bytes


@needs_chromium
def test_a_devtools_message_written_in_parts_still_reaches_chromium_whole(figures, monkeypatch):
    """A pipe write interrupted by a signal returns short; choreographer wrote each DevTools message
    once and Chromium got it cut at 64 KiB ("JSON: comma or array end expected at position
    65536"): that render failed as a crash. Writes here return at most 64 KiB, as an interrupted
    one does."""
    daily, _, _ = figures
    real_write, short_writes = os.write, []

    def interrupted_write(fd, data):
        if len(data) > 65536:
            short_writes.append(len(data))
            return real_write(fd, bytes(data[:65536]))
        return real_write(fd, data)

    with ChartRenderer(tabs=1, timeout_s=60) as r:
        monkeypatch.setattr(os, "write", interrupted_write)
        png = r.render_png(daily)
    assert short_writes, "no DevTools message over 64 KiB was written: the test did not cut one"
    assert png_size(png) == (1920, 1080)


@needs_chromium
def test_pipelined_renders_give_each_figure_its_png_in_order_while_the_next_are_built(figures):
    daily, weekly, small = figures
    bad = {"data": "not a list", "layout": {"width": 300, "height": 200}}  # plotly.js refuses it
    wanted = [small, daily, bad, weekly, small, small, daily]
    first_batch_rendering = threading.Event()
    with ChartRenderer(tabs=2, timeout_s=60) as r:
        render_each = r.render_each

        def recording_render_each(batch, **kwargs):
            first_batch_rendering.set()
            return render_each(batch, **kwargs)

        r.render_each = recording_render_each

        def built_one_by_one():
            for i, fig in enumerate(wanted):
                if i == 4:  # the first batch (two figures per tab) renders while the rest are built
                    assert first_batch_rendering.wait(30)
                yield fig

        results = [f.result(timeout=120) for f in r.render_each_pipelined(built_one_by_one())]
        assert isinstance(results[2], ChartRenderError)  # one bad figure fails only itself
        pngs = [p for i, p in enumerate(results) if i != 2]
        assert [png_size(p) for p in pngs] == [(800, 600), (1920, 1080), (1920, 1080), (800, 600), (800, 600),
                                               (1920, 1080)]
        assert pngs == render_each([small, daily, weekly, small, small, daily])  # the same bytes as one batch


@needs_chromium
def test_invalid_figure_is_a_type_error(renderer):
    with pytest.raises(TypeError):
        renderer.render_png(["not a figure"])


@needs_chromium
def test_tiny_timeout_raises_and_next_render_recovers(figures):
    daily = figures[0]
    with ChartRenderer(timeout_s=0.001) as r:
        t0 = time.monotonic()
        with pytest.raises(ChartRenderError) as info:
            r.render_png(daily)
        assert time.monotonic() - t0 < 10
        assert "timed out" in info.value.problem and "timeout_s" in info.value.fix
        assert not r.is_running  # killed
        r.timeout_s = 60
        assert png_size(r.render_png(daily)) == (1920, 1080)
        assert r.starts == 2


@needs_chromium
def test_hung_browser_times_out_and_is_killed(figures):
    daily = figures[0]
    with ChartRenderer(timeout_s=2) as r:
        r.render_png(daily)
        pid = r.browser_pid
        os.killpg(pid, signal.SIGSTOP)  # freeze Chromium: every render now hangs
        try:
            t0 = time.monotonic()
            with pytest.raises(ChartRenderError) as info:
                r.render_png(daily)
            elapsed = time.monotonic() - t0
        finally:
            try:  # only reached if the renderer failed to kill it
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert "timed out" in info.value.problem
        assert elapsed < 2 + 8, elapsed
        assert _gone(pid)


@needs_chromium
def test_browser_crash_mid_render_is_a_clear_error(figures):
    daily = figures[0]
    with ChartRenderer(timeout_s=30) as r:
        r.render_png(daily)
        pid = r.browser_pid
        os.killpg(pid, signal.SIGSTOP)  # the batch below is certainly still in flight...
        killer = threading.Timer(1.0, os.killpg, (pid, signal.SIGKILL))  # ...when it dies
        killer.start()
        try:
            with pytest.raises(ChartRenderError) as info:
                r.render_many([daily, daily, daily])
        finally:
            killer.join()
        assert "crashed or exited" in info.value.problem
        assert "Retry" in info.value.fix
        # the next call starts a fresh browser
        assert png_size(r.render_png(daily)) == (1920, 1080)
        assert r.starts == 2 and r.browser_pid != pid


@needs_chromium
def test_close_stops_the_browser(figures):
    r = ChartRenderer().start()
    pid = r.browser_pid
    assert pid is not None and r.is_running
    r.close()
    r.close()  # idempotent
    assert not r.is_running and r.browser_pid is None
    assert _gone(pid)


# ---- warm tabs and lean start (the speed-ups; see the module doc) -------------------------


def test_add_chromium_args_without_choreographer_internals_is_a_no_op():
    class Bare:
        pass

    assert chart_browser.add_chromium_args(Bare(), ["--x"]) is False


def test_tab_recycle_after_must_be_positive():
    with pytest.raises(ValueError):
        ChartRenderer(tab_recycle_after=0)


def _browser_cmdlines(pgid: int) -> list[list[str]]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
            with open(f"/proc/{entry}/cmdline") as f:
                out.append(f.read().split("\0"))
        except (OSError, IndexError, ValueError):
            continue
    return out


@needs_chromium
def test_fast_path_is_on_with_the_installed_kaleido(renderer, figures):
    """If a kaleido upgrade removes the internals the renderer hooks, this fails (the renderer
    itself would fall back to stock kaleido: correct, but a page reload per figure)."""
    renderer.render_png(figures[2])
    assert renderer.fast_path
    main = [c for c in _browser_cmdlines(renderer.browser_pid) if "--remote-debugging-pipe" in c]
    assert main, "Chromium's command line not found"
    for arg in chart_render.EXTRA_ARGS:
        assert arg in main[-1]


@needs_chromium
def test_tabs_are_not_reloaded_per_figure(renderer, figures):
    daily, weekly, small = figures
    before = renderer.tab_reloads
    pngs = renderer.render_many([daily, weekly, small, daily])
    renderer.render_png(small)
    assert [png_size(p) for p in pngs] == [(1920, 1080), (1920, 1080), (800, 600), (1920, 1080)]
    assert renderer.tab_reloads == before
    assert renderer.starts == 1


@needs_chromium
def test_warm_tab_renders_the_same_bytes_as_a_fresh_page(figures):
    """Nothing a figure leaves in the page changes the next one: a figure rendered after others
    in a warm tab is byte-identical to the same figure on a freshly loaded page."""
    daily, weekly, small = figures
    with ChartRenderer(tabs=1) as r:
        fresh = r.render_png(daily)
        for fig in (weekly, small, weekly):
            r.render_png(fig)
        assert r.render_png(daily) == fresh
        assert r.tab_reloads == 0


@needs_chromium
def test_tab_page_is_recycled_after_n_figures(figures):
    small = figures[2]
    with ChartRenderer(tabs=1, tab_recycle_after=2) as r:
        pngs = [r.render_png(small) for _ in range(5)]
        assert r.tab_reloads == 2  # before the 3rd and the 5th figure
        assert len(set(pngs)) == 1 and png_size(pngs[0]) == (800, 600)
        assert r.starts == 1


@needs_chromium
def test_figure_rejected_by_plotly_js_is_an_error_and_the_tab_gets_a_fresh_page(figures):
    small = figures[2]
    with ChartRenderer(tabs=1, timeout_s=60) as r:
        good = r.render_png(small)
        pid = r.browser_pid
        with pytest.raises(ChartRenderError) as info:
            r.render_png({"data": "not a list", "layout": {"width": 300, "height": 200}})
        assert "Rendering failed" in info.value.problem and "build_chart_figure" in info.value.fix
        assert r.is_running and r.browser_pid == pid  # not a browser failure: no restart
        assert r.render_png(small) == good
        assert r.tab_reloads == 1 and r.starts == 1


@needs_chromium
def test_without_kaleido_internals_falls_back_to_stock_kaleido(monkeypatch, figures):
    import kaleido

    class OldKaleido(kaleido.Kaleido):
        _return_kaleido_tab = None  # as if this kaleido version had no such hook

    monkeypatch.setattr(kaleido, "Kaleido", OldKaleido)
    warm_kaleido.warm_kaleido_class.cache_clear()
    try:
        assert warm_kaleido.warm_kaleido_class() is OldKaleido
    finally:
        monkeypatch.undo()
        warm_kaleido.warm_kaleido_class.cache_clear()
    # the real fallback path: stock kaleido (a reload per figure) still renders correctly
    monkeypatch.setattr(chart_render, "warm_kaleido_class", lambda: kaleido.Kaleido)
    with ChartRenderer(tabs=1) as r:
        assert png_size(r.render_png(figures[2])) == (800, 600)
        assert not r.fast_path and r.tab_reloads == 0
