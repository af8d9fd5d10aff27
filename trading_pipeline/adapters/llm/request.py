"""What is sent to the model: the numeric context, the chart image and the request body.

Per symbol × timeframe the chart PNG goes as an `image_url` data URL with a compact numeric context
(the last close, ATR, recent range, latest indicators and the bounds the answer must respect); the
consolidation gets both analyses' summaries and the daily numbers. With OPENAI_ANONYMIZE_CHARTS the
context is in the anonymized chart's units (core/chart_spec.py: rebased prices, no symbol, no date).
The context is read from a series' arrays at a position, the same way live and in a backtest. The
answer is requested with
`response_format={"type": "json_schema", ..., "strict": true}`, or, on a server without it, with the
schema in the prompt. The request as recorded in `llm_calls` carries the image's sha256, not its base64.

A response cache key hashes a context's contents and CONTEXT_FORMAT_VERSION, not its text: a change
in how a context is written needs a new CONTEXT_FORMAT_VERSION (a test pins the text to it).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from pydantic import BaseModel

from trading_pipeline.adapters.llm.settings import OpenAISettings
from trading_pipeline.adapters.llm.transport import Features
from trading_pipeline.adapters.model_calls import canonical_json
from trading_pipeline.core import chart_spec, rules_analyst
from trading_pipeline.core.analysis import TimeframeAnalysis
from trading_pipeline.core.analysis_validation import NumericContext
from trading_pipeline.core.chart_spec import IDENTITY, Rebase, SeriesArrays
from trading_pipeline.core.market_calendar import isoformat
from trading_pipeline.core.risk import RANGE_TOLERANCE_ATR
from trading_pipeline.prompts import Prompt

# What a 1920×1080 PNG costs as image input at "high" detail on OpenAI's vision models (85 + 6 × 170),
# used only to estimate a call before it is made (budget reservation, servers that report no usage).
IMAGE_TOKENS_ESTIMATE = 1105
CHARS_PER_TOKEN = 3.5
RECENT_CLOSES = 5
INDICATOR_COLUMNS = ("sma_20", "sma_50", "sma_200", "rsi_14", "macd", "macd_signal", "macd_hist", "bb_upper",
                     "bb_middle", "bb_lower", "atr_14", "supertrend", "supertrend_direction", "volume")
CHART_STATUS = "{chart_status}"  # filled in per attempt: the image may be dropped for a server without vision


def snapped(values: Sequence[float] | np.ndarray, price: float, is_price: np.ndarray) -> np.ndarray:
    """The values on a binary grid: those in price units (`is_price`: prices, ATR, MACD, ...) on a
    grid of 2^-20 of `price` (the last close), the others on a grid of 2^-20 of their own size.

    An indicator's last digits depend on how much history came before it (the live graph reads two
    years, a backtest its whole window: ~1e-10 of the price apart), and an average of cent prices
    often lies exactly on a decimal rounding boundary (519.8245): written to 6 digits directly, such
    a value reads 519.824 in one run and 519.825 in the other. Decimal values lie anywhere on a
    binary grid, rarely within 1e-10 of its boundaries, so both runs snap to the same value and
    write the same. A price-unit value near zero (MACD) is snapped on the price's grid: on its own,
    its noise would be as large as the grid."""
    values = np.asarray(values, dtype=np.float64)
    # Relative grid: the mantissa rounded to 20 bits, half up on the bit pattern (a carry out of the
    # mantissa moves the exponent, as it should).
    relative = ((values.view(np.uint64) + _HALF_DROPPED) & _KEPT).view(np.float64)
    if not (math.isfinite(price) and price > 0):
        return relative
    step = math.ldexp(1.0, math.frexp(price)[1] - 21)  # a power of two: the scaling is exact
    return np.where(is_price, np.rint(values / step) * step, relative)  # rint: np.round's own, without its wrapper


_DROPPED_BITS = 52 - 20
_HALF_DROPPED = np.uint64(1 << (_DROPPED_BITS - 1))
_KEPT = np.uint64(~((1 << _DROPPED_BITS) - 1) & 0xFFFF_FFFF_FFFF_FFFF)


def written(numbers: np.ndarray) -> list[float]:
    """Snapped numbers as the context writes them: 6 significant digits."""
    return [float(f"{x:.6g}") for x in numbers.tolist()]


# How the contexts are written. A context is keyed by its contents, not by its text (RequestContext),
# so a change in how the text is written must change this, and with it every response cache key
# (trading_pipeline_tests/adapters/openai/test_context_format.py pins the text to it and fails,
# saying so, when the text changes alone). Its value is what this module's text hashed to when the
# key hashed the text, so the keys made before stayed the same.
CONTEXT_FORMAT_VERSION = "a082384b1c35f604"


@dataclass(frozen=True)
class RequestContext:
    """The numeric context of one request, keyed without writing it.

    `fields` is everything in it but the numbers (hashable, with a stable repr), `numbers` the
    numbers, snapped; `write` makes the context (a JSON object) from them. The response cache key
    hashes fields and numbers (`sha256`): a backtest asks tens of thousands of times and never
    sends a request, so the text is written only when a request is sent (`as_json`)."""

    fields: tuple[Any, ...]
    numbers: np.ndarray
    write: Callable[[tuple[Any, ...], list[float]], dict[str, Any]]

    def sha256(self) -> str:
        digest = hashlib.sha256(f"{CONTEXT_FORMAT_VERSION}|{self.fields!r}|".encode())
        digest.update(self.numbers)  # contiguous (a row of a C-ordered matrix, or its own array): its bytes, uncopied
        return digest.hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return self.write(self.fields, written(self.numbers))

    def as_json(self) -> str:
        return canonical_json(self.as_dict())


def _bounds(numbers: NumericContext) -> list[float]:
    """The bounds the answer's prices must respect (the same ones the validation applies):
    entry tolerance, entry range, stop and target range."""
    tolerance = numbers.entry_tolerance()
    return [tolerance, numbers.last_close - tolerance, numbers.last_close + tolerance, *numbers.price_bounds()]


def _constraints(bounds: list[float]) -> dict[str, Any]:
    """The context's `constraints`, from the numbers of `_bounds`."""
    return {"entry_tolerance": bounds[0], "entry_range": bounds[1:3], "range_tolerance_atr": RANGE_TOLERANCE_ATR,
            "stop_and_target_range": bounds[3:5]}


