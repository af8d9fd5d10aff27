"""The openai analyst over real HTTP (the `openai` SDK) against the local scripted server."""

import base64
import hashlib
import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from trading_pipeline.adapters.model_calls import ModelResponseCacheRow, summarize_calls
from trading_pipeline.adapters.openai_analyst import OpenAIAnalyst, OpenAISettings
from trading_pipeline.core.analysis import Action, ChartSource
from trading_pipeline.core.decisions import decide
from trading_pipeline.core.risk import AccountState, MarketContext, evaluate
from trading_pipeline.core.strategies import parse_strategies
from trading_pipeline.errors import ConfigError
from trading_pipeline.prompts import load_prompt
from trading_pipeline_tests.adapters.openai.conftest import API_KEY, chart_for, rows
from trading_pipeline_tests.adapters.openai.local_server import (
    Reply,
    answer_json,
    completion,
    context_of,
    error,
    good,
    image_parts,
    scripted,
    timeframe_answer,
)

# --- the good path ---------------------------------------------------------------------------------


def test_good_answer_sends_chart_and_context_validates_and_records_everything(make_analyst, openai_server, daily,
                                                                              png, sessions):
    openai_server.reset(good())
    analysis = make_analyst().analyze(daily, chart_for(png), png)

    context = context_of(openai_server.bodies()[0])
    assert analysis.valid and analysis.signal == Action.BUY
    assert analysis.analyst == "openai:gpt-4.1-mini"
    assert analysis.prompt_version == load_prompt("timeframe_analysis").version
    assert analysis.entry == round(context["last_close"], 2) and analysis.stop < analysis.entry < analysis.targets[0]
    assert analysis.last_close == pytest.approx(daily.last_close) and analysis.chart.sha256 == chart_for(png).sha256
    assert [v.name for v in analysis.votes][:4] == ["supertrend", "close_vs_sma20", "macd_vs_signal", "rsi_vs_50"]
    assert "R recomputed from the prices" in analysis.rationale

    request = openai_server.requests[0]
    body = request["body"]
    assert request["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert body["model"] == "gpt-4.1-mini" and body["temperature"] == 0 and body["max_completion_tokens"] == 1500
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["additionalProperties"] is False and set(schema["required"]) == set(schema["properties"])
    [image] = image_parts(body)
    assert base64.b64decode(image["image_url"]["url"].removeprefix("data:image/png;base64,")) == png
    assert context["last_close"] == pytest.approx(daily.last_close) and context["atr_14"] > 0
    assert {"sma_20", "rsi_14", "macd", "supertrend_direction"} <= set(context["indicators"])

    [row] = rows(sessions)
    assert (row.status, row.model, row.prompt_version, row.vision, row.response_format) == (
        "ok", "gpt-4.1-mini", analysis.prompt_version, True, "json_schema")
    assert row.image_sha256 == hashlib.sha256(png).hexdigest() and row.run_id == "run-1"
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (1200, 300, 1500)
    assert row.cost_usd == pytest.approx((1200 * 0.40 + 300 * 1.60) / 1e6)
    assert row.latency_ms > 0 and row.outcome == "valid"
    recorded = json.dumps(row.request)
    assert "base64" not in recorded and f"sha256 {row.image_sha256}" in recorded
    assert row.request["headers"]["Authorization"] == "Bearer [REDACTED]"
    assert json.loads(row.response)["choices"][0]["message"]["content"]

    summary = summarize_calls(sessions, run_id="run-1", symbol="AAPL", timeframe="1d")
    assert summary["model_calls"] == 1 and summary["http_attempts"] == 1 and summary["total_tokens"] == 1500
    assert summary["cost_usd"] == pytest.approx(row.cost_usd) and summary["vision"] == [True]
    assert summary["prompt_versions"] == [analysis.prompt_version] and summary["outcomes"] == ["valid"]


def test_json_in_code_fences_is_accepted(make_analyst, openai_server, daily, png):
    openai_server.reset(good(fence=True))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid and analysis.signal == Action.BUY


def test_hold_from_the_model_is_an_explicit_hold_without_a_plan(make_analyst, openai_server, daily, png):
    openai_server.reset(scripted(lambda b: answer_json(b, signal="HOLD", entry=None, stop=None, targets=[],
                                                       setup="no clear setup")))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid and analysis.signal == Action.HOLD
    assert analysis.entry is None and analysis.targets == [] and analysis.rationale.startswith("no clear setup")


# --- fail closed: every unusable answer is NO_TRADE with the reason ---------------------------------


@pytest.mark.parametrize("case, step, reason, status", [
    ("malformed JSON", lambda b: Reply(200, completion('{"trend": "up", "signal": "BUY", ')),
     "not valid JSON", "invalid_json"),
    ("prose instead of JSON", lambda b: Reply(200, completion("I would BUY this stock at 250.")),
     "not valid JSON", "invalid_json"),
    ("schema violation: unknown signal", scripted(lambda b: answer_json(b, signal="STRONG_BUY")),
     "violates the response schema", "schema_violation"),
    ("schema violation: price as text", scripted(lambda b: answer_json(b, entry="37.5")),
     "violates the response schema", "schema_violation"),
    ("schema violation: extra field", scripted(lambda b: answer_json(b, position_size=100)),
     "violates the response schema", "schema_violation"),
    ("schema violation: confidence above 1", scripted(lambda b: answer_json(b, confidence=7)),
     "violates the response schema", "schema_violation"),
    ("refusal", lambda b: Reply(200, completion(None, refusal="I can't help with trading decisions.")),
     "the model refused: I can't help", "refusal"),
    ("empty content", lambda b: Reply(200, completion("")), "empty content", "empty"),
    ("truncated", lambda b: Reply(200, completion('{"trend": "up"', finish_reason="length")),
     "cut off at the output token limit", "truncated"),
    ("not a chat completion", lambda b: Reply(200, {"result": "BUY"}), "not a chat completion", "malformed_response"),
])
def test_unusable_answers_are_no_trade_with_the_reason(make_analyst, openai_server, daily, png, sessions,
                                                       case, step, reason, status):
    openai_server.reset(step)
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert not analysis.valid and analysis.signal == Action.NO_TRADE, case
    assert reason in analysis.invalid_reason
    assert analysis.entry is None and analysis.stop is None and analysis.targets == []
    [row] = rows(sessions)
    assert row.status == status and row.outcome.startswith("invalid: ")
    with sessions() as session:  # nothing unusable is cached
        assert session.execute(sa.select(sa.func.count()).select_from(ModelResponseCacheRow)).scalar_one() == 0


@pytest.mark.parametrize("overrides, reason", [
    (lambda c: {"entry": round(c["last_close"] * 2, 2)}, "away from the last close"),
    (lambda c: {"stop": round(c["last_close"] + 2 * c["atr_14"], 2)}, "needs the stop below the entry"),
    (lambda c: {"targets": [round(c["last_close"] - 3 * c["atr_14"], 2)]}, "needs targets above the entry"),
    (lambda c: {"targets": [round(c["recent_high"] + 20 * c["atr_14"], 2)]}, "outside the recent range"),
    (lambda c: {"stop": None}, "without a finite stop"),
    (lambda c: {"targets": []}, "without a target"),
    (lambda c: {"support": [round(c["chart_low"] / 10, 2)]}, "support level"),
    (lambda c: {"signal": "SELL", "stop": round(c["last_close"] - 2 * c["atr_14"], 2)}, "needs the stop above"),
])
def test_implausible_numbers_are_no_trade(make_analyst, openai_server, daily, png, sessions, overrides, reason):
    openai_server.reset(scripted(lambda b: answer_json(b, **overrides(context_of(b)))))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert not analysis.valid and analysis.signal == Action.NO_TRADE
    assert analysis.invalid_reason.startswith("implausible numbers from the model")
    assert reason in analysis.invalid_reason
    [row] = rows(sessions)
    assert row.status == "ok" and "implausible" in row.outcome  # the call worked; its numbers did not


def test_chart_png_not_matching_its_reference_is_no_trade_without_a_call(make_analyst, openai_server, daily, png):
    analysis = make_analyst().analyze(daily, ChartSource(uri="file:///other.png", sha256="0" * 64), png)
    assert not analysis.valid and "does not match the chart reference" in analysis.invalid_reason
    assert openai_server.requests == []


# --- retries ---------------------------------------------------------------------------------------


def test_429_then_success_retries_with_backoff(make_analyst, openai_server, daily, png, sessions):
    openai_server.reset(error(429, "Rate limit reached", **{"retry-after": "0.05"}), good())
    started = time.perf_counter()
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid and analysis.signal == Action.BUY
    assert time.perf_counter() - started >= 0.05  # honoured Retry-After
    assert len(openai_server.requests) == 2
    assert [(r.attempt, r.status, r.http_status) for r in rows(sessions)] == [(1, "rate_limited", 429), (2, "ok", 200)]
    assert len({r.call_id for r in rows(sessions)}) == 1


def test_5xx_then_success(make_analyst, openai_server, daily, png):
    openai_server.reset(error(500, "internal"), error(503, "overloaded"), good())
    assert make_analyst().analyze(daily, chart_for(png), png).valid
    assert len(openai_server.requests) == 3


def test_timeout_then_success(make_analyst, openai_server, daily, png, sessions):
    openai_server.reset(good(delay=1.0), good())
    analysis = make_analyst(OPENAI_TIMEOUT_SECONDS=0.3).analyze(daily, chart_for(png), png)
    assert analysis.valid
    assert [r.status for r in rows(sessions)] == ["timeout", "ok"]


def test_timeouts_exhaust_the_bounded_retries_and_give_no_trade(make_analyst, openai_server, daily, png, sessions):
    openai_server.reset(default=good(delay=1.0))
    analysis = make_analyst(OPENAI_TIMEOUT_SECONDS=0.3, TRADING_LLM_MAX_ATTEMPTS=3).analyze(daily, chart_for(png), png)
    assert not analysis.valid and analysis.signal == Action.NO_TRADE
    assert "failed after 3 attempt(s)" in analysis.invalid_reason and "timeout" in analysis.invalid_reason
    assert [r.status for r in rows(sessions)] == ["timeout"] * 3


def test_rate_limit_forever_gives_no_trade(make_analyst, openai_server, daily, png):
    openai_server.reset(default=error(429, "Rate limit reached"))
    analysis = make_analyst(TRADING_LLM_MAX_ATTEMPTS=2).analyze(daily, chart_for(png), png)
    assert analysis.signal == Action.NO_TRADE and "rate_limited (429)" in analysis.invalid_reason
    assert len(openai_server.requests) == 2


def test_unreachable_server_gives_no_trade_naming_the_endpoint(sessions, daily, png):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    analyst = OpenAIAnalyst.from_env({"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
                                      "TRADING_LLM_MAX_ATTEMPTS": "2", "TRADING_LLM_BACKOFF_SECONDS": "0.01"}, sessions)
    analysis = analyst.analyze(daily, chart_for(png), png)
    assert analysis.signal == Action.NO_TRADE and f"cannot reach http://127.0.0.1:{port}/v1" in analysis.invalid_reason


def test_rejected_key_is_not_retried_and_says_the_fix(make_analyst, openai_server, daily, png):
    openai_server.reset(default=error(401, f"Incorrect API key provided: {API_KEY}."))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.signal == Action.NO_TRADE and "refused the API key (401)" in analysis.invalid_reason
    assert "Fix: set OPENAI_API_KEY" in analysis.invalid_reason
    assert API_KEY not in analysis.invalid_reason
    assert len(openai_server.requests) == 1


# --- servers that differ ---------------------------------------------------------------------------


def rejects_images(body):
    if image_parts(body):
        return error(400, "Invalid content type. image_url is only supported by certain models.")
    return good()(body)


def test_server_without_vision_gets_the_numbers_only_and_the_analysis_records_it(make_analyst, openai_server, daily,
                                                                                weekly, png, sessions):
    openai_server.reset(default=rejects_images)
    analyst = make_analyst()
    analysis = analyst.analyze(daily, chart_for(png), png)
    assert analysis.valid and analysis.analyst == "openai:gpt-4.1-mini (no vision)"
    assert "numeric context only: the model did not see the chart" in analysis.rationale
    first, second = openai_server.bodies()
    assert image_parts(first) and not image_parts(second)
    assert "Chart image: not available" in second["messages"][-1]["content"]
    assert [(r.status, r.vision) for r in rows(sessions)] == [("http_error", True), ("ok", False)]
    assert summarize_calls(sessions, run_id="run-1", symbol="AAPL")["vision"] == [False]

    openai_server.reset(default=rejects_images)  # learned: the next analysis sends no image at all
    assert analyst.analyze(weekly, None, png).valid
    assert len(openai_server.requests) == 1 and not image_parts(openai_server.bodies()[0])


def test_vision_yes_with_a_server_rejecting_images_is_no_trade_with_the_fix(make_analyst, openai_server, daily, png):
    openai_server.reset(default=rejects_images)
    analysis = make_analyst(OPENAI_VISION="yes").analyze(daily, chart_for(png), png)
    assert analysis.signal == Action.NO_TRADE and "OPENAI_VISION=yes" in analysis.invalid_reason
    assert "Fix: use a vision model" in analysis.invalid_reason


def test_vision_no_never_sends_the_image(make_analyst, openai_server, daily, png, sessions):
    openai_server.reset(good())
    analysis = make_analyst(OPENAI_VISION="no").analyze(daily, chart_for(png), png)
    assert analysis.valid and analysis.analyst.endswith("(no vision)")
    assert not image_parts(openai_server.bodies()[0])
    [row] = rows(sessions)
    assert row.vision is False and row.image_sha256 is None


def test_server_rejecting_json_schema_falls_back_to_json_object_with_the_schema_in_the_prompt(
        make_analyst, openai_server, daily, png, sessions):
    def step(body):
        if body.get("response_format", {}).get("type") == "json_schema":
            return error(400, "response_format type 'json_schema' is not supported")
        return good(fence=True)(body)

    openai_server.reset(default=step)
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid and "answered in json_object mode" in analysis.rationale
    fallback = openai_server.bodies()[1]
    assert fallback["response_format"] == {"type": "json_object"}
    assert '"additionalProperties":false' in fallback["messages"][0]["content"]
    assert [(r.status, r.response_format) for r in rows(sessions)] == [("http_error", "json_schema"), ("ok", "json_object")]


def test_server_rejecting_max_completion_tokens_gets_max_tokens(make_analyst, openai_server, daily, png):
    def step(body):
        if "max_completion_tokens" in body:
            return error(400, "Unrecognized request argument supplied: max_completion_tokens")
        return good()(body)

    openai_server.reset(default=step)
    assert make_analyst().analyze(daily, chart_for(png), png).valid
    assert openai_server.bodies()[1]["max_tokens"] == 1500 and "max_completion_tokens" not in openai_server.bodies()[1]


def test_server_without_usage_is_still_budgeted_by_estimate(make_analyst, openai_server, daily, png, sessions):
    openai_server.reset(lambda b: Reply(200, completion(answer_json(b), usage=None)))
    assert make_analyst().analyze(daily, chart_for(png), png).valid
    [row] = rows(sessions)
    assert row.usage_estimated and row.total_tokens > 1500


# --- cache -----------------------------------------------------------------------------------------


def test_cache_hit_makes_no_http_request_and_returns_the_same_analysis(make_analyst, openai_server, daily, png,
                                                                       sessions):
    openai_server.reset(good())
    first = make_analyst(run_id="run-1").analyze(daily, chart_for(png), png)
    openai_server.reset(default=error(500, "the cache should have answered"))
    second = make_analyst(run_id="run-2").analyze(daily, chart_for(png), png)
    assert openai_server.requests == []
    assert second == first
    summary = summarize_calls(sessions, run_id="run-2", symbol="AAPL")
    assert summary["cache_hits"] == 1 and summary["http_attempts"] == 0 and summary["total_tokens"] == 0
    assert summary["cost_usd"] == 0.0 and summary["outcomes"] == ["valid"]


def test_changed_bars_miss_the_cache_and_another_png_of_the_same_chart_hits_it(make_analyst, openai_server, daily,
                                                                                  weekly, png, sessions):
    openai_server.reset(default=good())
    analyst = make_analyst()
    first = analyst.analyze(daily, chart_for(png), png)
    # The key is what the chart shows (core/chart_spec.py), not the PNG's bytes: a re-render of the
    # same bars is the same chart; the call log still names the PNG each call had.
    other_png = png + b"\0"
    again = analyst.analyze(daily, ChartSource(uri="file:///x.png", sha256=hashlib.sha256(other_png).hexdigest()),
                            other_png)
    assert len(openai_server.requests) == 1 and again.signal == first.signal and again.entry == first.entry
    assert [(r.cache_hit, r.image_sha256) for r in rows(sessions)] == [
        (False, hashlib.sha256(png).hexdigest()), (True, hashlib.sha256(other_png).hexdigest())]
    analyst.analyze(daily.with_frame(daily.frame.iloc[:-1]), None, png)
    analyst.analyze(weekly, None, png)
    assert len(openai_server.requests) == 3


@pytest.mark.parametrize("bypass", [{"TRADING_LLM_CACHE": "off"}, {"run_tags": {"trading/llm_cache": "off"}}])
def test_cache_bypass_calls_the_model_again(make_analyst, openai_server, daily, png, bypass):
    openai_server.reset(default=good())
    make_analyst(run_id="run-1").analyze(daily, chart_for(png), png)
    again = make_analyst(run_id="run-2", **bypass).analyze(daily, chart_for(png), png)
    assert again.valid and len(openai_server.requests) == 2


def test_bad_cache_setting_names_the_fix():
    with pytest.raises(ConfigError, match="TRADING_LLM_CACHE='maybe' is not on or off"):
        OpenAISettings.from_env({"OPENAI_API_KEY": "x", "TRADING_LLM_CACHE": "maybe"})


# --- budgets ---------------------------------------------------------------------------------------


def test_run_token_budget_stops_further_calls_with_a_clear_message(make_analyst, openai_server, daily, weekly, png,
                                                                   sessions):
    openai_server.reset(default=good(usage=(1200, 300)))
    analyst = make_analyst(TRADING_LLM_MAX_TOKENS_PER_RUN=1000)
    assert analyst.analyze(daily, chart_for(png), png).valid
    refused = analyst.analyze(weekly, None, png)
    assert refused.signal == Action.NO_TRADE and not refused.valid
    assert "LLM token budget for this run is used up: 1,500 tokens used by run run-1" in refused.invalid_reason
    assert "TRADING_LLM_MAX_TOKENS_PER_RUN=1,000" in refused.invalid_reason
    assert "Fix: raise TRADING_LLM_MAX_TOKENS_PER_RUN" in refused.invalid_reason
    assert len(openai_server.requests) == 1
    assert rows(sessions)[-1].status == "budget_exceeded"
    # Another run has its own run budget.
    assert make_analyst(run_id="run-2", TRADING_LLM_MAX_TOKENS_PER_RUN=1000).analyze(weekly, None, png).valid


def test_daily_cost_budget(make_analyst, openai_server, daily, weekly, png):
    openai_server.reset(default=good(usage=(100_000, 10_000)))  # 0.056 USD at 0.40/1.60 per 1M
    analyst = make_analyst(TRADING_LLM_MAX_COST_PER_DAY_USD=0.05)
    assert analyst.analyze(daily, chart_for(png), png).valid
    refused = make_analyst(run_id="run-2", TRADING_LLM_MAX_COST_PER_DAY_USD=0.05).analyze(weekly, None, png)
    assert "LLM cost budget for today (UTC) is used up: $0.0560" in refused.invalid_reason
    assert "TRADING_LLM_MAX_COST_PER_DAY_USD=0.05" in refused.invalid_reason


def test_concurrent_calls_cannot_overrun_the_budget(make_analyst, openai_server, daily, png, sessions):
    openai_server.reset(default=good(delay=0.2))
    analyst = make_analyst(TRADING_LLM_MAX_TOKENS_PER_DAY=1000, TRADING_LLM_CACHE="off")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: analyst.analyze(daily, chart_for(png), png), range(4)))
    assert sum(r.valid for r in results) == 1 and len(openai_server.requests) == 1
    assert all("TRADING_LLM_MAX_TOKENS_PER_DAY" in r.invalid_reason for r in results if not r.valid)


