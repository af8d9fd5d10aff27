"""OpenAI-compatible servers that are not OpenAI (vLLM, Ollama, LM Studio, llama.cpp, LiteLLM,
OpenRouter-like proxies) and hostile model output, over real HTTP against the local server.

Every case ends either in a valid, fully checked analysis or in NO_TRADE with a reason that names
the problem (and, for configuration problems, the variable to fix); never in a crash, never in a
BUY or SELL from numbers that were not checked, and always with the call in `llm_calls`.
"""

import asyncio
import json
import logging
import socket
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import sqlalchemy as sa

from trading_pipeline.adapters.model_calls import summarize_calls
from trading_pipeline.adapters.openai_analyst import OpenAIAnalyst
from trading_pipeline.core.analysis import Action
from trading_pipeline_tests.adapters.openai.conftest import API_KEY, cached_entries, chart_for, rows
from trading_pipeline_tests.adapters.openai.local_server import (
    Reply,
    answer_json,
    completion,
    context_of,
    error,
    good,
    scripted,
    timeframe_answer,
)


def raw(body_of_request, status: int = 200, **headers):
    """A step answering with a raw body (a dict is sent as JSON, a str as is)."""
    return lambda body: Reply(status, body_of_request(body), headers=dict(headers))


def assert_no_trade(analysis, reason: str) -> None:
    assert not analysis.valid and analysis.signal == Action.NO_TRADE, analysis.rationale
    assert analysis.entry is None and analysis.stop is None and analysis.targets == []
    assert reason in analysis.invalid_reason, analysis.invalid_reason


# --- 1. servers without Structured Outputs --------------------------------------------------------


def rejects_response_format(body):
    """LM Studio-like: neither json_schema nor json_object is accepted, only plain text."""
    if "response_format" in body:
        kind = body["response_format"]["type"]
        return error(400, f"'response_format.type' {kind!r} is not supported: must be 'text'")
    return good()(body)


def test_server_rejecting_json_schema_and_json_object_gets_the_schema_in_the_prompt(make_analyst, openai_server,
                                                                                    daily, weekly, png, sessions):
    openai_server.reset(default=rejects_response_format)
    analyst = make_analyst()
    analysis = analyst.analyze(daily, chart_for(png), png)

    assert analysis.valid and analysis.signal == Action.BUY
    assert "answered in plain-prompt mode (no response_format, schema in the prompt)" in analysis.rationale
    first, second, third = openai_server.bodies()
    assert first["response_format"]["type"] == "json_schema" and second["response_format"] == {"type": "json_object"}
    assert "response_format" not in third
    assert '"additionalProperties":false' in third["messages"][0]["content"]  # the schema travels in the prompt
    assert [(r.status, r.http_status, r.response_format) for r in rows(sessions)] == [
        ("http_error", 400, "json_schema"), ("http_error", 400, "json_object"), ("ok", 200, "none")]
    assert summarize_calls(sessions, run_id="run-1", symbol="AAPL")["response_formats"] == [
        "json_object", "json_schema", "none"]

    # Learned for this analyst: the next call goes straight to the plain prompt, and the answer is
    # still validated strictly (an extra field is a schema violation, not ignored).
    openai_server.reset(lambda body: Reply(200, completion(answer_json(body, position_size=100))))
    strict = analyst.analyze(weekly, None, png)
    assert_no_trade(strict, "violates the response schema")
    assert len(openai_server.requests) == 1 and "response_format" not in openai_server.bodies()[0]
    assert rows(sessions)[-1].response_format == "none" and rows(sessions)[-1].status == "schema_violation"


def test_fastapi_style_422_on_response_format_is_understood(make_analyst, openai_server, daily, png, sessions):
    def step(body):  # vLLM / LiteLLM answer a body they cannot validate with FastAPI's 422
        if body.get("response_format", {}).get("type") == "json_schema":
            return Reply(422, {"detail": [{"loc": ["body", "response_format", "type"], "type": "literal_error",
                                           "msg": "Input should be 'text' or 'json_object'"}]})
        return good()(body)

    openai_server.reset(default=step)
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid and "answered in json_object mode" in analysis.rationale
    assert [r.response_format for r in rows(sessions)] == ["json_schema", "json_object"]


# --- 2. what reasoning and chatty models wrap around the JSON ------------------------------------


