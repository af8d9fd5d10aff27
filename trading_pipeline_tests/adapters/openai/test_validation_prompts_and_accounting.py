"""Pure parts: plausibility validation, prompt versions, strict schema, fences, prices, redaction, cache key."""

import json

import pytest

from trading_pipeline.adapters import model_calls
from trading_pipeline.adapters.llm.answers import TimeframeAnswer, strict_json_schema
from trading_pipeline.adapters.llm.json_text import strip_fences
from trading_pipeline.adapters.model_calls import BudgetLimits, Redactor, cache_enabled, cache_key, price_for
from trading_pipeline.core.analysis import Action
from trading_pipeline.core.analysis_validation import (
    NumericContext,
    consolidation_problems,
    context_problems,
    plausibility_problems,
    reward_risk,
)
from trading_pipeline.errors import ConfigError
from trading_pipeline.prompts import load_prompt, parse_prompt

# close 100, ATR 2: entry tolerance max(1×2, 2% of 100) = 2; stops/targets within 90-110 ± 12 = 78-122.
CTX = NumericContext(last_close=100.0, atr=2.0, recent_high=110.0, recent_low=90.0, chart_high=130.0, chart_low=70.0)


def test_a_sound_buy_and_a_sound_sell_are_plausible():
    assert plausibility_problems(Action.BUY, 100.5, 96.0, [106.0, 110.0], CTX, support=[95.0], resistance=[125.0]) == []
    assert plausibility_problems("SELL", 99.0, 104.0, [94.0], CTX) == []


@pytest.mark.parametrize("signal, entry, stop, targets, expected", [
    ("BUY", 102.5, 96.0, [106.0], "entry 102.50 is 2.50 away from the last close 100.00 (tolerance ±2.00"),
    ("BUY", 100.0, 101.0, [106.0], "BUY needs the stop below the entry 100.00; got stop 101.00"),
    ("SELL", 100.0, 99.0, [94.0], "SELL needs the stop above the entry 100.00; got stop 99.00"),
    ("BUY", 100.0, 100.0, [106.0], "BUY needs the stop below"),
    ("BUY", 100.0, 96.0, [99.0], "BUY needs targets above the entry 100.00; got ['99.00']"),
    ("SELL", 100.0, 104.0, [101.0], "SELL needs targets below the entry"),
    ("BUY", 100.0, 96.0, [123.0], "prices ['123.00'] are outside the recent range 90.00-110.00 ± 6×ATR (78.00-122.00)"),
    ("BUY", 100.0, 77.0, [106.0], "prices ['77.00'] are outside the recent range"),
    ("BUY", None, 96.0, [106.0], "BUY without a finite entry price"),
    ("BUY", 100.0, None, [106.0], "BUY without a finite stop price"),
    ("BUY", 100.0, 96.0, [], "BUY without a target"),
    ("BUY", float("nan"), 96.0, [106.0], "without a finite entry"),
    ("BUY", 100.0, 96.0, [float("inf")], "are not finite prices"),
    ("BUY", 100.0, 96.0, [104.0, 106.0, 108.0, 110.0], "4 targets given, at most 3"),
])
def test_implausible_plans_are_named(signal, entry, stop, targets, expected):
    problems = plausibility_problems(signal, entry, stop, targets, CTX)
    assert any(expected in p for p in problems), problems


def test_key_levels_are_checked_against_the_charted_range_for_any_signal():
    assert plausibility_problems("HOLD", None, None, [], CTX, support=[58.5], resistance=[141.0]) == []  # 70−12, 130+12
    problems = plausibility_problems("HOLD", None, None, [], CTX, support=[50.0], resistance=[150.0])
    assert len(problems) == 2 and "support level 50.0 is outside the charted range ± 6×ATR (58.00-142.00)" in problems[0]


def test_hold_carries_no_plan_to_check():
    assert plausibility_problems("HOLD", 1e9, -5.0, [0.0], CTX) == []


def test_unusable_bars_are_named_before_any_number_is_judged():
    ctx = NumericContext(last_close=100.0, atr=float("nan"), recent_high=110.0, recent_low=90.0)
    assert context_problems(ctx) == ["ATR nan is not available (too little history?): prices cannot be checked"]
    assert plausibility_problems("BUY", 100.0, 96.0, [106.0], ctx) == context_problems(ctx)


def test_tolerance_uses_the_share_of_the_close_when_atr_is_small():
    ctx = NumericContext(last_close=100.0, atr=0.5, recent_high=101.0, recent_low=99.0)
    assert ctx.entry_tolerance() == 2.0
    assert plausibility_problems("BUY", 101.9, 99.5, [103.0], ctx) == []


