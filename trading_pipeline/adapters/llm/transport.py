"""HTTP to an OpenAI-compatible server: the client, one request, backoff, what the server accepts
and what its errors mean.

- `Transport.send` makes one Chat Completions request through the `openai` SDK (imported only when
  the first client is built) and never raises for HTTP trouble: it says what happened (`Sent`).
- `ServerFeatures` remembers what this endpoint accepts, learned from its 400s: a server rejecting
  `json_schema` gets `json_object` (then no `response_format` at all, "none"); with
  OPENAI_VISION=auto one rejecting image input gets the numeric context only; `max_completion_tokens`
  falls back to `max_tokens`; a rejected `temperature` is dropped.
- `classify`: what an HTTP error status means: 429 rate limits, 408, 409 and 5xx are retried; a used-up
  quota (402, a 429 saying so) and a content filter's 400 are not.
- `Transport.backoff`: exponential with jitter; a server's retry-after(-ms), or else its
  x-ratelimit-reset-*, is honoured up to TRADING_LLM_BACKOFF_MAX_SECONDS.
- `Transport.explain` / `retry_fix`: a rejected key, an unknown model, an unreachable server each
  give a reason naming the variable to fix; server text in it is redacted.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import math
import random
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from trading_pipeline.adapters import model_calls
from trading_pipeline.adapters.llm.settings import OpenAISettings
from trading_pipeline.adapters.model_calls import Redactor

# Loggers of the HTTP stack that write what the server sent verbatim, unredacted: httpx2 every request's
# full URL (a password in OPENAI_BASE_URL) and status line at INFO, httpcore2 every response header and
# openai the x-request-id header at DEBUG. Each call is recorded (redacted) in llm_calls instead.
_VERBATIM_LOGGERS = {"httpx2": logging.WARNING, "httpcore2": logging.INFO, "openai": logging.INFO}
# What `ServerFeatures.learn` returns when the image was rejected but OPENAI_VISION=yes forbids dropping it.
IMAGE_REJECTED_WITH_VISION_YES = "image_rejected_yes"
RETRYABLE = ("rate_limited", "server_error", "timeout", "connection_error")
QUOTA_EXCEEDED = "quota_exceeded"  # 402, or a 429 saying the quota or credit is used up: waiting does not end it
CONTENT_FILTER = "content_filter"  # a 400 of the server's content filter (Azure: code content_filter): not a feature
RESPONSE_TOO_LARGE = "response_too_large"  # adapters/bounded_http.MAX_RESPONSE_BYTES: not retried, the server answered


class Sent(NamedTuple):
    """What one request came to: status ok | rate_limited | server_error | http_error | timeout |
    connection_error | response_too_large, and whatever the server answered."""

    status: str
    http_status: int | None
    text: str | None
    headers: Mapping[str, str] | None
    error_text: str | None


# How servers word a 400 for a `system` message: OpenAI's o1-mini/o1-preview ("'messages[0].role' does
# not support 'system' with this model"), chat templates that have no system turn, as vLLM and TGI
# relay them (Gemma: "System role not supported"; older Mistral: "Conversation roles must alternate
# user/assistant/...").
_NO_SYSTEM_ROLE = ("does not support 'system'", "system role not supported", "system role is not supported",
                   "roles must alternate", "role 'system' is not supported", "unsupported role: system")


def mentions(text: str, *words: str) -> bool:
    return any(word in text for word in words)


# A 429 that is not a rate limit (OpenAI: type/code insufficient_quota, and the *_spend_limit_exceeded,
# credit_balance_exhausted codes): the account has nothing left to spend, so retrying cannot help.
# Not "billing": OpenAI's plain rate-limit message may end "Visit …/account/billing to add a payment method".
_QUOTA = ("insufficient_quota", "exceeded your current quota", "spend_limit", "credit_balance", "usage_limit_exceeded",
          "insufficient credits", "insufficient balance")
# A 400 of a content filter on the prompt (Azure: {"error": {"code": "content_filter", ...}}; OpenAI: invalid_prompt,
# "flagged as potentially violating our usage policy").
_FILTERED = ("content_filter", "content_policy_violation", "responsibleaipolicyviolation", "invalid_prompt",
             "flagged as potentially violating")


def classify(code: int, text: str) -> str:
    """The status of an HTTP error `code` whose lowercased body (and message) is `text`. 408 and 409
    are retried like 429 and 5xx, as the OpenAI API's documentation and SDKs do."""
    if code == 402 or (code == 429 and mentions(text, *_QUOTA)):
        return QUOTA_EXCEEDED
    if code == 429:
        return "rate_limited"
    if code == 408:
        return "timeout"
    if code == 409 or code >= 500:
        return "server_error"
    if code == 400 and mentions(text, *_FILTERED):
        return CONTENT_FILTER
    return "http_error"


