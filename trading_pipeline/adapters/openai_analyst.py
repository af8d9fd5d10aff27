"""The `openai` analyst: a vision model reads the chart PNG, code checks every number it gives.

Works with any OpenAI-compatible endpoint (OpenAI, Azure's /openai/v1, OpenRouter, vLLM, Ollama,
LM Studio) through Chat Completions:
- per symbol × timeframe, the chart PNG plus a compact numeric context (llm/request.py); the answer
  is requested as strict Structured Outputs and always validated here with pydantic (llm/answers.py);
- per symbol, a consolidation call (daily leads, weekly confirms) returns the decision proposal
  just as strictly; when the rules already fix the outcome, no call is made.

With OPENAI_ANONYMIZE_CHARTS=yes the model sees the chart and numbers with no symbol, no dates and
no absolute prices (core/chart_spec.py: last close = 100); its prices are mapped back to real ones
before they are checked, so everything downstream is in real prices.

Servers differ, so the calls adapt (llm/transport.py) and record what they did (in `llm_calls` and
in the analysis's rationale): `json_object` or the schema in the prompt for a server without
`json_schema`, the numeric context only for a server without vision (`vision: false`).

Fail closed: invalid JSON, a schema violation, a refusal, empty content, implausible numbers
(core/analysis_validation.py), exhausted retries, a used-up budget or any unexpected error give an
invalid analysis (NO_TRADE with the reason), never a BUY or SELL and never a silent HOLD.

Every HTTP attempt, cache hit and budget refusal is a row in `llm_calls` (llm/calls.py,
adapters/model_calls.py). `openai` is imported only when a client is built, so importing this
module stays light. The settings are `OpenAISettings` (llm/settings.py), importable from here.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.llm.answers import ConsolidationAnswer, TimeframeAnswer, Unusable
from trading_pipeline.adapters.llm.calls import Answer, ModelCaller
from trading_pipeline.adapters.llm.request import CHART_STATUS, Summary, consolidation_context, summary
from trading_pipeline.adapters.llm.series_context import timeframe_context
from trading_pipeline.adapters.llm.settings import OpenAISettings
from trading_pipeline.core import chart_spec
from trading_pipeline.core.analysis import NO_DATA, Action, ChartSource, IndicatorVote, TimeframeAnalysis, Trend
from trading_pipeline.core.analysis_validation import (
    NumericContext,
    consolidation_problems,
    context_problems,
    plausibility_problems,
    reward_risk,
)
from trading_pipeline.core.chart_figure import TIMEFRAME_NAMES
from trading_pipeline.core.chart_spec import IDENTITY, Rebase, SeriesArrays
from trading_pipeline.core.decisions import CONFIRM, LEAD, Consolidated
from trading_pipeline.core.decisions import consolidate as consolidate_by_rules
from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.core.risk import Proposal
from trading_pipeline.core.rules_analyst import Columns
from trading_pipeline.prompts import CONSOLIDATION, TIMEFRAME_ANALYSIS, load_prompt

__all__ = ["ANALYST_PREFIX", "Analyst", "OpenAIAnalyst", "OpenAISettings"]

ANALYST_PREFIX = "openai"


class Analyst(Protocol):
    """What the graph needs from an analyst; `rules` and `openai` both provide it."""

    name: str

    def analyze(self, indicators: MarketFrame, chart: ChartSource | None, png: bytes | None = None) -> TimeframeAnalysis: ...

    def consolidate(self, daily: TimeframeAnalysis, weekly: TimeframeAnalysis) -> Consolidated: ...


class OpenAIAnalyst:
    """Chart analysis and consolidation by an OpenAI-compatible model, fail-closed and accounted."""

    def __init__(self, settings: OpenAISettings, sessions: sessionmaker[Session], *, run_id: str | None = None,
                 client: Any = None, render_png: Callable[[Any], bytes] | None = None):
        self.settings = settings
        self.name = f"{ANALYST_PREFIX}:{settings.model}"
        self.run_id = run_id
        self.caller = ModelCaller(settings, sessions, run_id=run_id, client=client)
        self.redactor = self.caller.redactor
        # Renders the anonymized chart (a plotly figure to PNG bytes); default: a renderer of its own.
        self.render_png = render_png
        self._own_renderer: Any = None
        self._summaries: dict[int, tuple[TimeframeAnalysis, Rebase, Summary]] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None, sessions: sessionmaker[Session], *,
                 run_id: str | None = None, run_tags: Mapping[str, str] | None = None,
                 render_png: Callable[[Any], bytes] | None = None) -> OpenAIAnalyst:
        return cls(OpenAISettings.from_env(os.environ if environ is None else environ, run_tags), sessions,
                   run_id=run_id, render_png=render_png)

    def close(self) -> None:
        self.caller.close()
        if self._own_renderer is not None:
            self._own_renderer.close()

    # -- timeframe analysis --

    def analyze(self, indicators: MarketFrame, chart: ChartSource | None = None, png: bytes | None = None) -> TimeframeAnalysis:
        """One timeframe's analysis; an unusable answer is an invalid (NO_TRADE) analysis saying why."""
        if indicators.frame.empty:
            return self._invalid(indicators.symbol, indicators.timeframe, indicators.as_of, None, 0, chart,
                                 "the bars give no numeric context: there are no bars")
        return self.analyze_at(SeriesArrays(Columns(indicators.frame)), len(indicators.frame), symbol=indicators.symbol,
                               timeframe=indicators.timeframe, as_of=indicators.as_of,
                               data_through=indicators.last_bar_start.to_pydatetime(), chart=chart, png=png)

    def analyze_at(self, series: SeriesArrays, end: int, *, symbol: str, timeframe: str, as_of: datetime,
                   data_through: datetime, chart: ChartSource | None = None,
                   png: bytes | None = None) -> TimeframeAnalysis:
        """`analyze` of bars [0, end) of `series` (bar `end - 1` is the last one seen): the live graph
        passes a whole frame, the backtest one long series at each session (no pandas per call)."""
        prompt = load_prompt(TIMEFRAME_ANALYSIS)
        anonymize = self.settings.anonymize
        try:
            rebase = chart_spec.anonymizing(series.columns, end, timeframe) if anonymize else IDENTITY
            numbers, context = timeframe_context(series, end, symbol=symbol, timeframe=timeframe,
                                                 last_bar_start=data_through, rebase=rebase)
            chart_sha = chart_spec.chart_spec_sha256(series, end, symbol=symbol, timeframe=timeframe,
                                                     anonymize=anonymize)
        except Exception as error:  # noqa: BLE001 - fail closed on anything
            return self._invalid(symbol, timeframe, as_of, series.columns, end, chart,
                                 f"the bars give no numeric context: {error}", data_through)
        base = {"symbol": symbol, "timeframe": timeframe, "as_of": as_of, "data_through": data_through, "chart": chart,
                "prompt_version": prompt.version, "last_close": numbers.last_close,
                "atr": numbers.atr if math.isfinite(numbers.atr) else 0.0,
                "recent_high": numbers.recent_high, "recent_low": numbers.recent_low}
        problems = context_problems(numbers)
        if problems:
            return TimeframeAnalysis.invalid(reason="; ".join(problems), analyst=self.name, **base)
        if png is not None and chart is not None and hashlib.sha256(png).hexdigest() != chart.sha256:
            return TimeframeAnalysis.invalid(
                reason=f"the chart PNG given does not match the chart reference {chart.uri} (sha256 differs)",
                analyst=self.name, **base)
        image: bytes | Callable[[], bytes] | None = png
        if anonymize and png is not None:  # the model sees the anonymized chart, drawn only if a request is sent
            image = functools.partial(self._render_anonymized, series.columns, end, timeframe, png)
        result: Answer | None = None
        call_id = None
        try:
            result = self.caller.complete(
                kind=TIMEFRAME_ANALYSIS, symbol=symbol, timeframe=timeframe, prompt=prompt,
                user_text=lambda: prompt.user(symbol=context.fields[0],
                                              timeframe_name=TIMEFRAME_NAMES.get(timeframe, timeframe),
                                              chart_status=CHART_STATUS, context_json=context.as_json()),
                context_sha256=context.sha256(), png=image, chart_sha256=chart_sha, answer_model=TimeframeAnswer)
            call_id = result.call_id
            analysis = self._timeframe_analysis(result, numbers, base, rebase)
        except Unusable as error:
            call_id = call_id or error.call_id
            analysis = TimeframeAnalysis.invalid(reason=str(error), analyst=self.name, **base)
        except Exception as error:  # noqa: BLE001 - fail closed on anything, say what it was
            analysis = TimeframeAnalysis.invalid(
                reason=f"unexpected error in the openai analyst: {type(error).__name__}: {self.redactor.text(str(error))}",
                analyst=self.name, **base)
        if call_id is not None:
            outcome = "valid" if analysis.valid else f"invalid: {analysis.invalid_reason}"
            problem = self.caller.settle(result, call_id, outcome)
            if problem:
                analysis = TimeframeAnalysis.invalid(reason=problem, analyst=self.name, **base)
        return analysis

    def _weekly_summary(self, analysis: TimeframeAnalysis, rebase: Rebase) -> Summary:
        """`summary` of a weekly analysis, kept: it serves a week of daily decisions."""
        kept = self._summaries.get(id(analysis))
        if kept is None or kept[0] is not analysis or kept[1] != rebase:
            if len(self._summaries) >= 1024:  # two weeks of 500 symbols
                self._summaries.clear()
            kept = self._summaries[id(analysis)] = (analysis, rebase, summary(analysis, rebase))
        return kept[2]

    def _render_anonymized(self, columns: Columns, end: int, timeframe: str, png: bytes) -> bytes:
        """The anonymized chart of bars [0, end), drawn at the size of the real chart `png`."""
        from trading_pipeline.adapters.chart_render import ChartRenderer, png_size
        from trading_pipeline.core.chart_figure import build_chart_figure

        width, height = png_size(png)
        figure = build_chart_figure(chart_spec.anonymized_frame(columns, end, timeframe), chart_spec.ANONYMOUS_SYMBOL,
                                    timeframe, chart_spec.ANONYMOUS_AS_OF, width=width, height=height)
        if self.render_png is None:
            self._own_renderer = self._own_renderer or ChartRenderer().start()
            self.render_png = self._own_renderer.render_png
        return self.render_png(figure)

    def _timeframe_analysis(self, result: Answer, numbers: NumericContext, base: dict[str, Any],
                            rebase: Rebase) -> TimeframeAnalysis:
        answer: TimeframeAnswer = result.answer  # type: ignore[assignment]
        signal = Action(answer.signal)
        trade = signal in (Action.BUY, Action.SELL)
        # The model answered in the chart's units: its prices, in real ones, are what is checked and used.
        entry, stop, targets = (rebase.real(answer.entry), rebase.real(answer.stop), rebase.reals(answer.targets)) \
            if trade else (None, None, [])
        support, resistance = rebase.reals(answer.support), rebase.reals(answer.resistance)
        analyst = self.name if result.vision else f"{self.name} (no vision)"
        problems = plausibility_problems(signal, entry, stop, targets, numbers, support=support, resistance=resistance)
        if problems:
            raise Unusable(f"implausible numbers from the model ({signal.value}): " + "; ".join(problems))
        notes = []
        if trade:
            notes.append(_r_note(entry, stop, targets[0], rebase))
        if rebase.anonymized:
            notes.append(ANONYMIZED_NOTE)
        if not result.vision:
            notes.append("numeric context only: the model did not see the chart")
        notes.extend(result.how_obtained())
        rationale = f"{answer.setup}: {answer.rationale}" + "".join(f" [{n}]" for n in notes)
        # model_validate of one dict: the constructor's validation without repacking its keyword arguments.
        return TimeframeAnalysis.model_validate(dict(
            signal=signal, trend=Trend(answer.trend), confidence=answer.confidence,
            entry=entry, stop=stop, targets=targets, support=sorted(support), resistance=sorted(resistance),
            # The readings passed the answer's strict schema (str, bool, str): built as votes directly.
            votes=[IndicatorVote(i.name, i.bullish, i.reading) for i in answer.indicators],
            rationale=rationale, analyst=analyst, vision=result.vision, **base))

    def _invalid(self, symbol: str, timeframe: str, as_of: datetime, columns: Columns | None, end: int,
                 chart: ChartSource | None, reason: str, data_through: datetime | None = None) -> TimeframeAnalysis:
        def read(name: str, how: Callable[[Any], Any]) -> float:
            return float(how(columns[name][:end])) if columns is not None and end and name in columns else 0.0

        return TimeframeAnalysis.invalid(
            reason=reason, analyst=self.name, symbol=symbol, timeframe=timeframe, as_of=as_of,
            data_through=data_through or NO_DATA, chart=chart, prompt_version=load_prompt(TIMEFRAME_ANALYSIS).version,
            last_close=read("close", lambda a: a[-1]), atr=0.0, recent_high=read("high", np.nanmax),
            recent_low=read("low", np.nanmin))

    # -- consolidation --

    def consolidate(self, daily: TimeframeAnalysis, weekly: TimeframeAnalysis) -> Consolidated:
        """The decision proposal for one symbol; any failure is a NO_TRADE proposal saying why."""
        try:
            return self._consolidate(daily, weekly)
        except Exception as error:  # noqa: BLE001 - fail closed on anything
            return _no_trade(f"unexpected error in the openai consolidation: {type(error).__name__}: "
                             f"{self.redactor.text(str(error))}")

    def _consolidate(self, daily: TimeframeAnalysis, weekly: TimeframeAnalysis) -> Consolidated:
        if daily.timeframe != LEAD or weekly.timeframe != CONFIRM or daily.symbol != weekly.symbol:
            return _no_trade(f"consolidation needs the {LEAD} and {CONFIRM} analyses of one symbol; got "
                             f"{daily.symbol} {daily.timeframe} and {weekly.symbol} {weekly.timeframe}")
        by_rules = consolidate_by_rules(daily, weekly)
        if by_rules.proposal.action not in (Action.BUY, Action.SELL):
            # An invalid analysis (NO_TRADE), no daily setup or a weekly opposing it (HOLD): the
            # outcome is fixed by the rules, a model call could not change it and is not made.
            return Consolidated(by_rules.proposal, by_rules.confirmation,
                                by_rules.rationale + " [no consolidation call: the outcome does not depend on it]")
        prompt = load_prompt(CONSOLIDATION)
        # Anonymized: the model reads both analyses rebased so the daily last close is 100, no symbol or date.
        rebase = chart_spec.price_rebase(daily.last_close) if self.settings.anonymize else IDENTITY
        numbers, context = consolidation_context(daily, weekly, rebase, self._weekly_summary(weekly, rebase))
        try:
            result = self.caller.complete(kind=CONSOLIDATION, symbol=daily.symbol, timeframe=None, prompt=prompt,
                                          user_text=lambda: prompt.user(
                                              symbol=context.fields[0], daily_signal=daily.signal.value,
                                              weekly_signal=weekly.signal.value, context_json=context.as_json()),
                                          context_sha256=context.sha256(), png=None,
                                          answer_model=ConsolidationAnswer)
        except Unusable as error:
            reason = f"the consolidation call gave nothing usable: {error}"
            problem = self.caller.settle(None, error.call_id, f"invalid: {error}") if error.call_id else None
            return _no_trade(problem or reason)
        answer: ConsolidationAnswer = result.answer  # type: ignore[assignment]
        action = Action(answer.action)
        trade = action in (Action.BUY, Action.SELL)
        entry, stop, targets = (rebase.real(answer.entry), rebase.real(answer.stop), rebase.reals(answer.targets)) \
            if trade else (None, None, [])
        problems = consolidation_problems(action, daily.signal, weekly.signal) + \
            plausibility_problems(action, entry, stop, targets, numbers)
        who = f"{self.name}, prompt {prompt.version}"
        if problems:
            reason = f"the consolidation proposal is implausible ({action.value}): " + "; ".join(problems)
            return _no_trade(self.caller.settle(result, result.call_id, f"invalid: {reason}") or reason)
        problem = self.caller.settle(result, result.call_id, "valid")
        if problem:
            return _no_trade(problem)
        lead = daily.signal
        notes = "".join(f" [{n}]" for n in result.how_obtained())
        if not trade:
            return Consolidated(
                Proposal(Action.HOLD, None, None, [], answer.confidence), "declined by the consolidation",
                f"HOLD: the consolidation declined the daily {lead.value} ({who}): {answer.rationale}{notes} "
                f"(daily: {daily.rationale} | weekly: {weekly.rationale})")
        confirmation = "confirmed (strong)" if weekly.signal == lead else "partially confirmed (weekly neutral)"
        r = reward_risk(entry, stop, targets[0])
        anonymized = f" [{ANONYMIZED_NOTE}]" if rebase.anonymized else ""
        return Consolidated(
            Proposal(action, entry, stop, targets, answer.confidence), confirmation,
            f"{action.value} led by the daily analysis, {confirmation} by the weekly; consolidation ({who}): "
            f"{answer.rationale} [R recomputed from the prices: {r:.2f}]{anonymized}{notes} "
            f"(daily: {daily.rationale} | weekly: {weekly.rationale})")


ANONYMIZED_NOTE = ("anonymized: the model saw no symbol, dates or absolute prices (last close = 100); its prices "
                   "were mapped back")


def _r_note(entry: float, stop: float, target: float, rebase: Rebase) -> str:
    r = reward_risk(entry, stop, target)
    if rebase.anonymized:  # the rationale is shown to the consolidation call: no real prices in it
        return f"R recomputed from the prices: {r:.2f}"
    return f"R recomputed from the prices: |{target:.2f} − {entry:.2f}| / |{entry:.2f} − {stop:.2f}| = {r:.2f}"


def _no_trade(reason: str) -> Consolidated:
    return Consolidated(Proposal(Action.NO_TRADE, None, None, [], 0.0), "none", f"NO_TRADE: {reason}")
