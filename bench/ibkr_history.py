"""IBKR history throughput against the local gateway emulator with simulated latency.

Fetches N symbols x 2 timeframes (1d over 2y, 1w over 6y: one history request each) through the
real IBKRClient/IBKRMarketData with IBKR's default limits, and prints the achieved time against
the pacing-limited ideal, plus the peak history requests in flight and the peak requests per
second the emulator saw (IBKR's limits: 5 in flight, 10 per second; the client uses 4 and a
1.2 s window). The emulator answers 429 to any breach, so "429 answers: 0" is part of the result.

The emulator runs in its own process (`python -m trading_pipeline_tests.emulators.ibkr_gateway`), as the
gateway does, so its request timestamps are not distorted by the client's threads.

Run: `.venv/bin/python bench/ibkr_history.py [--symbols 100] [--latency-ms 200] [--workers 8]`.
"""

from __future__ import annotations

import argparse
import math
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IBKR_RATE = 10  # requests per second through the CP gateway
IBKR_HISTORY_IN_FLIGHT = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()

    import httpx

    from trading_pipeline.adapters.ibkr.client import IBKRClient
    from trading_pipeline.adapters.ibkr.market_data import IBKRMarketData
    from trading_pipeline.core.market_calendar import calendar
    from trading_pipeline.core.strategies import TimeframeSettings

    calendar()  # load the exchange calendar outside the measurement
    symbols = [f"BENCH{i:03d}" for i in range(args.symbols)]
    jobs = [(s, tf, TimeframeSettings(period=p)) for s in symbols for tf, p in (("1d", "2y"), ("1w", "6y"))]
    latency = args.latency_ms / 1000
    with socket.socket() as probe:  # the emulator runs in its own process, as the gateway does
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "trading_pipeline_tests.emulators.ibkr_gateway", "--port", str(port),
         "--latency-ms", str(args.latency_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent)  # the emulator lives with the tests, in the checkout
    url = f"http://127.0.0.1:{port}/v1/api"
    control = f"http://127.0.0.1:{port}/__emulator__/stats"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(control, timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the emulator did not start: {server.stderr.read().decode()[-500:]}")
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as state, IBKRClient(url, shared_pacing_dir=state) as client:
            source = IBKRMarketData(client)
            as_of = datetime.now(UTC)
            started = time.perf_counter()
            source.prefetch_contracts(symbols)  # batched lookups: part of the measured work
            with ThreadPoolExecutor(args.workers) as pool:
                frames = list(pool.map(lambda job: source.fetch(job[0], job[1], job[2], as_of), jobs))
            elapsed = time.perf_counter() - started
        stats = httpx.get(control, timeout=5).json()
    finally:
        server.terminate()
        server.wait(timeout=10)

    history = stats["counts"].get("GET /iserver/marketdata/history", 0)
    total = stats["requests"]
    # Pacing-limited ideal: every request at IBKR's 10/s (the last one still takes one latency), or
    # the history requests at IBKR's 5 in flight, whichever is slower.
    ideal = max((total - 1) / IBKR_RATE + latency, math.ceil(history / IBKR_HISTORY_IN_FLIGHT) * latency)
    bars = sum(len(f) for f in frames)
    print(f"IBKR history benchmark: {args.symbols} symbols x 2 timeframes (1d/2y, 1w/6y), "
          f"{args.latency_ms:.0f} ms simulated latency, {args.workers} worker threads")
    print(f"  requests            {total} ({history} history, {total - history} session/contract lookups)")
    print(f"  bars                {bars} ({bars / len(frames):.0f} per frame)")
    print(f"  achieved            {elapsed:6.2f} s")
    print(f"  pacing-limited ideal{ideal:6.2f} s  (10 requests/s, 5 history in flight)")
    print(f"  efficiency          {ideal / elapsed:6.1%}  (target >= 80%)")
    print(f"  peak in flight      {stats['peak_history_in_flight']} history requests (limit 5; client uses 4)")
    print(f"  peak rate           {stats['peak_requests_per_second']} requests in any 1 s (limit 10)")
    print(f"  429 answers         {stats['rate_limited']}")
    ok = (ideal / elapsed >= 0.8 and stats["peak_history_in_flight"] <= 5
          and stats["peak_requests_per_second"] <= 10 and stats["rate_limited"] == 0)
    print("  result              " + ("OK" if ok else "BELOW TARGET OR OVER A LIMIT"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