def test_r_is_recomputed_from_the_prices():
    assert reward_risk(100.0, 96.0, 106.0) == 1.5
    assert reward_risk(100.0, 104.0, 94.0) == 1.5
    assert reward_risk(100.0, 100.0, 106.0) is None


@pytest.mark.parametrize("action, daily, weekly, expected", [
    ("BUY", "BUY", "BUY", []),
    ("BUY", "BUY", "HOLD", []),
    ("HOLD", "BUY", "SELL", []),
    ("SELL", "BUY", "HOLD", ["consolidated SELL differs from the daily signal BUY (the daily leads)"]),
    ("BUY", "HOLD", "BUY", ["consolidated BUY differs from the daily signal HOLD (the daily leads)"]),
    ("BUY", "BUY", "SELL", ["consolidated BUY is opposed by the weekly signal SELL"]),
    ("NO_TRADE", "BUY", "BUY", ["consolidated action NO_TRADE is not BUY, SELL or HOLD"]),
])
def test_consolidation_keeps_daily_lead_and_weekly_confirmation(action, daily, weekly, expected):
    assert consolidation_problems(action, daily, weekly) == expected


# --- prompts ---------------------------------------------------------------------------------------


def test_prompt_version_is_the_content_hash():
    prompt = load_prompt("timeframe_analysis")
    assert prompt.version.startswith("timeframe_analysis@") and len(prompt.version.split("@")[1]) == 12
    assert "{context_json}" in prompt.user_template and "JSON" in prompt.system
    raw = b"=== system ===\nA\n=== user ===\n{context_json}\n"
    assert parse_prompt("p", raw).version != parse_prompt("p", raw.replace(b"A", b"B")).version
    assert load_prompt("consolidation").version.startswith("consolidation@")
    with pytest.raises(ValueError, match="must start with"):
        parse_prompt("p", b"no markers")


def test_strict_schema_requires_every_property_and_forbids_extras_everywhere():
    schema = strict_json_schema(TimeframeAnswer)
    assert "$defs" not in json.dumps(schema) and "$ref" not in json.dumps(schema)

    def objects(node):
        if isinstance(node, dict):
            if node.get("type") == "object":
                yield node
            for value in node.values():
                yield from objects(value)
        elif isinstance(node, list):
            for value in node:
                yield from objects(value)

    found = list(objects(schema))
    assert len(found) == 2  # the answer and an indicator reading
    for node in found:
        assert node["additionalProperties"] is False and set(node["required"]) == set(node["properties"])
    assert schema["properties"]["entry"]["anyOf"] == [{"type": "number"}, {"type": "null"}]
    assert "maximum" not in json.dumps(schema)  # bounds are enforced by pydantic, not sent


@pytest.mark.parametrize("text", ['```json\n{"a": 1}\n```', '```\n{"a": 1}\n```', '  {"a": 1}  ', '```JSON {"a": 1}```'])
def test_fences_are_stripped(text):
    assert json.loads(strip_fences(text)) == {"a": 1}


# --- prices, budgets, cache, secrets ---------------------------------------------------------------


def test_prices_from_the_table_snapshots_and_environment():
    assert price_for("gpt-4o-mini", {}).input_per_mtok == 0.15
    assert price_for("gpt-4o-2024-08-06", {}).output_per_mtok == 10.0
    assert price_for("openai/gpt-4.1-mini", {}).source == "built-in table (gpt-4.1-mini)"
    assert price_for("gpt-4o-audio-preview", {}) is None and price_for("llava:13b", {}) is None
    custom = price_for("llava:13b", {"OPENAI_PRICE_INPUT_PER_MTOK": "0.2", "OPENAI_PRICE_OUTPUT_PER_MTOK": "0.8"})
    assert custom.source == "environment" and custom.cost(1_000_000, 500_000) == pytest.approx(0.6)


def test_budget_limits_from_environment():
    limits = BudgetLimits.from_env({"TRADING_LLM_MAX_TOKENS_PER_RUN": "200_000", "TRADING_LLM_MAX_COST_PER_DAY_USD": "2.5"})
    assert (limits.max_tokens_per_run, limits.max_tokens_per_day, limits.max_cost_per_day_usd) == (200_000, None, 2.5)
    with pytest.raises(ConfigError, match="TRADING_LLM_MAX_TOKENS_PER_RUN='-5'"):
        BudgetLimits.from_env({"TRADING_LLM_MAX_TOKENS_PER_RUN": "-5"})