def timeframe_context(series: SeriesArrays, end: int, *, symbol: str, timeframe: str, last_bar_start: datetime,
                      rebase: Rebase = IDENTITY) -> tuple[NumericContext, RequestContext]:
    """The numbers a timeframe answer is checked against (real prices), and the context the model
    is sent (in the chart's units: rebased, with no symbol or date, when `rebase` anonymizes), for
    bars [0, end) of `series`: the live analyst passes a whole frame, the backtest a position in a
    long series."""
    names, rows, complete = series.derived(("context rows", timeframe),
                                           functools.partial(context_rows, timeframe=timeframe))
    row = rows[end - 1]
    numbers = NumericContext(*row[:6].tolist())
    shown = numbers if not rebase.anonymized else NumericContext(*(row[:6] * rebase.price).tolist())
    latest = row[6:]
    if not complete[end - 1]:  # warm-up: an indicator without a value is left out
        present = ~np.isnan(latest)
        names, latest = tuple(n for n, p in zip(names, present, strict=True) if p), latest[present]
    closes = series.columns["close"][max(0, end - RECENT_CLOSES):end]
    if rebase.anonymized:
        latest, closes = latest * rebase.factors(names), closes * rebase.price
    values = np.concatenate(([shown.last_close, shown.atr, shown.recent_high, shown.recent_low, shown.chart_high,
                              shown.chart_low, *_bounds(shown)], latest, closes))
    is_price = _timeframe_prices(names, len(closes))
    fields = (chart_spec.ANONYMOUS_SYMBOL if rebase.anonymized else symbol, timeframe,
              isoformat(chart_spec.ANONYMOUS_LAST_START if rebase.anonymized else last_bar_start),
              end - chart_spec.shown_start(timeframe, end), names)
    return numbers, RequestContext(fields, snapped(values, shown.last_close, is_price), _write_timeframe_context)


@functools.lru_cache(maxsize=64)
def _timeframe_prices(names: tuple[str, ...], closes: int) -> np.ndarray:
    """Which numbers of a timeframe context are in price units: the 11 first, the indicators that
    are, the closes."""
    return np.array([True] * 11 + [name in chart_spec.PRICE_COLUMNS for name in names] + [True] * closes)


