"""`llm_replay`: the OpenAI analyst's answers replayed from the response cache, never the network.

The replay analyst *is* the live `OpenAIAnalyst` (same numeric context, prompts, validation,
plausibility checks, anonymization and consolidation) with only its model caller replaced:
`CacheOnlyCaller` looks the answer up in the response cache (loaded once) and a miss is an unusable
answer, so NO_TRADE, counted. No client is ever built and nothing is written to the call log.

A chart analysis is keyed on what the chart shows (`core/chart_spec.chart_spec_sha256`), live and
here alike, so replay never renders a chart and finds the answers live runs got (those that sent
the chart: with OPENAI_VISION=no a live run keys its answers without one). The analyst reads the
prepared series' arrays at each session (`OpenAIAnalyst.analyze_at`), as the rules analyst does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters import model_calls, openai_analyst
from trading_pipeline.adapters.llm.answers import Unusable, parse_cached, schema_for
from trading_pipeline.adapters.llm.calls import Answer
from trading_pipeline.adapters.llm.settings import DEFAULT_MODEL, OpenAISettings
from trading_pipeline.backtest.engine import PreparedSeries
from trading_pipeline.backtest.settings import BacktestSettings
from trading_pipeline.core.analysis import TimeframeAnalysis
from trading_pipeline.core.chart_spec import SeriesArrays


class CacheOnlyCaller:
    """Stands in for the live analyst's `ModelCaller`: the answer comes from the response cache
    (loaded once) or not at all. A miss raises `Unusable`, which the analyst turns into NO_TRADE."""

    def __init__(self, model: str, answers: dict[str, model_calls.CachedResponse]):
        self.model = model
        self.answers = answers
        self.redactor = model_calls.Redactor([])
        self.hits = 0
        self.misses = 0

    def key(self, *, kind: str, prompt, context_sha256: str, answer_model, chart_sha256: str | None) -> str:
        """The answer's cache key, as a live run that sent the chart keys it (ModelCaller.complete)."""
        return model_calls.cache_key(kind=kind, model=self.model, prompt_version=prompt.version,
                                     chart_sha256=chart_sha256, context_sha256=context_sha256,
                                     schema_sha256=schema_for(answer_model)[1])

    def complete(self, *, kind: str, symbol: str, timeframe: str | None, prompt, user_text, context_sha256: str,
                 png, answer_model, chart_sha256: str | None = None) -> Answer:
        key = self.key(kind=kind, prompt=prompt, context_sha256=context_sha256, answer_model=answer_model,
                       chart_sha256=chart_sha256)
        cached = self.answers.get(key)
        if cached is None:
            self.misses += 1
            raise Unusable(f"llm_replay: no cached {kind} answer of {self.model} for {symbol} {timeframe or ''} "
                           f"(key {key[:12]}): NO_TRADE")
        answer, notes = parse_cached(cached.content, answer_model)
        self.hits += 1
        return Answer(answer, cached.vision, cached.response_format, f"replay-{key[:12]}", cached=True, notes=notes,
                      model_note=model_calls.answered_model_note(self.model, cached.answered_model))

    def settle(self, result, call_id: str, outcome: str) -> str | None:
        return None  # a replay writes nothing to the call log

    def close(self) -> None:
        pass


class ReplayAnalyst:
    """The backtest loop's analyst for `llm_replay` (see the module docstring)."""

    def __init__(self, model: str, answers: dict[str, model_calls.CachedResponse], *, anonymize: bool = False):
        settings = OpenAISettings(
            api_key="", base_url="http://127.0.0.1:9/v1", model=model, vision="auto", timeout_s=1.0,
            max_output_tokens=1500, temperature=0.0, max_attempts=1, backoff_s=0.0, backoff_max_s=0.0,
            concurrency=1, price=None, limits=model_calls.BudgetLimits(), cache=True, anonymize=anonymize)
        self.live = openai_analyst.OpenAIAnalyst(settings, sessionmaker())
        self.caller = CacheOnlyCaller(model, answers)
        self.live.caller, self.live.redactor = self.caller, self.caller.redactor  # no client, no call log
        self.model = model
        self.anonymize = anonymize
        self.name = self.live.name + " (replay)"
        self.arrays: dict[int, tuple[PreparedSeries, SeriesArrays]] = {}

    def analyze(self, series: PreparedSeries, end: int, as_of: datetime) -> TimeframeAnalysis:
        arrays = self.arrays.get(id(series))
        if arrays is None or arrays[0] is not series:  # made once per series: the run reads it at every session
            arrays = self.arrays[id(series)] = (series, SeriesArrays(series.columns))
        return self.live.analyze_at(arrays[1], end, symbol=series.symbol, timeframe=series.timeframe,
                                    as_of=as_of, data_through=series.starts[end - 1])

    def consolidate(self, daily: TimeframeAnalysis, weekly: TimeframeAnalysis):
        return self.live.consolidate(daily, weekly)

    def counters(self) -> dict[str, int]:
        return {"cache_hits": self.caller.hits, "cache_misses": self.caller.misses}


def load_answers(sessions: sessionmaker[Session], model: str) -> dict[str, model_calls.CachedResponse]:
    """Every cached answer of `model`, read once (a backtest asks tens of thousands of times)."""
    with sessions() as session:
        rows = session.execute(select(model_calls.ModelResponseCacheRow).where(
            model_calls.ModelResponseCacheRow.model == model)).scalars()
        return {row.cache_key: model_calls.CachedResponse(row.content, row.vision, row.response_format, row.call_id,
                                                          row.answered_model)
                for row in rows}


def model_for(settings: BacktestSettings) -> str:
    return settings.model or (os.environ.get("OPENAI_MODEL") or DEFAULT_MODEL).strip()


def analyst_factory(settings: BacktestSettings, sessions: sessionmaker[Session]) -> Callable[[], ReplayAnalyst]:
    """Makes a fresh ReplayAnalyst per backtest run (its own hit and miss counts), all reading one
    load of the cached answers: a walk-forward makes a run per grid point and fold, and the cache
    may hold tens of thousands of answers."""
    model = model_for(settings)
    answers = load_answers(sessions, model)
    return lambda: ReplayAnalyst(model, answers, anonymize=settings.anonymized_charts)


def analyst_for(settings: BacktestSettings, sessions: sessionmaker[Session]) -> ReplayAnalyst:
    return analyst_factory(settings, sessions)()