def test_cost_budget_for_a_model_without_a_price_is_refused_at_configuration():
    with pytest.raises(ConfigError) as caught:
        OpenAISettings.from_env({"OPENAI_API_KEY": "x", "OPENAI_MODEL": "llava:13b",
                                 "TRADING_LLM_MAX_COST_PER_DAY_USD": "1"})
    assert "price of model 'llava:13b' is unknown" in caught.value.problem
    assert "OPENAI_PRICE_INPUT_PER_MTOK" in caught.value.fix


# --- concurrency -----------------------------------------------------------------------------------


def test_requests_in_flight_are_bounded_by_the_configured_concurrency(make_analyst, openai_server, daily, png):
    openai_server.reset(default=good(delay=0.25))
    analyst = make_analyst(TRADING_LLM_CONCURRENCY=3, TRADING_LLM_CACHE="off")
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: analyst.analyze(daily, chart_for(png), png), range(6)))
    elapsed = time.perf_counter() - started
    assert all(r.valid for r in results)
    assert openai_server.max_in_flight == 3  # in parallel, but never more than the pool allows
    assert elapsed >= 0.5  # so six calls took (at least) two waves


# --- secrets ---------------------------------------------------------------------------------------


def test_api_key_never_reaches_the_database_the_analysis_the_summary_or_the_logs(make_analyst, openai_server, daily,
                                                                                  weekly, png, sessions, caplog):
    caplog.set_level(logging.DEBUG)
    openai_server.reset(error(401, f"Incorrect API key provided: {API_KEY}"), error(400, f"bad request for {API_KEY}"),
                        error(429, f"slow down {API_KEY}"), good())
    analyst = make_analyst(TRADING_LLM_MAX_ATTEMPTS=2)
    results = [analyst.analyze(daily, chart_for(png), png), analyst.analyze(daily, chart_for(png), png),
               analyst.analyze(weekly, None, png)]
    assert openai_server.requests[0]["headers"]["authorization"] == f"Bearer {API_KEY}"  # it was sent...
    dumps = [r.model_dump_json() for r in results]
    dumps.append(json.dumps(summarize_calls(sessions, run_id="run-1", symbol="AAPL")))
    dumps.append(caplog.text)
    dumps.append(repr(analyst.settings))
    engine = sessions.kw["bind"]
    with engine.connect() as connection:
        for table in ("llm_calls", "llm_response_cache"):
            dumps.extend(str(tuple(row)) for row in connection.execute(sa.text(f"SELECT * FROM {table}")))
    assert len(dumps) > 6
    for text in dumps:  # ...and is nowhere else
        assert API_KEY not in text and "SECRETKEY" not in text


