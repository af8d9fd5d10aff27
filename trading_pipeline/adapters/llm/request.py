"""What is sent to the model: the numeric context, the chart image and the request body.

Per symbol × timeframe the chart PNG goes as an `image_url` data URL with a compact numeric context
(the last close, ATR, recent range, latest indicators and the bounds the answer must respect); the
consolidation gets both analyses' summaries and the daily numbers. The answer is requested with
`response_format={"type": "json_schema", ..., "strict": true}`, or, on a server without it, with the
schema in the prompt. The request as recorded in `llm_calls` carries the image's sha256, not its base64.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pandas as pd
from pydantic import BaseModel

from trading_pipeline.adapters.llm.settings import OpenAISettings
from trading_pipeline.adapters.llm.transport import Features
from trading_pipeline.core import rules_analyst
from trading_pipeline.core.analysis import TimeframeAnalysis
from trading_pipeline.core.analysis_validation import NumericContext
from trading_pipeline.core.chart_figure import DEFAULT_BARS_SHOWN, FALLBACK_BARS_SHOWN
from trading_pipeline.core.frames import MarketFrame
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
    return float(f"{x:.6g}")


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


def timeframe_context(indicators: MarketFrame) -> tuple[NumericContext, dict[str, Any]]:
    """The numbers a timeframe answer is checked against, and the context JSON the model is sent."""
    frame = indicators.frame
    base = rules_analyst.numeric_context(frame)
    shown = frame.tail(DEFAULT_BARS_SHOWN.get(indicators.timeframe, FALLBACK_BARS_SHOWN))
    numbers = NumericContext(base["last_close"], base["atr"], base["recent_high"], base["recent_low"],
                             float(shown["high"].max()), float(shown["low"].min()))
    last = frame.iloc[-1]
    latest = {c: _round(float(last[c])) for c in INDICATOR_COLUMNS if c in frame.columns and pd.notna(last[c])}
    context = {
        "symbol": indicators.symbol,
        "timeframe": indicators.timeframe,
        "last_bar_start": indicators.last_bar_start.isoformat(),
        "bars_in_chart": len(shown),
        "last_close": _round(numbers.last_close),
        "recent_closes": [_round(float(x)) for x in frame["close"].tail(RECENT_CLOSES)],
        "atr_14": _round(numbers.atr),
        "recent_bars": rules_analyst.LEVEL_LOOKBACKS[-1],
        "recent_high": _round(numbers.recent_high),
        "recent_low": _round(numbers.recent_low),
        "chart_high": _round(numbers.chart_high),
        "chart_low": _round(numbers.chart_low),
        "indicators": latest,
        "constraints": _constraints(numbers),
    }
    return numbers, context


def _summary(a: TimeframeAnalysis) -> dict[str, Any]:
    return {"timeframe": a.timeframe, "signal": a.signal.value, "trend": a.trend.value, "confidence": a.confidence,
            "entry": a.entry, "stop": a.stop, "targets": a.targets, "support": a.support, "resistance": a.resistance,
            "indicators": [{"name": v.name, "bullish": v.bullish, "reading": v.detail} for v in a.votes],
            "last_close": a.last_close, "atr_14": a.atr, "rationale": a.rationale, "data_through": a.data_through.isoformat()}


def consolidation_context(daily: TimeframeAnalysis, weekly: TimeframeAnalysis) -> tuple[NumericContext, dict[str, Any]]:
    """The daily numbers the proposal is checked against, and the context JSON the model is sent."""
    numbers = NumericContext(daily.last_close, daily.atr, daily.recent_high, daily.recent_low)
    context = {
        "symbol": daily.symbol,
        "daily": _summary(daily),
        "weekly": _summary(weekly),
        "daily_numbers": {"last_close": daily.last_close, "atr_14": daily.atr, "recent_high": daily.recent_high,
                          "recent_low": daily.recent_low},
        "constraints": _constraints(numbers),
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