def test_cache_switches():
    assert cache_enabled({}) and cache_enabled({"TRADING_LLM_CACHE": "on"}, {"trading/llm_cache": ""})
    assert not cache_enabled({"TRADING_LLM_CACHE": "off"})
    assert not cache_enabled({}, {model_calls.CACHE_RUN_TAG: "off"})
    with pytest.raises(ConfigError, match="run tag trading/llm_cache='nope'"):
        cache_enabled({}, {"trading/llm_cache": "nope"})


def test_cache_key_depends_on_model_prompt_chart_context_and_schema():
    base = {"kind": "k", "model": "m", "prompt_version": "p@1", "chart_sha256": "c", "context_sha256": "x",
            "schema_sha256": "s"}
    key = cache_key(**base)
    assert cache_key(**base) == key
    for change in ({"model": "m2"}, {"prompt_version": "p@2"}, {"chart_sha256": None}, {"context_sha256": "y"},
                   {"schema_sha256": "t"}):
        assert cache_key(**{**base, **change}) != key


def test_redactor_removes_the_key_and_anything_shaped_like_one():
    redactor = Redactor(["my-own-secret-123"])
    text = "key my-own-secret-123, Authorization: Bearer abc.def-ghi, sk-proj-AbCdEf123456 and sk-abc***wxyz"
    assert redactor.text(text) == "key [REDACTED], Authorization: Bearer [REDACTED], [REDACTED] and [REDACTED]"
    recorded = redactor.json({"headers": {"Authorization": "Bearer my-own-secret-123", "api-key": "x"},
                              "body": ["my-own-secret-123"]})
    assert recorded == {"headers": {"Authorization": "Bearer [REDACTED]", "api-key": "[REDACTED]"}, "body": ["[REDACTED]"]}


def test_recorded_endpoint_drops_credentials_in_the_url():
    assert model_calls.endpoint_for_record("https://user:pw@example.com:8443/v1?api-key=zz") == "https://example.com:8443/v1"


def test_the_endpoints_redactor_removes_the_base_urls_password_as_written_decoded_and_as_basic_credentials():
    import base64

    redactor = Redactor.for_endpoint("sk-key-0123456789", "https://proxy%2Duser:pa%40ss-w0rd-99@proxy.example/v1")
    basic = base64.b64encode(b"proxy-user:pa@ss-w0rd-99").decode()
    text = f"echo: Authorization: Basic {basic} / pa%40ss-w0rd-99 / pa@ss-w0rd-99 / sk-key-0123456789"
    cleaned = redactor.text(text)
    assert "w0rd" not in cleaned and basic[:8] not in cleaned and "0123456789" not in cleaned
    assert Redactor.for_endpoint("k" * 20, "https://proxy.example/v1").text("https://proxy.example/v1") == \
        "https://proxy.example/v1"


def test_redactor_removes_every_run_of_8_characters_of_a_secret_and_keeps_shorter_ones():
    key = "Q7vXm2LpR9tK4wZb-support-Hn3cYd8fJ6gTqW1e"
    redactor = Redactor([key, "pw42"])
    text = f"a {key[:8]} b {key[10:18]} c {key[-8:]} d {key[3:30]} e {key[:8]}{key[-8:]} f support {key[:7]} pw42"
    assert redactor.text(text) == (
        "a [REDACTED] b [REDACTED] c [REDACTED] d [REDACTED] e [REDACTED] f support Q7vXm2L [REDACTED]")
    assert redactor.json({"error": {"message": f"key ending {key[-9:]}"}}) == {"error": {"message": "key ending [REDACTED]"}}


@pytest.mark.parametrize("asked, answered, same", [
    ("gpt-4o", "gpt-4o", True),
    ("gpt-4o", "gpt-4o-2024-08-06", True),  # OpenAI's dated snapshot
    ("gpt-4", "gpt-4-0613", True),
    ("openai/gpt-4o-mini", "openai/gpt-4o-mini-2024-07-18", True),
    ("GPT-4o", "gpt-4o", True),
    ("llama3.2-vision", "llama3.2-vision:latest", True),  # Ollama's default tag
    ("gpt-4o", "gpt-4o-mini", False),  # starts with the asked name and a '-', but another (cheaper) model
    ("gpt-4o", "gpt-4o-mini-2024-07-18", False),
    ("gpt-4", "gpt-4-1106-preview", False),
    ("my-azure-deployment", "gpt-4o-2024-08-06", False),
    ("gpt-4.1-mini", "gpt-4.1", False),
])
def test_which_answered_model_names_are_the_asked_model(asked, answered, same):
    assert model_calls.same_model(asked, answered) is same