# --- consolidation ---------------------------------------------------------------------------------


STRATEGY = parse_strategies("""\
strategies:
  - name: t
    symbols: [AAPL]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
    risk: {min_r: 1.0, min_profit_margin: 0.01}
""").strategies[0]


def analyses(make_analyst, openai_server, daily, weekly, png, weekly_signal="BUY"):
    def step(body):
        context = context_of(body)
        close, atr = context["last_close"], context["atr_14"]
        if context["timeframe"] == "1w" and weekly_signal == "HOLD":
            overrides = {"signal": "HOLD", "entry": None, "stop": None, "targets": []}
            return Reply(200, completion(json.dumps(timeframe_answer(context, **overrides))))
        if context["timeframe"] == "1w" and weekly_signal == "SELL":
            overrides = {"signal": "SELL", "trend": "down", "stop": round(close + 2 * atr, 2),
                         "targets": [round(close - 3 * atr, 2)]}
            return Reply(200, completion(json.dumps(timeframe_answer(context, **overrides))))
        return good()(body)

    openai_server.reset(default=step)
    analyst = make_analyst()
    return analyst, analyst.analyze(daily, chart_for(png), png), analyst.analyze(weekly, None, png)


def test_consolidation_call_returns_a_strict_proposal_the_risk_gates_accept(make_analyst, openai_server, daily,
                                                                          weekly, png, sessions):
    analyst, d, w = analyses(make_analyst, openai_server, daily, weekly, png)
    openai_server.reset(good())
    consolidated = analyst.consolidate(d, w)
    body = openai_server.bodies()[0]
    assert not image_parts(body) and body["response_format"]["json_schema"]["name"] == "consolidationanswer"
    context = context_of(body)
    assert context["daily"]["signal"] == "BUY" and context["weekly"]["signal"] == "BUY"
    proposal = consolidated.proposal
    assert proposal.action == Action.BUY and proposal.entry == d.entry and proposal.targets == d.targets[:1]
    assert proposal.confidence == 0.72 and consolidated.confirmation == "confirmed (strong)"
    assert load_prompt("consolidation").version in consolidated.rationale
    assert "R recomputed from the prices" in consolidated.rationale
    [row] = [r for r in rows(sessions) if r.kind == "consolidation"]
    assert row.status == "ok" and row.timeframe is None and row.outcome == "valid" and row.image_sha256 is None
    market = MarketContext(d.last_close, d.atr, d.recent_high, d.recent_low, True, "now")
    verdict = evaluate(proposal, "AAPL", market, AccountState(100_000, 100_000), STRATEGY.risk)
    assert verdict.accepted and verdict.quantity > 0
    assert verdict.r_multiple == pytest.approx(abs(proposal.targets[0] - proposal.entry) / abs(proposal.entry - proposal.stop), abs=1e-3)
    # The same decision path as the rules analyst: decide() accepts the analyses as they are.
    decision = decide(STRATEGY, "AAPL", d, w, AccountState(100_000, 100_000), market_open=True, next_open="now")
    assert decision.analysts == {"1d": "openai:gpt-4.1-mini", "1w": "openai:gpt-4.1-mini"}
    assert decision.proposed_action == Action.BUY