@pytest.mark.parametrize("case, wrap, note", [
    ("fence", lambda j: f"```json\n{j}\n```", None),
    ("prose before a fence", lambda j: f"Here is my analysis of the chart:\n\n```json\n{j}\n```\nGood luck!",
     "text around the JSON was ignored"),
    ("prose before bare JSON", lambda j: f"Sure! Based on the chart:\n{j}", "text around the JSON was ignored"),
    ("prose after bare JSON", lambda j: f"{j}\n\nNote: this is not financial advice.",
     "text around the JSON was ignored"),
    ("think block", lambda j: "<think>\nThe trend is up. A draft: {\"signal\": \"SELL\"} no, wait.\n</think>\n\n" + j,
     "<think> reasoning block"),
    ("think block then fence", lambda j: f"<think>Let me look at {{the}} chart.</think>\n```json\n{j}\n```",
     "<think> reasoning block"),
    ("reasoning without its opening tag", lambda j: "Okay, the user wants a plan {maybe}.\n</think>\n\n" + j,
     "</think> reasoning"),
])
def test_json_wrapped_in_fences_prose_or_reasoning_is_read(make_analyst, openai_server, daily, png, sessions,
                                                           case, wrap, note):
    openai_server.reset(scripted(lambda body: wrap(answer_json(body))))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid and analysis.signal == Action.BUY, (case, analysis.invalid_reason)
    if note:
        assert note in analysis.rationale  # what was removed is said, and the raw text is in llm_calls
    [row] = rows(sessions)
    assert row.status == "ok" and row.outcome == "valid"
    stored = json.loads(row.response)["choices"][0]["message"]["content"]
    assert stored == wrap(json.dumps(timeframe_answer(context_of(openai_server.bodies()[0]))))  # kept as sent


@pytest.mark.parametrize("case, text, reason", [
    ("reasoning that never ends", lambda b: "<think>The trend is up, so I would buy at " + "…" * 50,
     "reasoning block that never closes"),
    ("two answers in prose", lambda b: f"Option A: {answer_json(b)}\nOption B: {answer_json(b, signal='HOLD')}",
     "2 JSON objects"),
    ("two fenced blocks", lambda b: f"```json\n{answer_json(b)}\n```\nor\n```json\n{answer_json(b)}\n```",
     "2 fenced blocks"),
    ("prose with no JSON", lambda b: "<think>hmm</think>I recommend a BUY at the last close.", "not valid JSON"),
    ("deeply nested object", lambda b: '{"a":' * 30_000, "not valid JSON"),
    ("deeply nested array", lambda b: "[" * 100_000, "not valid JSON"),
    ("an answer far too long", lambda b: answer_json(b, rationale="x" * 300_000), "characters long"),
])
def test_unreadable_wrapped_answers_are_no_trade_and_recorded(make_analyst, openai_server, daily, png, sessions,
                                                              case, text, reason):
    openai_server.reset(scripted(text))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, reason)
    assert "unexpected error" not in analysis.invalid_reason, case
    [row] = rows(sessions)
    assert row.status == "invalid_json" and row.outcome.startswith("invalid: ") and row.prompt_tokens == 1200
    assert cached_entries(sessions) == 0


# --- 3. completions that are odd, incomplete or hostile ------------------------------------------


def without(*names):
    def step(body):
        reply = completion(answer_json(body))
        for name in names:
            reply.pop(name)
        return Reply(200, reply)
    return step


def with_usage(usage):
    def step(body):
        reply = completion(answer_json(body))
        reply["usage"] = usage
        return Reply(200, reply)
    return step


def content_parts(body):
    reply = completion(None)
    text = answer_json(body)
    reply["choices"][0]["message"]["content"] = [{"type": "text", "text": text[:40]},
                                                 {"type": "text", "text": text[40:]}]
    return Reply(200, reply)


