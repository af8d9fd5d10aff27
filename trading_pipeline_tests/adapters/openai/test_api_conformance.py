"""The Chat Completions API as documented (OpenAI, Azure OpenAI, and the servers that copy it), not as
the local test server happens to answer: error shapes and codes, rate-limit headers, base URLs.

Every case ends in a valid analysis or in NO_TRADE whose reason names the problem and the fix, with
a bounded number of requests.
"""

import json
import time

import pytest

from trading_pipeline.adapters.llm.settings import OpenAISettings
from trading_pipeline.adapters.llm.transport import retry_after
from trading_pipeline.errors import ConfigError
from trading_pipeline_tests.adapters.openai.conftest import API_KEY, chart_for, rows
from trading_pipeline_tests.adapters.openai.local_server import Reply, completion, good
from trading_pipeline_tests.adapters.openai.test_compatible_servers import assert_no_trade


def api_error(status: int, message: str, type_: str | None, code: str | None, param: str | None = None,
              **headers: str) -> Reply:
    """An error as the API documents it: {"error": {"message", "type", "param", "code"}}."""
    return Reply(status, {"error": {"message": message, "type": type_, "param": param, "code": code}},
                 headers=dict(headers))


# --- 429s that are not rate limits, and how long a rate limit lasts --------------------------------


@pytest.mark.parametrize("status, body", [
    (429, {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                     "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}),
    (429, {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                     "type": "insufficient_quota", "param": None, "code": "project_spend_limit_exceeded"}}),
    (402, {"error": {"message": "Insufficient credits. Add more using https://openrouter.ai/settings/credits",
                     "code": 402}}),  # OpenRouter
])
def test_a_used_up_quota_is_not_retried_and_names_the_account(make_analyst, openai_server, daily, png, sessions,
                                                                status, body):
    openai_server.reset(default=Reply(status, body))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, f"quota or credit is used up ({status})")
    assert "Fix: check the plan, billing and spend limits" in analysis.invalid_reason
    assert "TRADING_LLM_CONCURRENCY" not in analysis.invalid_reason  # not a rate limit: pacing cannot help
    assert len(openai_server.requests) == 1 and [r.status for r in rows(sessions)] == ["quota_exceeded"]


def test_a_rate_limit_mentioning_billing_is_still_a_rate_limit(make_analyst, openai_server, daily, png, sessions):
    limited = api_error(429, "Rate limit reached for gpt-4.1-mini in organization org-x on requests per min. Limit: 3 "
                        "/ min. Please add a payment method to your account to increase your rate limit. Visit "
                        "https://platform.openai.com/account/billing to add a payment method.", "requests",
                        "rate_limit_exceeded")
    openai_server.reset(limited, good())
    assert make_analyst().analyze(daily, chart_for(png), png).valid
    assert [r.status for r in rows(sessions)] == ["rate_limited", "ok"]


def test_x_ratelimit_reset_of_the_exhausted_limit_is_honoured(make_analyst, openai_server, daily, png, sessions):
    # OpenAI's 429 may carry no Retry-After; its x-ratelimit-* headers say which limit is used up and when it resets.
    limited = api_error(429, "Rate limit reached for gpt-4.1-mini on tokens per min (TPM)", "tokens",
                        "rate_limit_exceeded", **{"x-ratelimit-remaining-requests": "499",
                                                  "x-ratelimit-reset-requests": "120ms",
                                                  "x-ratelimit-remaining-tokens": "0",
                                                  "x-ratelimit-reset-tokens": "0.6s"})
    openai_server.reset(limited, good())
    started = time.perf_counter()
    analysis = make_analyst(TRADING_LLM_BACKOFF_MAX_SECONDS="5").analyze(daily, chart_for(png), png)
    assert analysis.valid
    assert time.perf_counter() - started >= 0.6
    assert [r.status for r in rows(sessions)] == ["rate_limited", "ok"]


def test_x_ratelimit_reset_is_bounded_by_the_backoff_cap(make_analyst, openai_server, daily, png):
    limited = api_error(429, "Rate limit reached", "requests", "rate_limit_exceeded",
                        **{"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"})
    openai_server.reset(limited, good())
    started = time.perf_counter()
    assert make_analyst(TRADING_LLM_BACKOFF_MAX_SECONDS="0.3").analyze(daily, chart_for(png), png).valid
    assert 0.3 <= time.perf_counter() - started < 3