def test_consolidation_cannot_turn_a_daily_buy_into_a_sell(make_analyst, openai_server, daily, weekly, png):
    analyst, d, w = analyses(make_analyst, openai_server, daily, weekly, png)
    openai_server.reset(good(action="SELL", stop=round(d.entry + 2 * d.atr, 2), targets=[round(d.entry - 3 * d.atr, 2)]))
    consolidated = analyst.consolidate(d, w)
    assert consolidated.proposal.action == Action.NO_TRADE
    assert "differs from the daily signal BUY" in consolidated.rationale


@pytest.mark.parametrize("step, reason", [
    (lambda b: Reply(200, completion("{not json")), "not valid JSON"),
    (lambda b: Reply(200, completion(None, refusal="no")), "the model refused"),
    (good(entry=1.0), "away from the last close"),
])
def test_unusable_consolidation_is_no_trade(make_analyst, openai_server, daily, weekly, png, step, reason):
    analyst, d, w = analyses(make_analyst, openai_server, daily, weekly, png)
    openai_server.reset(step)
    consolidated = analyst.consolidate(d, w)
    assert consolidated.proposal.action == Action.NO_TRADE and consolidated.rationale.startswith("NO_TRADE: ")
    assert reason in consolidated.rationale


def test_consolidation_hold_is_explicit(make_analyst, openai_server, daily, weekly, png):
    analyst, d, w = analyses(make_analyst, openai_server, daily, weekly, png, weekly_signal="HOLD")
    openai_server.reset(good(action="HOLD", entry=None, stop=None, targets=[], rationale="Weekly momentum fading."))
    consolidated = analyst.consolidate(d, w)
    assert consolidated.proposal.action == Action.HOLD
    assert "HOLD: the consolidation declined the daily BUY" in consolidated.rationale
    assert "Weekly momentum fading." in consolidated.rationale


