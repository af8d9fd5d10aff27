"""The blocking `no_gaps` check on market_bars: missing XNYS sessions (1d) or weeks (1w) between the
first and the last bar, a few tolerated (IBKR sometimes lacks a half day), listed in the metadata."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.core.market_sim import simulate_bars
from trading_pipeline.core.strategies import parse_strategies
from trading_pipeline.definitions import build_definitions
from trading_pipeline.graph import checks
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.checks import MAX_GAPS, bar_check_specs, bar_checks
from trading_pipeline.graph.resources import resources_from_env

AS_OF = pd.Timestamp("2026-09-01T21:30:00+00:00")


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def frame_for(timeframe: str, symbol: str = "SPY") -> pd.DataFrame:
    years = 2 if timeframe == "1d" else 6
    return simulate_bars(symbol, timeframe, AS_OF - pd.DateOffset(years=years), AS_OF)


def drop_days(frame: pd.DataFrame, *days: str) -> pd.DataFrame:
    dates = frame.index.tz_convert("UTC").strftime("%Y-%m-%d")
    assert set(days) <= set(dates), "the test should drop existing bars"
    return frame[~dates.isin(days)]


def results_for(frame: pd.DataFrame, timeframe: str) -> dict[str, dg.AssetCheckResult]:
    bars = MarketFrame("SPY", timeframe, AS_OF.to_pydatetime(), "simulated", frame)
    return {result.check_name: result for result in bar_checks(bars, "2y" if timeframe == "1d" else "6y")}


def metadata(result: dg.AssetCheckResult) -> dict:
    return {key: value.value for key, value in result.metadata.items()}


def test_no_gaps_is_a_blocking_bar_check_next_to_the_others():
    specs = {spec.name: spec for spec in bar_check_specs("market_bars")}
    assert list(specs) == ["bars_valid", "enough_history", "fresh", "no_gaps"]
    assert all(spec.blocking for spec in specs.values())
    assert MAX_GAPS == {"1d": 3, "1w": 1}


@pytest.mark.parametrize("timeframe", ["1d", "1w"])
def test_complete_bars_pass_every_check(timeframe):
    results = results_for(frame_for(timeframe), timeframe)
    assert list(results) == ["bars_valid", "enough_history", "fresh", "no_gaps"]
    assert all(result.passed for result in results.values())
    assert metadata(results["no_gaps"]) == {
        "missing_periods": 0, "tolerance": MAX_GAPS[timeframe], "missing": "none", "fix": ""}


def test_up_to_three_missing_sessions_pass_and_are_listed():
    # Two half days (IBKR's usual gaps) and an ordinary day.
    frame = drop_days(frame_for("1d"), "2025-07-03", "2025-11-28", "2026-03-10")
    results = results_for(frame, "1d")
    assert all(result.passed for result in results.values())
    assert metadata(results["no_gaps"]) == {
        "missing_periods": 3, "tolerance": 3,
        "missing": "3 missing: Thu 2025-07-03, Fri 2025-11-28, Tue 2026-03-10", "fix": ""}


def test_a_fourth_missing_session_fails_and_says_what_to_do():
    frame = drop_days(frame_for("1d"), "2025-07-03", "2025-11-28", "2026-03-10", "2026-03-11")
    results = results_for(frame, "1d")
    assert not results["no_gaps"].passed
    found = metadata(results["no_gaps"])
    assert found["missing_periods"] == 4 and found["tolerance"] == 3
    assert found["missing"] == "4 missing: Thu 2025-07-03, Fri 2025-11-28, Tue 2026-03-10, Wed 2026-03-11"
    assert "re-request the 1d history from the simulated source" in found["fix"]
    # The other checks keep their own verdicts.
    assert results["bars_valid"].passed and results["enough_history"].passed and results["fresh"].passed


def test_weekly_bars_tolerate_one_missing_week_not_two():
    one = drop_days(frame_for("1w"), "2025-09-02")  # the week after Labor Day starts on Tuesday
    assert results_for(one, "1w")["no_gaps"].passed
    assert metadata(results_for(one, "1w")["no_gaps"])["missing"] == "1 missing: Tue 2025-09-02"
    two = drop_days(frame_for("1w"), "2025-09-02", "2026-01-05")
    result = results_for(two, "1w")["no_gaps"]
    assert not result.passed
    assert metadata(result)["missing"] == "2 missing: Tue 2025-09-02, Mon 2026-01-05"


def test_bars_that_cannot_be_placed_on_the_calendar_fail_the_check():
    naive = MarketFrame("SPY", "1d", AS_OF.to_pydatetime(), "csv", frame_for("1d").tz_localize(None))
    result = checks._gap_check(naive)
    assert result.check_name == "no_gaps" and not result.passed
    assert "timezone-aware" in metadata(result)["problem"] and metadata(result)["tolerance"] == 3


def test_no_bars_at_all_have_no_gaps_but_fail_the_other_gates():
    results = results_for(frame_for("1d").iloc[:0], "1d")
    assert results["no_gaps"].passed and metadata(results["no_gaps"])["missing_periods"] == 0
    assert not results["enough_history"].passed and not results["fresh"].passed


def test_a_failed_gap_check_stops_the_chain_in_a_real_run(tmp_path):
    """CSV bars lacking four sessions: market_bars materializes, no_gaps fails and blocks
    indicator_frames and everything after it."""
    folder = tmp_path / "csv"
    folder.mkdir()
    frame = drop_days(frame_for("1d"), "2026-02-02", "2026-02-03", "2026-02-04", "2026-02-05")
    frame.rename_axis("time").reset_index().assign(time=lambda f: f["time"].map(pd.Timestamp.isoformat)).to_csv(
        folder / "SPY_1d.csv", index=False)
    strategies = parse_strategies(
        "strategies:\n  - name: gaps\n    symbols: [SPY]\n    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n")
    environment = {"TRADING_DATA_DIR": str(tmp_path / "data"), "TRADING_MARKET_DATA": "csv",
                   "TRADING_CSV_DIR": str(folder)}
    defs = build_definitions(strategies, resources_from_env(environment))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = defs.resolve_job_def("analyze_timeframe").execute_in_process(
            partition_key=dg.MultiPartitionKey({"symbol": "SPY", "timeframe": "1d"}),
            instance=instance, tags={AS_OF_TAG: AS_OF.isoformat()}, raise_on_error=False)
        evaluations = {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}
        assert not evaluations["no_gaps"].passed
        assert evaluations["bars_valid"].passed and evaluations["fresh"].passed
        assert evaluations["no_gaps"].metadata["missing"].value == (
            "4 missing: Mon 2026-02-02, Tue 2026-02-03, Wed 2026-02-04, Thu 2026-02-05")
        materialized = {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}
        assert materialized == {"market_bars"}
        assert instance.get_latest_materialization_event(dg.AssetKey("indicator_frames")) is None
