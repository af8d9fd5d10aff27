"""One model call, fail-closed and accounted: response cache, budget, HTTP attempts, `llm_calls`.

A call first looks in the response cache (same model, prompt, chart, numbers and schema: same
answer; the chart as what it shows, core/chart_spec.py, so a backtest finds the answer too). Otherwise each attempt reserves its estimate against the token/cost budgets, is sent,
and is written to `llm_calls` (adapters/model_calls.py); a 400 naming a feature the server lacks
adapts the request (not counted as a failure), rate limits, 5xx, timeouts and unreachable servers
are retried with backoff up to TRADING_LLM_MAX_ATTEMPTS. A server's `usage` is used only when it is
plausible, else the call is budgeted by estimate. Every text from the server is redacted before it
is stored, logged or raised; nothing usable raises `Unusable` with the NO_TRADE reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters import model_calls
from trading_pipeline.adapters.llm.answers import (
    Unusable,
    answered_model,
    completion_content,
    parse_answer,
    parse_cached,
    reported_usage,
    schema_for,
)
from trading_pipeline.adapters.llm.request import build_request, estimate_tokens
from trading_pipeline.adapters.llm.settings import OpenAISettings
from trading_pipeline.adapters.llm.transport import (
    CONTENT_FILTER,
    IMAGE_REJECTED_WITH_VISION_YES,
    RESPONSE_TOO_LARGE,
    RETRYABLE,
    Sent,
    ServerFeatures,
    Transport,
)
from trading_pipeline.adapters.model_calls import Budget, BudgetExceeded, ModelCallLog, Redactor, ResponseCache
from trading_pipeline.prompts import Prompt

log = logging.getLogger(__name__)

# Adaptations to a server's 400s within one call: each of the six things a server may lack (the image,
# json_schema, json_object, max_completion_tokens, temperature, the system role) is dropped at most once.
MAX_FALLBACKS = 6
MAX_MODEL_NAME = 128  # llm_calls.answered_model's length


@dataclass
class Answer:
    answer: BaseModel
    vision: bool
    response_format: str
    call_id: str
    cached: bool
    notes: tuple[str, ...] = ()  # what was removed around the JSON (reasoning, prose)
    model_note: str | None = None  # another model than the one asked for answered (model_calls.answered_model_note)
    # Written together with the outcome, in one transaction, once the answer has been judged:
    row: dict[str, Any] | None = None  # the successful attempt (or the cache hit)
    cache_put: tuple[str, dict[str, Any]] | None = None  # (key, fields) of a fresh schema-valid answer
    cache_hit_key: str | None = None
    reservation: Any = None  # the budget reservation, released once the row is in the log

    def how_obtained(self) -> list[str]:
        """How the answer was obtained, when it was not the plain Structured Outputs path."""
        notes = []
        if self.response_format == "json_object":
            notes.append("server without json_schema: answered in json_object mode")
        elif self.response_format != "json_schema":
            notes.append("server without json_schema or json_object: answered in plain-prompt mode "
                         "(no response_format, schema in the prompt)")
        if self.model_note:
            notes.append(self.model_note)
        notes.extend(self.notes)
        return notes


class ModelCaller:
    """Makes the analyst's model calls against one endpoint, for one run."""

    def __init__(self, settings: OpenAISettings, sessions: sessionmaker[Session], *, run_id: str | None = None,
                 client: Any = None):
        self.settings = settings
        self.run_id = run_id
        # The key, and a password in OPENAI_BASE_URL (https://user:password@proxy/v1), never leave.
        self.redactor = Redactor.for_endpoint(settings.api_key, settings.base_url)
        self.calls = ModelCallLog(sessions, self.redactor)
        self.cache = ResponseCache(sessions)
        self.budget = Budget(self.calls, settings.limits, run_id)
        self.transport = Transport(settings, self.redactor, client)
        self.features = ServerFeatures(settings)

    def close(self) -> None:
        self.transport.close()

    def complete(self, *, kind: str, symbol: str, timeframe: str | None, prompt: Prompt,
                 user_text: Callable[[], str], context_sha256: str, png: bytes | Callable[[], bytes] | None,
                 answer_model: type[BaseModel], chart_sha256: str | None = None) -> Answer:
        """The schema-valid answer (from the cache or the model), to be judged and then `settle`d;
        Unusable (with its call_id) when there is none.

        The request's text and chart image are made only when a request is sent: `user_text` writes
        the text (with the numeric context whose contents `context_sha256` names), `png` is the
        chart image or how to render it. `chart_sha256` (core/chart_spec.py) names what that chart
        shows and keys the answer, so a backtest finds it without rendering; the call log keeps the
        sha256 of the PNG sent."""
        s = self.settings
        schema, schema_sha = schema_for(answer_model)
        want_image = png is not None and s.vision != "no"
        if want_image and chart_sha256 is None:
            raise ValueError("a call with a chart image needs its chart_sha256 (core/chart_spec.py)")
        image_sha = hashlib.sha256(png).hexdigest() if want_image and isinstance(png, bytes) else None
        key = model_calls.cache_key(kind=kind, model=s.model, prompt_version=prompt.version,
                                    chart_sha256=chart_sha256 if want_image else None, context_sha256=context_sha256,
                                    schema_sha256=schema_sha)
        common = {"run_id": self.run_id, "kind": kind, "symbol": symbol, "timeframe": timeframe,
                  "endpoint": self.transport.endpoint, "model": s.model, "prompt_version": prompt.version,
                  "image_sha256": image_sha, "cache_key": key}
        cached = self._cached(key, answer_model, common) if s.cache else None
        if cached is not None:
            return cached

        self.transport.client()  # built (and `openai` imported) before any latency is measured
        text = user_text()
        call_id = uuid.uuid4().hex
        attempt = fallbacks = 0
        failures: list[str] = []
        while True:
            features = self.features.snapshot()
            send_image = want_image and not (s.vision == "auto" and features.vision_ok is False)
            if send_image and not isinstance(png, bytes):
                try:
                    png = png()
                except Exception as error:  # noqa: BLE001 - no picture, no call: fail closed, say why
                    raise self.unusable(None, f"the chart image could not be rendered: {type(error).__name__}: "
                                              f"{error}") from None
                image_sha = common["image_sha256"] = hashlib.sha256(png).hexdigest()
            body, record = build_request(s, f"{self.transport.endpoint}/chat/completions", prompt, text,
                                         png if send_image else None, image_sha, schema, features, answer_model)
            estimate = estimate_tokens(prompt, text, send_image, s.max_output_tokens)
            row = {"call_id": call_id, "vision": send_image, "response_format": features.response_format,
                   "request": record, **common}
            try:
                reservation = self.budget.reserve(estimate, s.price.cost(estimate, 0) if s.price else None)
            except BudgetExceeded as error:
                self.calls.record(attempt=attempt + 1, status=model_calls.BUDGET_EXCEEDED, error=str(error), **row)
                raise self.unusable(call_id, f"no model call: {error}") from None
            attempt += 1
            try:  # the reservation is released once the call's real usage is in the log
                started = time.perf_counter()
                sent = self.transport.send(body)
                latency_ms = (time.perf_counter() - started) * 1000
                if sent.status == "ok":
                    result = self._accept(sent, row, attempt, latency_ms, estimate, answer_model, key, context_sha256)
                    result.reservation, reservation = reservation, None  # released by settle
                    return result
                self.calls.record(attempt=attempt, status=sent.status, http_status=sent.http_status,
                                  error=sent.error_text, response=sent.text, latency_ms=latency_ms, **row)
            finally:
                Budget.release(reservation)
            # A content filter's 400 is about the prompt, not a feature to drop (its body may name the image).
            if sent.http_status in (400, 415, 422) and sent.status != CONTENT_FILTER and fallbacks < MAX_FALLBACKS:
                lowered = (sent.error_text or "").lower() + " " + (sent.text or "").lower()
                learned = self.features.learn(lowered, send_image, features)
                if learned == IMAGE_REJECTED_WITH_VISION_YES:
                    raise self.unusable(call_id, f"the server rejected the chart image ({sent.http_status}) but "
                                        f"OPENAI_VISION=yes: {self.transport.short(sent.error_text)}. Fix: use a vision "
                                        "model, or set OPENAI_VISION=auto (fall back to numbers) or no")
                if learned:
                    fallbacks += 1  # adapting to the server is not a retry: it does not count as a failure
                    log.warning("%s %s: %s; retrying", symbol, timeframe or "", learned)
                    continue
            if sent.status in RETRYABLE:
                failures.append(f"attempt {attempt}: {sent.status}" + (f" ({sent.http_status})" if sent.http_status else ""))
                if len(failures) < s.max_attempts:
                    time.sleep(self.transport.backoff(len(failures), sent.headers, sent.status == "rate_limited"))
                    continue
                raise self.unusable(call_id, f"the model call failed after {len(failures)} attempt(s) "
                                    f"({'; '.join(failures)}): {self.transport.short(sent.error_text)}. "
                                    f"Fix: {self.transport.retry_fix(sent.status)}")
            if sent.status == RESPONSE_TOO_LARGE:
                raise self.unusable(call_id, sent.error_text)
            raise self.unusable(call_id, self.transport.explain(sent.http_status, sent.error_text, sent.text,
                                                                sent.headers))

    def _cached(self, key: str, answer_model: type[BaseModel], common: dict[str, Any]) -> Answer | None:
        cached = self.cache.get(key)
        if cached is None:
            return None
        try:
            answer, notes = parse_cached(cached.content, answer_model)
        except Unusable as error:  # a cache row that no longer validates is a miss, not an answer
            log.warning("cached answer %s no longer validates (%s); calling the model", key,
                        self.redactor.text(str(error)))
            return None
        call_id = uuid.uuid4().hex
        row = {"call_id": call_id, "attempt": 0, "vision": cached.vision, "response_format": cached.response_format,
               "cache_hit": True, "status": model_calls.CACHE_HIT, "response": cached.content,
               "request": {"cache_of_call": cached.call_id}, "answered_model": cached.answered_model, **common}
        return Answer(answer, cached.vision, cached.response_format, call_id, cached=True, notes=notes,
                      model_note=model_calls.answered_model_note(self.settings.model, cached.answered_model),
                      row=row, cache_hit_key=key)

    def _accept(self, sent: Sent, row: dict, attempt: int, latency_ms: float, estimate: int,
                answer_model: type[BaseModel], key: str, context_sha: str) -> Answer:
        """The answer of a 200, its attempt accounted; Unusable (recorded now) when it holds none."""
        s = self.settings
        call_id = row["call_id"]
        try:
            body = json.loads(sent.text or "")
        except (ValueError, RecursionError):
            body = None
        usage = reported_usage(body) if isinstance(body, dict) else None
        # Who answered, as the server says: recorded, and noted when it is not the model asked for. The
        # cost stays at the asked model's price (the only one configured) and the cache key stays the asked
        # model's: answers cached before are still found.
        answered = self.redactor.text(answered_model(body))
        answered = answered[:MAX_MODEL_NAME] if answered else None
        prompt_tokens, completion_tokens = usage if usage else (estimate - s.max_output_tokens, s.max_output_tokens)
        accounted = {"attempt": attempt, "http_status": sent.http_status, "response": sent.text,
                     "latency_ms": latency_ms, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "usage_estimated": usage is None, "answered_model": answered,
                     "cost_usd": s.price.cost(prompt_tokens, completion_tokens) if s.price else None, **row}
        content = redacted = None
        try:
            content = completion_content(body, sent.text, sent.headers, sent.http_status, self.transport.endpoint)
            # Redacted before it is read: a server echoing the key cannot put it into an analysis.
            redacted = self.redactor.text(content)
            answer, notes = parse_answer(redacted, answer_model)
        except Exception as error:  # noqa: BLE001 - whatever the server sent, the call is in the log
            status = error.status if isinstance(error, Unusable) else "malformed_response"
            reason = str(error) if isinstance(error, Unusable) else \
                f"the server's response could not be read ({type(error).__name__}: {error})"
            if redacted != content:  # a key sharing 8 characters with the answer's own words breaks it
                reason += (" [text matching OPENAI_API_KEY was redacted from the answer before it was read: "
                           "the server echoed the key, or the key shares 8 or more characters with the answer]")
            self.calls.record(status=status, error=reason, **accounted)
            raise self.unusable(call_id, reason) from None
        # The cache entry is stored even when the cache is bypassed: the fresh answer serves the next run.
        cache_fields = {"kind": row["kind"], "model": s.model, "prompt_version": row["prompt_version"],
                        "image_sha256": row["image_sha256"], "context_sha256": context_sha, "content": redacted,
                        "vision": row["vision"], "response_format": row["response_format"], "call_id": call_id,
                        "answered_model": answered}
        return Answer(answer, row["vision"], row["response_format"], call_id, cached=False, notes=notes,
                      model_note=model_calls.answered_model_note(s.model, answered), row={"status": model_calls.OK, **accounted}, cache_put=(key, cache_fields))

    def unusable(self, call_id: str | None, reason: str) -> Unusable:
        """The error ending a call: its reason redacted (it becomes the NO_TRADE reason, shown and stored)."""
        return Unusable(self.redactor.text(reason), call_id=call_id)

    def settle(self, result: Answer | None, call_id: str, outcome: str) -> str | None:
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