def test_no_consolidation_call_when_the_outcome_is_fixed(make_analyst, openai_server, daily, weekly, png):
    analyst, d, w = analyses(make_analyst, openai_server, daily, weekly, png, weekly_signal="SELL")
    openai_server.reset(default=error(500, "should not be called"))
    opposed = analyst.consolidate(d, w)
    assert opposed.proposal.action == Action.HOLD and "opposed by weekly SELL" in opposed.rationale
    invalid = d.model_copy(update={"valid": False, "invalid_reason": "the model refused", "signal": Action.NO_TRADE})
    failed = analyst.consolidate(invalid, w)
    assert failed.proposal.action == Action.NO_TRADE and "the model refused" in failed.rationale
    assert openai_server.requests == []


# --- configuration and import cost -----------------------------------------------------------------


def test_missing_api_key_names_the_problem_and_the_fix(sessions):
    with pytest.raises(ConfigError) as caught:
        OpenAIAnalyst.from_env({"TRADING_ANALYST": "openai"}, sessions)
    assert "TRADING_ANALYST=openai needs OPENAI_API_KEY" in caught.value.problem
    assert "TRADING_ANALYST=rules" in caught.value.fix


@pytest.mark.parametrize("env, message", [
    ({"OPENAI_VISION": "maybe"}, "OPENAI_VISION='maybe' is not auto, yes or no"),
    ({"OPENAI_BASE_URL": "api.openai.com"}, "is not an http(s) URL"),
    ({"OPENAI_BASE_URL": "http://10.1.2.3:11434/v1"}, "plain http to 10.1.2.3"),
    ({"TRADING_LLM_CONCURRENCY": "0"}, "TRADING_LLM_CONCURRENCY='0'"),
    # Counts: a fraction was cut silently (2.5 requests in flight became 2).
    ({"TRADING_LLM_CONCURRENCY": "2.5"}, "TRADING_LLM_CONCURRENCY='2.5' is not a whole number"),
    ({"TRADING_LLM_MAX_ATTEMPTS": "1.5"}, "TRADING_LLM_MAX_ATTEMPTS='1.5' is not a whole number"),
    ({"OPENAI_MAX_OUTPUT_TOKENS": "1500.5"}, "OPENAI_MAX_OUTPUT_TOKENS='1500.5' is not a whole number"),
    ({"TRADING_LLM_MAX_TOKENS_PER_DAY": "lots"}, "TRADING_LLM_MAX_TOKENS_PER_DAY='lots'"),
    ({"OPENAI_PRICE_INPUT_PER_MTOK": "1"}, "only one of OPENAI_PRICE_INPUT_PER_MTOK"),
])
def test_bad_settings_are_user_errors(env, message):
    with pytest.raises(ConfigError, match=None) as caught:
        OpenAISettings.from_env({"OPENAI_API_KEY": "x", **env})
    assert message in str(caught.value) and "Fix: " in str(caught.value)


