"""`llm_replay`: the OpenAI analyst's answers replayed from the response cache, never the network.

The replay analyst *is* the live `OpenAIAnalyst` (same numeric context, prompts, validation,
plausibility checks and consolidation) with only its model caller replaced: `CacheOnlyCaller`
looks the answer up in the response cache (loaded once) and a miss is an unusable answer, so
NO_TRADE, counted. No client is ever built and nothing is written to the call log.

The cache key of a chart analysis uses `chart_spec_sha256` (the chart's data and figure spec)
where the live analyst used the PNG's sha256, so replay never renders a chart. For live answers
to be found here, the live analyst must key its timeframe analyses the same way (one line in
`ModelCaller.complete`: `image_sha256` from `chart_spec_sha256(indicators)` rather than the PNG).
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters import model_calls, openai_analyst
from trading_pipeline.adapters.llm.answers import Unusable, parse_answer, schema_for
from trading_pipeline.adapters.llm.calls import Answer
from trading_pipeline.adapters.llm.settings import DEFAULT_MODEL, OpenAISettings
from trading_pipeline.backtest.engine import PreparedSeries
from trading_pipeline.backtest.settings import BacktestSettings
from trading_pipeline.core import chart_figure
from trading_pipeline.core.analysis import TimeframeAnalysis
from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.prompts import TIMEFRAME_ANALYSIS

ANONYMOUS_SYMBOL = "ASSET"
# A fixed run of business days the anonymized chart's bars are placed on: the dates say nothing.
_ANONYMOUS_END = pd.Timestamp("2001-01-01 14:30", tz="UTC")
CHART_SPEC_VERSION = 1


def anonymized(frame: pd.DataFrame) -> pd.DataFrame:
    """The chart's frame with no absolute prices or dates: prices (and price-valued indicators)
    rebased so the last close is 100, bars placed on a fixed run of business days."""
    last_close = float(frame["close"].iloc[-1])
    price_like = [c for c in frame.columns if c in ("open", "high", "low", "close", "bb_upper", "bb_middle",
                                                     "bb_lower", "supertrend", "atr_14", "macd", "macd_signal",
                                                     "macd_hist") or c.startswith("sma_")]
    rebased = frame.copy()
    # Rounded: a chart shows no more, and the same shape at another price level keys the same.
    rebased[price_like] = (frame[price_like] * (100.0 / last_close)).round(6)
    rebased.index = pd.bdate_range(end=_ANONYMOUS_END, periods=len(frame), freq="B", tz="UTC", name="time")
    return rebased


def chart_spec_sha256(indicators: MarketFrame, *, anonymize: bool = False, width: int = 1920,
                      height: int = 1080) -> str:
    """sha256 of what the chart shows (the bars and indicators drawn, symbol, timeframe, size and
    the figure code's version): equal specs render equal charts, so an answer given on one chart
    is found again without rendering it."""
    shown = indicators.frame.tail(chart_figure.DEFAULT_BARS_SHOWN.get(indicators.timeframe,
                                                                      chart_figure.FALLBACK_BARS_SHOWN))
    if anonymize:
        shown = anonymized(shown)
    digest = hashlib.sha256()
    digest.update(repr((CHART_SPEC_VERSION, _figure_code_version(), ANONYMOUS_SYMBOL if anonymize
                        else indicators.symbol, indicators.timeframe, width, height, list(shown.columns))).encode())
    digest.update(np.ascontiguousarray(shown.index.as_unit("ns").asi8).tobytes())
    digest.update(np.ascontiguousarray(shown.to_numpy(np.float64)).tobytes())
    return digest.hexdigest()


def _figure_code_version() -> str:
    from pathlib import Path

    return hashlib.sha256(Path(chart_figure.__file__).read_bytes()).hexdigest()[:16]


class CacheOnlyCaller:
    """Stands in for the live analyst's `ModelCaller`: the answer comes from the response cache
    (loaded once) or not at all. A miss raises `Unusable`, which the analyst turns into NO_TRADE."""

    def __init__(self, model: str, answers: dict[str, model_calls.CachedResponse]):
        self.model = model
        self.answers = answers
        self.redactor = model_calls.Redactor([])
        self.chart_sha: str | None = None  # the chart being analyzed, set by ReplayAnalyst
        self.hits = 0
        self.misses = 0

    def complete(self, *, kind: str, symbol: str, timeframe: str | None, prompt, user_text: str,
                 png: bytes | None, context: dict[str, Any], answer_model) -> Answer:
        _, schema_sha = schema_for(answer_model)
        key, _ = model_calls.cache_key(kind=kind, model=self.model, prompt_version=prompt.version,
                                       image_sha256=self.chart_sha if kind == TIMEFRAME_ANALYSIS else None,
                                       context=context, schema_sha256=schema_sha)
        cached = self.answers.get(key)
        if cached is None:
            self.misses += 1
            raise Unusable(f"llm_replay: no cached {kind} answer of {self.model} for {symbol} {timeframe or ''} "
                           f"(key {key[:12]}): NO_TRADE")
        answer, notes = parse_answer(cached.content, answer_model)
        self.hits += 1
        return Answer(answer, cached.vision, cached.response_format, f"replay-{key[:12]}", cached=True, notes=notes)

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
            concurrency=1, price=None, limits=model_calls.BudgetLimits(), cache=True)
        self.live = openai_analyst.OpenAIAnalyst(settings, sessionmaker())
        self.caller = CacheOnlyCaller(model, answers)
        self.live.caller, self.live.redactor = self.caller, self.caller.redactor  # no client, no call log
        self.model = model
        self.anonymize = anonymize
        self.name = self.live.name + " (replay)"

    def analyze(self, series: PreparedSeries, end: int, as_of: datetime) -> TimeframeAnalysis:
        frame = MarketFrame(series.symbol, series.timeframe, as_of, "backtest", series.frame.iloc[:end])
        self.caller.chart_sha = chart_spec_sha256(frame, anonymize=self.anonymize)
        return self.live.analyze(frame)

    def consolidate(self, daily: TimeframeAnalysis, weekly: TimeframeAnalysis):
        return self.live.consolidate(daily, weekly)

    def counters(self) -> dict[str, int]:
        return {"cache_hits": self.caller.hits, "cache_misses": self.caller.misses}


def load_answers(sessions: sessionmaker[Session], model: str) -> dict[str, model_calls.CachedResponse]:
    """Every cached answer of `model`, read once (a backtest asks tens of thousands of times)."""
    with sessions() as session:
        rows = session.execute(select(model_calls.ModelResponseCacheRow).where(
            model_calls.ModelResponseCacheRow.model == model)).scalars()
        return {row.cache_key: model_calls.CachedResponse(row.content, row.vision, row.response_format, row.call_id)
                for row in rows}


def model_for(settings: BacktestSettings) -> str:
    return settings.model or (os.environ.get("OPENAI_MODEL") or DEFAULT_MODEL).strip()


def analyst_for(settings: BacktestSettings, sessions: sessionmaker[Session]) -> ReplayAnalyst:
    model = model_for(settings)
    return ReplayAnalyst(model, load_answers(sessions, model), anonymize=settings.anonymized_charts)
