"""Backtest speed: 20 symbols × 10 years × {1d, 1w} with the rules analyst and full statistics,
in one process; then the live graph making the same kind of decision, as a ratio.

Prints the wall time (bars, indicators, loop, statistics, report), the core loop's decisions per
second (one `decide` per symbol and session; the per-timeframe analyses counted too), and the
live graph's time per decision (bars -> indicators -> chart -> analysis per timeframe, then the
decision, materialized in process) for a sample of one symbol-year's sessions, extrapolated to
the year and set against the backtest's time for that symbol-year.

`--analyst llm_replay` also times `llm_replay` with every call a cache hit, against the rules
analyst on the same bars: a first replay with `CannedCaller` stores a valid answer for every call
the replay makes (the 3-of-4 rule read off the numbers the model would be sent, a plan 2/3/5 ATR
from the close; not a model) in a temporary SQLite trading database; the timed replay loads them
from there as a backtest does, and the core loop's decisions per second of both are printed with
their ratio.
Run: `.venv/bin/python bench/backtest.py [--symbols 20 --years 10 --live-samples 3 --analyst llm_replay]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from datetime import date

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--years", type=int, default=10)
    parser.add_argument("--live-samples", type=int, default=3, help="live-graph decisions to time (0: skip)")
    parser.add_argument("--analyst", choices=("rules", "llm_replay"), default="rules",
                        help="llm_replay: also time llm_replay with every call a cache hit, as a ratio to rules")
    args = parser.parse_args()
    from machine import describe as describe_machine  # bench/machine.py, beside this file

    print(describe_machine())

    from trading_pipeline.backtest import runner
    from trading_pipeline.backtest.report import text_report
    from trading_pipeline.backtest.settings import BacktestSettings
    from trading_pipeline.backtest.statistics import summarize
    from trading_pipeline.core.strategies import parse_strategies

    symbols = [f"BENCH{i:02d}" for i in range(args.symbols)]
    strategies = parse_strategies(
        "strategies:\n  - name: bench\n    symbols: [" + ", ".join(symbols) + "]\n"
        "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n")
    end = date(2024, 12, 31)
    settings = BacktestSettings(strategy="bench", start=date(end.year - args.years + 1, 1, 1), end=end)

    started = time.perf_counter()
    loaded = runner.load(settings, strategies_file=strategies)
    loaded_at = time.perf_counter()
    result = runner.run_backtest(settings, loaded=loaded)
    ran_at = time.perf_counter()
    summary = summarize(result, result.extra_benchmarks)
    text_report(result, summary)
    wall = time.perf_counter() - started

    decisions = len(result.decisions)
    core = result.core_loop_seconds
    print(f"{args.symbols} symbols x {args.years} years x {{1d, 1w}}, rules analyst, full statistics")
    print(f"wall time {wall:.2f} s (bars {loaded_at - started:.2f} s, run {ran_at - loaded_at:.2f} s of which core "
          f"loop {core:.2f} s, statistics and report {wall - (ran_at - started):.2f} s)")
    cpu = result.core_loop_cpu_seconds
    print(f"core loop: {decisions:,} decisions ({result.analyses:,} per-timeframe analyses) = "
          f"{decisions / core:,.0f} decisions/s, {(decisions + result.analyses) / core:,.0f} decisions+analyses/s "
          f"(CPU time {cpu:.2f} s: {decisions / cpu:,.0f} decisions/s on a core of its own)")
    print(f"closed trades {summary['trades']['trades']:,}; result digest {summary['result_digest'][:16]}")

    if args.analyst == "llm_replay":
        replayed = llm_replay_run(settings, loaded)
        replay_seconds, replay_cpu = replayed.core_loop_seconds, replayed.core_loop_cpu_seconds
        replay_decisions = len(replayed.decisions)
        rules_rate, replay_rate = decisions / cpu, replay_decisions / replay_cpu
        same = sum((a.action, a.quantity) == (b.action, b.quantity)
                   for a, b in zip(result.decisions, replayed.decisions, strict=True))
        print(f"llm_replay, every call a cache hit: {replay_decisions:,} decisions in {replay_seconds:.2f} s "
              f"(CPU {replay_cpu:.2f} s) = {replay_rate:,.0f} decisions/s on a core of its own vs rules "
              f"{rules_rate:,.0f}/s: llm_replay at {replay_rate / rules_rate:.0%} of the rules analyst's speed "
              f"(wall: {replay_decisions / replay_seconds:,.0f}/s vs {decisions / core:,.0f}/s); {same:,} of "
              f"{decisions:,} decisions the same as the rules run's")

    if args.live_samples:
        per_decision = live_graph_seconds(args.live_samples)
        symbol_year = 252
        backtest_symbol_year = core / decisions * symbol_year
        print(f"live graph: {per_decision:.2f} s per decision (mean of {args.live_samples}, bars -> chart -> "
              f"analysis for both timeframes, then the decision); one symbol-year ({symbol_year} decisions) "
              f"~{per_decision * symbol_year:,.0f} s vs {backtest_symbol_year:.3f} s in the backtest's core loop: "
              f"{per_decision * symbol_year / backtest_symbol_year:,.0f}x")


def llm_replay_run(settings, loaded):
    """The result of `llm_replay` on `loaded` with every answer cached: a first replay stores a
    canned answer for each call, the timed one reads them back."""
    from trading_pipeline.adapters.model_calls import ModelResponseCacheRow
    from trading_pipeline.adapters.trading_db import session_factory
    from trading_pipeline.backtest import replay, runner

    replay_settings = settings.model_copy(update={"analyst": "llm_replay", "model": "bench-canned"})
    with tempfile.TemporaryDirectory() as folder:
        sessions = session_factory(f"sqlite:///{folder}/trading.db")
        filling = replay.ReplayAnalyst(replay_settings.model, {})
        filling.live.caller = canned = CannedCaller(filling.caller)
        analyze = filling.analyze

        def analyze_noting_the_bars(series, end, as_of):
            canned.bars = (series, end, as_of)
            return analyze(series, end, as_of)

        filling.analyze = analyze_noting_the_bars
        runner.run_backtest(replay_settings, loaded=loaded, analyst=filling)
        with sessions.begin() as session:
            session.add_all(ModelResponseCacheRow(
                cache_key=key, kind=kind, model=replay_settings.model, prompt_version=version, image_sha256=None,
                context_sha256="bench", content=content, vision=True, response_format="json_schema",
                call_id="bench") for key, (kind, version, content) in canned.stored.items())
        analyst = replay.analyst_for(replay_settings, sessions)
        result = runner.run_backtest(replay_settings, loaded=loaded, analyst=analyst)
    counters = result.analyst_counters
    assert counters["cache_misses"] == 0 and counters["cache_hits"] == len(canned.stored), counters
    return result


class CannedCaller:
    """A replay's model caller that answers every call with a canned, valid answer and keeps it by
    cache key: not a model, but one that answers as the rules analyst does, so the replay makes the
    rules run's decisions and the two loops do the same work but for the analyst. A chart analysis
    is the rules analyst's analysis of the same bars (`bars`: what is being analyzed), a
    consolidation the rules' consolidation of the two analyses the context holds."""

    def __init__(self, cache_only):
        self.cache_only = cache_only
        self.redactor = cache_only.redactor
        self.stored: dict[str, tuple[str, str, str]] = {}
        self.bars = None  # (series, end, as_of) of the chart analysis being made

    def complete(self, *, kind, symbol, timeframe, prompt, user_text, context_sha256, png, answer_model,
                 chart_sha256=None):
        import json

        from trading_pipeline.adapters.model_calls import CachedResponse

        key = self.cache_only.key(kind=kind, prompt=prompt, context_sha256=context_sha256, answer_model=answer_model,
                                  chart_sha256=chart_sha256)
        text = user_text()
        context = json.loads(text[text.index("\n{") + 1:])  # the context JSON ends the user message
        content = json.dumps(canned_consolidation(context) if "daily" in context else canned_analysis(*self.bars))
        self.stored[key] = (kind, prompt.version, content)
        self.cache_only.answers[key] = CachedResponse(content, True, "json_schema", "bench")
        return self.cache_only.complete(kind=kind, symbol=symbol, timeframe=timeframe, prompt=prompt,
                                        user_text=user_text, context_sha256=context_sha256, png=png,
                                        answer_model=answer_model, chart_sha256=chart_sha256)

    def settle(self, result, call_id, outcome):
        return None


