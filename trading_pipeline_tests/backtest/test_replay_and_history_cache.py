"""llm_replay answers from the response cache only (a miss is NO_TRADE and counted, no network
call is possible); IBKR-style history is fetched once and read from the local cache after."""

from __future__ import annotations

import json
import socket
from datetime import date

import pytest

from trading_pipeline.adapters.model_calls import ModelResponseCacheRow
from trading_pipeline.adapters.trading_db import session_factory
from trading_pipeline.backtest import replay, runner
from trading_pipeline.backtest.data import HistoryCache, SimulatedMarketData
from trading_pipeline_tests.backtest.conftest import STRATEGIES, run, settings

MODEL = "gpt-4.1-mini"
HOLD = json.dumps({"trend": "sideways", "support": [], "resistance": [], "setup": "range", "signal": "HOLD",
                   "indicators": [{"name": "rsi_vs_50", "reading": "RSI near 50", "bullish": False}],
                   "entry": None, "stop": None, "targets": [], "confidence": 0.5, "rationale": "no setup"})


@pytest.fixture
def no_network(monkeypatch):
    import openai

    def refuse(*args, **kwargs):
        raise AssertionError("llm_replay tried to reach the network")

    monkeypatch.setattr(openai, "OpenAI", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def replay_settings():
    return settings(analyst="llm_replay", model=MODEL, start=date(2024, 5, 1), end=date(2024, 6, 28),
                    symbols=("SPY",))


class RecordingAnswers(dict):
    def __init__(self):
        super().__init__()
        self.asked = []

    def get(self, key, default=None):
        self.asked.append(key)
        return super().get(key, default)


def test_llm_replay_makes_no_network_call_and_a_miss_is_a_counted_no_trade(tmp_path, no_network):
    sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
    result = run(replay_settings(), analyst=replay.analyst_for(replay_settings(), sessions))
    assert result.decisions and all(d.action == "NO_TRADE" and d.proposed == "NO_TRADE" for d in result.decisions)
    assert result.analyst_counters == {"cache_hits": 0, "cache_misses": result.analyses}
    assert any("knowledge cutoff" in w for w in result.warnings)  # 2024-05 is before gpt-4.1-mini's cutoff


def test_llm_replay_uses_the_cached_answers(tmp_path, no_network):
    answers = RecordingAnswers()
    first = run(replay_settings(), analyst=replay.ReplayAnalyst(MODEL, answers))
    assert first.analyst_counters["cache_misses"] == len(answers.asked) == first.analyses
    sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
    with sessions.begin() as session:
        for key in set(answers.asked):
            session.add(ModelResponseCacheRow(cache_key=key, kind="timeframe_analysis", model=MODEL,
                                              prompt_version="x", image_sha256=None, context_sha256="x",
                                              content=HOLD, vision=True, response_format="json_schema",
                                              call_id="recorded"))
    again = run(replay_settings(), analyst=replay.analyst_for(replay_settings(), sessions))
    assert again.analyst_counters == {"cache_hits": again.analyses, "cache_misses": 0}
    assert {d.action for d in again.decisions} == {"HOLD"}
    assert not any(d.invalid_analysis for d in again.decisions)


def test_the_chart_spec_key_changes_with_the_data_and_hides_symbol_dates_and_prices(simulated):
    from trading_pipeline.core.frames import MarketFrame
    from trading_pipeline.core.indicators import compute_indicators

    _, (_, bars, _), _ = simulated
    frame = compute_indicators(bars["SPY"]["1d"])
    as_of = frame.index[-1].to_pydatetime()
    spy = MarketFrame("SPY", "1d", as_of, "s", frame)
    assert replay.chart_spec_sha256(spy) != replay.chart_spec_sha256(spy.with_frame(frame.iloc[:-1]))
    assert replay.chart_spec_sha256(spy) != replay.chart_spec_sha256(MarketFrame("QQQ", "1d", as_of, "s", frame))
    # Anonymized: the same shape at another price level, symbol and date is the same chart.
    scaled = frame.copy()
    price_like = [c for c in frame.columns if c not in ("volume", "rsi_14", "supertrend_direction")]
    scaled[price_like] = frame[price_like] * 3
    scaled.index = scaled.index + (scaled.index[-1] - scaled.index[0])
    other = MarketFrame("QQQ", "1d", as_of, "s", scaled)
    assert replay.chart_spec_sha256(spy, anonymize=True) == replay.chart_spec_sha256(other, anonymize=True)
    shown = replay.anonymized(frame.tail(150))
    assert shown["close"].iloc[-1] == pytest.approx(100.0)


class CountingSource:
    name = "ibkr"

    def __init__(self):
        self.inner = SimulatedMarketData()
        self.requests = 0

    def fetch(self, symbol, timeframe, history, as_of):
        self.requests += 1
        return self.inner.fetch(symbol, timeframe, history, as_of)


def test_a_second_backtest_sends_no_history_request(tmp_path):
    source = CountingSource()
    base = settings(symbols=("SPY", "AAPL"), start=date(2024, 1, 1), end=date(2024, 3, 28))
    first = runner.load(base, strategies_file=STRATEGIES, source=HistoryCache(source, tmp_path / "history"))
    assert source.requests == 4
    cache = HistoryCache(source, tmp_path / "history")
    second = runner.load(base, strategies_file=STRATEGIES, source=cache)
    assert source.requests == 4 and cache.hits == 4
    for symbol in ("SPY", "AAPL"):
        for timeframe in ("1d", "1w"):
            assert second[1][symbol][timeframe].equals(first[1][symbol][timeframe])
    assert run(base, second).result_digest() == run(base, first).result_digest()
