"""The render service against a local renderer: time to a run process's first chart, and a batch.

What a daemon run pays before its first chart PNG, in a fresh process with plotly already
imported (the run built its figure with it):
- local: `ChartRenderer().start()` (imports kaleido, starts Chromium, loads plotly.js in its
  tabs) and the first `render_png`;
- service: `RenderServiceClient` against an already warm service (ping, the figure as JSON over
  the socket, the render) and the first `render_png`.
Each is measured in `--runs` fresh processes (alternating), from "I need a renderer" to the
PNG, wall and this process's CPU (the browser's or the service's CPU is not in it).

Then the 20-chart batch (20 symbols' 1d charts at 1920x1080, as the daily refresh renders them)
through `render_each_pipelined`, warm both ways, `--repeats` times each (alternating), in this
process: a warm local renderer against the warm service. The load average is printed before
and after: the machine is shared.

Run: `.venv/bin/python bench/render_service.py [--runs N] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import json, sys, time
import plotly.graph_objects as go
mode, socket_path, figure_path = sys.argv[1:4]
fig = go.Figure(json.load(open(figure_path)))
from trading_pipeline.adapters.chart_render import ChartRenderer
from trading_pipeline.adapters.render_client import RenderServiceClient
def no_fallback():
    raise SystemExit("the service did not answer")
t0, c0 = time.monotonic(), time.process_time()
renderer = ChartRenderer().start() if mode == "local" else RenderServiceClient(socket_path, fallback=no_fallback)
png = renderer.render_png(fig)
print(json.dumps({"wall_s": time.monotonic() - t0, "cpu_s": time.process_time() - c0, "bytes": len(png)}))
"""


def load() -> str:
    return os.getloadavg().__repr__()


def summary(values: list[float]) -> str:
    return f"min {min(values):.3f} s, median {statistics.median(values):.3f} s (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per side")
    parser.add_argument("--repeats", type=int, default=5, help="20-chart batches per side")
    args = parser.parse_args()

    from charts import build_figures

    from trading_pipeline.adapters.chart_render import ChartRenderer
    from trading_pipeline.adapters.render_client import RenderServiceClient
    from trading_pipeline.adapters.render_service import start_render_service

    print(f"load average before: {load()}, {os.cpu_count()} cores")
    figures = [fig for _, timeframe, fig in build_figures(20) if timeframe == "1d"]
    work = Path(tempfile.mkdtemp(prefix="rs-bench-"))
    figure_path = work / "figure.json"
    figure_path.write_text(figures[0].to_json())
    service = start_render_service(work / "service")
    try:
        first: dict[str, list[dict]] = {"local": [], "service": []}
        for run in range(args.runs):
            for mode, runs in list(first.items())[:: 1 if run % 2 == 0 else -1]:
                done = subprocess.run([sys.executable, "-c", CHILD, mode, str(service.socket_path), str(figure_path)],
                                      capture_output=True, text=True, check=True)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print("time to the first PNG in a fresh process (plotly imported, figure built):")
        for mode, runs in first.items():
            print(f"  {mode:8s} wall {summary([r['wall_s'] for r in runs])}; "
                  f"CPU of the run process {summary([r['cpu_s'] for r in runs])}")

        client = RenderServiceClient(str(service.socket_path), fallback=lambda: sys.exit("service gone"))
        batches: dict[str, list[float]] = {"local": [], "service": []}
        with ChartRenderer() as local:
            local.render_many(figures[:2])  # warm: started, pages loaded
            client.render_many(figures[:2])
            expected = local.render_many(figures)
            sides = [("local", local), ("service", client)]
            for repeat in range(args.repeats):
                for mode, renderer in sides if repeat % 2 == 0 else sides[::-1]:  # neither always goes first
                    t0 = time.monotonic()
                    pngs = [f.result() for f in renderer.render_each_pipelined(iter(figures))]
                    batches[mode].append(time.monotonic() - t0)
                    assert pngs == expected, f"{mode}: different PNGs"
        print("20-chart batch (1920x1080, render_each_pipelined, warm), identical PNGs both ways:")
        for mode, times in batches.items():
            print(f"  {mode:8s} {summary(times)}")
    finally:
        service.close()
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
