"""llm_replay answers from the response cache only (a miss is NO_TRADE and counted, no network
call is possible) and finds the answers live runs got; IBKR-style history is fetched once and read
from the local cache after."""

from __future__ import annotations

import io
import json
import socket
from datetime import date

import pytest

from trading_pipeline.adapters.llm.answers import Unusable
from trading_pipeline.adapters.model_calls import ModelResponseCacheRow, Redactor
from trading_pipeline.adapters.trading_db import session_factory
from trading_pipeline.backtest import replay, runner
from trading_pipeline.backtest.data import HistoryCache, SimulatedMarketData
from trading_pipeline.backtest.engine import prepare
from trading_pipeline.core import market_calendar, rules_analyst
from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.core.indicators import compute_indicators
from trading_pipeline_tests.backtest.conftest import STRATEGIES, run, settings

MODEL = "gpt-4.1-mini"
HOLD = json.dumps({"trend": "sideways", "support": [], "resistance": [], "setup": "range", "signal": "HOLD",
                   "indicators": [{"name": "rsi_vs_50", "reading": "RSI near 50", "bullish": False}],
                   "entry": None, "stop": None, "targets": [], "confidence": 0.5, "rationale": "no setup"})


def block_the_network(monkeypatch) -> None:
    import openai

    def refuse(*args, **kwargs):
        raise AssertionError("llm_replay tried to reach the network")

    monkeypatch.setattr(openai, "OpenAI", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_network(monkeypatch):
    block_the_network(monkeypatch)


def replay_settings(**changes):
    return settings(**{"analyst": "llm_replay", "model": MODEL, "start": date(2024, 5, 1), "end": date(2024, 6, 28),
                       "symbols": ("SPY",), **changes})


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
    # A flat run of NO_TRADE from an empty cache was reported like any other result; it now says why.
    assert any(w.startswith(f"llm_replay found no cached answer for any of its {result.analyses:,} calls (the "
                            f"response cache holds no answer of {MODEL}): every decision is NO_TRADE")
               for w in result.warnings)


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


class RecordingCaller:
    """A model caller that records what each call is keyed on and would send, and answers nothing."""

    redactor = Redactor([])

    def __init__(self):
        self.calls = []

    def complete(self, *, kind, symbol, timeframe, prompt, user_text, context_sha256, png, answer_model,
                 chart_sha256=None):
        self.calls.append((kind, symbol, timeframe, chart_sha256, context_sha256, user_text()))
        raise Unusable("recorded")

    def settle(self, result, call_id, outcome):
        return None


@pytest.mark.parametrize("anonymize", [False, True], ids=["chart", "anonymized chart"])
def test_the_backtests_array_path_asks_what_the_live_frame_path_asks(simulated, anonymize):
    """The backtest reads a long series at each position, the live graph a frame cut there: the
    same numbers, context text, chart and cache keys."""
    _, (_, bars, _), _ = simulated
    analyst = replay.ReplayAnalyst(MODEL, {}, anonymize=anonymize)
    frame_path, array_path = RecordingCaller(), RecordingCaller()
    for timeframe in ("1d", "1w"):
        series = prepare("AAPL", timeframe, bars["AAPL"][timeframe])
        for end in (len(series.frame) // 2, len(series.frame) - 3, len(series.frame)):
            as_of = series.closes[end - 1]
            analyst.live.caller = frame_path
            live = analyst.live.analyze(MarketFrame("AAPL", timeframe, as_of, "simulated", series.frame.iloc[:end]))
            analyst.live.caller = array_path
            assert analyst.analyze(series, end, as_of) == live
            read = rules_analyst.numeric_context_at(series.columns, end)  # what the rules analyst reads
            assert (live.last_close, live.atr, live.recent_high, live.recent_low) == (
                read["last_close"], read["atr"], read["recent_high"], read["recent_low"])
    assert len(array_path.calls) == 6 and array_path.calls == frame_path.calls
    assert len({call[4] for call in array_path.calls}) == 6


@pytest.fixture(scope="module")
def openai_server():
    from trading_pipeline_tests.adapters.openai.local_server import LocalOpenAIServer

    server = LocalOpenAIServer().start()
    yield server
    server.stop()


def blank_png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (255, 255, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def live_frames(session: date) -> dict[str, MarketFrame]:
    """What the live graph reads at `session`'s close: each timeframe's period of bars up to then
    (not the backtest's history: its indicators differ in the 10th digit), indicators on them."""
    as_of = market_calendar.calendar().session_close(session).to_pydatetime()
    periods = STRATEGIES.strategies[0].timeframes
    return {timeframe: MarketFrame("SPY", timeframe, as_of, "simulated", compute_indicators(
        SimulatedMarketData().fetch("SPY", timeframe, periods[timeframe], as_of))) for timeframe in ("1d", "1w")}


@pytest.mark.parametrize("anonymize, answered_by", [(False, None), (True, None), (False, "other-model")],
                         ids=["chart", "anonymized chart", "answered by another model"])
def test_llm_replay_finds_the_answers_a_live_run_got_on_the_same_date(tmp_path, openai_server, monkeypatch,
                                                                      anonymize, answered_by):
    from trading_pipeline.adapters.openai_analyst import OpenAIAnalyst
    from trading_pipeline_tests.adapters.openai.conftest import API_KEY, chart_for
    from trading_pipeline_tests.adapters.openai.local_server import good

    session = date(2024, 6, 4)
    png = blank_png(1920, 1080)  # what is drawn does not matter: the key is what the chart shows
    sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
    good_answer = good()

    def answer(body):
        reply = good_answer(body)
        if answered_by:  # the live analyses say who answered; the replayed ones must say it too
            reply.body["model"] = answered_by
        return reply

    openai_server.reset(default=answer)
    live = OpenAIAnalyst.from_env({"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": openai_server.base_url,
                                   "OPENAI_MODEL": MODEL, "OPENAI_ANONYMIZE_CHARTS": "yes" if anonymize else "no"},
                                  sessions, run_id="live", render_png=lambda figure: png)
    analyses = {timeframe: live.analyze(frame, chart_for(png), png) for timeframe, frame in live_frames(session).items()}
    consolidated = live.consolidate(analyses["1d"], analyses["1w"])
    live.close()
    assert all(a.valid and a.signal.value == "BUY" for a in analyses.values())
    assert all((f"answered by {answered_by}, asked for {MODEL}" in a.rationale) is bool(answered_by)
               for a in analyses.values())
    assert consolidated.proposal.action.value == "BUY" and len(openai_server.requests) == 3

    block_the_network(monkeypatch)
    settings_ = replay_settings(start=session, end=session, anonymized_charts=anonymize)
    analyst = replay.analyst_for(settings_, sessions)
    replayed, analyze = [], analyst.analyze
    analyst.analyze = lambda series, end, as_of: replayed.append(analyze(series, end, as_of)) or replayed[-1]
    decisions = []
    result = run(settings_, analyst=analyst, on_decision=decisions.append)
    assert result.analyst_counters == {"cache_hits": 3, "cache_misses": 0}
    for replay_analysis in replayed:
        live_analysis = analyses[replay_analysis.timeframe]
        # The backtest read its own history: the ATR differs in the 10th digit, the answer not at all.
        assert replay_analysis.atr == pytest.approx(live_analysis.atr, rel=1e-8)
        ignored = {"as_of", "chart", "atr"}
        assert replay_analysis.model_dump(exclude=ignored) == live_analysis.model_dump(exclude=ignored)
    [decision] = decisions
    assert decision.proposed_action == consolidated.proposal.action


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


def test_a_walk_forward_replay_reads_the_cache_once_and_counts_each_run_apart(tmp_path, no_network, monkeypatch):
    """Every run of a walk-forward (grid points × folds, then out of sample) gets a fresh analyst
    with its own hit and miss counts, all reading the one load of the cached answers."""
    from trading_pipeline.backtest.walk_forward import walk_forward

    sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
    loads = []
    real_load = replay.load_answers
    monkeypatch.setattr(replay, "load_answers", lambda *a: loads.append(a) or real_load(*a))
    walking = replay_settings(start=date(2024, 3, 1), end=date(2024, 6, 28), folds=2, grid={"min_r": (1.0, 1.5)})
    loaded = runner.load(walking, strategies_file=STRATEGIES)
    made = []
    factory = replay.analyst_factory(walking, sessions)

    def counted():
        made.append(factory())
        return made[-1]

    walk = walk_forward(walking, loaded, analyst_factory=counted)
    assert len(loads) == 1
    assert len(made) == 2 * (2 + 1) and len({id(a) for a in made}) == len(made)
    assert len({id(a.caller.answers) for a in made}) == 1
    for fold in walk.folds:  # nothing cached: each run's analyses are its own misses
        for result in (fold.in_sample_result, fold.out_of_sample_result):
            assert result.analyst_counters == {"cache_hits": 0, "cache_misses": result.analyses}
