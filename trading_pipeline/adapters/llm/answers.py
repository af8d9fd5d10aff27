"""The answers the model must give, read from a chat completion and validated here (never trusted).

A chat completion gives its answer text (`completion_content`: an HTML page, a 200 carrying an
error, a refusal, a filtered, empty or truncated answer each say so), its usage when plausible
(`reported_usage`), and the text's one JSON object validated strictly against the answer's
pydantic model (`parse_answer`). What is unusable raises `Unusable`: the NO_TRADE reason, with the
`llm_calls` status to record.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from trading_pipeline.adapters.llm.json_text import UnreadableJSON, read_json
from trading_pipeline.adapters.model_calls import canonical_json, sha256_hex

MAX_REPORTED_TOKENS = 10_000_000  # per usage field; beyond that a server's usage is not believed


class Unusable(Exception):
    """The call produced nothing usable: the message is the NO_TRADE reason, `status` the llm_calls
    status of the attempt, `call_id` the call it ends (once known)."""

    def __init__(self, reason: str, status: str = "malformed_response", call_id: str | None = None):
        super().__init__(reason)
        self.status = status
        self.call_id = call_id


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


# Control characters but tab and line breaks: NUL cannot be stored in PostgreSQL text (the decision row
# carries the rationale), ESC sequences drive the terminal a log is read in. Model text has no use for them.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    bad = _CONTROL.search(text)
    if bad:
        raise ValueError(f"holds the control character U+{ord(bad.group()):04X} at position {bad.start()}")
    return text


# Free text of an answer; its bounds are enforced here (the schema sent leaves maxLength out).
Text = Annotated[str, AfterValidator(_printable)]

# The trade plan's fields both answers share (declared in each, in the order the model writes them).
Stop = Annotated[float | None, Field(description="Stop: below the entry for BUY, above for SELL; null for HOLD.")]
Targets = Annotated[list[float], Field(max_length=3, description="1-2 targets beyond the entry; [] for HOLD.")]
Confidence = Annotated[float, Field(ge=0, le=1, description="0 to 1.")]
Rationale = Annotated[Text, Field(min_length=1, max_length=2000)]


class IndicatorReading(_Strict):
    name: Text = Field(max_length=64,
                       description="supertrend, close_vs_sma20, macd_vs_signal, rsi_vs_50, bollinger, volume or atr")
    reading: Text = Field(max_length=500, description="What the indicator shows, with the numbers read.")
    bullish: bool = Field(description="True when this reading argues for a long position.")


class TimeframeAnswer(_Strict):
    trend: Literal["up", "down", "sideways"]
    support: list[float] = Field(max_length=4, description="Up to 4 support prices.")
    resistance: list[float] = Field(max_length=4, description="Up to 4 resistance prices.")
    indicators: list[IndicatorReading] = Field(min_length=1, max_length=8)
    setup: Text = Field(min_length=1, max_length=200, description="The setup in a few words.")
    signal: Literal["BUY", "SELL", "HOLD"]
    entry: float | None = Field(description="Limit entry near the last close; null for HOLD.")
    stop: Stop
    targets: Targets
    confidence: Confidence
    rationale: Rationale


class ConsolidationAnswer(_Strict):
    action: Literal["BUY", "SELL", "HOLD"]
    entry: float | None = Field(description="Limit entry near the daily last close; null for HOLD.")
    stop: Stop
    targets: Targets
    confidence: Confidence
    rationale: Rationale


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
def schema_for(model: type[BaseModel]) -> tuple[dict[str, Any], str]:
    """The strict schema of an answer model and its sha256 (part of the cache key)."""
    schema = strict_json_schema(model)
    return schema, sha256_hex(canonical_json(schema))


def parse_answer(content: str, model: type[BaseModel]) -> tuple[BaseModel, tuple[str, ...]]:
    """Validate the model's text against the schema: (answer, notes on text removed around the JSON).
    Raises Unusable saying what is wrong."""
    try:
        data, notes = read_json(content)
    except UnreadableJSON as error:
        raise Unusable(str(error), "invalid_json") from None
    if not isinstance(data, dict):
        raise Unusable(f"the model's answer is JSON but not an object: {content.strip()[:200]!r}", "invalid_json")
    try:
        return model.model_validate(data, strict=True), notes
    except ValidationError as error:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}" for e in error.errors()[:6])
        raise Unusable(f"the model's answer violates the response schema ({error.error_count()} problem(s): "
                       f"{details})", "schema_violation") from None


def parse_cached(content: str, model: type[BaseModel]) -> tuple[BaseModel, tuple[str, ...]]:
    """`parse_answer` of a response cache entry. An entry holds text that passed `parse_answer` when
    it was stored; plain JSON such text is read as such, in one step (a backtest reads tens of
    thousands): what passed the strict reader once has no duplicate keys or NaN. Anything else
    (a fenced answer, prose around it) goes through `parse_answer` again, and its notes with it."""
    try:
        return model.model_validate_json(content, strict=True), ()
    except ValidationError:
        return parse_answer(content, model)


def _content_and_refusals(message: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """The message's content (content parts' text joined) and its refusal texts, each once. The
    API's message has `content` and `refusal` (text or null); servers also give content as parts,
    `{"type": "text", "text": ...}` and a refusal as `{"type": "refusal", "refusal": ...}` (some
    with its text in `text`). A refusal anywhere is the answer: the model refused."""
    refusals: list[str] = []

    def refused(text: Any) -> None:
        # The reason is shown in the UI, stored and logged: control characters (ESC, NUL) become '?'.
        text = _CONTROL.sub("?", str(text)).strip() if text is not None else ""
        if text and text not in refusals:
            refusals.append(text)

    refused(message.get("refusal") or None)
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "refusal":
                refused(part.get("refusal") or part.get("text") or "(no reason given)")
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
        content = "".join(texts)
    return content, refusals


def completion_content(body: Any, text: str | None, headers: Mapping[str, str] | None, http_status: int | None,
                       endpoint: str) -> str:
    """The answer text of a chat completion (`body`, or None when `text` is not JSON); Unusable (with a
    status) saying what is missing."""
    if body is None:
        content_type = (headers or {}).get("content-type") or "no content type"
        html = "html" in content_type.lower() or (text or "").lstrip()[:1] == "<"
        raise Unusable(
            f"the server at {endpoint} answered HTTP {http_status} with "
            f"{'an HTML page' if html else 'a body that is not JSON'} ({content_type}: {(text or '')[:200]!r}) "
            "instead of a chat completion. Fix: set OPENAI_BASE_URL to the API root of an OpenAI-compatible "
            "server (usually ending in /v1, e.g. https://api.openai.com/v1 or http://127.0.0.1:11434/v1)",
            "malformed_response")
    choices = body.get("choices") if isinstance(body, Mapping) else None
    if isinstance(body, Mapping) and not choices and body.get("error"):  # proxies put upstream errors in a 200
        problem = body["error"]
        message = problem.get("message") if isinstance(problem, Mapping) else problem
        raise Unusable(f"the server at {endpoint} answered HTTP {http_status} with an error instead of a "
                       f"completion: {str(message)[:300]}", "error_in_body")
    if not isinstance(choices, list) or not choices:
        raise Unusable("the server's response is not a chat completion (no choices)", "malformed_response")
    choice = choices[0] if isinstance(choices[0], Mapping) else {}
    message = choice.get("message") if isinstance(choice.get("message"), Mapping) else {}
    finish = choice.get("finish_reason")
    content, refusals = _content_and_refusals(message)
    if refusals:
        raise Unusable(f"the model refused: {' '.join(refusals)[:300]}", "refusal")
    if finish == "content_filter":
        raise Unusable("the server's content filter stopped the answer (finish_reason=content_filter)",
                       "content_filter")
    if finish == "error":  # OpenRouter-style proxies: the upstream failed mid-answer; what came is not the answer
        raise Unusable("the server reports that generation failed (finish_reason=error); the partial answer is not "
                       "used", "error_in_body")
    if content is not None and not isinstance(content, str):
        raise Unusable(f"the model's content is not text (got {type(content).__name__})", "empty")
    if not content or not content.strip():
        # The reasoning text (vLLM, Ollama, DeepSeek), or only its token count (OpenAI's reasoning models).
        reasoning = message.get("reasoning_content") or message.get("reasoning") or _reasoning_tokens(body)
        hint = ""
        if message.get("tool_calls") or message.get("function_call") or finish in ("tool_calls", "function_call"):
            # None is offered; a proxy may turn response_format into a tool (LiteLLM for some providers).
            hint = (f" (it answered with a tool call instead, finish_reason={finish}; no tools are offered and a tool "
                    "call's arguments are not read as an answer: use a model or server that answers in the "
                    "message content)")
        elif reasoning and finish == "length":
            hint = (" (the model spent its output on reasoning and was cut off before answering, "
                    "finish_reason=length: raise OPENAI_MAX_OUTPUT_TOKENS)")
        elif finish == "length":
            hint = " (finish_reason=length: raise OPENAI_MAX_OUTPUT_TOKENS)"
        elif reasoning:
            hint = " (the model gave only reasoning, no answer)"
        raise Unusable("the model returned empty content" + hint, "empty")
    if finish == "length":
        raise Unusable("the answer was cut off at the output token limit (finish_reason=length); "
                       "raise OPENAI_MAX_OUTPUT_TOKENS", "truncated")
    return content


def _reasoning_tokens(body: Mapping[str, Any]) -> int:
    """usage.completion_tokens_details.reasoning_tokens when the server reports it (part of completion_tokens)."""
    usage = body.get("usage")
    details = usage.get("completion_tokens_details") if isinstance(usage, Mapping) else None
    tokens = details.get("reasoning_tokens") if isinstance(details, Mapping) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else 0


# Control characters, line breaks included: a model name is one line of plain text.
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def answered_model(body: Any) -> str | None:
    """The model the server says answered (the completion's `model`), control characters replaced by
    '?'; None when it names none. Redacted and cut to the column's length by the caller."""
    name = body.get("model") if isinstance(body, Mapping) else None
    if not isinstance(name, str):
        return None
    return _ANY_CONTROL.sub("?", name).strip() or None


def reported_usage(body: Mapping[str, Any]) -> tuple[int, int] | None:
    """(prompt, completion) tokens as the server reports them, or None when missing or not believable
    (nulls, text, booleans, negative or absurd counts, or a zero: every request has a prompt, and a
    server that does not count reports zeros): the call is then budgeted by estimate."""
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
    if not prompt or not completion:  # None, or a zero
        return None
    return prompt, completion
