"""What is sent to the model: the numeric context, the chart image and the request body.

Per symbol × timeframe the chart PNG goes as an `image_url` data URL with a compact numeric context
(the last close, ATR, recent range, latest indicators and the bounds the answer must respect); the
consolidation gets both analyses' summaries and the daily numbers. With OPENAI_ANONYMIZE_CHARTS the
context is in the anonymized chart's units (core/chart_spec.py: rebased prices, no symbol, no date).
The context is read from a series' arrays at a position, the same way live and in a backtest. The
answer is requested with
`response_format={"type": "json_schema", ..., "strict": true}`, or, on a server without it, with the
schema in the prompt. The request as recorded in `llm_calls` carries the image's sha256, not its base64.
"""

from __future__ import annotations

import base64
import json
import math
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from trading_pipeline.adapters.llm.settings import OpenAISettings
from trading_pipeline.adapters.llm.transport import Features
from trading_pipeline.core import chart_spec, rules_analyst
from trading_pipeline.core.analysis import TimeframeAnalysis
from trading_pipeline.core.analysis_validation import NumericContext
from trading_pipeline.core.chart_spec import IDENTITY, Rebase
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


def _round(x: float) -> float:
    """6 significant digits, read off the value snapped to a binary grid of 2^-20 of its size first.

    An indicator's last digits depend on how much history came before it (the live graph reads two
    years, a backtest its whole window: ~1e-10 apart), and an average of cent prices often lies
    exactly on a decimal rounding boundary (519.8245): rounded directly, such a value prints as
    519.824 in one run and 519.825 in the other, and the response cache key differs. Decimal values
    lie anywhere on the binary grid, rarely within 1e-10 of its boundaries: both runs print the same."""
    if not math.isfinite(x) or x == 0:
        return x
    mantissa, exponent = math.frexp(x)
    return float(f"{math.ldexp(round(mantissa * _GRID) / _GRID, exponent):.6g}")


_GRID = float(2 ** 20)


def _constraints(numbers: NumericContext) -> dict[str, Any]:
    """The bounds the answer's prices must respect (the same ones the validation applies)."""
    tolerance = numbers.entry_tolerance()
    low, high = numbers.price_bounds()
    return {
        "entry_tolerance": _round(tolerance),
        "entry_range": [_round(numbers.last_close - tolerance), _round(numbers.last_close + tolerance)],
        "range_tolerance_atr": RANGE_TOLERANCE_ATR,
        "stop_and_target_range": [_round(low), _round(high)],
    }


def timeframe_context(columns: rules_analyst.Columns, end: int, *, symbol: str, timeframe: str,
                      last_bar_start: datetime, rebase: Rebase = IDENTITY) -> tuple[NumericContext, dict[str, Any]]:
    """The numbers a timeframe answer is checked against (real prices), and the context JSON the
    model is sent (in the chart's units: rebased, with no symbol or date, when `rebase` anonymizes),
    for bars [0, end) of `columns`; the live analyst passes a whole frame, the backtest a position."""
    arrays = columns.arrays
    base = rules_analyst.numeric_context_at(columns, end)
    start = chart_spec.shown_start(timeframe, end)
    numbers = NumericContext(base["last_close"], base["atr"], base["recent_high"], base["recent_low"],
                             float(arrays["high"][start:end].max()), float(arrays["low"][start:end].min()))
    shown = numbers if not rebase.anonymized else NumericContext(
        *(rebase.shown(x) for x in (numbers.last_close, numbers.atr, numbers.recent_high, numbers.recent_low,
                                    numbers.chart_high, numbers.chart_low)))
    latest = {}
    for name in INDICATOR_COLUMNS:
        if name in arrays:
            value = float(arrays[name][end - 1])
            if not math.isnan(value):
                latest[name] = _round(rebase.value(name, value))
    context = {
        "symbol": chart_spec.ANONYMOUS_SYMBOL if rebase.anonymized else symbol,
        "timeframe": timeframe,
        "last_bar_start": (chart_spec.ANONYMOUS_LAST_START if rebase.anonymized else last_bar_start).isoformat(),
        "bars_in_chart": end - start,
        "last_close": _round(shown.last_close),
        "recent_closes": [_round(rebase.shown(float(x))) for x in arrays["close"][max(0, end - RECENT_CLOSES):end]],
        "atr_14": _round(shown.atr),
        "recent_bars": rules_analyst.LEVEL_LOOKBACKS[-1],
        "recent_high": _round(shown.recent_high),
        "recent_low": _round(shown.recent_low),
        "chart_high": _round(shown.chart_high),
        "chart_low": _round(shown.chart_low),
        "indicators": latest,
        "constraints": _constraints(shown),
    }
    return numbers, context


def _summary(a: TimeframeAnalysis, rebase: Rebase) -> dict[str, Any]:
    def shown(x: float | None) -> float | None:
        return None if x is None else _round(rebase.shown(x)) if rebase.anonymized else x

    summary = {"timeframe": a.timeframe, "signal": a.signal.value, "trend": a.trend.value, "confidence": a.confidence,
               "entry": shown(a.entry), "stop": shown(a.stop), "targets": [shown(t) for t in a.targets],
               "support": [shown(x) for x in a.support], "resistance": [shown(x) for x in a.resistance],
               "indicators": [{"name": v.name, "bullish": v.bullish, "reading": v.detail} for v in a.votes],
               # ATR rounded like every indicator value: its 10th digit depends on the history read before it.
               "last_close": shown(a.last_close), "atr_14": _round(rebase.shown(a.atr)), "rationale": a.rationale}
    if not rebase.anonymized:
        summary["data_through"] = a.data_through.isoformat()
    return summary


def consolidation_context(daily: TimeframeAnalysis, weekly: TimeframeAnalysis,
                          rebase: Rebase = IDENTITY) -> tuple[NumericContext, dict[str, Any]]:
    """The daily numbers the proposal is checked against (real prices), and the context JSON the
    model is sent (rebased, with no symbol or date, when `rebase` anonymizes)."""
    numbers = NumericContext(daily.last_close, daily.atr, daily.recent_high, daily.recent_low)
    shown = numbers if not rebase.anonymized else NumericContext(
        *(rebase.shown(x) for x in (numbers.last_close, numbers.atr, numbers.recent_high, numbers.recent_low)))

    def value(x: float) -> float:
        return _round(x) if rebase.anonymized else x

    context = {
        "symbol": chart_spec.ANONYMOUS_SYMBOL if rebase.anonymized else daily.symbol,
        "daily": _summary(daily, rebase),
        "weekly": _summary(weekly, rebase),
        "daily_numbers": {"last_close": value(shown.last_close), "atr_14": _round(shown.atr),
                          "recent_high": value(shown.recent_high), "recent_low": value(shown.recent_low)},
        "constraints": _constraints(shown),
    }
    return numbers, context


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

    def messages(image_url: str | None) -> list[dict]:
        content: list[dict] = [{"type": "text", "text": text}]
        if image_url is not None:
            content.append({"type": "image_url", "image_url": {"url": image_url}})
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