# A 403 about where the request comes from, not the key (OpenAI: unsupported_country_region_territory;
# Azure: "Access denied due to Virtual Network/Firewall rules").
_PLACE_WORDS = ("country", "region", "territory", "firewall", "virtual network", "ip address", "not allowed from")
# A 400 saying the request does not fit the model (its context, or its output limit): not a missing feature.
_TOO_LONG = ("context length", "context_length", "context window", "maximum context", "too large", "too long",
             "too many tokens", "reduce the length", "supports at most")


@dataclass(frozen=True)
class Features:
    """What a request may use (a snapshot of ServerFeatures)."""

    vision_ok: bool | None = None
    response_format: str = "json_schema"  # -> json_object -> none
    max_tokens_param: str = "max_completion_tokens"  # -> max_tokens
    send_temperature: bool = True
    system_role: bool = True  # -> the instructions open the user message


class ServerFeatures:
    """What this endpoint accepts, learned from its 400s (per analyst, shared by its threads)."""

    def __init__(self, settings: OpenAISettings):
        self.settings = settings
        self._known = Features()
        self._lock = threading.Lock()

    def snapshot(self) -> Features:
        with self._lock:
            return self._known

    def learn(self, error_text: str, sent_image: bool, tried: Features) -> str | None:
        """Adapt to a 400 (lowercased `error_text`) naming a feature the server lacks; return what
        changed (None: nothing; IMAGE_REJECTED_WITH_VISION_YES: the image cannot be dropped)."""
        s = self.settings
        with self._lock:
            if sent_image and mentions(error_text, "image", "vision", "multimodal", "multi-modal"):
                if s.vision == "yes":
                    return IMAGE_REJECTED_WITH_VISION_YES
                self._known = replace(self._known, vision_ok=False)
                return "the server rejects image input: continuing with the numeric context only (vision: false)"
            if tried.system_role and mentions(error_text, *_NO_SYSTEM_ROLE):
                self._known = replace(self._known, system_role=False)
                return "the server rejects the system role: sending the instructions at the start of the user message"
            if tried.response_format != "none" and mentions(error_text, "response_format", "json_schema",
                                                            "response format", "structured output", "json_object",
                                                            "schema"):
                fallback = "json_object" if tried.response_format == "json_schema" else "none"
                self._known = replace(self._known, response_format=fallback)
                return f"the server rejects response_format {tried.response_format}: using {fallback}"
            if tried.max_tokens_param == "max_completion_tokens" and mentions(error_text, "max_completion_tokens") \
                    and not mentions(error_text, *_TOO_LONG):
                self._known = replace(self._known, max_tokens_param="max_tokens")
                return "the server rejects max_completion_tokens: using max_tokens"
            if tried.send_temperature and s.temperature is not None and mentions(error_text, "temperature"):
                self._known = replace(self._known, send_temperature=False)
                return "the server rejects temperature: leaving it out"
        return None


@functools.cache
def _gate(concurrency: int) -> threading.BoundedSemaphore:
    """Process-wide bound on model requests in flight (TRADING_LLM_CONCURRENCY)."""
    return threading.BoundedSemaphore(concurrency)


def _quiet_http_loggers() -> None:
    for name, level in _VERBATIM_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, level))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def _duration(raw: str) -> float | None:
    """OpenAI's x-ratelimit-reset-* value ("20ms", "1s", "6m0s", "1h2m3.5s") or plain seconds, in seconds."""
    raw = raw.strip().lower()
    try:
        return float(raw)
    except ValueError:
        pass
    parts = _DURATION.findall(raw)
    if not parts or "".join(n + u for n, u in parts) != raw:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def ratelimit_reset(headers: Mapping[str, str], rate_limited: bool) -> float | None:
    """Seconds until the exhausted limit resets, from x-ratelimit-reset-requests/-tokens (OpenAI,
    Azure, OpenRouter-style proxies): of the limits whose x-ratelimit-remaining-* is 0; for a 429
    (`rate_limited`) that gives no x-ratelimit-remaining-*, the longest. OpenAI sends these headers
    on every response: a limit with some left says nothing about when to retry a 500."""
    resets = {kind: _duration(headers.get(f"x-ratelimit-reset-{kind}") or "") for kind in ("requests", "tokens")}
    resets = {kind: value for kind, value in resets.items() if value is not None and math.isfinite(value)}
    remaining = {kind: (headers.get(f"x-ratelimit-remaining-{kind}") or "").strip() for kind in resets}
    chosen = [value for kind, value in resets.items() if remaining[kind] == "0"]
    if not chosen and rate_limited and not any(remaining.values()):
        chosen = list(resets.values())
    return max(chosen) if chosen else None