@pytest.mark.parametrize("case, step, estimated", [
    ("no id, created, model or object", without("id", "created", "model", "object"), False),
    ("no usage", without("usage"), True),
    ("usage with nulls", with_usage({"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}), True),
    ("usage as text", with_usage({"prompt_tokens": "1200", "completion_tokens": "300"}), True),
    ("negative usage", with_usage({"prompt_tokens": -1_000_000, "completion_tokens": 300}), True),
    ("absurd usage", with_usage({"prompt_tokens": 10**15, "completion_tokens": 300}), True),
    ("usage as booleans", with_usage({"prompt_tokens": True, "completion_tokens": True}), True),
    ("usage as a list", with_usage([1200, 300]), True),
    # A proxy that does not count reports zeros: taken as counts, the calls would escape every token budget.
    ("zero usage", with_usage({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}), True),
    ("no completion tokens for an answer", with_usage({"prompt_tokens": 1200, "completion_tokens": 0}), True),
    ("no prompt tokens for a prompt", with_usage({"prompt_tokens": 0, "completion_tokens": 300}), True),
    ("content as parts", content_parts, False),
])
def test_odd_but_usable_completions_are_read_and_accounted(make_analyst, openai_server, daily, png, sessions,
                                                           case, step, estimated):
    openai_server.reset(step)
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid and analysis.signal == Action.BUY, (case, analysis.invalid_reason)
    [row] = rows(sessions)
    assert row.status == "ok" and row.usage_estimated is estimated
    # A server's usage is taken only when it is plausible; otherwise the call is budgeted by estimate.
    assert row.total_tokens > 1500 if estimated else row.total_tokens == 1500
    assert 0 < row.total_tokens < 10_000_000


def choice(**fields):
    def step(body):
        reply = completion(None)
        reply["choices"] = [fields] if fields else []
        return Reply(200, reply)
    return step


@pytest.mark.parametrize("case, step, reason, status", [
    ("empty choices", choice(), "not a chat completion (no choices)", "malformed_response"),
    ("choices null", raw(lambda b: {**completion("{}"), "choices": None}), "not a chat completion",
     "malformed_response"),
    ("choice without a message", choice(index=0, finish_reason="stop"), "empty content", "empty"),
    ("a choice that is not an object", raw(lambda b: {**completion("{}"), "choices": ["BUY"]}), "empty content",
     "empty"),
    ("content null with a refusal", choice(message={"role": "assistant", "content": None, "refusal": "I can't."}),
     "the model refused: I can't.", "refusal"),
    # OpenAI's refusal content part is {"type": "refusal", "refusal": ...}; some servers put the text in "text".
    ("a refusal as a content part", choice(finish_reason="stop", message={
        "role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with trading."}]}),
     "the model refused: I can't help with trading.", "refusal"),
    ("a refusal part with its text in text", choice(finish_reason="stop", message={
        "role": "assistant", "content": [{"type": "refusal", "text": "No."}]}), "the model refused: No.", "refusal"),
    ("a refusal part after text parts", choice(finish_reason="stop", message={
        "role": "assistant", "content": [{"type": "text", "text": '{"signal": '},
                                         {"type": "refusal", "refusal": "I stopped: not financial advice."}]}),
     "the model refused: I stopped: not financial advice.", "refusal"),
    ("a refusal field and the same refusal as a part", choice(finish_reason="stop", message={
        "role": "assistant", "refusal": "I can't help.", "content": [{"type": "refusal", "refusal": "I can't help."}]}),
     "the model refused: I can't help.", "refusal"),
    ("a refusal with control characters", choice(message={
        "role": "assistant", "content": None, "refusal": "No\x1b[2J\x00 way\x07."}),
     "the model refused: No?[2J? way?.", "refusal"),
    ("truncated JSON", scripted(lambda b: answer_json(b)[:80], finish_reason="length"),
     "cut off at the output token limit (finish_reason=length); raise OPENAI_MAX_OUTPUT_TOKENS", "truncated"),
    ("all tokens spent on reasoning", choice(finish_reason="length", message={
        "role": "assistant", "content": None, "reasoning_content": "Let me think about the chart..."}),
     "spent its output on reasoning", "empty"),
    ("content parts with non-text", choice(finish_reason="stop", message={
        "role": "assistant", "content": [{"type": "text", "text": 5}, {"type": "text", "text": None}]}),
     "empty content", "empty"),
    ("content as an object", choice(finish_reason="stop", message={"role": "assistant", "content": {"signal": "BUY"}}),
     "content is not text (got dict)", "empty"),
    ("an error in a 200 body", raw(lambda b: {"error": {"message": "Upstream provider overloaded", "code": 502}}),
     "answered HTTP 200 with an error instead of a completion: Upstream provider overloaded", "error_in_body"),
    ("a JSON bomb as the body", raw(lambda b: '{"choices":' + "[" * 100_000), "not JSON", "malformed_response"),
])
def test_incomplete_completions_are_no_trade_and_recorded(make_analyst, openai_server, daily, png, sessions,
                                                          case, step, reason, status):
    openai_server.reset(step)
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, reason)
    assert "unexpected error" not in analysis.invalid_reason, case
    [row] = rows(sessions)  # the call is in the log (and so counts against the budgets)
    assert row.status == status and row.outcome == f"invalid: {analysis.invalid_reason}"
    assert analysis.invalid_reason.count("the model refused") <= 1
    assert row.total_tokens > 0
    assert len(openai_server.requests) == 1  # not retried: the server answered


# --- 4. numbers the model should not have given ---------------------------------------------------


def numbers(**overrides):
    """An otherwise sound BUY with some fields replaced by raw JSON text (may be invalid JSON numbers)."""
    def text(body):
        answer = timeframe_answer(context_of(body))
        marked = {k: f"@@{k}@@" for k in overrides}
        out = json.dumps({**answer, **marked})
        for key, value in overrides.items():
            out = out.replace(json.dumps(marked[key]), value(context_of(body)) if callable(value) else value)
        return out
    return scripted(text)