@pytest.mark.parametrize("headers, rate_limited, seconds", [
    ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30.5s",
      "x-ratelimit-remaining-requests": "9", "x-ratelimit-reset-requests": "2s"}, True, 90.5),
    # A 429 that says no remaining: the longest reset.
    ({"x-ratelimit-reset-tokens": "20ms", "x-ratelimit-reset-requests": "1h2m3s"}, True, 3723.0),
    ({"x-ratelimit-reset-tokens": "7"}, True, 7.0),  # Azure: plain seconds
    ({"x-ratelimit-reset-tokens": "7"}, False, None),  # a 500 with no limit used up: nothing to wait for
    ({"x-ratelimit-remaining-tokens": "5000", "x-ratelimit-reset-tokens": "6m0s"}, True, None),
    ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "soon"}, True, None),
    ({"retry-after": "2", "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "9s"}, True, 2.0),
])
def test_rate_limit_headers_read(headers, rate_limited, seconds):
    assert retry_after(headers, rate_limited) == seconds


def test_rate_limit_headers_on_a_500_are_not_a_reason_to_wait(make_analyst, openai_server, daily, png):
    # OpenAI sends x-ratelimit-* on every response; with tokens left, a reset in 6 minutes is no wait.
    failed = api_error(500, "The server had an error while processing your request.", "server_error", None,
                       **{"x-ratelimit-remaining-tokens": "149000", "x-ratelimit-reset-tokens": "6m0s"})
    openai_server.reset(failed, good())
    started = time.perf_counter()
    assert make_analyst(TRADING_LLM_BACKOFF_MAX_SECONDS="5").analyze(daily, chart_for(png), png).valid
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("status", [408, 409])
def test_408_and_409_are_retried_as_the_api_documents(make_analyst, openai_server, daily, png, sessions, status):
    openai_server.reset(api_error(status, "Request timed out" if status == 408 else "conflict", None, None), good())
    assert make_analyst().analyze(daily, chart_for(png), png).valid
    assert len(openai_server.requests) == 2


# --- a content filter's 400 ------------------------------------------------------------------------

AZURE_FILTERED = {"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
               "Please modify your prompt and retry.",
    "type": None, "param": "prompt", "code": "content_filter", "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
        "hate": {"filtered": False, "severity": "safe"}, "jailbreak": {"filtered": True, "detected": True},
        "self_harm": {"filtered": False, "severity": "safe"}, "sexual": {"filtered": False, "severity": "safe"},
        "violence": {"filtered": False, "severity": "safe"}}}}}


def test_azure_content_filter_400_is_no_trade_naming_the_filter_not_the_base_url(make_analyst, openai_server, daily,
                                                                                  png, sessions):
    openai_server.reset(default=Reply(400, AZURE_FILTERED))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "the server's content filter rejected the request (400)")
    assert "Fix: review the content filter configuration" in analysis.invalid_reason
    assert "OPENAI_BASE_URL" not in analysis.invalid_reason
    assert len(openai_server.requests) == 1 and [r.status for r in rows(sessions)] == ["content_filter"]


def test_a_filter_naming_the_image_does_not_turn_vision_off(make_analyst, openai_server, daily, png, sessions):
    body = {"error": {"message": "The image was filtered by the content management policy.", "type": None,
                      "param": "prompt", "code": "content_filter"}}
    openai_server.reset(default=Reply(400, body))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "content filter rejected the request")
    assert len(openai_server.requests) == 1 and [r.vision for r in rows(sessions)] == [True]


# --- request parameters reasoning models reject (OpenAI's documented error bodies) -----------------


def test_temperature_rejected_by_a_reasoning_model_is_dropped(make_analyst, openai_server, daily, png):
    def step(body):
        if "temperature" in body:
            return api_error(400, "Unsupported value: 'temperature' does not support 0 with this model. Only the "
                             "default (1) value is supported.", "invalid_request_error", "unsupported_value",
                             "temperature")
        return good()(body)

    openai_server.reset(default=step)
    assert make_analyst(OPENAI_MODEL="o4-mini").analyze(daily, chart_for(png), png).valid
    first, second = openai_server.bodies()
    assert first["temperature"] == 0 and "temperature" not in second
    assert second["max_completion_tokens"] == 1500 and "max_tokens" not in second  # the one reasoning models take


# --- what the completion holds ---------------------------------------------------------------------