def retry_after(headers: Mapping[str, str], rate_limited: bool = False) -> float | None:
    """Seconds a server asks to wait: retry-after-ms, or retry-after as seconds or an HTTP date, or
    else when its x-ratelimit-reset-* headers say the exhausted limit resets."""
    if not headers.get("retry-after-ms") and not (headers.get("retry-after") or "").strip():
        value = ratelimit_reset(headers, rate_limited)
        return value if value is not None and value >= 0 else None
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


class Transport:
    """The HTTP side of the analyst's model calls, for one endpoint."""

    def __init__(self, settings: OpenAISettings, redactor: Redactor, client: Any = None):
        self.settings = settings
        self.redactor = redactor
        self.endpoint = model_calls.endpoint_for_record(settings.base_url)  # as recorded: no credentials
        self._client = client
        self._client_lock = threading.Lock()

    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import httpx2
                import openai

                from trading_pipeline.adapters.bounded_http import bounded_hooks

                _quiet_http_loggers()
                s = self.settings
                self._client = openai.OpenAI(
                    api_key=s.api_key, base_url=s.base_url, timeout=s.timeout_s, max_retries=0,
                    http_client=httpx2.Client(
                        timeout=s.timeout_s, event_hooks=bounded_hooks(httpx2, s.timeout_s),
                        limits=httpx2.Limits(max_connections=max(16, 2 * s.concurrency),
                                             max_keepalive_connections=max(8, s.concurrency))))
                _ = self._client.chat.completions.with_raw_response  # import the SDK's lazy parts now
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def send(self, body: dict[str, Any]) -> Sent:
        """One request (body fields the SDK does not know travel as extra_body), never raising for HTTP trouble."""
        import openai

        client = self.client()
        request = dict(body)
        known = {"model", "messages", "max_completion_tokens", "max_tokens", "temperature", "response_format"}
        extra = {k: request.pop(k) for k in list(request) if k not in known}
        with _gate(self.settings.concurrency):
            try:
                raw = client.chat.completions.with_raw_response.create(**request, extra_body=extra or None)
                return Sent("ok", raw.status_code, raw.http_response.text, raw.headers, None)
            except openai.APITimeoutError as error:
                return Sent("timeout", None, None, None, f"timed out after {self.settings.timeout_s:g} s: "
                            f"{error} {error.__cause__ or ''}".strip())
            except openai.APIConnectionError as error:
                import httpx2

                from trading_pipeline.adapters.bounded_http import response_too_large

                if isinstance(error.__cause__, response_too_large(httpx2)):
                    code = error.__cause__.status_code
                    return Sent(RESPONSE_TOO_LARGE, code, None, None, (
                        f"the server at {self.endpoint} answered HTTP {code} with a response larger than "
                        f"{error.__cause__} (an answer is a few KB); it was cut off unread. Fix: check that "
                        "OPENAI_BASE_URL is the API root of an OpenAI-compatible Chat Completions server"))
                return Sent("connection_error", None, None, None,
                            f"cannot reach {self.endpoint}: {error} {error.__cause__ or ''}".strip())
            except openai.APIStatusError as error:
                response = error.response
                code = response.status_code
                status = classify(code, f"{error.message} {response.text}".lower())
                return Sent(status, code, response.text, response.headers, f"{code}: {error.message}")

    def backoff(self, attempt: int, headers: Mapping[str, str] | None, rate_limited: bool = False) -> float:
        """Exponential backoff with jitter; a server's wait (`retry_after`) is honoured up to
        TRADING_LLM_BACKOFF_MAX_SECONDS (a wait of an hour would stall the whole run)."""
        s = self.settings
        delay = min(s.backoff_max_s, s.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        asked = retry_after(headers or {}, rate_limited)
        if asked is not None:
            delay = max(delay, min(asked, s.backoff_max_s))
        return delay

    def short(self, text: str | None) -> str:
        """Server text fit for a reason: redacted, at most 300 characters."""
        return (self.redactor.text(text or "") or "")[:300]

    def explain(self, http_status: int | None, error_text: str | None, response_text: str | None = None,
                headers: Mapping[str, str] | None = None) -> str:
        """Why a request the server answered (not retryable) gave nothing, and what to fix."""
        s, short = self.settings, self.short(error_text)
        if http_status is not None and 300 <= http_status < 400:  # never followed: it could lead off the machine
            location = self.short((headers or {}).get("location")) or "no Location given"
            return (f"the server at {self.endpoint} redirects ({http_status}) to {location}; redirects are not "
                    "followed. Fix: set OPENAI_BASE_URL to the address the API really answers at (the API root, "
                    "usually ending in /v1)")
        lowered = f"{error_text or ''} {response_text or ''}".lower()
        key_words = ("api key", "api_key", "apikey", "unauthorized", "unauthenticated", "authentication")
        model_words = ("not found", "does not exist", "not exist", "invalid model", "unknown model", "no such model",
                       "not a valid model", "model_not_found")
        if http_status == 402 or (http_status == 429 and mentions(lowered, *_QUOTA)):
            return (f"the server at {self.endpoint} says the account's quota or credit is used up ({http_status}): "
                    f"{short}. Not retried: waiting does not end it. Fix: check the plan, billing and spend limits "
                    "of the account (or project) that OPENAI_API_KEY belongs to, or use another key")
        if http_status == 400 and mentions(lowered, *_FILTERED):
            return (f"the server's content filter rejected the request ({http_status}): {short}. Not retried: the "
                    "same request is filtered again. Fix: review the content filter configuration of the deployment "
                    "(Azure: its content filter / Responsible AI policy) or use another model or server")
        if http_status == 403 and mentions(lowered, *_PLACE_WORDS):
            return (f"the server at {self.endpoint} refused access from this machine (403): {short}. The key may be "
                    "fine: the account's region or the resource's network rules exclude this machine. Fix: run from "
                    "a supported region, or allow this machine's network (Azure: the resource's Networking/firewall "
                    "settings)")
        if http_status == 413:  # the body's size in bytes (the chart image), not its tokens
            return (f"the server at {self.endpoint} answered 413: the request body is larger than it accepts "
                    f"(or a proxy in front of it): {short}. Fix: raise that body size limit (nginx: "
                    "client_max_body_size), or set OPENAI_VISION=no to send the numeric context without the chart")
        if http_status in (401, 403) or (http_status == 400 and mentions(lowered, *key_words)):
            return (f"the server at {self.endpoint} refused the API key ({http_status}): {short}. "
                    "Fix: set OPENAI_API_KEY to a valid key for OPENAI_BASE_URL")
        if http_status in (400, 422) and mentions(lowered, *_TOO_LONG):
            return (f"the server at {self.endpoint} answered {http_status}: the request is too long for the model's "
                    f"context or output limit: {short}. Fix: lower OPENAI_MAX_OUTPUT_TOKENS (now "
                    f"{s.max_output_tokens}), or serve the model with a larger context (Ollama: num_ctx or "
                    "OLLAMA_CONTEXT_LENGTH; vLLM: --max-model-len; llama.cpp: --ctx-size)")
        unknown_model = "model" in lowered and mentions(lowered, *model_words)
        if http_status == 404 and not unknown_model:  # the path, not the model: no API at this URL
            path = urlsplit(s.base_url).path.rstrip("/")
            hint = "" if path.endswith("/v1") or "/openai/v1" in path else (
                f"; it does not end in /v1: Ollama, vLLM, LM Studio and OpenAI answer at {self.endpoint}/v1")
            return (f"the server at {self.endpoint} has no Chat Completions API at {self.endpoint}/chat/completions "
                    f"(404): {short}. Fix: set OPENAI_BASE_URL to the API root{hint}; OPENAI_MODEL={s.model!r} "
                    "must be a model that server serves")
        if http_status == 404 or (http_status in (400, 422) and unknown_model):
            return (f"the server at {self.endpoint} answered {http_status} for model {s.model!r}: {short}. "
                    "Fix: check OPENAI_MODEL (the model's name as this server knows it, e.g. `ollama list`) and "
                    "OPENAI_BASE_URL (the API root, usually ending in /v1)")
        return (f"the server at {self.endpoint} rejected the request ({http_status}): {short}. Fix: check that "
                "OPENAI_BASE_URL is an OpenAI-compatible Chat Completions API and OPENAI_MODEL one of its models")

    def retry_fix(self, status: str) -> str:
        """What to change when retries of a `status` failure ran out."""
        if status == "connection_error":
            return f"start the server, or set OPENAI_BASE_URL to its API root (now {self.endpoint})"
        if status == "timeout":
            return f"raise OPENAI_TIMEOUT_SECONDS (now {self.settings.timeout_s:g}) for a slow server, or check its load"
        if status == "rate_limited":
            return ("lower TRADING_LLM_CONCURRENCY, raise TRADING_LLM_MAX_ATTEMPTS or TRADING_LLM_BACKOFF_MAX_SECONDS, "
                    "or raise the account's rate limit")
        return "check the server's logs; TRADING_LLM_MAX_ATTEMPTS sets how often a failing call is tried"
