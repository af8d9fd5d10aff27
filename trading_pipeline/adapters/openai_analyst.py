"""The `openai` analyst: a vision model reads the chart PNG, code checks every number it gives.

Works with any OpenAI-compatible endpoint (OpenAI, Azure's /openai/v1, OpenRouter, vLLM, Ollama,
LM Studio) through Chat Completions:
- per symbol × timeframe, the chart PNG as an `image_url` data URL plus a compact numeric context;
  the answer is requested with `response_format={"type": "json_schema", ..., "strict": true}` and
  always validated here with pydantic (the SDK's `parsed` is never used);
- per symbol, a consolidation call (daily leads, weekly confirms) returns the decision proposal
  just as strictly.

Servers differ, so the analyst adapts and records what it did (in `llm_calls` and in the
analysis's rationale): a server that rejects `json_schema` gets `json_object` with the schema in
the prompt (then no `response_format` at all, "none"); with OPENAI_VISION=auto a server that
rejects image input gets the numeric context only (`vision: false`); `max_completion_tokens`
falls back to `max_tokens`, and a rejected `temperature` is dropped. Whatever the mode, the answer
is validated by the same strict pydantic models.

Model text is read strictly (`read_json`): ```json fences, a leading <think>…</think> block of a
reasoning model, or prose around one JSON object are removed and said; several candidate objects,
NaN/Infinity, duplicate keys, absurd nesting or length fail closed. A server's `usage` is used only
when it is plausible (else the call is budgeted by estimate), `retry-after(-ms)` is honoured up to
TRADING_LLM_BACKOFF_MAX_SECONDS, and an HTML page, a 200 carrying an error, a rejected key, an
unknown model or an unreachable server each give a reason naming the variable to fix.

Fail closed: invalid JSON, a schema violation, a refusal, empty content, implausible numbers
(core/analysis_validation.py), exhausted retries, a used-up budget or any unexpected error give an
invalid analysis (NO_TRADE with the reason), never a BUY or SELL and never a silent HOLD.

Every HTTP attempt, cache hit and budget refusal is a row in `llm_calls` (adapters/model_calls.py).
`openai` is imported only when a client is built, so importing this module stays light.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import json
import logging
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters import model_calls
from trading_pipeline.adapters.model_calls import (
    Budget,
    BudgetExceeded,
    BudgetLimits,
    ModelCallLog,
    ModelPrice,
    Redactor,
    ResponseCache,
    canonical_json,
    sha256_hex,
)
from trading_pipeline.core import rules_analyst
from trading_pipeline.core.analysis import Action, ChartSource, IndicatorVote, TimeframeAnalysis, Trend
from trading_pipeline.core.analysis_validation import (
    NumericContext,
    consolidation_problems,
    context_problems,
    plausibility_problems,
    reward_risk,
)
from trading_pipeline.core.chart_figure import DEFAULT_BARS_SHOWN, FALLBACK_BARS_SHOWN, TIMEFRAME_NAMES
from trading_pipeline.core.decisions import CONFIRM, LEAD, Consolidated
from trading_pipeline.core.decisions import consolidate as consolidate_by_rules
from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.core.risk import RANGE_TOLERANCE_ATR, Proposal
from trading_pipeline.errors import ConfigError
from trading_pipeline.prompts import CONSOLIDATION, TIMEFRAME_ANALYSIS, Prompt, load_prompt

log = logging.getLogger(__name__)

ANALYST_PREFIX = "openai"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4.1-mini"
DEFAULTS = {
    "OPENAI_VISION": "auto",
    "OPENAI_TIMEOUT_SECONDS": 60.0,
    "OPENAI_MAX_OUTPUT_TOKENS": 1500,
    "OPENAI_TEMPERATURE": "0",
    "TRADING_LLM_MAX_ATTEMPTS": 4,
    "TRADING_LLM_BACKOFF_SECONDS": 1.0,
    "TRADING_LLM_BACKOFF_MAX_SECONDS": 30.0,
    "TRADING_LLM_CONCURRENCY": 4,
}
VISION_MODES = ("auto", "yes", "no")
# What a 1920×1080 PNG costs as image input at "high" detail on OpenAI's vision models (85 + 6 × 170),
# used only to estimate a call before it is made (budget reservation, servers that report no usage).
IMAGE_TOKENS_ESTIMATE = 1105
CHARS_PER_TOKEN = 3.5
RECENT_CLOSES = 5
INDICATOR_COLUMNS = ("sma_20", "sma_50", "sma_200", "rsi_14", "macd", "macd_signal", "macd_hist", "bb_upper",
                     "bb_middle", "bb_lower", "atr_14", "supertrend", "supertrend_direction", "volume")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
JSON_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(?P<body>.*?)\n?\s*```$", re.DOTALL)
ANY_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(?P<body>.*?)```", re.DOTALL)
# Reasoning models on vLLM, Ollama or llama.cpp without a reasoning parser put their thinking first.
REASONING_BLOCK = re.compile(r"^<(?P<tag>think|thinking|reasoning)>.*?</(?P=tag)>", re.DOTALL | re.IGNORECASE)
REASONING_OPEN = re.compile(r"^<(?P<tag>think|thinking|reasoning)>", re.IGNORECASE)
REASONING_CLOSE = re.compile(r"</(?P<tag>think|thinking|reasoning)>", re.IGNORECASE)
MAX_ANSWER_CHARS = 200_000  # an answer is a few KB; far more is a runaway model or a hostile server
MAX_JSON_CANDIDATES = 64  # '{' positions tried when looking for a second JSON object in prose
MAX_REPORTED_TOKENS = 10_000_000  # per usage field; beyond that a server's usage is not believed


# --- the answers the model must give (validated here, never trusted as given) -----------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class IndicatorReading(_Strict):
    name: str = Field(description="supertrend, close_vs_sma20, macd_vs_signal, rsi_vs_50, bollinger, volume or atr")
    reading: str = Field(description="What the indicator shows, with the numbers read.")
    bullish: bool = Field(description="True when this reading argues for a long position.")


class TimeframeAnswer(_Strict):
    trend: Literal["up", "down", "sideways"]
    support: list[float] = Field(max_length=4, description="Up to 4 support prices.")
    resistance: list[float] = Field(max_length=4, description="Up to 4 resistance prices.")
    indicators: list[IndicatorReading] = Field(min_length=1, max_length=8)
    setup: str = Field(min_length=1, max_length=200, description="The setup in a few words.")
    signal: Literal["BUY", "SELL", "HOLD"]
    entry: float | None = Field(description="Limit entry near the last close; null for HOLD.")
    stop: float | None = Field(description="Stop: below the entry for BUY, above for SELL; null for HOLD.")
    targets: list[float] = Field(max_length=3, description="1-2 targets beyond the entry; [] for HOLD.")
    confidence: float = Field(ge=0, le=1, description="0 to 1.")
    rationale: str = Field(min_length=1, max_length=2000)


class ConsolidationAnswer(_Strict):
    action: Literal["BUY", "SELL", "HOLD"]
    entry: float | None = Field(description="Limit entry near the daily last close; null for HOLD.")
    stop: float | None = Field(description="Stop: below the entry for BUY, above for SELL; null for HOLD.")
    targets: list[float] = Field(max_length=3, description="1-2 targets beyond the entry; [] for HOLD.")
    confidence: float = Field(ge=0, le=1, description="0 to 1.")
    rationale: str = Field(min_length=1, max_length=2000)


# Keywords a Structured Outputs server may not know; the bounds are enforced by pydantic here instead.
_UNSUPPORTED_KEYWORDS = ("title", "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                         "minItems", "maxItems", "minLength", "maxLength", "pattern", "format")


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema in the form `strict: true` requires: refs inlined, every property
    required (optional ones nullable), no additional properties, no keywords servers reject."""
    raw = model.model_json_schema()
    defs = raw.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
        out = {k: ({name: walk(sub) for name, sub in v.items()} if k == "properties" else walk(v))
               for k, v in node.items() if k not in _UNSUPPORTED_KEYWORDS}
        if out.get("type") == "object" or "properties" in out:
            out["type"] = "object"
            out["required"] = list(out.get("properties", {}))
            out["additionalProperties"] = False
        return out

    return walk(raw)