def test_plain_http_to_a_trusted_network_needs_an_explicit_opt_in():
    settings = OpenAISettings.from_env({"OPENAI_API_KEY": "x", "OPENAI_BASE_URL": "http://10.1.2.3:11434/v1",
                                        "OPENAI_ALLOW_HTTP": "yes", "OPENAI_MODEL": "llava"})
    assert settings.base_url == "http://10.1.2.3:11434/v1" and settings.price is None


def test_importing_the_analyst_does_not_import_openai():
    code = ("import sys, trading_pipeline.adapters.openai_analyst, trading_pipeline.adapters.model_calls; "
            "print('openai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the same accounting on PostgreSQL ----------------------------------------------------------------


def test_call_log_cache_and_budget_on_sqlite_and_postgresql(database_url, openai_server, daily, weekly, png):
    from trading_pipeline.adapters.trading_db import session_factory

    sessions = session_factory(database_url)
    environ = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": openai_server.base_url,
               "TRADING_LLM_MAX_TOKENS_PER_DAY": "2000"}
    openai_server.reset(default=good(usage=(1500, 600)))
    first = OpenAIAnalyst.from_env(environ, sessions, run_id="pg-1")
    assert first.analyze(daily, chart_for(png), png).valid
    again = OpenAIAnalyst.from_env(environ, sessions, run_id="pg-2")
    assert again.analyze(daily, chart_for(png), png).valid  # cache hit: no tokens, allowed
    refused = again.analyze(weekly, None, png)  # 2,100 tokens used today ≥ 2,000
    assert "LLM token budget for today (UTC) is used up: 2,100 tokens" in refused.invalid_reason
    assert len(openai_server.requests) == 1
    assert [r.status for r in rows(sessions)] == ["ok", "cache_hit", "budget_exceeded"]
    with sessions() as session:
        assert session.execute(sa.select(ModelResponseCacheRow.hits)).scalar_one() == 1
    summary = summarize_calls(sessions, run_id="pg-2", symbol="AAPL")
    assert summary["cache_hits"] == 1 and summary["budget_refusals"] == 1 and summary["total_tokens"] == 0
    first.close()
    again.close()


