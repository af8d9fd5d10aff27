"""The `openai` analyst's settings: every OPENAI_* and TRADING_LLM_* variable, read and checked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from trading_pipeline.adapters import model_calls
from trading_pipeline.adapters.model_calls import BudgetLimits, ModelPrice
from trading_pipeline.config import env_number, is_loopback_host
from trading_pipeline.errors import ConfigError

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
    "OPENAI_ANONYMIZE_CHARTS": "no",
}
VISION_MODES = ("auto", "yes", "no")
YES, NO = ("yes", "on", "true", "1"), ("no", "off", "false", "0")


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
    # The model sees the chart and numbers with no symbol, dates or absolute prices (core/chart_spec.py).
    anonymize: bool = False

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
        _check_api_root(base_url, parts)
        if parts.scheme == "http" and not is_loopback_host(parts.hostname) and \
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
        raw_anonymize = (environ.get("OPENAI_ANONYMIZE_CHARTS") or DEFAULTS["OPENAI_ANONYMIZE_CHARTS"]).strip().lower()
        if raw_anonymize not in YES + NO:
            raise ConfigError(f"OPENAI_ANONYMIZE_CHARTS={environ.get('OPENAI_ANONYMIZE_CHARTS')!r} is not yes or no",
                              "set OPENAI_ANONYMIZE_CHARTS=yes (the model sees no symbol, dates or absolute prices) "
                              "or no (default)")
        raw_temperature = (environ.get("OPENAI_TEMPERATURE") or DEFAULTS["OPENAI_TEMPERATURE"]).strip().lower()
        if raw_temperature in ("none", "omit", "unset"):
            temperature = None
        else:
            temperature = env_number({"OPENAI_TEMPERATURE": raw_temperature}, "OPENAI_TEMPERATURE", None,
                                     low=0.0, high=2.0, example="0 (or none to leave it out)")

        def number(name: str, low: float, high: float, whole: bool = False) -> float:
            return env_number(environ, name, float(DEFAULTS[name]), low=low, high=high, whole=whole)

        return cls(
            api_key=api_key, base_url=base_url, model=model, vision=vision,
            timeout_s=number("OPENAI_TIMEOUT_SECONDS", 0.05, 3600),
            max_output_tokens=int(number("OPENAI_MAX_OUTPUT_TOKENS", 200, 100_000, whole=True)),
            temperature=temperature,
            max_attempts=int(number("TRADING_LLM_MAX_ATTEMPTS", 1, 10, whole=True)),
            backoff_s=number("TRADING_LLM_BACKOFF_SECONDS", 0, 60),
            backoff_max_s=number("TRADING_LLM_BACKOFF_MAX_SECONDS", 0, 600),
            concurrency=int(number("TRADING_LLM_CONCURRENCY", 1, 256, whole=True)),
            price=model_calls.price_for(model, environ),
            limits=_limits(environ, model),
            cache=model_calls.cache_enabled(environ, run_tags),
            anonymize=raw_anonymize in YES,
        )


def _check_api_root(base_url: str, parts: SplitResult) -> None:
    """OPENAI_BASE_URL must be the API root the SDK appends /chat/completions to: a query string would
    end up before that path (…?api-version=…chat/completions), and Azure's per-deployment URLs
    (/openai/deployments/<name>, api-version, api-key header) are a different API, not supported."""
    shown = model_calls.endpoint_for_record(base_url)
    path = parts.path.rstrip("/").lower()
    if "/openai/deployments" in path or "api-version" in parts.query.lower():
        raise ConfigError(
            f"OPENAI_BASE_URL={shown!r} is an Azure OpenAI per-deployment URL (/openai/deployments/…?api-version=…), "
            "which this analyst does not support",
            "use the resource's v1 API: OPENAI_BASE_URL=https://<resource>.openai.azure.com/openai/v1 and "
            "OPENAI_MODEL=<your deployment name>")
    if parts.query or parts.fragment:
        raise ConfigError(f"OPENAI_BASE_URL={shown!r} has a query string or fragment (?… or #…), which would be "
                          "put before the /chat/completions path",
                          "set OPENAI_BASE_URL to the API root alone, e.g. https://api.openai.com/v1")
    if path.endswith(("/chat/completions", "/completions", "/responses")):
        raise ConfigError(f"OPENAI_BASE_URL={shown!r} is an endpoint, not the API root: /chat/completions is "
                          "added to it",
                          "set OPENAI_BASE_URL to the API root, the URL without /chat/completions (e.g. "
                          "https://api.openai.com/v1 or http://127.0.0.1:11434/v1)")


def _limits(environ: Mapping[str, str], model: str) -> BudgetLimits:
    limits = BudgetLimits.from_env(environ)
    if limits.max_cost_per_day_usd is not None and model_calls.price_for(model, environ) is None:
        raise ConfigError(
            f"{model_calls.MAX_COST_PER_DAY_ENV} is set but the price of model {model!r} is unknown, "
            "so its cost cannot be counted",
            f"set {model_calls.PRICE_INPUT_ENV} and {model_calls.PRICE_OUTPUT_ENV} (USD per 1M tokens), or budget "
            f"tokens instead with {model_calls.MAX_TOKENS_PER_DAY_ENV}")
    return limits