@functools.cache
def _schema(model: type[BaseModel]) -> tuple[dict[str, Any], str]:
    schema = strict_json_schema(model)
    return schema, sha256_hex(canonical_json(schema))


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAISettings:
    api_key: str = field(repr=False)
    base_url: str
    model: str
    vision: str
    timeout_s: float
    max_output_tokens: int
    temperature: float | None
    max_attempts: int
    backoff_s: float
    backoff_max_s: float
    concurrency: int
    price: ModelPrice | None
    limits: BudgetLimits
    cache: bool

    @classmethod
    def from_env(cls, environ: Mapping[str, str], run_tags: Mapping[str, str] | None = None) -> OpenAISettings:
        """Read and check every variable; a wrong one raises ConfigError naming it and the fix."""
        api_key = (environ.get("OPENAI_API_KEY") or "").strip()
        if not api_key:
            raise ConfigError(
                "TRADING_ANALYST=openai needs OPENAI_API_KEY, which is not set",
                "set OPENAI_API_KEY to your API key (for a local server that needs none, any text such as "
                "'unused'), or set TRADING_ANALYST=rules to use the embedded analyst")
        base_url = (environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"OPENAI_BASE_URL={base_url!r} is not an http(s) URL",
                              "set OPENAI_BASE_URL to the API root, e.g. https://api.openai.com/v1 or "
                              "http://127.0.0.1:11434/v1 (Ollama), or unset it for OpenAI")
        if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS and \
                (environ.get("OPENAI_ALLOW_HTTP") or "").strip().lower() not in ("yes", "true", "1", "on"):
            raise ConfigError(
                f"OPENAI_BASE_URL uses plain http to {parts.hostname}: the API key would cross the network unencrypted",
                "use an https URL, or set OPENAI_ALLOW_HTTP=yes if that network is trusted")
        model = (environ.get("OPENAI_MODEL") or DEFAULT_MODEL).strip()
        vision = (environ.get("OPENAI_VISION") or DEFAULTS["OPENAI_VISION"]).strip().lower()
        if vision not in VISION_MODES:
            raise ConfigError(f"OPENAI_VISION={environ.get('OPENAI_VISION')!r} is not auto, yes or no",
                              "set OPENAI_VISION=auto (send the chart, fall back to numbers if the server "
                              "rejects images), yes (always send it) or no (numbers only)")
        raw_temperature = (environ.get("OPENAI_TEMPERATURE") or DEFAULTS["OPENAI_TEMPERATURE"]).strip().lower()
        if raw_temperature in ("none", "omit", "unset"):
            temperature = None
        else:
            temperature = _number(environ, "OPENAI_TEMPERATURE", raw_temperature, 0.0, 2.0)

        def number(name: str, low: float, high: float) -> float:
            raw = (environ.get(name) or "").strip()
            return float(DEFAULTS[name]) if not raw else _number(environ, name, raw, low, high)

        return cls(
            api_key=api_key, base_url=base_url, model=model, vision=vision,
            timeout_s=number("OPENAI_TIMEOUT_SECONDS", 0.05, 3600),
            max_output_tokens=int(number("OPENAI_MAX_OUTPUT_TOKENS", 200, 100_000)),
            temperature=temperature,
            max_attempts=int(number("TRADING_LLM_MAX_ATTEMPTS", 1, 10)),
            backoff_s=number("TRADING_LLM_BACKOFF_SECONDS", 0, 60),
            backoff_max_s=number("TRADING_LLM_BACKOFF_MAX_SECONDS", 0, 600),
            concurrency=int(number("TRADING_LLM_CONCURRENCY", 1, 256)),
            price=model_calls.price_for(model, environ),
            limits=_limits(environ, model),
            cache=model_calls.cache_enabled(environ, run_tags),
        )


def _number(environ: Mapping[str, str], name: str, raw: str, low: float, high: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{name}={environ.get(name)!r} is not a number from {low:g} to {high:g}",
                          f"set {name} to a number in that range, or unset it for the default")
    return value


def _limits(environ: Mapping[str, str], model: str) -> BudgetLimits:
    limits = BudgetLimits.from_env(environ)
    if limits.max_cost_per_day_usd is not None and model_calls.price_for(model, environ) is None:
        raise ConfigError(
            f"{model_calls.MAX_COST_PER_DAY_ENV} is set but the price of model {model!r} is unknown, "
            "so its cost cannot be counted",
            f"set {model_calls.PRICE_INPUT_ENV} and {model_calls.PRICE_OUTPUT_ENV} (USD per 1M tokens), or budget "
            f"tokens instead with {model_calls.MAX_TOKENS_PER_DAY_ENV}")
    return limits