def test_a_tool_call_instead_of_content_is_no_trade_saying_so(make_analyst, openai_server, daily, png, sessions):
    reply = completion(None, finish_reason="tool_calls")
    reply["choices"][0]["message"]["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
        "name": "json_tool_call", "arguments": '{"signal": "BUY", "entry": 100}'}}]
    openai_server.reset(Reply(200, reply))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "it answered with a tool call instead, finish_reason=tool_calls")
    assert [r.status for r in rows(sessions)] == ["empty"] and len(openai_server.requests) == 1


# --- base URLs ---------------------------------------------------------------------------------------


def test_a_base_url_with_a_trailing_slash_works(make_analyst, openai_server, daily, png):
    openai_server.reset(good())
    assert make_analyst(OPENAI_BASE_URL=openai_server.base_url + "/").analyze(daily, chart_for(png), png).valid


def test_a_base_url_without_v1_says_to_add_it(make_analyst, openai_server, daily, png, sessions):
    root = openai_server.base_url.removesuffix("/v1")  # Ollama's http://host:11434 instead of .../v1: a 404
    analysis = make_analyst(OPENAI_BASE_URL=root).analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, f"has no Chat Completions API at {root}/chat/completions (404)")
    assert f"it does not end in /v1: Ollama, vLLM, LM Studio and OpenAI answer at {root}/v1" in analysis.invalid_reason
    assert [r.status for r in rows(sessions)] == ["http_error"]


@pytest.mark.parametrize("url, message", [
    ("https://res.openai.azure.com/openai/deployments/gpt4o?api-version=2024-10-21",
     "is an Azure OpenAI per-deployment URL"),
    ("https://res.openai.azure.com/openai/deployments/gpt4o/", "is an Azure OpenAI per-deployment URL"),
    ("https://proxy.example/v1?team=quant", "has a query string or fragment"),
    ("https://api.openai.com/v1/chat/completions", "is an endpoint, not the API root"),
])
def test_base_urls_the_sdk_cannot_use_are_refused_at_configuration(url, message):
    with pytest.raises(ConfigError) as raised:
        OpenAISettings.from_env({"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": url})
    assert message in str(raised.value)
    assert "team=quant" not in str(raised.value)  # a query may hold a secret: not repeated


def test_azure_v1_api_root_is_accepted():
    settings = OpenAISettings.from_env({"OPENAI_API_KEY": API_KEY,
                                        "OPENAI_BASE_URL": "https://res.openai.azure.com/openai/v1/",
                                        "OPENAI_MODEL": "my-gpt4o-deployment"})
    assert settings.base_url == "https://res.openai.azure.com/openai/v1"


# --- message content: a string unless there is an image -------------------------------------------


def string_content_only(body):
    """A text-only server that takes `content` only as a string (the form every server accepts)."""
    if any(not isinstance(m["content"], str) for m in body["messages"]):
        return Reply(422, {"detail": [{"loc": ["body", "messages", 1, "content"], "type": "string_type",
                                       "msg": "Input should be a valid string"}]})
    return good()(body)


def test_a_request_without_an_image_sends_its_text_as_a_string(make_analyst, openai_server, daily, weekly, png):
    openai_server.reset(default=string_content_only)
    analyst = make_analyst(OPENAI_VISION="no")
    analysis = analyst.analyze(daily, chart_for(png), png)
    assert analysis.valid, analysis.invalid_reason
    assert len(openai_server.requests) == 1
    assert "Chart image: not available" in openai_server.bodies()[0]["messages"][-1]["content"]


# --- a server lacking every optional feature -------------------------------------------------------


def lacks_everything(body):
    """No vision, no response_format of either kind, no max_completion_tokens, no temperature (an old
    reasoning model behind a strict proxy): each is rejected with its own 400."""
    if any(isinstance(m["content"], list) for m in body["messages"]):
        return api_error(400, "Invalid content type. image_url is only supported by certain models.",
                         "invalid_request_error", None, "messages")
    if "response_format" in body:
        return api_error(400, f"Invalid parameter: 'response_format' of type {body['response_format']['type']!r} "
                         "is not supported with this model.", "invalid_request_error", None, "response_format")
    if "max_completion_tokens" in body:
        return api_error(400, "Unrecognized request argument supplied: max_completion_tokens",
                         "invalid_request_error", None)
    if "temperature" in body:
        return api_error(400, "Unsupported parameter: 'temperature' is not supported with this model.",
                         "invalid_request_error", "unsupported_parameter", "temperature")
    if body["messages"][0]["role"] == "system":
        return api_error(400, "Unsupported value: 'messages[0].role' does not support 'system' with this model.",
                         "invalid_request_error", "unsupported_value", "messages[0].role")
    return good()(body)