def context_rows(series: SeriesArrays, timeframe: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """A timeframe context's numbers at every position, made once per series: per bar, the last
    close, ATR, recent high and low (as `rules_analyst.numeric_context_at` reads them), the high and
    low of the bars the chart shows, then the latest value of each of `names` (INDICATOR_COLUMNS
    the series has); and whether each bar has a value for all of `names`."""
    columns, recent, shown = series.columns, rules_analyst.LEVEL_LOOKBACKS[-1], chart_spec.bars_shown(timeframe)
    names = tuple(name for name in INDICATOR_COLUMNS if name in columns)
    rows = np.column_stack([
        columns["close"], columns["atr_14"],
        chart_spec.rolling(columns["high"], recent, np.maximum), chart_spec.rolling(columns["low"], recent, np.minimum),
        chart_spec.rolling(columns["high"], shown, np.maximum), chart_spec.rolling(columns["low"], shown, np.minimum),
        *(columns[name] for name in names)])
    return names, rows, ~np.isnan(rows[:, 6:]).any(axis=1)


def _write_timeframe_context(fields: tuple[Any, ...], n: list[float]) -> dict[str, Any]:
    symbol, timeframe, last_bar_start, bars_in_chart, names = fields
    return {
        "symbol": symbol,
        "timeframe": timeframe,
        "last_bar_start": last_bar_start,
        "bars_in_chart": bars_in_chart,
        "last_close": n[0],
        "recent_closes": n[11 + len(names):],
        "atr_14": n[1],
        "recent_bars": rules_analyst.LEVEL_LOOKBACKS[-1],
        "recent_high": n[2],
        "recent_low": n[3],
        "chart_high": n[4],
        "chart_low": n[5],
        "indicators": dict(zip(names, n[11:11 + len(names)], strict=True)),
        "constraints": _constraints(n[6:11]),
    }


@dataclass(frozen=True)
class Summary:
    """An analysis as the consolidation reads it: `fields` (all but the numbers, as `_write_summary`
    reads them), `numbers` (in the chart's units) and the sha256 of the fields."""

    fields: tuple[Any, ...]
    numbers: list[float]
    sha256: str


_vote_fields = operator.attrgetter("name", "bullish", "detail")


def summary(a: TimeframeAnalysis, rebase: Rebase) -> Summary:
    prices = [a.last_close, *([] if a.entry is None else [a.entry]), *([] if a.stop is None else [a.stop]),
              *a.targets, *a.support, *a.resistance]
    fields = (a.timeframe, a.signal.value, a.trend.value, a.entry is not None, a.stop is not None, len(a.targets),
              len(a.support), len(a.resistance), tuple(map(_vote_fields, a.votes)), a.rationale,
              None if rebase.anonymized else isoformat(a.data_through))
    numbers = [a.confidence, a.atr, *prices]
    if rebase.anonymized:
        numbers[1:] = [x * rebase.price for x in numbers[1:]]
    return Summary(fields, numbers, hashlib.sha256(repr(fields).encode()).hexdigest())


def _write_summary(fields: tuple[Any, ...], n: list[float]) -> dict[str, Any]:
    timeframe, signal, trend, has_entry, has_stop, targets, support, resistance, votes, rationale, data_through = fields
    prices = iter(n[2:])
    last_close = next(prices)
    entry = next(prices) if has_entry else None
    stop = next(prices) if has_stop else None
    written_summary = {
        "timeframe": timeframe, "signal": signal, "trend": trend, "confidence": n[0], "entry": entry, "stop": stop,
        "targets": [next(prices) for _ in range(targets)], "support": [next(prices) for _ in range(support)],
        "resistance": [next(prices) for _ in range(resistance)],
        "indicators": [{"name": name, "bullish": bullish, "reading": reading} for name, bullish, reading in votes],
        "last_close": last_close, "atr_14": n[1], "rationale": rationale}
    if data_through is not None:
        written_summary["data_through"] = data_through
    return written_summary


def consolidation_context(daily: TimeframeAnalysis, weekly: TimeframeAnalysis, rebase: Rebase = IDENTITY,
                          weekly_summary: Summary | None = None) -> tuple[NumericContext, RequestContext]:
    """The daily numbers the proposal is checked against (real prices), and the context the model
    is sent (rebased, with no symbol or date, when `rebase` anonymizes). `weekly_summary` is
    `summary(weekly, rebase)` when the caller kept it (a weekly analysis serves a week of decisions)."""
    numbers = NumericContext(daily.last_close, daily.atr, daily.recent_high, daily.recent_low)
    shown = numbers if not rebase.anonymized else NumericContext(
        *(rebase.shown(x) for x in (numbers.last_close, numbers.atr, numbers.recent_high, numbers.recent_low)))
    daily_summary, weekly_summary = summary(daily, rebase), weekly_summary or summary(weekly, rebase)
    fields = (chart_spec.ANONYMOUS_SYMBOL if rebase.anonymized else daily.symbol, daily_summary.sha256,
              len(daily_summary.numbers), weekly_summary.sha256)
    values = [shown.last_close, shown.atr, shown.recent_high, shown.recent_low, *_bounds(shown),
              *daily_summary.numbers, *weekly_summary.numbers]
    is_price = _consolidation_prices(len(daily_summary.numbers), len(weekly_summary.numbers))
    return numbers, RequestContext(fields, snapped(values, shown.last_close, is_price), functools.partial(
        _write_consolidation_context, daily_summary.fields, weekly_summary.fields))


@functools.lru_cache(maxsize=64)
def _consolidation_prices(daily: int, weekly: int) -> np.ndarray:
    """Which numbers of a consolidation context are in price units: all but the two confidences."""
    is_price = np.ones(9 + daily + weekly, dtype=bool)
    is_price[[9, 9 + daily]] = False
    return is_price


def _write_consolidation_context(daily_fields: tuple[Any, ...], weekly_fields: tuple[Any, ...],
                                 fields: tuple[Any, ...], n: list[float]) -> dict[str, Any]:
    symbol, _, daily_count, _ = fields
    return {
        "symbol": symbol,
        "daily": _write_summary(daily_fields, n[9:9 + daily_count]),
        "weekly": _write_summary(weekly_fields, n[9 + daily_count:]),
        "daily_numbers": {"last_close": n[0], "atr_14": n[1], "recent_high": n[2], "recent_low": n[3]},
        "constraints": _constraints(n[4:9]),
    }


def estimate_tokens(prompt: Prompt, user_text: str, send_image: bool, max_output_tokens: int) -> int:
    """What a call may cost at most, before it is made: text by length, the image, the whole output."""
    return int((len(prompt.system) + len(user_text)) / CHARS_PER_TOKEN) + \
        (IMAGE_TOKENS_ESTIMATE if send_image else 0) + max_output_tokens


def build_request(settings: OpenAISettings, url: str, prompt: Prompt, user_text: str, png: bytes | None,
                  image_sha: str | None, schema: dict[str, Any], features: Features,
                  answer_model: type[BaseModel]) -> tuple[dict, dict]:
    """(body sent, request recorded): the record carries the image's sha256 instead of its base64."""
    system = prompt.system
    if features.response_format != "json_schema":
        system += ("\n\nReply with a single JSON object (no prose, no code fence) that validates against this "
                   "JSON schema:\n" + json.dumps(schema, separators=(",", ":")))
    text = user_text.replace(CHART_STATUS, "attached" if png is not None else
                             "not available (use the numeric context only)")

    # A server with no system turn (see transport._NO_SYSTEM_ROLE) gets the instructions first in the
    # one user message: the same words, in the order the model would have read them.
    user = text if features.system_role else f"{system}\n\n{text}"

    def messages(image_url: str | None) -> list[dict]:
        # Without an image the text goes as a plain string: content parts are optional in the API and
        # some text-only servers take only a string.
        content: str | list[dict] = user if image_url is None else [
            {"type": "text", "text": user}, {"type": "image_url", "image_url": {"url": image_url}}]
        if not features.system_role:
            return [{"role": "user", "content": content}]
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    body: dict[str, Any] = {"model": settings.model, features.max_tokens_param: settings.max_output_tokens}
    if settings.temperature is not None and features.send_temperature:
        body["temperature"] = settings.temperature
    if features.response_format == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": answer_model.__name__.lower(), "strict": True, "schema": schema}}
    elif features.response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    record = {"method": "POST", "url": url,
              "headers": {"Authorization": "Bearer [REDACTED]", "Content-Type": "application/json"},
              "body": {**body, "messages": messages(
                  None if png is None else f"[image omitted: sha256 {image_sha}, {len(png)} bytes]")}}
    body["messages"] = messages(None if png is None else
                                "data:image/png;base64," + base64.b64encode(png).decode("ascii"))
    return body, record