# --- the analyst interface both analysts implement ---------------------------------------------


class Analyst(Protocol):
    """What the graph needs from an analyst; `rules` and `openai` both provide it."""

    name: str

    def analyze(self, indicators: MarketFrame, chart: ChartSource | None, png: bytes | None = None) -> TimeframeAnalysis: ...

    def consolidate(self, daily: TimeframeAnalysis, weekly: TimeframeAnalysis) -> Consolidated: ...


# --- internals --------------------------------------------------------------------------------


class _Unusable(Exception):
    """The call produced nothing usable; the message is the NO_TRADE reason."""


@dataclass
class _Answer:
    answer: BaseModel
    vision: bool
    response_format: str
    call_id: str
    cached: bool
    notes: tuple[str, ...] = ()  # what was removed around the JSON (reasoning, prose)
    # Written together with the outcome, in one transaction, once the answer has been judged:
    row: dict[str, Any] | None = None  # the successful attempt (or the cache hit)
    cache_put: tuple[str, dict[str, Any]] | None = None  # (key, fields) of a fresh schema-valid answer
    cache_hit_key: str | None = None
    reservation: Any = None  # the budget reservation, released once the row is in the log


@dataclass
class _Adaptation:
    """What this endpoint accepts, learned from its 400s (per analyst instance)."""

    vision_ok: bool | None = None
    response_format: str = "json_schema"  # -> json_object -> none
    max_tokens_param: str = "max_completion_tokens"  # -> max_tokens
    send_temperature: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)


@functools.cache
def _gate(concurrency: int) -> threading.BoundedSemaphore:
    """Process-wide bound on model requests in flight (TRADING_LLM_CONCURRENCY)."""
    return threading.BoundedSemaphore(concurrency)


def strip_fences(text: str) -> str:
    """```json … ``` (or bare ``` … ```) around the JSON is formatting, not a reason to fail."""
    text = text.strip()
    match = JSON_FENCE.match(text)
    return match.group("body").strip() if match else text


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):  # {"signal": "HOLD", ..., "signal": "BUY"}: which one the model meant is unknown
        seen: set[str] = set()
        duplicates = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise ValueError(f"duplicate key(s) {duplicates} in one object")
    return data


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _decode(text: str, start: int | None = None) -> tuple[Any, int]:
    """Strict JSON (no NaN/Infinity, no duplicate keys) from `start` (None: the whole text)."""
    try:
        if start is None:
            return _DECODER.decode(text), len(text)
        return _DECODER.raw_decode(text, start)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _unusable_with(status: str, reason: str) -> _Unusable:
    error = _Unusable(reason)
    error.status = status  # type: ignore[attr-defined]
    return error


def read_json(content: str) -> tuple[Any, tuple[str, ...]]:
    """The one JSON value in the model's text, and notes saying what was removed around it.

    Plain JSON or JSON in a ``` fence is read as is. Otherwise a leading <think>…</think> block (or
    text up to a lone </think>) is removed, then the one fenced block, or the one JSON object the
    text holds, is read. No JSON, several candidates, or JSON that is not strict (NaN, Infinity,
    duplicate keys) raise _Unusable saying so: the answer is never guessed.
    """
    if len(content) > MAX_ANSWER_CHARS:
        raise _unusable_with("invalid_json", f"the model's answer is {len(content):,} characters long, more than the "
                                             f"{MAX_ANSWER_CHARS:,} an answer may have")
    text = content.strip()
    try:
        return _decode(strip_fences(text))[0], ()
    except ValueError as error:
        problem = error
    notes: list[str] = []
    block = REASONING_BLOCK.match(text)
    close = None if block else list(REASONING_CLOSE.finditer(text))
    if block:
        text = text[block.end():].strip()
        notes.append(f"a <{block.group('tag').lower()}> reasoning block before the JSON was removed")
    elif REASONING_OPEN.match(text):
        tag = REASONING_OPEN.match(text).group("tag").lower()
        raise _unusable_with("invalid_json", f"the model's answer is a reasoning block that never closes (<{tag}> "
                             f"without </{tag}>) and holds no JSON answer: it ran out of output tokens or never "
                             "answered. Fix: raise OPENAI_MAX_OUTPUT_TOKENS, or enable the server's reasoning parser")
    elif close:
        text = text[close[-1].end():].strip()
        notes.append(f"text up to a </{close[-1].group('tag').lower()}> reasoning end tag was removed")
    if notes:
        try:
            return _decode(strip_fences(text))[0], tuple(notes)
        except ValueError as error:
            problem = error
    around = "text around the JSON was ignored"
    fences = [m.group("body").strip() for m in ANY_FENCE.finditer(text)]
    if len(fences) > 1:
        raise _unusable_with("invalid_json", f"the model's answer holds {len(fences)} fenced blocks; which one is the "
                                             f"answer is ambiguous: {text[:200]!r}")
    if fences:
        try:
            return _decode(fences[0])[0], (*notes, around)
        except ValueError as error:
            raise _unusable_with("invalid_json", f"the model's answer is not valid JSON ({error}): "
                                                 f"{fences[0][:200]!r}") from None
    start = text.find("{")
    if start == -1:
        raise _unusable_with("invalid_json", f"the model's answer is not valid JSON ({problem}): {text[:200]!r}")
    try:  # the JSON object starts at the first brace: text before it is prose, braces in prose are not guessed past
        value, end = _decode(text, start)
    except ValueError as error:
        raise _unusable_with("invalid_json", f"the model's answer is not valid JSON ({error}): "
                                             f"{text[start:start + 200]!r}") from None
    found, position = 1, text.find("{", end)
    for _ in range(MAX_JSON_CANDIDATES):
        if position == -1:
            break
        try:
            _, position = _decode(text, position)
            found += 1
        except ValueError:
            position += 1
        position = text.find("{", position)
    if found > 1:
        raise _unusable_with("invalid_json", f"the model's answer holds {found} JSON objects; which one is the answer "
                                             f"is ambiguous: {text[:200]!r}")
    return value, (*notes, around)


def parse_answer(content: str, model: type[BaseModel]) -> tuple[BaseModel, tuple[str, ...]]:
    """Validate the model's text against the schema: (answer, notes on text removed around the JSON).
    Raises _Unusable saying what is wrong."""
    data, notes = read_json(content)
    if not isinstance(data, dict):
        raise _unusable_with("invalid_json", f"the model's answer is JSON but not an object: {content.strip()[:200]!r}")
    try:
        return model.model_validate(data, strict=True), notes
    except ValidationError as error:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}" for e in error.errors()[:6])
        raise _unusable_with("schema_violation", f"the model's answer violates the response schema "
                                                 f"({error.error_count()} problem(s): {details})") from None