def test_each_missing_feature_is_learned_once_and_the_call_still_answers(make_analyst, openai_server, daily, png,
                                                                           sessions):
    openai_server.reset(default=lacks_everything)
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid, analysis.invalid_reason
    assert len(openai_server.requests) == 7  # six features dropped, one at a time, then the answer
    last = openai_server.bodies()[-1]
    assert last["max_tokens"] == 1500 and "temperature" not in last and "response_format" not in last
    assert [m["role"] for m in last["messages"]] == ["user"]


def without_a_system_turn(reply: Reply):
    """A server whose chat template has no system turn: any `system` message gets `reply`."""
    def step(body):
        return reply if any(m["role"] == "system" for m in body["messages"]) else good()(body)
    return step


@pytest.mark.parametrize("reply", [
    api_error(400, "Unsupported value: 'messages[0].role' does not support 'system' with this model.",
              "invalid_request_error", "unsupported_value", "messages[0].role"),  # OpenAI o1-mini
    Reply(400, {"object": "error", "message": "System role not supported", "type": "BadRequestError",
                "param": None, "code": 400}),  # vLLM serving Gemma
    Reply(422, {"error": "Template error: template not found: Conversation roles must alternate "
                         "user/assistant/user/assistant/...", "error_type": "template_error"}),  # TGI, old Mistral
], ids=["openai-o1", "vllm-gemma", "tgi-mistral"])
def test_a_server_without_a_system_turn_gets_the_instructions_first_in_the_user_message(
        make_analyst, openai_server, daily, weekly, png, reply):
    openai_server.reset(default=without_a_system_turn(reply))
    analyst = make_analyst()
    assert analyst.analyze(daily, chart_for(png), png).valid
    first, second = openai_server.bodies()
    system = first["messages"][0]["content"]
    assert first["messages"][0]["role"] == "system" and [m["role"] for m in second["messages"]] == ["user"]
    text, image = second["messages"][0]["content"]  # the chart still goes with it
    assert text["text"] == system + "\n\n" + first["messages"][1]["content"][0]["text"]
    assert image == first["messages"][1]["content"][1]
    # Learned once: the next call (a text-only one) is sent without a system turn from the start.
    assert analyst.analyze(weekly, chart_for(png), png).valid
    third = openai_server.bodies()[2]
    assert [m["role"] for m in third["messages"]] == ["user"] and len(openai_server.requests) == 3


def test_a_400_that_only_mentions_the_system_prompt_keeps_the_system_turn(make_analyst, openai_server, daily,
                                                                         png, sessions):
    """Not every 400 naming "system" is about the role: an over-long prompt is not fixed by moving it."""
    openai_server.reset(default=Reply(400, {"error": {
        "message": "This model's maximum context length is 8192 tokens. However, your system message and "
                   "messages resulted in 9000 tokens.", "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded"}}))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert not analysis.valid and len(openai_server.requests) == 1
    assert openai_server.bodies()[0]["messages"][0]["role"] == "system"


# --- usage of reasoning models ---------------------------------------------------------------------


def test_reasoning_tokens_are_counted_once_as_part_of_completion_tokens(make_analyst, openai_server, daily, png,
                                                                          sessions):
    def step(body):
        reply = completion(good()(body).body["choices"][0]["message"]["content"], usage=(1200, 900))
        reply["usage"]["completion_tokens_details"] = {"reasoning_tokens": 600, "accepted_prediction_tokens": 0}
        reply["usage"]["prompt_tokens_details"] = {"cached_tokens": 1024}
        return Reply(200, reply)

    openai_server.reset(step)
    assert make_analyst().analyze(daily, chart_for(png), png).valid
    [row] = rows(sessions)
    assert (row.prompt_tokens, row.completion_tokens, row.usage_estimated) == (1200, 900, False)


def test_output_spent_on_hidden_reasoning_says_so(make_analyst, openai_server, daily, png, sessions):
    # OpenAI's reasoning models return no reasoning text: only usage says where the output went.
    reply = completion("", finish_reason="length", usage=(1200, 1500))
    reply["usage"]["completion_tokens_details"] = {"reasoning_tokens": 1500}
    openai_server.reset(Reply(200, reply))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "the model spent its output on reasoning and was cut off before answering")
    assert "raise OPENAI_MAX_OUTPUT_TOKENS" in analysis.invalid_reason