def canned_analysis(series, end: int, as_of) -> dict:
    """The rules analyst's analysis of bars [0, end), as a model's answer."""
    from trading_pipeline.core import rules_analyst

    a = rules_analyst.analyze_at(series.columns, end, symbol=series.symbol, timeframe=series.timeframe,
                                 as_of=as_of, data_through=series.starts[end - 1])
    signal = a.signal.value if a.signal.value in ("BUY", "SELL", "HOLD") else "HOLD"
    return {"trend": a.trend.value, "support": a.support[:4], "resistance": a.resistance[:4],
            "indicators": [{"name": v.name, "reading": v.detail, "bullish": v.bullish} for v in a.votes] or
            [{"name": "atr", "reading": "no value yet", "bullish": False}],
            "setup": "3-of-4 rule", "signal": signal, "entry": a.entry, "stop": a.stop, "targets": a.targets,
            "confidence": a.confidence, "rationale": a.rationale[:2000]}


def canned_consolidation(context: dict) -> dict:
    """The rules' consolidation (core/decisions.py `consolidate`) of the two analyses in the context."""
    daily, weekly = context["daily"], context["weekly"]
    if weekly["signal"] == daily["signal"]:
        confidence = min(1.0, (daily["confidence"] + weekly["confidence"]) / 2 + 0.1)
    else:
        confidence = max(0.0, daily["confidence"] - 0.1)
    return {"action": daily["signal"], "entry": daily["entry"], "stop": daily["stop"], "targets": daily["targets"],
            "confidence": round(confidence, 2), "rationale": "The weekly does not oppose the daily."}