def _mentions(error_text: str, *words: str) -> bool:
    return any(word in error_text for word in words)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _usage(body: Mapping[str, Any]) -> tuple[int, int] | None:
    """(prompt, completion) tokens as the server reports them, or None when missing or not believable
    (nulls, text, booleans, negative or absurd counts): the call is then budgeted by estimate."""
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return None

    def count(value: Any) -> int | None:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPORTED_TOKENS:
            return None
        return value

    prompt, completion = count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    return prompt, completion


# --- the analyst ------------------------------------------------------------------------------


class OpenAIAnalyst:
    """Chart analysis and consolidation by an OpenAI-compatible model, fail-closed and accounted."""

    def __init__(self, settings: OpenAISettings, sessions: sessionmaker[Session], *, run_id: str | None = None,
                 client: Any = None):
        self.settings = settings
        self.name = f"{ANALYST_PREFIX}:{settings.model}"
        self.run_id = run_id
        # The key, and a password in OPENAI_BASE_URL (https://user:password@proxy/v1), never leave.
        self.redactor = Redactor([settings.api_key, urlsplit(settings.base_url or "").password or ""])
        self.calls = ModelCallLog(sessions, self.redactor)
        self.cache = ResponseCache(sessions)
        self.budget = Budget(self.calls, settings.limits, run_id)
        self._client = client
        self._client_lock = threading.Lock()
        self._adapt = _Adaptation()
        self._endpoint = model_calls.endpoint_for_record(settings.base_url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None, sessions: sessionmaker[Session], *,
                 run_id: str | None = None, run_tags: Mapping[str, str] | None = None) -> OpenAIAnalyst:
        import os

        return cls(OpenAISettings.from_env(os.environ if environ is None else environ, run_tags), sessions,
                   run_id=run_id)

    # -- public interface --

    def analyze(self, indicators: MarketFrame, chart: ChartSource | None = None, png: bytes | None = None) -> TimeframeAnalysis:
        """One timeframe's analysis; an unusable answer is an invalid (NO_TRADE) analysis saying why."""
        prompt = load_prompt(TIMEFRAME_ANALYSIS)
        try:
            numbers, context = self._numeric_context(indicators)
        except Exception as error:  # noqa: BLE001 - fail closed on anything
            return self._invalid(indicators, chart, prompt, f"the bars give no numeric context: {error}", None)
        base = dict(symbol=indicators.symbol, timeframe=indicators.timeframe, as_of=indicators.as_of,
                    data_through=indicators.last_bar_start.to_pydatetime(), chart=chart,
                    prompt_version=prompt.version, last_close=numbers.last_close, atr=numbers.atr,
                    recent_high=numbers.recent_high, recent_low=numbers.recent_low)
        if not math.isfinite(numbers.atr):
            base["atr"] = 0.0
        problems = context_problems(numbers)
        if problems:
            return TimeframeAnalysis.invalid(reason="; ".join(problems), analyst=self.name, **base)
        if png is not None and chart is not None and hashlib.sha256(png).hexdigest() != chart.sha256:
            return TimeframeAnalysis.invalid(
                reason=f"the chart PNG given does not match the chart reference {chart.uri} (sha256 differs)",
                analyst=self.name, **base)
        result: _Answer | None = None
        call_id = None
        try:
            result = self._complete(
                kind=TIMEFRAME_ANALYSIS, symbol=indicators.symbol, timeframe=indicators.timeframe, prompt=prompt,
                user_text=prompt.user(symbol=indicators.symbol,
                                      timeframe_name=TIMEFRAME_NAMES.get(indicators.timeframe, indicators.timeframe),
                                      chart_status="{chart_status}", context_json=canonical_json(context)),
                png=png, context=context, answer_model=TimeframeAnswer)
            call_id = result.call_id
            analysis = self._timeframe_analysis(result, numbers, base)
        except _Unusable as error:
            call_id = call_id or getattr(error, "call_id", None)
            analysis = TimeframeAnalysis.invalid(reason=str(error), analyst=self.name, **base)
        except Exception as error:  # noqa: BLE001 - fail closed on anything, say what it was
            analysis = TimeframeAnalysis.invalid(
                reason=f"unexpected error in the openai analyst: {type(error).__name__}: {self.redactor.text(str(error))}",
                analyst=self.name, **base)
        if call_id is not None:
            problem = self._settle(result, call_id, "valid" if analysis.valid else f"invalid: {analysis.invalid_reason}")
            if problem:
                analysis = TimeframeAnalysis.invalid(reason=problem, analyst=self.name, **base)
        return analysis

    def consolidate(self, daily: TimeframeAnalysis, weekly: TimeframeAnalysis) -> Consolidated:
        """The decision proposal for one symbol; any failure is a NO_TRADE proposal saying why."""
        try:
            return self._consolidate(daily, weekly)
        except Exception as error:  # noqa: BLE001 - fail closed on anything
            return _no_trade(f"unexpected error in the openai consolidation: {type(error).__name__}: "
                             f"{self.redactor.text(str(error))}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- timeframe analysis --

    def _numeric_context(self, indicators: MarketFrame) -> tuple[NumericContext, dict[str, Any]]:
        frame = indicators.frame
        base = rules_analyst.numeric_context(frame)
        shown = frame.tail(DEFAULT_BARS_SHOWN.get(indicators.timeframe, FALLBACK_BARS_SHOWN))
        numbers = NumericContext(base["last_close"], base["atr"], base["recent_high"], base["recent_low"],
                                 float(shown["high"].max()), float(shown["low"].min()))
        last = frame.iloc[-1]
        latest = {c: _round(float(last[c])) for c in INDICATOR_COLUMNS if c in frame.columns and pd.notna(last[c])}
        tolerance = numbers.entry_tolerance()
        low, high = numbers.price_bounds()
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
            "constraints": {
                "entry_tolerance": _round(tolerance),
                "entry_range": [_round(numbers.last_close - tolerance), _round(numbers.last_close + tolerance)],
                "range_tolerance_atr": RANGE_TOLERANCE_ATR,
                "stop_and_target_range": [_round(low), _round(high)],
            },
        }
        return numbers, context

    def _timeframe_analysis(self, result: _Answer, numbers: NumericContext, base: dict[str, Any]) -> TimeframeAnalysis:
        answer: TimeframeAnswer = result.answer  # type: ignore[assignment]
        signal = Action(answer.signal)
        trade = signal in (Action.BUY, Action.SELL)
        entry, stop, targets = (answer.entry, answer.stop, list(answer.targets)) if trade else (None, None, [])
        analyst = self.name if result.vision else f"{self.name} (no vision)"
        problems = plausibility_problems(signal, entry, stop, targets, numbers,
                                         support=answer.support, resistance=answer.resistance)
        if problems:
            raise _Unusable(f"implausible numbers from the model ({signal.value}): " + "; ".join(problems))
        notes = []
        if trade:
            r = reward_risk(entry, stop, targets[0])
            notes.append(f"R recomputed from the prices: |{targets[0]:.2f} − {entry:.2f}| / |{entry:.2f} − {stop:.2f}| = {r:.2f}")
        if not result.vision:
            notes.append("numeric context only: the model did not see the chart")
        notes.extend(_answer_notes(result))
        rationale = f"{answer.setup}: {answer.rationale}" + "".join(f" [{n}]" for n in notes)
        extra = {"vision": result.vision} if "vision" in TimeframeAnalysis.model_fields else {}
        return TimeframeAnalysis(
            signal=signal, trend=Trend(answer.trend), confidence=answer.confidence,
            entry=entry, stop=stop, targets=targets,
            support=sorted(answer.support), resistance=sorted(answer.resistance),
            votes=[IndicatorVote(name=i.name, bullish=i.bullish, detail=i.reading) for i in answer.indicators],
            rationale=rationale, analyst=analyst, **extra, **base)

    def _invalid(self, indicators: MarketFrame, chart: ChartSource | None, prompt: Prompt, reason: str,
                 numbers: NumericContext | None) -> TimeframeAnalysis:
        frame = indicators.frame
        return TimeframeAnalysis.invalid(
            reason=reason, analyst=self.name, symbol=indicators.symbol, timeframe=indicators.timeframe,
            as_of=indicators.as_of, data_through=indicators.last_bar_start.to_pydatetime(), chart=chart,
            prompt_version=prompt.version,
            last_close=float(frame["close"].iloc[-1]) if len(frame) else 0.0, atr=0.0,
            recent_high=float(frame["high"].max()) if len(frame) else 0.0,
            recent_low=float(frame["low"].min()) if len(frame) else 0.0)

    # -- consolidation --

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
        numbers = NumericContext(daily.last_close, daily.atr, daily.recent_high, daily.recent_low)
        tolerance = numbers.entry_tolerance()
        low, high = numbers.price_bounds()
        context = {
            "symbol": daily.symbol,
            "daily": _summary(daily),
            "weekly": _summary(weekly),
            "daily_numbers": {"last_close": daily.last_close, "atr_14": daily.atr, "recent_high": daily.recent_high,
                              "recent_low": daily.recent_low},
            "constraints": {
                "entry_tolerance": _round(tolerance),
                "entry_range": [_round(daily.last_close - tolerance), _round(daily.last_close + tolerance)],
                "range_tolerance_atr": RANGE_TOLERANCE_ATR,
                "stop_and_target_range": [_round(low), _round(high)],
            },
        }
        user_text = prompt.user(symbol=daily.symbol, daily_signal=daily.signal.value, weekly_signal=weekly.signal.value,
                                context_json=canonical_json(context))
        try:
            result = self._complete(kind=CONSOLIDATION, symbol=daily.symbol, timeframe=None, prompt=prompt,
                                    user_text=user_text, png=None, context=context, answer_model=ConsolidationAnswer)
        except _Unusable as error:
            call_id = getattr(error, "call_id", None)
            reason = f"the consolidation call gave nothing usable: {error}"
            problem = self._settle(None, call_id, f"invalid: {error}") if call_id else None
            return _no_trade(problem or reason)
        answer: ConsolidationAnswer = result.answer  # type: ignore[assignment]
        action = Action(answer.action)
        trade = action in (Action.BUY, Action.SELL)
        entry, stop, targets = (answer.entry, answer.stop, list(answer.targets)) if trade else (None, None, [])
        problems = consolidation_problems(action, daily.signal, weekly.signal) + \
            plausibility_problems(action, entry, stop, targets, numbers)
        who = f"{self.name}, prompt {prompt.version}"
        if problems:
            reason = f"the consolidation proposal is implausible ({action.value}): " + "; ".join(problems)
            return _no_trade(self._settle(result, result.call_id, f"invalid: {reason}") or reason)
        problem = self._settle(result, result.call_id, "valid")
        if problem:
            return _no_trade(problem)
        lead = daily.signal
        notes = "".join(f" [{n}]" for n in _answer_notes(result))
        if not trade:
            return Consolidated(
                Proposal(Action.HOLD, None, None, [], answer.confidence), "declined by the consolidation",
                f"HOLD: the consolidation declined the daily {lead.value} ({who}): {answer.rationale}{notes} "
                f"(daily: {daily.rationale} | weekly: {weekly.rationale})")
        confirmation = "confirmed (strong)" if weekly.signal == lead else "partially confirmed (weekly neutral)"
        r = reward_risk(entry, stop, targets[0])
        return Consolidated(
            Proposal(action, entry, stop, targets, answer.confidence), confirmation,
            f"{action.value} led by the daily analysis, {confirmation} by the weekly; consolidation ({who}): "
            f"{answer.rationale} [R recomputed from the prices: {r:.2f}]{notes} "
            f"(daily: {daily.rationale} | weekly: {weekly.rationale})")

    # -- the call itself --

    def _settle(self, result: _Answer | None, call_id: str, outcome: str) -> str | None:
        """Record the call's last row, its outcome and its cache entry in one transaction. Returns a
        reason when that fails: an unrecorded call would escape the budgets, so it is not used."""
        try:
            self.calls.settle(call_id, outcome, row=result.row if result else None,
                              cache_put=result.cache_put if result else None,
                              cache_hit_key=result.cache_hit_key if result else None)
            return None
        except Exception as error:
            log.exception("could not record model call %s", call_id)
            return (f"the model call could not be recorded in the trading database "
                    f"({type(error).__name__}: {self.redactor.text(str(error))[:300]}); its answer is not used")
        finally:
            Budget.release(result.reservation if result else None)

    def client(self):
        with self._client_lock:
            if self._client is None:
                import httpx2
                import openai

                _quiet_http_loggers()
                s = self.settings
                self._client = openai.OpenAI(
                    api_key=s.api_key, base_url=s.base_url, timeout=s.timeout_s, max_retries=0,
                    http_client=httpx2.Client(
                        timeout=s.timeout_s,
                        limits=httpx2.Limits(max_connections=max(16, 2 * s.concurrency),
                                             max_keepalive_connections=max(8, s.concurrency))))
                _ = self._client.chat.completions.with_raw_response  # import the SDK's lazy parts now
            return self._client

    def _complete(self, *, kind: str, symbol: str, timeframe: str | None, prompt: Prompt, user_text: str,
                  png: bytes | None, context: dict[str, Any], answer_model: type[BaseModel]) -> _Answer:
        s = self.settings
        schema, schema_sha = _schema(answer_model)
        want_image = png is not None and s.vision != "no"
        image_sha = hashlib.sha256(png).hexdigest() if want_image else None
        key, context_sha = model_calls.cache_key(kind=kind, model=s.model, prompt_version=prompt.version,
                                                  image_sha256=image_sha, context=context, schema_sha256=schema_sha)
        common = dict(run_id=self.run_id, kind=kind, symbol=symbol, timeframe=timeframe, endpoint=self._endpoint,
                      model=s.model, prompt_version=prompt.version, image_sha256=image_sha, cache_key=key)

        if s.cache:
            cached = self.cache.get(key)
            if cached is not None:
                try:
                    answer, notes = parse_answer(cached.content, answer_model)
                except _Unusable as error:  # a cache row that no longer validates is a miss, not an answer
                    log.warning("cached answer %s no longer validates (%s); calling the model", key,
                                self.redactor.text(str(error)))
                else:
                    call_id = uuid.uuid4().hex
                    row = dict(call_id=call_id, attempt=0, vision=cached.vision, response_format=cached.response_format,
                               cache_hit=True, status=model_calls.CACHE_HIT, response=cached.content,
                               request={"cache_of_call": cached.call_id}, **common)
                    return _Answer(answer, cached.vision, cached.response_format, call_id, cached=True, notes=notes,
                                   row=row, cache_hit_key=key)

        client = self.client()  # built (and `openai` imported) before any latency is measured
        call_id = uuid.uuid4().hex
        attempt = 0
        fallbacks = 0
        failures: list[str] = []
        while True:
            with self._adapt.lock:
                adapt = _Adaptation(self._adapt.vision_ok, self._adapt.response_format, self._adapt.max_tokens_param,
                                    self._adapt.send_temperature)
            send_image = want_image and not (s.vision == "auto" and adapt.vision_ok is False)
            body, record = self._request(prompt, user_text, png if send_image else None, image_sha, schema, adapt,
                                         answer_model)
            estimate = int((len(prompt.system) + len(user_text)) / CHARS_PER_TOKEN) + \
                (IMAGE_TOKENS_ESTIMATE if send_image else 0) + s.max_output_tokens
            row = dict(call_id=call_id, vision=send_image, response_format=adapt.response_format, request=record, **common)
            try:
                reservation = self.budget.reserve(estimate, s.price.cost(estimate, 0) if s.price else None)
            except BudgetExceeded as error:
                self.calls.record(attempt=attempt + 1, status=model_calls.BUDGET_EXCEEDED, error=str(error), **row)
                raise self._unusable(call_id, f"no model call: {error}") from None
            attempt += 1
            try:  # the reservation is released once the call's real usage is in the log
                started = time.perf_counter()
                status, http_status, text, headers, error_text = self._send(client, body)
                latency_ms = (time.perf_counter() - started) * 1000
                if status == "ok":
                    result = self._accept(text, headers, row, attempt, http_status, latency_ms, estimate, answer_model,
                                          key, context_sha, send_image, adapt.response_format)
                    result.reservation, reservation = reservation, None  # released by _settle
                    return result
                self.calls.record(attempt=attempt, status=status, http_status=http_status, error=error_text,
                                  response=text, latency_ms=latency_ms, **row)
            finally:
                Budget.release(reservation)
            lowered = (error_text or "").lower() + " " + (text or "").lower()
            if http_status in (400, 415, 422) and fallbacks < 4:
                learned = self._learn(lowered, send_image, adapt)
                if learned == "image_rejected_yes":
                    raise self._unusable(call_id, f"the server rejected the chart image ({http_status}) but OPENAI_VISION=yes: "
                                         f"{self._short(error_text)}. Fix: use a vision model, or set OPENAI_VISION=auto "
                                         "(fall back to numbers) or no")
                if learned:
                    fallbacks += 1  # adapting to the server is not a retry: it does not count as a failure
                    log.warning("%s %s: %s; retrying", symbol, timeframe or "", learned)
                    continue
            if status in ("rate_limited", "server_error", "timeout", "connection_error"):
                failures.append(f"attempt {attempt}: {status}" + (f" ({http_status})" if http_status else ""))
                if len(failures) < s.max_attempts:
                    time.sleep(self._backoff(len(failures), headers))
                    continue
                raise self._unusable(call_id, f"the model call failed after {len(failures)} attempt(s) "
                                     f"({'; '.join(failures)}): {self._short(error_text)}. "
                                     f"Fix: {self._retry_fix(status)}")
            raise self._unusable(call_id, self._explain(http_status, error_text, text))

    def _unusable(self, call_id: str, reason: str) -> _Unusable:
        error = _Unusable(self.redactor.text(reason))
        error.call_id = call_id  # type: ignore[attr-defined]
        return error

    def _short(self, text: str | None) -> str:
        return (self.redactor.text(text or "") or "")[:300]

    def _explain(self, http_status: int | None, error_text: str | None, response_text: str | None = None) -> str:
        s, short = self.settings, self._short(error_text)
        lowered = f"{error_text or ''} {response_text or ''}".lower()
        key_words = ("api key", "api_key", "apikey", "unauthorized", "unauthenticated", "authentication")
        model_words = ("not found", "does not exist", "not exist", "invalid model", "unknown model", "no such model",
                       "not a valid model", "model_not_found")
        if http_status in (401, 403) or (http_status == 400 and _mentions(lowered, *key_words)):
            return (f"the server at {self._endpoint} refused the API key ({http_status}): {short}. "
                    "Fix: set OPENAI_API_KEY to a valid key for OPENAI_BASE_URL")
        unknown_model = http_status in (400, 422) and "model" in lowered and _mentions(lowered, *model_words)
        if http_status == 404 or unknown_model:
            return (f"the server at {self._endpoint} answered {http_status} for model {s.model!r}: {short}. "
                    "Fix: check OPENAI_MODEL (the model's name as this server knows it, e.g. `ollama list`) and "
                    "OPENAI_BASE_URL (the API root, usually ending in /v1)")
        return (f"the server at {self._endpoint} rejected the request ({http_status}): {short}. Fix: check that "
                "OPENAI_BASE_URL is an OpenAI-compatible Chat Completions API and OPENAI_MODEL one of its models")

    def _retry_fix(self, status: str) -> str:
        s = self.settings
        if status == "connection_error":
            return f"start the server, or set OPENAI_BASE_URL to its API root (now {self._endpoint})"
        if status == "timeout":
            return f"raise OPENAI_TIMEOUT_SECONDS (now {s.timeout_s:g}) for a slow server, or check its load"
        if status == "rate_limited":
            return ("lower TRADING_LLM_CONCURRENCY, raise TRADING_LLM_MAX_ATTEMPTS or TRADING_LLM_BACKOFF_MAX_SECONDS, "
                    "or raise the account's rate limit")
        return "check the server's logs; TRADING_LLM_MAX_ATTEMPTS sets how often a failing call is tried"

    def _learn(self, error_text: str, sent_image: bool, adapt: _Adaptation) -> str | None:
        """Adapt to a 400 that names a feature the server lacks; return what changed (None: nothing)."""
        s = self.settings
        with self._adapt.lock:
            if sent_image and _mentions(error_text, "image", "vision", "multimodal", "multi-modal"):
                if s.vision == "yes":
                    return "image_rejected_yes"
                self._adapt.vision_ok = False
                return "the server rejects image input: continuing with the numeric context only (vision: false)"
            if adapt.response_format != "none" and _mentions(error_text, "response_format", "json_schema", "response format",
                                                             "structured output", "json_object", "schema"):
                self._adapt.response_format = "json_object" if adapt.response_format == "json_schema" else "none"
                return f"the server rejects response_format {adapt.response_format}: using {self._adapt.response_format}"
            if adapt.max_tokens_param == "max_completion_tokens" and _mentions(error_text, "max_completion_tokens"):
                self._adapt.max_tokens_param = "max_tokens"
                return "the server rejects max_completion_tokens: using max_tokens"
            if adapt.send_temperature and s.temperature is not None and _mentions(error_text, "temperature"):
                self._adapt.send_temperature = False
                return "the server rejects temperature: leaving it out"
        return None

    def _backoff(self, attempt: int, headers: Mapping[str, str] | None) -> float:
        """Exponential backoff with jitter; a server's retry-after(-ms) is honoured up to
        TRADING_LLM_BACKOFF_MAX_SECONDS (a wait of an hour would stall the whole run)."""
        s = self.settings
        delay = min(s.backoff_max_s, s.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        asked = _retry_after(headers or {})
        if asked is not None:
            delay = max(delay, min(asked, s.backoff_max_s))
        return delay

    def _request(self, prompt: Prompt, user_text: str, png: bytes | None, image_sha: str | None,
                 schema: dict[str, Any], adapt: _Adaptation, answer_model: type[BaseModel]) -> tuple[dict, dict]:
        """(body sent, body recorded): the record carries the image's sha256 instead of its base64."""
        s = self.settings
        system = prompt.system
        if adapt.response_format != "json_schema":
            system += ("\n\nReply with a single JSON object (no prose, no code fence) that validates against this "
                       "JSON schema:\n" + json.dumps(schema, separators=(",", ":")))
        text = user_text.replace("{chart_status}", "attached" if png is not None else
                                 "not available (use the numeric context only)")

        def messages(image_url: str | None) -> list[dict]:
            content: list[dict] = [{"type": "text", "text": text}]
            if image_url is not None:
                content.append({"type": "image_url", "image_url": {"url": image_url}})
            return [{"role": "system", "content": system}, {"role": "user", "content": content}]

        body: dict[str, Any] = {"model": s.model, adapt.max_tokens_param: s.max_output_tokens}
        if s.temperature is not None and adapt.send_temperature:
            body["temperature"] = s.temperature
        if adapt.response_format == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": answer_model.__name__.lower(), "strict": True, "schema": schema}}
        elif adapt.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        record = {"method": "POST", "url": f"{self._endpoint}/chat/completions",
                  "headers": {"Authorization": "Bearer [REDACTED]", "Content-Type": "application/json"},
                  "body": {**body, "messages": messages(
                      None if png is None else f"[image omitted: sha256 {image_sha}, {len(png)} bytes]")}}
        body["messages"] = messages(None if png is None else
                                    "data:image/png;base64," + base64.b64encode(png).decode("ascii"))
        return body, record

    def _send(self, client: Any, body: dict[str, Any]) -> tuple[str, int | None, str | None, Mapping[str, str] | None, str | None]:
        """(status, http status, response text, headers, error text), never raising for HTTP trouble."""
        import openai

        request = dict(body)
        known = {"model", "messages", "max_completion_tokens", "max_tokens", "temperature", "response_format"}
        extra = {k: request.pop(k) for k in list(request) if k not in known}
        with _gate(self.settings.concurrency):
            try:
                raw = client.chat.completions.with_raw_response.create(**request, extra_body=extra or None)
                return "ok", raw.status_code, raw.http_response.text, raw.headers, None
            except openai.APITimeoutError as error:
                return "timeout", None, None, None, f"timed out after {self.settings.timeout_s:g} s: {error}"
            except openai.APIConnectionError as error:
                return "connection_error", None, None, None, (
                    f"cannot reach {self._endpoint}: {error} {error.__cause__ or ''}".strip())
            except openai.APIStatusError as error:
                response = error.response
                code = response.status_code
                status = "rate_limited" if code == 429 else "server_error" if code >= 500 else "http_error"
                return status, code, response.text, response.headers, f"{code}: {error.message}"

    def _accept(self, text: str | None, headers: Mapping[str, str] | None, row: dict, attempt: int,
                http_status: int | None, latency_ms: float, estimate: int, answer_model: type[BaseModel], key: str,
                context_sha: str, vision: bool, response_format: str) -> _Answer:
        s = self.settings
        call_id = row["call_id"]
        try:
            body = json.loads(text or "")
        except (ValueError, RecursionError):
            body = None
        usage = _usage(body) if isinstance(body, Mapping) else None
        prompt_tokens, completion_tokens = usage if usage else (estimate - s.max_output_tokens, s.max_output_tokens)
        accounted = dict(attempt=attempt, http_status=http_status, response=text, latency_ms=latency_ms,
                         prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, usage_estimated=usage is None,
                         cost_usd=s.price.cost(prompt_tokens, completion_tokens) if s.price else None, **row)
        try:
            # Redacted before it is read: a server echoing the key cannot put it into an analysis.
            content = self.redactor.text(self._content(body, text, headers, http_status))
            answer, notes = parse_answer(content, answer_model)
        except Exception as error:  # noqa: BLE001 - whatever the server sent, the call is in the log
            status = getattr(error, "status", None) or "malformed_response"
            reason = str(error) if isinstance(error, _Unusable) else \
                f"the server's response could not be read ({type(error).__name__}: {error})"
            self.calls.record(status=status, error=self.redactor.text(reason), **accounted)
            raise self._unusable(call_id, reason) from None
        # The cache entry is stored even when the cache is bypassed: the fresh answer serves the next run.
        cache_fields = dict(kind=row["kind"], model=s.model, prompt_version=row["prompt_version"],
                            image_sha256=row["image_sha256"], context_sha256=context_sha, content=content,
                            vision=vision, response_format=response_format, call_id=call_id)
        return _Answer(answer, vision, response_format, call_id, cached=False, notes=notes,
                       row=dict(status=model_calls.OK, **accounted), cache_put=(key, cache_fields))

    def _content(self, body: Any, text: str | None, headers: Mapping[str, str] | None, http_status: int | None) -> str:
        """The answer text of a chat completion; _Unusable (with a status) saying what is missing."""
        if body is None:
            content_type = (headers or {}).get("content-type") or "no content type"
            html = "html" in content_type.lower() or (text or "").lstrip()[:1] == "<"
            raise _unusable_with("malformed_response", (
                f"the server at {self._endpoint} answered HTTP {http_status} with "
                f"{'an HTML page' if html else 'a body that is not JSON'} ({content_type}: {(text or '')[:200]!r}) "
                "instead of a chat completion. Fix: set OPENAI_BASE_URL to the API root of an OpenAI-compatible "
                "server (usually ending in /v1, e.g. https://api.openai.com/v1 or http://127.0.0.1:11434/v1)"))
        choices = body.get("choices") if isinstance(body, Mapping) else None
        if isinstance(body, Mapping) and not choices and body.get("error"):  # proxies put upstream errors in a 200
            problem = body["error"]
            message = problem.get("message") if isinstance(problem, Mapping) else problem
            raise _unusable_with("error_in_body", f"the server at {self._endpoint} answered HTTP {http_status} with an "
                                                  f"error instead of a completion: {str(message)[:300]}")
        if not isinstance(choices, list) or not choices:
            raise _unusable_with("malformed_response", "the server's response is not a chat completion (no choices)")
        choice = choices[0] if isinstance(choices[0], Mapping) else {}
        message = choice.get("message") if isinstance(choice.get("message"), Mapping) else {}
        finish = choice.get("finish_reason")
        refusal = message.get("refusal")
        if refusal:
            raise _unusable_with("refusal", f"the model refused: {str(refusal)[:300]}")
        if finish == "content_filter":
            raise _unusable_with("content_filter", "the server's content filter stopped the answer "
                                                   "(finish_reason=content_filter)")
        content = message.get("content")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
        if content is not None and not isinstance(content, str):
            raise _unusable_with("empty", f"the model's content is not text (got {type(content).__name__})")
        if not content or not content.strip():
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            hint = ""
            if reasoning and finish == "length":
                hint = (" (the model spent its output on reasoning and was cut off before answering, "
                        "finish_reason=length: raise OPENAI_MAX_OUTPUT_TOKENS)")
            elif finish == "length":
                hint = " (finish_reason=length: raise OPENAI_MAX_OUTPUT_TOKENS)"
            elif reasoning:
                hint = " (the model gave only reasoning, no answer)"
            raise _unusable_with("empty", "the model returned empty content" + hint)
        if finish == "length":
            raise _unusable_with("truncated", "the answer was cut off at the output token limit "
                                              "(finish_reason=length); raise OPENAI_MAX_OUTPUT_TOKENS")
        return content


# Loggers of the HTTP stack that write what the server sent verbatim, unredacted: httpx2 every request's
# full URL (a password in OPENAI_BASE_URL) and status line at INFO, httpcore2 every response header and
# openai the x-request-id header at DEBUG. Each call is recorded (redacted) in llm_calls instead.
_VERBATIM_LOGGERS = {"httpx2": logging.WARNING, "httpcore2": logging.INFO, "openai": logging.INFO}


def _quiet_http_loggers() -> None:
    for name, level in _VERBATIM_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, level))


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a server asks to wait: retry-after-ms, or retry-after as seconds or an HTTP date."""
    try:
        milliseconds = headers.get("retry-after-ms")
        if milliseconds:
            value = float(milliseconds) / 1000
        else:
            raw = (headers.get("retry-after") or "").strip()
            if not raw:
                return None
            try:
                value = float(raw)
            except ValueError:
                value = (email.utils.parsedate_to_datetime(raw) - datetime.now(UTC)).total_seconds()
    except (ValueError, TypeError, OverflowError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _answer_notes(result: _Answer) -> list[str]:
    """How the answer was obtained, when it was not the plain Structured Outputs path."""
    notes = []
    if result.response_format == "json_object":
        notes.append("server without json_schema: answered in json_object mode")
    elif result.response_format != "json_schema":
        notes.append("server without json_schema or json_object: answered in plain-prompt mode "
                     "(no response_format, schema in the prompt)")
    notes.extend(result.notes)
    return notes


def _summary(a: TimeframeAnalysis) -> dict[str, Any]:
    return {"timeframe": a.timeframe, "signal": a.signal.value, "trend": a.trend.value, "confidence": a.confidence,
            "entry": a.entry, "stop": a.stop, "targets": a.targets, "support": a.support, "resistance": a.resistance,
            "indicators": [{"name": v.name, "bullish": v.bullish, "reading": v.detail} for v in a.votes],
            "last_close": a.last_close, "atr_14": a.atr, "rationale": a.rationale, "data_through": a.data_through.isoformat()}


def _no_trade(reason: str) -> Consolidated:
    return Consolidated(Proposal(Action.NO_TRADE, None, None, [], 0.0), "none", f"NO_TRADE: {reason}")