def test_a_generation_that_failed_is_not_used_even_when_its_text_validates(make_analyst, openai_server, daily, png,
                                                                             sessions):
    def step(body):  # a proxy whose upstream failed: finish_reason "error", with whatever text came before
        reply = good()(body).body
        reply["choices"][0]["finish_reason"] = "error"
        return Reply(200, reply)

    openai_server.reset(step)
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "generation failed (finish_reason=error)")
    assert [r.status for r in rows(sessions)] == ["error_in_body"] and len(openai_server.requests) == 1


def test_azure_filter_annotations_on_a_good_completion_are_read_as_a_completion(make_analyst, openai_server, daily,
                                                                                  png):
    safe = {"filtered": False, "severity": "safe"}
    annotations = {kind: safe for kind in ("hate", "self_harm", "sexual", "violence")}

    def step(body):
        reply = good()(body).body
        reply["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": annotations}]
        reply["choices"][0]["content_filter_results"] = annotations
        return Reply(200, reply)

    openai_server.reset(step)
    assert make_analyst().analyze(daily, chart_for(png), png).valid


def test_an_azure_completion_stopped_by_its_filter_is_no_trade(make_analyst, openai_server, daily, png, sessions):
    def step(body):  # "rarely a partial result" with finish_reason content_filter: never read
        reply = good()(body).body
        reply["choices"][0]["finish_reason"] = "content_filter"
        reply["choices"][0]["content_filter_results"] = {"violence": {"filtered": True, "severity": "medium"}}
        return Reply(200, reply)

    openai_server.reset(step)
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "finish_reason=content_filter")
    assert [r.status for r in rows(sessions)] == ["content_filter"]


# --- 403s that are not about the key, and 413 ----------------------------------------------------


@pytest.mark.parametrize("body, named", [
    ({"error": {"message": "Country, region, or territory not supported", "type": "request_forbidden",
                "param": None, "code": "unsupported_country_region_territory"}}, "region"),
    ({"error": {"code": "403", "message": "Access denied due to Virtual Network/Firewall rules."}}, "network"),
])
def test_a_403_about_region_or_network_does_not_blame_the_key(make_analyst, openai_server, daily, png, sessions,
                                                                body, named):
    openai_server.reset(default=Reply(403, body))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "refused access from this machine (403)")
    assert named in analysis.invalid_reason and "set OPENAI_API_KEY to a valid key" not in analysis.invalid_reason
    assert len(openai_server.requests) == 1


def test_a_413_from_a_proxy_names_the_body_limit_not_the_output_tokens(make_analyst, openai_server, daily, png):
    page = "<html><head><title>413 Request Entity Too Large</title></head><body>nginx</body></html>"
    openai_server.reset(default=Reply(413, page, headers={"content-type": "text/html"}))
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert_no_trade(analysis, "answered 413: the request body is larger than it accepts")
    assert "OPENAI_VISION=no" in analysis.invalid_reason and "OPENAI_MAX_OUTPUT_TOKENS" not in analysis.invalid_reason
    assert len(openai_server.requests) == 1


# --- json_schema rejected, in the words of each server ---------------------------------------------


@pytest.mark.parametrize("status, body", [
    (400, {"error": {"message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported with "
                                "this model.", "type": "invalid_request_error", "param": "response_format",
                     "code": None}}),  # OpenAI, a model without Structured Outputs
    (400, {"error": {"message": "response_format value as json_schema is enabled only for api versions "
                                "2024-08-01-preview and later", "type": "invalid_request_error", "param": None,
                     "code": "BadRequest"}}),  # Azure, an old api-version behind a proxy
    (422, {"error": "Failed to deserialize the JSON body into the target type: response_format: unknown variant "
                    "`json_schema`, expected `json` or `regex`", "error_type": "validation"}),  # TGI
    (400, {"object": "error", "message": "json_schema response format is not supported by this model",
           "type": "BadRequestError", "param": None, "code": 400}),  # vLLM's older top-level error
])
def test_json_schema_rejections_as_servers_word_them_fall_back_to_json_object(make_analyst, openai_server, daily,
                                                                               png, sessions, status, body):
    def step(request):
        if request.get("response_format", {}).get("type") == "json_schema":
            return Reply(status, body)
        # OpenAI's documented rule for json_object: the word "json" must appear in the messages.
        assert "json" in json.dumps(request["messages"]).lower()
        return good()(request)

    openai_server.reset(default=step)
    analysis = make_analyst().analyze(daily, chart_for(png), png)
    assert analysis.valid and "answered in json_object mode" in analysis.rationale
    assert [r.response_format for r in rows(sessions)] == ["json_schema", "json_object"]
