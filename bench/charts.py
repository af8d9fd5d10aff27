"""Chart rendering: 40 chart PNGs the naive way (`fig.to_image`) against the project's renderer.

The charts: 20 symbols x 2 timeframes (1d over 2 years, 1w over 6 years of history, as the demo
strategy), bars from the embedded simulated market (`simulate_bars`), indicators from
`compute_indicators`, figures from `build_chart_figure` at 1920x1080. The figures are built once,
before any timing; both sides render the same 40 figure objects.

- naive: `fig.to_image(format="png")` per chart, kaleido's default: every call starts a Chromium,
  loads plotly.js into a tab, renders one figure and closes the browser.
- renderer: `ChartRenderer` (trading_pipeline/adapters/chart_render.py): one Chromium, one tab per
  core, all 40 figures through `render_many`. Its total INCLUDES starting the browser; the
  amortized time per chart is that total / 40. Then, in the same browser, each chart once more
  through `render_png` one at a time (how the chart_images asset calls it): the per-chart
  latency of a warm renderer.

No network traffic leaves the machine:
- kaleido's default page loads MathJax from a CDN (cdnjs.cloudflare.com). plotly forwards
  `plotly.io.defaults.mathjax` to kaleido only when it is truthy, so `False` cannot switch it off
  from plotly: it points at an empty local script instead (the charts contain no LaTeX);
- plotly.js is the copy inside the plotly package (kaleido's default when plotly is installed);
  checked before running: the page kaleido writes loads no http(s) URL;
- CHOREO_PROXY_SERVER makes choreographer start every Chromium (naive and renderer alike) with
  `--proxy-server=http://127.0.0.1:9`, a dead loopback port, as `ChartRenderer(offline=True)`
  does: any other HTTP(S) request (Chromium's own background requests) fails on loopback.
Verified with `strace -f -e trace=connect,sendto,sendmsg`: every AF_INET connect goes to
127.0.0.1:9; the only other one is Chromium's IPv6 reachability probe, a UDP connect() to
2001:4860:4860::8888 that is closed without sending anything (a UDP connect sends no packet).
`--watch-network` also samples our sockets while running (see `NetworkWatch`).

Targets: renderer >= 8x faster than naive, <= 0.3 s per chart amortized (startup included) on a
2-core machine. The machine's load average is printed: on a shared, busy machine every number
grows; the renderer's CPU-seconds per chart (this process and its browser) are printed too, as
they depend less on the load (on 2 idle cores, wall time is about half of them). Exits 1 if a
target is missed.

Run: `.venv/bin/python bench/charts.py [--symbols N] [--repeats N] [--show N] [--watch-network]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Self

warnings.filterwarnings("ignore")

TARGET_RATIO = 8.0
TARGET_AMORTIZED_S = 0.3
AS_OF = "2025-06-02 21:30"
SYMBOLS = (
    "AAPL", "MSFT", "NVDA", "AMZN", "SPY", "QQQ", "GOOGL", "META", "TSLA", "AMD",
    "NFLX", "JPM", "XOM", "KO", "PEP", "COST", "AVGO", "ORCL", "INTC", "IWM",
)  # fmt: skip
HISTORY_YEARS = {"1d": 2, "1w": 6}
DEAD_PROXY = "http://127.0.0.1:9"


# ---- offline setup ----------------------------------------------------------------------


def configure_offline(tmp: Path) -> None:
    """Make plotly's fig.to_image (kaleido's defaults otherwise) send nothing off the machine."""
    import plotly.io as pio
    from kaleido import PageGenerator

    no_mathjax = tmp / "no-mathjax.js"
    no_mathjax.write_text("// MathJax stand-in for the benchmark: the charts contain no LaTeX\n")
    pio.defaults.mathjax = str(no_mathjax)
    os.environ["CHOREO_PROXY_SERVER"] = DEAD_PROXY
    page = PageGenerator(plotly=pio.defaults.plotlyjs, mathjax=pio.defaults.mathjax).generate_index()
    remote = re.findall(r"""src=["'](https?://[^"']+)""", page)
    if remote:
        sys.exit(f"kaleido's page would still load {remote}; refusing to run")


class NetworkWatch:
    """Samples the sockets of this process and its descendants for a non-loopback peer.

    Every `period_s`: map each socket inode of our process tree to /proc/net/{tcp,udp}{,6} and
    record any remote address that is neither loopback nor unset (an outgoing connection, TCP
    or UDP, DNS included). A sampler, not a packet capture: a connection shorter than the period
    can slip through. What prevents traffic is the setup above (no remote URL in the page, the
    dead proxy). Reading /proc/net/tcp costs ~5 ms on a busy VM, so this is opt-in
    (--watch-network): it takes a little CPU from both sides while they are timed.
    """

    def __init__(self, enabled: bool, period_s: float = 0.25) -> None:
        self.enabled, self.period_s = enabled, period_s
        self.seen: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()

    def report(self) -> str:
        if not self.enabled:
            return "not watched (add --watch-network to sample our sockets)"
        if self.seen:
            return "SEEN: " + ", ".join(sorted(self.seen))
        return f"none seen: only loopback or unconnected sockets in {self.samples} samples"

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.seen |= _foreign_peers(_tree_pids(os.getpid()))
                self.samples += 1
            except OSError:  # a process exited while being read; sample again
                continue


def _tree_pids(root: int) -> set[int]:
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            continue
    return out


def _foreign_peers(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, inode = fields[2], fields[9]
            if inode in inodes and not _local(remote):
                found.add(f"{proto} {remote}")
    return found


def _local(hex_addr: str) -> bool:
    addr, _ = hex_addr.split(":")
    if set(addr) == {"0"}:
        return True  # not connected
    if len(addr) == 8:  # IPv4, little-endian: 127.x.x.x ends with 7F
        return addr.endswith("7F")
    return addr == "00000000000000000000000001000000" or (  # ::1
        addr.startswith("0000000000000000FFFF0000") and addr.endswith("7F")  # ::ffff:127.x
    )


class ShutdownQuirks(logging.Filter):
    """Counts (and keeps off the screen) choreographer's "JSONError decoding message" records.

    When a browser closes, choreographer's pipe wrapper writes "{bye}" (not JSON); if it arrives
    in one read with a last message, choreographer logs a JSONError traceback and ignores it.
    The naive path closes a browser per chart, so this shows up now and then; it is counted
    and reported in one line instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    @classmethod
    def install(cls) -> ShutdownQuirks:
        import choreographer.channels.pipe  # noqa: F401 - its logger exists (logistro's class) first

        quirks = cls()
        logging.getLogger("choreographer.channels.pipe").addFilter(quirks)
        return quirks

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("JSONError decoding message"):
            self.count += 1
            return False
        return True


# ---- measurement ------------------------------------------------------------------------


def build_figures(n_symbols: int) -> list[tuple[str, str, object]]:
    import pandas as pd

    from trading_pipeline.core.chart_figure import build_chart_figure
    from trading_pipeline.core.indicators import compute_indicators
    from trading_pipeline.core.market_sim import simulate_bars

    as_of = pd.Timestamp(AS_OF, tz="UTC")
    out = []
    for symbol in SYMBOLS[:n_symbols]:
        for timeframe, years in HISTORY_YEARS.items():
            bars = simulate_bars(symbol, timeframe, as_of - pd.DateOffset(years=years), as_of)
            frame = compute_indicators(bars)
            out.append((symbol, timeframe, build_chart_figure(frame, symbol, timeframe, as_of.to_pydatetime())))
    return out


def cpu_seconds() -> float:
    """CPU time of this process (all threads)."""
    t = os.times()
    return t.user + t.system


def group_cpu_seconds(pgid: int | None) -> float:
    """CPU time of the live processes in one process group (the renderer's browser)."""
    if pgid is None:
        return 0.0
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_naive(figures) -> dict:
    from trading_pipeline.adapters.chart_render import png_size

    times = []
    t0 = time.perf_counter()
    for _, _, fig in figures:
        t = time.perf_counter()
        png = fig.to_image(format="png")
        times.append(time.perf_counter() - t)
        assert png_size(png) == (1920, 1080)
    return {"total": time.perf_counter() - t0, "times": times}


def run_renderer(figures) -> dict:
    from trading_pipeline.adapters.chart_render import ChartRenderer, png_size

    figs = [fig for _, _, fig in figures]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    renderer = ChartRenderer()
    try:
        renderer.start()
        started = time.perf_counter()
        pngs = renderer.render_many(figs)
        total = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0 + group_cpu_seconds(renderer.browser_pid)
        assert all(png_size(p) == (1920, 1080) for p in pngs)
        sequential = []
        for fig in figs:
            t = time.perf_counter()
            renderer.render_png(fig)
            sequential.append(time.perf_counter() - t)
        info = {"tabs": renderer.tabs, "fast_path": renderer.fast_path, "reloads": renderer.tab_reloads}
    finally:
        renderer.close()
    return {"total": total, "startup": started - t0, "batch": total - (started - t0), "cpu": cpu,
            "sequential": sequential, **info}  # fmt: skip


def versions() -> str:
    import subprocess
    from importlib.metadata import version

    from trading_pipeline.adapters.chart_render import find_chromium

    path = find_chromium()
    try:
        out = subprocess.run(
            [path, "--version"], check=False, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        out = f"? ({exc})"
    return f"plotly {version('plotly')}, kaleido {version('kaleido')}, {out} ({path})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=20, help="symbols (x 2 timeframes); default 20")
    parser.add_argument("--repeats", type=int, default=1, help="runs of both sides; medians reported")
    parser.add_argument("--show", type=int, default=40, help="per-chart lines to print (default all)")
    parser.add_argument("--watch-network", action="store_true", help="sample our sockets for non-loopback peers")
    args = parser.parse_args()

    shutdown_quirks = ShutdownQuirks.install()
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    print(f"versions: {versions()}")
    with tempfile.TemporaryDirectory() as tmp:
        configure_offline(Path(tmp))
        t = time.perf_counter()
        figures = build_figures(args.symbols)
        n = len(figures)
        print(f"{n} figures ({args.symbols} symbols x 1d, 1w; 1920x1080) built in {time.perf_counter() - t:.1f} s "
              "(not timed below)")  # fmt: skip
        naive_runs, renderer_runs = [], []
        with NetworkWatch(args.watch_network) as watch:
            for rep in range(args.repeats):
                # alternate the order so a change of load hits both sides alike
                order = ("naive", "renderer") if rep % 2 == 0 else ("renderer", "naive")
                for side in order:
                    if side == "naive":
                        naive_runs.append(run_naive(figures))
                    else:
                        renderer_runs.append(run_renderer(figures))
                nv, rr = naive_runs[-1], renderer_runs[-1]
                print(f"run {rep + 1}: naive {nv['total']:.1f} s, renderer {rr['total']:.2f} s "
                      f"(start {rr['startup']:.2f} s), ratio {nv['total'] / rr['total']:.1f}x, "
                      f"load {os.getloadavg()[0]:.1f}")  # fmt: skip

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    naive_total, renderer_total = med(naive_runs, "total"), med(renderer_runs, "total")
    naive_times = [statistics.median(r["times"][i] for r in naive_runs) for i in range(n)]
    seq_times = [statistics.median(r["sequential"][i] for r in renderer_runs) for i in range(n)]
    last = renderer_runs[-1]

    print(
        f"\nper chart (median of {args.repeats} run(s)): naive fig.to_image | renderer.render_png, warm, one at a time"
    )
    for i, (symbol, timeframe, _) in enumerate(figures[: args.show]):
        print(f"  {symbol:6s} {timeframe}  {naive_times[i]:6.2f} s | {seq_times[i]:5.3f} s")

    amortized = renderer_total / n
    # each run's naive/renderer pair ran back to back, under about the same load
    ratio = statistics.median(nv["total"] / rr["total"] for nv, rr in zip(naive_runs, renderer_runs, strict=True))
    print(f"\nnaive     total {naive_total:7.2f} s  = {naive_total / n:.3f} s/chart "
          f"(median {statistics.median(naive_times):.2f}, min {min(naive_times):.2f}, max {max(naive_times):.2f})")  # fmt: skip
    print(f"renderer  total {renderer_total:7.2f} s  = {amortized:.3f} s/chart amortized, startup included "
          f"(medians: startup {med(renderer_runs, 'startup'):.2f} s, render_many {med(renderer_runs, 'batch'):.2f} s "
          f"= {med(renderer_runs, 'batch') / n:.3f} s/chart); CPU (Python + browser) {med(renderer_runs, 'cpu') / n:.2f} s/chart; "
          f"{last['tabs']} tabs, fast path {'on' if last['fast_path'] else 'OFF'}, "
          f"{last['reloads']} tab reloads")  # fmt: skip
    print(f"renderer  render_png one at a time (warm): median {statistics.median(seq_times):.3f} s/chart")
    print(f"ratio     {ratio:.1f}x   (median of the runs' naive/renderer ratios; target >= {TARGET_RATIO:g}x)")
    if shutdown_quirks.count:
        print(
            f"note      choreographer logged {shutdown_quirks.count} 'JSONError decoding message' while closing "
            "browsers: its shutdown marker '{bye}' arrived glued to a last message (harmless, not a render)"
        )
    print(f"amortized {amortized:.3f} s/chart (target <= {TARGET_AMORTIZED_S} s on 2 cores; this machine: "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end)")  # fmt: skip
    print(f"network   {watch.report()}")
    ok = ratio >= TARGET_RATIO and amortized <= TARGET_AMORTIZED_S and not watch.seen
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