def test_nul_characters_from_the_server_are_recorded_on_sqlite_and_postgresql(database_url, openai_server, daily,
                                                                               weekly, png):
    # PostgreSQL text cannot hold NUL: a server sending one (in an error, in a body that is not JSON)
    # must still give a recorded attempt and a NO_TRADE or retry that says what happened, not an
    # "unexpected error" with the attempt missing from the call log (and so from the budgets).
    from trading_pipeline.adapters.trading_db import session_factory

    sessions = session_factory(database_url)
    openai_server.reset(error(500, "upstream\x00crashed"), good(),
                        Reply(200, "oops\x00", headers={"content-type": "text/plain"}))
    analyst = OpenAIAnalyst.from_env({"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": openai_server.base_url,
                                      "TRADING_LLM_BACKOFF_SECONDS": "0.01"}, sessions, run_id="nul-1")
    try:
        retried = analyst.analyze(daily, chart_for(png), png)
        broken = analyst.analyze(weekly, None, png)
    finally:
        analyst.close()
    assert retried.valid and retried.signal == Action.BUY
    assert not broken.valid and "answered HTTP 200 with a body that is not JSON" in broken.invalid_reason
    assert "unexpected error" not in broken.invalid_reason and "\x00" not in broken.invalid_reason
    assert [(r.status, r.http_status) for r in rows(sessions)] == [
        ("server_error", 500), ("ok", 200), ("malformed_response", 200)]
    assert "upstream\\u0000crashed" in rows(sessions)[0].error
    assert rows(sessions)[2].outcome == f"invalid: {broken.invalid_reason}"
