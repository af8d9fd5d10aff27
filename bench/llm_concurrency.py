"""Throughput of the openai analyst at the configured concurrency, against a local server.

Starts the tests' local OpenAI-compatible server on 127.0.0.1 (no traffic leaves the machine)
with a fixed latency per request (default 1 s), then runs 50 timeframe analyses (25 simulated
symbols × 1d/1w, a chart-sized PNG each) through `OpenAIAnalyst.analyze` from a thread pool of
TRADING_LLM_CONCURRENCY workers (default 4), recording every call in a scratch SQLite trading
database as in production. Prints the ideal time (ceil(n / concurrency) × latency), the achieved
time and their ratio; exits 1 if the ratio is below the target (80 %) or any analysis is invalid.

Run: `.venv/bin/python bench/llm_concurrency.py [--analyses 50] [--latency 1.0]`
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for the tests' local server
warnings.filterwarnings("ignore")

TARGET = 0.80


def chart_like_png(seed: int) -> bytes:
    """A 1920×1080 PNG of roughly a rendered chart's size (candles, lines, some noise)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (1920, 1080), "white")
    draw = ImageDraw.Draw(image)
    y = 500
    for x in range(0, 1900, 8):
        y = min(900, max(100, y + rng.randint(-20, 20)))
        draw.rectangle([x, y - rng.randint(5, 40), x + 5, y + rng.randint(5, 40)],
                       fill=(38, 166, 154) if rng.random() < 0.5 else (239, 83, 80))
    noise = Image.frombytes("RGB", (240, 200), rng.randbytes(240 * 200 * 3))
    image.paste(noise, (1600, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--analyses", type=int, default=50)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds the server takes per request")
    args = parser.parse_args()

    import hashlib

    from trading_pipeline.adapters.model_calls import summarize_calls
    from trading_pipeline.adapters.openai_analyst import OpenAIAnalyst
    from trading_pipeline.adapters.trading_db import session_factory
    from trading_pipeline.core.analysis import ChartSource
    from trading_pipeline_tests.adapters.openai.conftest import market_frame
    from trading_pipeline_tests.adapters.openai.local_server import LocalOpenAIServer, good

    concurrency = os.environ.get("TRADING_LLM_CONCURRENCY", "4")
    symbols = [f"BENCH{i:02d}" for i in range(math.ceil(args.analyses / 2))]
    work = [(symbol, timeframe) for symbol in symbols for timeframe in ("1d", "1w")][: args.analyses]
    print(f"preparing {len(work)} indicator frames and chart PNGs ...", flush=True)
    frames = {item: market_frame(*item) for item in work}
    pngs = {item: chart_like_png(i) for i, item in enumerate(work)}

    server = LocalOpenAIServer().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sessions = session_factory(f"sqlite:///{Path(tmp) / 'trading.db'}")
            environ = {"OPENAI_API_KEY": "bench-not-a-key", "OPENAI_BASE_URL": server.base_url,
                       "OPENAI_MODEL": "gpt-4.1-mini", "TRADING_LLM_CONCURRENCY": concurrency,
                       "TRADING_LLM_CACHE": "off", "OPENAI_TIMEOUT_SECONDS": str(10 * args.latency + 5)}
            analyst = OpenAIAnalyst.from_env(environ, sessions, run_id="bench")
            workers = analyst.settings.concurrency

            server.reset(default=good())  # warm-up outside the measurement: SDK import, client, DB schema
            analyst.analyze(frames[work[0]], None, pngs[work[0]])
            server.reset(default=good(delay=args.latency))

            def one(item):
                png = pngs[item]
                chart = ChartSource(uri=f"file:///bench/{item[0]}/{item[1]}.png", sha256=hashlib.sha256(png).hexdigest())
                return analyst.analyze(frames[item], chart, png)

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(one, work))
            achieved = time.perf_counter() - started
            analyst.close()

            ideal = math.ceil(len(work) / workers) * args.latency
            ratio = ideal / achieved
            invalid = [r for r in results if not r.valid]
            tokens = sum(summarize_calls(sessions, run_id="bench", symbol=s)["total_tokens"] for s in symbols)
            print(f"analyses            {len(work)} ({len(results) - len(invalid)} valid, {len(invalid)} invalid)")
            print(f"concurrency         {workers} (TRADING_LLM_CONCURRENCY), server latency {args.latency:g} s per request")
            print(f"max in flight       {server.max_in_flight} (seen by the server)")
            print(f"ideal time          {ideal:.2f} s  (ceil({len(work)} / {workers}) × {args.latency:g} s)")
            print(f"achieved time       {achieved:.2f} s  ({(achieved - ideal) / len(work) * 1000:+.0f} ms per analysis "
                  "over ideal)")
            print(f"efficiency          {ratio:.1%} of ideal (target ≥ {TARGET:.0%})  "
                  f"{'PASS' if ratio >= TARGET and not invalid else 'FAIL'}")
            print(f"recorded            {tokens:,} tokens in llm_calls")
            for analysis in invalid[:3]:
                print(f"  invalid: {analysis.symbol} {analysis.timeframe}: {analysis.invalid_reason}")
            return 0 if ratio >= TARGET and not invalid else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
