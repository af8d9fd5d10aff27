""".env.example: a copy changes nothing, and the values it documents are the code's defaults.

`make demo`, the chart server and Dagster's CLI (`dg dev` loads ./.env from the current folder)
all read .env, so every setting in the example is commented out; uncommented, each documented
value must give exactly what the unset variable gives.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dotenv import dotenv_values

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / ".env.example"
DOCUMENTED = re.compile(r"^# ([A-Z][A-Z0-9_]+)=(.*)$")
# Read by docker compose only (their defaults are the compose file's, checked below).
COMPOSE_ONLY = {"POSTGRES_USER", "POSTGRES_PASSWORD", "DAGSTER_POSTGRES_DB", "TRADING_POSTGRES_DB", "BIND_ADDRESS",
                "COMPOSE_PROFILES", "IBEAM_ACCOUNT", "IBEAM_PASSWORD", "IBEAM_TWO_FA_HANDLER", "MINIO_IMAGE",
                "IBEAM_IMAGE"}


def documented() -> dict[str, str]:
    found = {}
    for line in EXAMPLE.read_text().splitlines():
        match = DOCUMENTED.match(line)
        if match:
            assert match[1] not in found, f"{match[1]} documented twice"
            found[match[1]] = match[2]
    return found


def test_a_copy_sets_nothing(tmp_path):
    """What Dagster's CLI and the demo would load from a fresh copy: no variable at all."""
    copy = tmp_path / ".env"
    copy.write_text(EXAMPLE.read_text())
    assert dotenv_values(copy) == {}
    assert len(documented()) > 60  # ... yet every setting is there to uncomment


def _clean_environment(monkeypatch, tmp_path) -> dict[str, str]:
    for name in documented():
        monkeypatch.delenv(name, raising=False)
    return {"DAGSTER_HOME": str(tmp_path), "OPENAI_API_KEY": "sk-test"}


def _dump(value):
    return value.model_dump() if hasattr(value, "model_dump") else value


def test_documented_values_are_the_code_defaults(monkeypatch, tmp_path):
    from trading_pipeline.adapters.ibkr.settings import read_switches, settings_from_env
    from trading_pipeline.adapters.model_calls import cache_enabled
    from trading_pipeline.adapters.openai_analyst import OpenAISettings
    from trading_pipeline.graph.resources import resources_from_env

    base = _clean_environment(monkeypatch, tmp_path)
    values = {name: value for name, value in documented().items() if name not in COMPOSE_ONLY}
    uncommented = {**values, **base}  # the key an openai settings check needs; everything else documented

    def everything(environ):
        resources = {name: _dump(resource) for name, resource in resources_from_env(environ).items()}
        ibkr = (settings_from_env(environ), read_switches(environ))  # switches: read when an order goes out
        return (resources, OpenAISettings.from_env(environ), ibkr, cache_enabled(environ))

    assert everything(uncommented) == everything(base)
    # settings read only in the other modes (S3 IO manager and chart store, IBKR broker and data)
    other_modes = {"TRADING_IO_MANAGER": "s3", "TRADING_CHART_STORE": "s3", "TRADING_BROKER": "ibkr",
                   "TRADING_MARKET_DATA": "ibkr"}
    assert everything({**uncommented, **other_modes}) == everything({**base, **other_modes})
    # the demo's one special case: it turns paper orders on only when the variable is unset
    assert values["TRADING_ORDERS_ENABLED"] == "no"


def test_compose_defaults_match_the_documented_values():
    compose = (REPO / "docker-compose.yml").read_text()
    defaults = dict(re.findall(r"\$\{([A-Z_]+):-([^}]*)\}", compose))
    required = set(re.findall(r"\$\{([A-Z_]+):\?", compose))
    docs = documented()
    for name, default in defaults.items():
        if name in docs and name not in ("TRADING_STRATEGIES_FILE", "TRADING_CHART_BASE_URL"):
            assert docs[name] == default, (name, docs[name], default)
    for name in required:  # no value for a secret docker compose insists on
        assert docs[name] == "", name
    assert {"POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= required


@pytest.mark.parametrize("name", ["TRADING_CHART_SERVER_PORT", "TRADING_CHART_BASE_URL"])
def test_new_chart_settings_are_documented(name):
    assert name in documented()