@pytest.mark.parametrize("case, step, reason, status", [
    ("price as a string", numbers(entry=lambda c: json.dumps(str(c["last_close"]))),
     "entry: Input should be a valid number", "schema_violation"),
    ("NaN", numbers(stop="NaN"), "NaN is not a number JSON allows", "invalid_json"),
    ("Infinity", numbers(targets="[Infinity]"), "Infinity is not a number JSON allows", "invalid_json"),
    ("-Infinity", numbers(stop="-Infinity"), "-Infinity is not a number JSON allows", "invalid_json"),
    ("overflowing float", numbers(entry="1e999"), "entry: Input should be a finite number", "schema_violation"),
    ("integer too long", numbers(entry="1" + "0" * 5000), "not valid JSON", "invalid_json"),
    ("huge integer", numbers(entry="1" + "0" * 400), "entry: Input should be a valid number", "schema_violation"),
    ("boolean as a price", numbers(entry="true"), "entry: Input should be a valid number", "schema_violation"),
    ("negative entry", numbers(entry=lambda c: json.dumps(-c["last_close"])), "away from the last close", "ok"),
    ("negative prices everywhere", numbers(entry="-1", stop="-2", targets="[-0.5]"), "away from the last close", "ok"),
    ("absurdly large entry", numbers(entry="1e12"), "away from the last close", "ok"),
    ("absurdly large target", numbers(targets="[1e300]"), "outside the recent range", "ok"),
    ("target on the wrong side", numbers(targets=lambda c: json.dumps([round(c["last_close"] - 3 * c["atr_14"], 2)])),
     "needs targets above the entry", "ok"),
    ("stop on the wrong side", numbers(stop=lambda c: json.dumps(round(c["last_close"] + 2 * c["atr_14"], 2))),
     "needs the stop below the entry", "ok"),
    ("confidence as a percentage", numbers(confidence="70"), "confidence: Input should be less than or equal to 1",
     "schema_violation"),
    ("confidence as a percent string", numbers(confidence='"70%"'), "confidence: Input should be a valid number",
     "schema_violation"),
    ("confidence as a numeric string", numbers(confidence='"0.7"'), "confidence: Input should be a valid number",
     "schema_violation"),
    ("negative confidence", numbers(confidence="-0.1"), "confidence: Input should be greater than or equal to 0",
     "schema_violation"),
    ("confidence as a boolean", numbers(confidence="true"), "confidence: Input should be a valid number",
     "schema_violation"),
    ("signal in lower case", numbers(signal='"buy"'), "signal: Input should be 'BUY', 'SELL' or 'HOLD'",
     "schema_violation"),
    ("a duplicate key changing the signal", scripted(lambda b: answer_json(b)[:-1] + ', "signal": "SELL"}'),
     "duplicate key(s) ['signal']", "invalid_json"),
])
def test_bad_numbers_are_no_trade_never_a_trade(make_analyst, openai_server, daily, png, sessions, case, step, reason,
                                                status):
    openai_server.reset(step)
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, reason)
    assert analysis.signal not in (Action.BUY, Action.SELL)
    [row] = rows(sessions)
    assert row.status == status and row.outcome == f"invalid: {analysis.invalid_reason}"
    # Only a schema-valid answer is cached (its numbers are judged again on every cache hit).
    assert cached_entries(sessions) == (1 if status == "ok" else 0)


@pytest.mark.parametrize("value, reason", [("NaN", "NaN is not a number JSON allows"),
                                           ("1.5", "confidence: Input should be less than or equal to 1"),
                                           ('"0.7"', "confidence: Input should be a valid number")])
def test_bad_numbers_in_the_consolidation_are_no_trade(make_analyst, openai_server, daily, weekly, png, value, reason):
    openai_server.reset(default=good())
    analyst = make_analyst()
    d, w = analyst.analyze(daily, chart_for(png), png), analyst.analyze(weekly, None, png)
    assert d.signal == w.signal == Action.BUY

    def step(body):
        answer = {"action": "BUY", "entry": d.entry, "stop": d.stop, "targets": d.targets[:1], "confidence": 0.5,
                  "rationale": "weekly agrees"}
        return Reply(200, completion(json.dumps(answer).replace('"confidence": 0.5', f'"confidence": {value}')))

    openai_server.reset(step)
    consolidated = analyst.consolidate(d, w)
    assert consolidated.proposal.action == Action.NO_TRADE and reason in consolidated.rationale


# --- 5. HTTP trouble: the message names the variable to fix --------------------------------------


def test_html_page_with_200_names_openai_base_url(make_analyst, openai_server, daily, png, sessions):
    page = "<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head><body>Welcome</body></html>"
    openai_server.reset(raw(lambda b: page, **{"content-type": "text/html; charset=utf-8"}))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, f"the server at {openai_server.base_url} answered HTTP 200 with an HTML page (text/html")
    assert "Welcome to nginx" in analysis.invalid_reason
    assert "Fix: set OPENAI_BASE_URL to the API root of an OpenAI-compatible server" in analysis.invalid_reason
    [row] = rows(sessions)
    assert row.status == "malformed_response" and row.response == page and row.usage_estimated


