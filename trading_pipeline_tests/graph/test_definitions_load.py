"""The code location loads fast and light, and refuses bad configuration with problem + fix."""

import os
import subprocess
import sys
import textwrap

import pytest

from trading_pipeline.errors import ConfigError, StrategiesFileError
from trading_pipeline.graph.resources import resources_from_env


def load_in_subprocess(env_overrides):
    code = textwrap.dedent("""
        import sys, time
        t = time.perf_counter()
        import trading_pipeline.definitions as d
        heavy = [m for m in ("plotly", "kaleido", "openai", "boto3", "talib", "numba", "pandas", "httpx",
                             "exchange_calendars", "sqlalchemy") if m in sys.modules]
        print(sorted(k.to_user_string() for k in d.defs.resolve_asset_graph().get_all_asset_keys()))
        print("heavy:", heavy)
    """)
    env = {**os.environ, **env_overrides}
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=False, capture_output=True, text=True,
                          env=env, timeout=120)


def test_definitions_expose_six_assets_and_import_no_heavy_library(tmp_path):
    result = load_in_subprocess({"TRADING_DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert ("['account_summary', 'ai_analyses', 'backtest', 'chart_images', 'executions', 'indicator_frames', "
            "'market_bars', 'orders', 'positions', 'strategies', 'trade_decisions']") in result.stdout
    assert "heavy: []" in result.stdout


def test_bad_strategies_file_stops_the_load_with_line_and_fix(tmp_path):
    bad = tmp_path / "strategies.yaml"
    bad.write_text("strategies:\n  - name: x\n    symbols: [aapl]\n    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n")
    result = load_in_subprocess({"TRADING_STRATEGIES_FILE": str(bad), "TRADING_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode != 0
    assert f"{bad}:3" in result.stderr and "Fix:" in result.stderr
    assert StrategiesFileError.__name__ in result.stderr


@pytest.mark.parametrize("variable, value, words", [
    ("TRADING_BROKER", "interactive", "one of: paper, ibkr"),
    ("TRADING_MARKET_DATA", "yahoo", "one of: simulated, csv, ibkr"),
    ("TRADING_ANALYST", "openai", "needs OPENAI_API_KEY"),
    ("TRADING_ORDERS_ENABLED", "yess", "neither yes nor no"),
    ("IBKR_VERIFY_SSL", "maybe", "neither yes nor no"),
    # Loaded before; then every decision step failed on it (exits included) until it was fixed.
    ("TRADING_KILL_SWITCH", "y", "neither yes nor no"),
    ("TRADING_PAPER_EQUITY", "lots", "not a number"),
    # Loaded before; nan and inf crashed every decision step (ValueError, no variable named), and a
    # negative or zero equity made every decision a NO_TRADE whose reason was a negative size.
    ("TRADING_PAPER_EQUITY", "nan", "not a number from 1 to"),
    ("TRADING_PAPER_EQUITY", "inf", "not a number from 1 to"),
    ("TRADING_PAPER_EQUITY", "-100000", "not a number from 1 to"),
    ("TRADING_PAPER_EQUITY", "0", "not a number from 1 to"),
    # nan stopped the load with "cannot convert float NaN to integer"; -5 failed every chart with a
    # fix about kaleido.
    ("TRADING_CHART_WIDTH", "nan", "not a whole number from 100 to 10000"),
    ("TRADING_CHART_WIDTH", "-5", "not a whole number from 100 to 10000"),
    ("TRADING_CHART_HEIGHT", "0", "not a whole number from 100 to 10000"),
    ("TRADING_SIM_SEED", "nan", "not a whole number"),
    ("TRADING_SIM_SEED", "1.5", "not a whole number"),
    # nan and inf timeouts loaded (nan <= 0 is false); a nan concurrency or a word for the volume
    # multiplier stopped the load with a bare ValueError.
    ("IBKR_CONNECT_TIMEOUT", "nan", "not a number"),
    ("IBKR_READ_TIMEOUT", "inf", "not a number"),
    ("IBKR_HISTORY_CONCURRENCY", "nan", "not a whole number from 1 to 5"),
    ("IBKR_HISTORY_VOLUME_MULTIPLIER", "abc", "not a number"),
    ("IBKR_HISTORY_VOLUME_MULTIPLIER", "-100", "is not a number above 0"),
    # 2.5 loaded as 2 (cut silently), and 6 stopped the load without naming the variable; the fix
    # read "e.g. seconds" for a count.
    ("IBKR_HISTORY_CONCURRENCY", "2.5", "is not a whole number from 1 to 5"),
    ("IBKR_HISTORY_CONCURRENCY", "6", "is not a whole number from 1 to 5"),
    # Loaded before; every market_bars step then failed on it.
    ("TRADING_MARKET_DATA", "csv", "TRADING_CSV_DIR is not set"),
    # Loaded before; every IBKR step and the session sensor then failed on it, run after run.
    ("IBKR_GATEWAY_URL", "localhost:5000/v1/api", "not an http(s) URL"),
    ("IBKR_GATEWAY_URL", "https://localhost:5000", "does not end with /v1/api"),
    ("TRADING_AS_OF", "yesterday", "not an ISO-8601 time"),
    ("TRADING_DATABASE_URL", "mysql://trader:hunter2@db/trading", "SQLite or PostgreSQL"),
])
def test_bad_mode_is_refused_with_fix(variable, value, words):
    with pytest.raises(ConfigError) as info:
        resources_from_env({variable: value})
    assert words in str(info.value) and variable in str(info.value) and "Fix:" in str(info.value)
    assert "hunter2" not in str(info.value)
    assert str(info.value).count("or unset it") <= 1  # the volume multiplier's fix said it twice


def test_defaults_are_the_embedded_modes(tmp_path):
    resources = resources_from_env({"TRADING_DATA_DIR": str(tmp_path)})
    assert resources["market_data"].mode == "simulated"
    assert resources["analyst"].mode == "rules"
    assert resources["broker"].mode == "paper" and resources["broker"].orders_enabled is None  # the deployment's
    assert resources["chart_store"].mode == "local"
    assert resources["trading_db"].url == f"sqlite:///{tmp_path / 'trading.db'}"


def test_database_url_with_password_stays_out_of_resource_config(monkeypatch):
    import dagster as dg

    secret_url = "postgresql+psycopg2://trader:s3cret@127.0.0.1:5432/trading"
    monkeypatch.setenv("TRADING_DATABASE_URL", secret_url)
    resources = resources_from_env()
    assert isinstance(resources["trading_db"].url, dg.EnvVar)
    # What Dagster shows of a resource is its config: the variable's name, not the URL.
    assert "s3cret" not in repr(resources["trading_db"]) and "s3cret" not in repr(resources["broker"])
    assert "TRADING_DATABASE_URL" in repr(resources["trading_db"])


@pytest.mark.parametrize("environment, variable", [
    ({"TRADING_BROKER": "ibkr"}, "TRADING_MARKET_DATA=simulated"),
    ({"TRADING_BROKER": "ibkr", "TRADING_MARKET_DATA": "ibkr", "TRADING_AS_OF": "2026-09-01T21:30:00Z"},
     "TRADING_AS_OF='2026-09-01T21:30:00Z' is set with TRADING_BROKER=ibkr"),
])
def test_a_trading_broker_never_gets_simulated_prices_or_a_replay(environment, variable):
    with pytest.raises(ConfigError) as info:
        resources_from_env(environment)
    assert variable in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("value", ["hooks.slack.com/services/T0/B0/s3cr3tT0ken", "htps://hooks.example/s3cr3tT0ken",
                                   "https:///s3cr3tT0ken"])
def test_an_alert_webhook_that_is_not_a_url_stops_the_load_without_echoing_it(value):
    # It loaded before, and the first alert (a failed run) went nowhere: "alert webhook at  failed".
    with pytest.raises(ConfigError) as info:
        resources_from_env({"TRADING_ALERT_WEBHOOK_URL": value})
    message = str(info.value)
    assert "TRADING_ALERT_WEBHOOK_URL" in message and "http(s) URL" in message and "Fix:" in message
    assert "s3cr3tT0ken" not in message  # a webhook URL carries its token


@pytest.mark.parametrize("value, bounds, problem", [
    ("nan", {}, "X='nan' is not a number"),
    ("1e999", {}, "X='1e999' is not a number"),
    ("-1", {"low": 0}, "X='-1' is not a number ≥ 0"),
    ("0", {"above": 0}, "X='0' is not a number above 0"),
    ("11", {"low": 1, "high": 10}, "X='11' is not a number from 1 to 10"),
    ("2.5", {"whole": True}, "X='2.5' is not a whole number"),
])
def test_one_reader_for_every_number_variable(value, bounds, problem):
    """config.env_number: the load's, IBKR's and the model price's number variables all read so."""
    from trading_pipeline.config import env_number

    assert env_number({}, "X", 7.0, **bounds) == 7.0 and env_number({"X": " "}, "X", None, **bounds) is None
    with pytest.raises(ConfigError) as info:
        env_number({"X": value}, "X", 7.0, **bounds)
    assert info.value.problem == problem and info.value.fix.startswith("set X to ")
    assert info.value.fix.endswith("or unset it for 7")
    assert env_number({"X": "3"}, "X", None, low=1, high=10, whole=True) == 3.0