def live_graph_seconds(samples: int) -> float:
    import logging

    import dagster as dg

    from trading_pipeline.core import market_calendar
    from trading_pipeline.core.strategies import parse_strategies
    from trading_pipeline.definitions import build_definitions
    from trading_pipeline.graph.assets import AS_OF_TAG
    from trading_pipeline.graph.resources import resources_from_env

    strategies = parse_strategies("strategies:\n  - name: live\n    symbols: [BENCH00]\n"
                                  "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n")
    logging.getLogger("dagster").setLevel(logging.WARNING)
    sessions = market_calendar.calendar().sessions_in_range("2024-03-01", "2024-12-31")
    with tempfile.TemporaryDirectory() as folder:
        defs = build_definitions(strategies, resources_from_env({"TRADING_DATA_DIR": folder}))
        with dg.instance_for_test(temp_dir=folder) as instance:
            def decide_at(session) -> None:
                tags = {AS_OF_TAG: market_calendar.calendar().session_close(session).isoformat()}
                for timeframe in ("1d", "1w"):
                    key = dg.MultiPartitionKey({"symbol": "BENCH00", "timeframe": timeframe})
                    assert defs.resolve_job_def("analyze_timeframe").execute_in_process(
                        partition_key=key, instance=instance, tags=tags, raise_on_error=True).success
                assert defs.resolve_job_def("decide_and_order").execute_in_process(
                    partition_key="BENCH00", instance=instance, tags=tags, raise_on_error=True).success

            decide_at(sessions[0])  # warm: imports, Chromium, first numba call
            started = time.perf_counter()
            for session in sessions[1:samples + 1]:
                decide_at(session)
            return (time.perf_counter() - started) / samples


if __name__ == "__main__":
    main()