async def drip(seconds: float, every: float = 0.1):
    """A body that never ends in time: one byte every `every` s (each read arrives well within the
    timeout), for `seconds` at most (so a failing test ends)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        yield b" "
        await asyncio.sleep(every)


async def flood(megabytes: int):
    for _ in range(megabytes):
        yield b" " * 1_000_000


@pytest.mark.parametrize("status", [200, 500])
def test_a_server_dripping_its_response_is_cut_off_at_the_timeout(make_analyst, openai_server, daily, png, sessions,
                                                                  status):
    # OPENAI_TIMEOUT_SECONDS bounds the whole response, not each read: a server that keeps sending a
    # byte at a time would otherwise hold the call (and a slot of TRADING_LLM_CONCURRENCY) forever.
    openai_server.reset(default=lambda body: Reply(status, drip(seconds=20)))
    started = time.perf_counter()
    analysis = make_analyst(OPENAI_TIMEOUT_SECONDS="1", TRADING_LLM_MAX_ATTEMPTS="2").analyze(daily, chart_for(png), png)
    elapsed = time.perf_counter() - started
    assert_no_trade(analysis, "failed after 2 attempt(s) (attempt 1: timeout; attempt 2: timeout)")
    assert "Fix: raise OPENAI_TIMEOUT_SECONDS (now 1)" in analysis.invalid_reason
    assert elapsed < 2 * (1 + 1) + 1  # each attempt cut off within its timeout and one more read
    assert [r.status for r in rows(sessions)] == ["timeout", "timeout"]


@pytest.mark.parametrize("status", [200, 500])
def test_an_endless_response_is_cut_off_unread_and_not_stored(make_analyst, openai_server, daily, png, sessions,
                                                              status):
    openai_server.reset(default=lambda body: Reply(status, flood(megabytes=64)))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, f"answered HTTP {status} with a response larger than 8 MB")
    assert "Fix: check that OPENAI_BASE_URL" in analysis.invalid_reason
    [row] = rows(sessions)  # not retried: the server answered
    assert row.status == "response_too_large" and row.http_status == status and row.response is None
    assert len(openai_server.requests) == 1


def test_plain_text_with_200_is_no_trade(make_analyst, openai_server, daily, png):
    openai_server.reset(raw(lambda b: "OK", **{"content-type": "text/plain"}))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "answered HTTP 200 with a body that is not JSON (text/plain: 'OK')")
    assert "OPENAI_BASE_URL" in analysis.invalid_reason


@pytest.mark.parametrize("status, message", [
    (401, "Incorrect API key provided."),
    (403, "Forbidden"),
    (400, "API key not valid. Please pass a valid API key."),  # Gemini's OpenAI-compatible endpoint
])
def test_rejected_key_says_check_openai_api_key_and_is_not_retried(make_analyst, openai_server, daily, png, sessions,
                                                                   status, message):
    openai_server.reset(default=error(status, message))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, f"refused the API key ({status})")
    assert "Fix: set OPENAI_API_KEY to a valid key" in analysis.invalid_reason
    assert len(openai_server.requests) == 1 and [r.status for r in rows(sessions)] == ["http_error"]


@pytest.mark.parametrize("status, message", [
    (404, "model \"llava:13b\" not found, try pulling it first"),  # Ollama
    (404, "The model `llava:13b` does not exist."),  # vLLM
    (400, "Invalid model name passed in model=llava:13b"),  # LiteLLM
])
def test_unknown_model_names_openai_model_and_is_not_retried(make_analyst, openai_server, daily, png, status, message):
    openai_server.reset(default=error(status, message))
    analysis = make_analyst(OPENAI_MODEL="llava:13b").analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, f"answered {status} for model 'llava:13b'")
    assert "Fix: check OPENAI_MODEL" in analysis.invalid_reason
    assert len(openai_server.requests) == 1


@pytest.mark.parametrize("message", [
    # vLLM
    ("'max_tokens' or 'max_completion_tokens' is too large: 1500. This model's maximum context length is 4096 "
     "tokens and your request has 3000 input tokens (1500 > 4096 - 3000)."),
    # OpenAI
    ("max_completion_tokens is too large: 50000. This model supports at most 32768 completion tokens, whereas you "
     "provided 50000."),
    # llama.cpp / LM Studio-like
    ("This model's maximum context length is 4096 tokens. However, your messages resulted in 5200 tokens. "
     "Please reduce the length of the messages."),
])
def test_a_request_too_long_for_the_model_names_openai_max_output_tokens(make_analyst, openai_server, daily, png,
                                                                         sessions, message):
    openai_server.reset(default=error(400, message))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "is too long for the model's context or output limit")
    assert "Fix: lower OPENAI_MAX_OUTPUT_TOKENS (now 1500)" in analysis.invalid_reason
    # Not mistaken for a server without max_completion_tokens: one request, the parameter kept.
    assert len(openai_server.requests) == 1 and "max_completion_tokens" in openai_server.bodies()[0]


@pytest.mark.parametrize("status", [301, 307, 308])
def test_a_redirect_is_not_followed_and_says_where_it_led(make_analyst, openai_server, daily, png, status):
    elsewhere = "http://127.0.0.1:9/elsewhere/v1/chat/completions"  # a dead loopback port: never reached anyway
    openai_server.reset(default=error(status, "moved", location=elsewhere))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, f"redirects ({status}) to {elsewhere}; redirects are not followed")
    assert "Fix: set OPENAI_BASE_URL to the address the API really answers at" in analysis.invalid_reason
    assert len(openai_server.requests) == 1  # not followed, not retried


@pytest.mark.parametrize("retry_after", ["3600", "retry-after-date"])
def test_retry_after_is_honoured_but_bounded(make_analyst, openai_server, daily, png, sessions, retry_after):
    if retry_after == "retry-after-date":
        retry_after = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    openai_server.reset(error(429, "Rate limit reached", **{"retry-after": retry_after}), good())
    started = time.perf_counter()
    analysis = make_analyst(TRADING_LLM_BACKOFF_MAX_SECONDS="0.3").analyze(daily, chart_for(png), png)
    elapsed = time.perf_counter() - started
    assert analysis.valid
    assert 0.3 <= elapsed < 3  # an hour was asked for; TRADING_LLM_BACKOFF_MAX_SECONDS caps the wait
    assert [r.status for r in rows(sessions)] == ["rate_limited", "ok"]


def test_retry_after_ms_is_honoured(make_analyst, openai_server, daily, png):
    openai_server.reset(error(429, "Rate limit reached", **{"retry-after-ms": "250"}), good())
    started = time.perf_counter()
    assert make_analyst(TRADING_LLM_BACKOFF_MAX_SECONDS="5").analyze(daily, chart_for(png), png).valid
    assert time.perf_counter() - started >= 0.25


def test_rate_limits_that_never_end_name_the_settings(make_analyst, openai_server, daily, png):
    openai_server.reset(default=error(429, "Rate limit reached", **{"retry-after": "0"}))
    analysis = make_analyst(TRADING_LLM_MAX_ATTEMPTS=2).analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "failed after 2 attempt(s)")
    assert "Fix: lower TRADING_LLM_CONCURRENCY" in analysis.invalid_reason


def test_connection_refused_names_openai_base_url(sessions, daily, png):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    analyst = OpenAIAnalyst.from_env({"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
                                      "TRADING_LLM_MAX_ATTEMPTS": "2", "TRADING_LLM_BACKOFF_SECONDS": "0.01"}, sessions)
    try:
        analysis = analyst.analyze(daily, chart_for(png), png)
    finally:
        analyst.close()
    assert_no_trade(analysis, f"cannot reach http://127.0.0.1:{port}/v1")
    assert (f"Fix: start the server, or set OPENAI_BASE_URL to its API root (now http://127.0.0.1:{port}/v1)"
            in analysis.invalid_reason)
    assert API_KEY not in analysis.invalid_reason
    assert [r.status for r in rows(sessions)] == ["connection_error"] * 2


# --- 6. the API key, even when a hostile server echoes it ----------------------------------------


def test_a_server_echoing_the_key_cannot_put_it_into_the_analysis_the_log_or_the_database(
        make_analyst, openai_server, daily, weekly, png, sessions, caplog):
    caplog.set_level(logging.DEBUG)

    def echo(body):  # a hostile proxy that reflects the Authorization header into the model's text
        return Reply(200, completion(answer_json(body, rationale=f"Bearer {API_KEY} says buy; key {API_KEY}",
                                                 setup=f"setup {API_KEY}"[:200])))

    openai_server.reset(echo, raw(lambda b: f"<html>{API_KEY}</html>"), error(500, f"upstream said {API_KEY}"),
                        error(404, f"no model for key {API_KEY}"))
    analyst = make_analyst(TRADING_LLM_MAX_ATTEMPTS=1, TRADING_LLM_CACHE="off")
    results = [analyst.analyze(daily, chart_for(png), png), analyst.analyze(weekly, None, png),
               analyst.analyze(daily, None, png), analyst.analyze(weekly, chart_for(png), png)]
    assert results[0].valid and "[REDACTED]" in results[0].rationale
    assert [r.valid for r in results[1:]] == [False, False, False]
    dumps = [r.model_dump_json() for r in results]
    dumps.append(json.dumps(summarize_calls(sessions, run_id="run-1", symbol="AAPL")))  # what Dagster metadata shows
    dumps.append(caplog.text)
    with sessions.kw["bind"].connect() as connection:
        for table in ("llm_calls", "llm_response_cache"):
            dumps.extend(str(tuple(row)) for row in connection.execute(sa.text(f"SELECT * FROM {table}")))
    assert len(rows(sessions)) == 4
    for text in dumps:
        assert API_KEY not in text and "SECRETKEY" not in text


def test_a_password_in_the_base_url_is_redacted_like_the_key(make_analyst, openai_server, daily, png, sessions,
                                                              caplog):
    caplog.set_level(logging.DEBUG)
    password = "proxy-PASSWORD-42"
    with_password = openai_server.base_url.replace("http://", f"http://trader:{password}@", 1)
    openai_server.reset(error(500, f"upstream refused trader:{password}"))
    analyst = make_analyst(OPENAI_BASE_URL=with_password, TRADING_LLM_MAX_ATTEMPTS=1, TRADING_LLM_CACHE="off")
    result = analyst.analyze(daily, chart_for(png), png)
    assert not result.valid
    dumps = [result.model_dump_json(), json.dumps(summarize_calls(sessions, run_id="run-1", symbol="AAPL")),
             caplog.text]
    with sessions.kw["bind"].connect() as connection:
        dumps.extend(str(tuple(row)) for row in connection.execute(sa.text("SELECT * FROM llm_calls")))
    assert any("[REDACTED]" in text for text in dumps)
    leaks = [text[max(0, text.find(password) - 200):text.find(password) + 50] for text in dumps if password in text]
    assert not leaks, leaks


# A gateway key (no `sk-` prefix, so only the key itself can identify it) holding a common 7-letter word.
FRAGMENT_KEY = "Q7vXm2LpR9tK4wZb-support-Hn3cYd8fJ6gTqW1e"


def key_runs(text: str, key: str = FRAGMENT_KEY) -> list[str]:
    """Every run of 8 consecutive characters of the key that stands in the text."""
    return sorted({key[i:i + 8] for i in range(len(key) - 7) if key[i:i + 8] in text})


def test_a_server_echoing_fragments_of_the_key_leaves_no_8_character_run_anywhere(
        make_analyst, openai_server, daily, weekly, png, sessions, caplog):
    caplog.set_level(logging.DEBUG)
    start, middle, end = FRAGMENT_KEY[:8], FRAGMENT_KEY[10:18], FRAGMENT_KEY[-8:]
    assert "support" in FRAGMENT_KEY and len({start, middle, end}) == 3

    def echo(body):  # parts of the key in the model's text, around a word the key shares with any answer
        return Reply(200, completion(answer_json(
            body, setup=f"pullback {middle}", rationale=f"Price holds support; checked with {start} and {end}.")))

    openai_server.reset(
        echo,
        error(500, f"upstream refused the key ending {middle}"),
        error(401, f"Incorrect API key provided: {start}****{end}."),  # OpenAI shows the key's end like this
        raw(lambda b: "OK", **{"content-type": f"text/plain; key={end}", "x-request-id": f"req-{middle}"}))
    analyst = make_analyst(OPENAI_API_KEY=FRAGMENT_KEY, TRADING_LLM_MAX_ATTEMPTS=1, TRADING_LLM_CACHE="off")
    results = [analyst.analyze(daily, chart_for(png), png), analyst.analyze(weekly, None, png),
               analyst.analyze(daily, None, png), analyst.analyze(weekly, chart_for(png), png)]

    assert results[0].valid and "[REDACTED]" in results[0].rationale
    # Seven characters the key shares with ordinary text are not a leak: the answer keeps its word.
    assert "Price holds support; checked with [REDACTED] and [REDACTED]." in results[0].rationale
    assert [r.valid for r in results[1:]] == [False, False, False]
    assert "Incorrect API key provided: [REDACTED]****[REDACTED]." in results[2].invalid_reason
    assert "(text/plain; key=[REDACTED]: 'OK')" in results[3].invalid_reason  # the header-derived message
    assert [r.status for r in rows(sessions)] == ["ok", "server_error", "http_error", "malformed_response"]

    # The invalid reasons are the texts of the errors the calls raised; the rest is what is stored or logged.
    shown = [r.model_dump_json() for r in results]
    shown.append(json.dumps(summarize_calls(sessions, run_id="run-1", symbol="AAPL")))  # Dagster metadata
    shown.extend([caplog.text, *(record.getMessage() for record in caplog.records)])
    engine = sessions.kw["bind"]
    with engine.connect() as connection:
        for table in sa.inspect(engine).get_table_names():  # the whole trading DB, llm_calls first of all
            shown.extend(str(tuple(row)) for row in connection.execute(sa.text(f"SELECT * FROM {table}")))
    assert {request["headers"]["authorization"] for request in openai_server.requests} == {f"Bearer {FRAGMENT_KEY}"}
    leaks = [(runs, text[:300]) for text in shown if (runs := key_runs(text))]
    assert not leaks, leaks


def test_an_answer_broken_by_redacting_the_key_says_so(make_analyst, openai_server, daily, png, sessions):
    # A hand-made key holding a word of the answer: redacting it breaks the JSON, fail closed, and the
    # reason says why rather than leaving a bare schema violation to puzzle over.
    openai_server.reset(scripted(answer_json))
    analysis = make_analyst(OPENAI_API_KEY="local-rationale-key").analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "violates the response schema")
    assert "text matching OPENAI_API_KEY was redacted from the answer before it was read" in analysis.invalid_reason
    assert "rational" not in rows(sessions)[0].response


# --- 7. text the model should not have given -------------------------------------------------------


def reading(**fields):
    return [{"name": "supertrend", "reading": "SuperTrend up", "bullish": True, **fields}]


@pytest.mark.parametrize("case, overrides, reason", [
    # NUL cannot be stored in PostgreSQL text (the decision row carries the rationale): fail here, saying so.
    ("NUL in the rationale", {"rationale": "Buy.\u0000"}, "rationale: Value error, holds the control character U+0000"),
    ("a terminal escape in the setup", {"setup": "\u001b[2J\u001b[31mBUY NOW"},
     "setup: Value error, holds the control character U+001B"),
    ("a control character in a reading", {"indicators": reading(reading="up\u0007")},
     "indicators.0.reading: Value error, holds the control character U+0007"),
    ("an indicator reading of 150,000 characters", {"indicators": reading(reading="y" * 150_000)},
     "indicators.0.reading: String should have at most"),
    ("an indicator name of 20,000 characters", {"indicators": reading(name="x" * 20_000)},
     "indicators.0.name: String should have at most"),
])
def test_unprintable_or_unbounded_text_is_no_trade(make_analyst, openai_server, daily, png, sessions, case,
                                                   overrides, reason):
    openai_server.reset(scripted(lambda body: answer_json(body, **overrides)))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, reason)
    [row] = rows(sessions)
    assert row.status == "schema_violation" and cached_entries(sessions) == 0


def test_tabs_and_line_breaks_in_the_text_are_kept(make_analyst, openai_server, daily, png):
    openai_server.reset(scripted(lambda body: answer_json(body, rationale="Trend up.\n\tRSI 58.\r\nBuy.",
                                                          indicators=reading(reading="ST up\n(green)"))))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid and "Trend up.\n\tRSI 58.\r\nBuy." in analysis.rationale


def test_a_nul_in_the_consolidation_rationale_is_no_trade(make_analyst, openai_server, daily, weekly, png):
    openai_server.reset(default=good())
    analyst = make_analyst()
    d, w = analyst.analyze(daily, chart_for(png), png), analyst.analyze(weekly, None, png)
    openai_server.reset(good(rationale="Weekly agrees.\u0000"))
    consolidated = analyst.consolidate(d, w)
    assert consolidated.proposal.action == Action.NO_TRADE
    assert "rationale: Value error, holds the control character U+0000" in consolidated.rationale


# --- 8. a server answering with another model's name ----------------------------------------------


def answered_by(model):
    """A sound answer, sent under the model name `model` (whatever was asked for)."""
    return lambda body: Reply(200, completion(answer_json(body), model=model))


def test_an_answer_by_another_model_is_used_recorded_and_noted_and_the_cache_keeps_the_note(
        make_analyst, openai_server, daily, png, sessions):
    openai_server.reset(answered_by("gpt-4o-mini"))
    first = make_analyst(run_id="run-1").analyze(daily, chart_for(png), png)
    note = "[answered by gpt-4o-mini, asked for gpt-4.1-mini; cost estimates use gpt-4.1-mini's price]"
    assert first.valid and first.signal == Action.BUY and note in first.rationale
    [row] = rows(sessions)
    assert (row.model, row.answered_model) == ("gpt-4.1-mini", "gpt-4o-mini")
    assert row.cost_usd == pytest.approx((1200 * 0.40 + 300 * 1.60) / 1e6)  # the configured model's price

    # The cache key is the asked model's, as before: the next run finds the answer, and says who gave it.
    openai_server.reset(default=error(500, "the cache should have answered"))
    second = make_analyst(run_id="run-2").analyze(daily, chart_for(png), png)
    assert openai_server.requests == [] and second == first
    fresh, hit = rows(sessions)
    assert hit.cache_hit and hit.cache_key == fresh.cache_key and hit.answered_model == "gpt-4o-mini"


@pytest.mark.parametrize("asked, answered", [
    ("gpt-4o", "gpt-4o-2024-08-06"),  # a dated snapshot of the asked model is the asked model
    ("gpt-4.1-mini", "gpt-4.1-mini"),
])
def test_the_asked_model_or_its_snapshot_gets_no_note(make_analyst, openai_server, daily, png, sessions,
                                                      asked, answered):
    openai_server.reset(answered_by(answered))
    analysis = make_analyst(OPENAI_MODEL=asked).analyze(daily, chart_for(png), png)
    assert analysis.valid and "answered by" not in analysis.rationale
    [row] = rows(sessions)
    assert (row.model, row.answered_model) == (asked, answered)


@pytest.mark.parametrize("case, model, recorded", [
    ("not text", {"name": "gpt-4o"}, None),
    ("empty", "", None),
    ("the API key", API_KEY, "[REDACTED]"),
    ("control characters", "evil\u0000\u001b[2Jmodel", "evil??[2Jmodel"),
    ("10,000 characters", "m" * 10_000, "m" * 128),
])
def test_a_hostile_model_name_is_cleaned_before_it_is_recorded_or_shown(make_analyst, openai_server, daily, png,
                                                                        sessions, case, model, recorded):
    openai_server.reset(answered_by(model))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid, (case, analysis.invalid_reason)
    [row] = rows(sessions)
    assert row.answered_model == recorded
    assert API_KEY not in analysis.rationale and "\u0000" not in analysis.rationale
    assert "\u001b" not in analysis.rationale and "m" * 129 not in analysis.rationale
    assert (f"answered by {recorded}," in analysis.rationale) is (recorded is not None)
