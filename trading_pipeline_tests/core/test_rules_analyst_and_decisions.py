from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from trading_pipeline.core import rules_analyst
from trading_pipeline.core.analysis import Action, TimeframeAnalysis, Trend
from trading_pipeline.core.decisions import consolidate, decide, decision_id
from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.core.risk import AccountState
from trading_pipeline.core.strategies import parse_strategies

AS_OF = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)
STRATEGY = parse_strategies("""\
strategies:
  - name: t
    symbols: [X]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
""").strategies[0]


def frame_with_last(timeframe="1d", **last):
    """60 flat bars at 100 (high 101, low 99), then the given indicator values on the last bar."""
    index = pd.date_range("2026-08-01 14:30", periods=60, freq="D", tz="UTC", name="time")
    frame = pd.DataFrame({"open": 100.0, "high": 101.0, "low": 99.0, "close": 100.0, "volume": 1e6}, index=index)
    defaults = dict(sma_20=100.0, sma_50=100.0, sma_200=100.0, rsi_14=50.0, macd=0.0, macd_signal=0.0,
                    atr_14=2.0, supertrend=95.0, supertrend_direction=1.0)
    for column, value in {**defaults, **last}.items():
        frame[column] = np.nan
        frame.loc[frame.index[-1], column] = value
    return MarketFrame("X", timeframe, AS_OF, "test", frame)


BULLISH = dict(supertrend_direction=1.0, sma_20=98.0, macd=0.5, macd_signal=0.2, rsi_14=60.0)
BEARISH = dict(supertrend_direction=-1.0, sma_20=102.0, macd=-0.5, macd_signal=-0.2, rsi_14=40.0)


def test_four_bullish_votes_buy_with_stop_two_atr_and_targets_capped_by_resistance():
    analysis = rules_analyst.analyze(frame_with_last(**BULLISH))
    assert analysis.signal == Action.BUY and analysis.valid
    assert analysis.entry == 100.0 and analysis.stop == 96.0  # 2 × ATR 2.0
    # 3×ATR would be 106, but nothing stands in the way beyond 0.5 ATR (the range high is 101)
    assert analysis.targets == [106.0, 110.0]
    assert analysis.confidence == 0.8


def test_recent_high_in_the_way_caps_first_target():
    marketframe = frame_with_last(**BULLISH)
    marketframe.frame.loc[marketframe.frame.index[-10], "high"] = 103.5  # a level between +0.5 and +3 ATR
    analysis = rules_analyst.analyze(marketframe)
    assert analysis.targets[0] == 103.5
    assert "capped at the recent high 103.50" in analysis.rationale


def test_three_bearish_votes_sell_and_split_holds():
    assert rules_analyst.analyze(frame_with_last(**{**BEARISH, "rsi_14": 55.0})).signal == Action.SELL
    split = rules_analyst.analyze(frame_with_last(supertrend_direction=1.0, sma_20=98.0, macd=-1.0,
                                                  macd_signal=0.0, rsi_14=40.0))
    assert split.signal == Action.HOLD and split.entry is None


def test_missing_indicator_is_invalid_never_a_trade():
    analysis = rules_analyst.analyze(frame_with_last(sma_200=np.nan, **BULLISH))
    assert not analysis.valid and analysis.signal == Action.NO_TRADE
    assert "sma_200" in analysis.invalid_reason


def analysis(signal, timeframe="1d", valid=True, **kw):
    base = dict(symbol="X", timeframe=timeframe, as_of=AS_OF, data_through=AS_OF, analyst="test",
                last_close=100.0, atr=2.0, recent_high=110.0, recent_low=90.0)
    if not valid:
        return TimeframeAnalysis.invalid(reason="model said nonsense", **base)
    prices = dict(entry=100.0, stop=96.0, targets=[106.0]) if signal == Action.BUY else \
        dict(entry=100.0, stop=104.0, targets=[94.0]) if signal == Action.SELL else {}
    return TimeframeAnalysis(signal=signal, trend=Trend.SIDEWAYS, confidence=0.7, rationale="r",
                             **{**base, **prices, **kw})


@pytest.mark.parametrize("daily, weekly, expected, confirmation", [
    (Action.BUY, Action.BUY, Action.BUY, "confirmed (strong)"),
    (Action.BUY, Action.HOLD, Action.BUY, "partially confirmed (weekly neutral)"),
    (Action.BUY, Action.SELL, Action.HOLD, "unconfirmed"),
    (Action.HOLD, Action.BUY, Action.HOLD, "none"),
    (Action.SELL, Action.SELL, Action.SELL, "confirmed (strong)"),
])
def test_daily_leads_weekly_confirms(daily, weekly, expected, confirmation):
    result = consolidate(analysis(daily), analysis(weekly, "1w"))
    assert result.proposal.action == expected and result.confirmation == confirmation


def test_invalid_analysis_fails_closed_to_no_trade():
    for daily, weekly in [(analysis(None, valid=False), analysis(Action.BUY, "1w")),
                          (analysis(Action.BUY), analysis(None, "1w", valid=False))]:
        decision = decide(STRATEGY, "X", daily, weekly, AccountState(1e5, 1e5), market_open=True, next_open="")
        assert decision.action == Action.NO_TRADE and decision.quantity == 0
        assert "model said nonsense" in decision.rationale


def test_decision_records_gates_and_id_ignores_prices():
    decision = decide(STRATEGY, "X", analysis(Action.BUY), analysis(Action.BUY, "1w"), AccountState(1e5, 1e5),
                      market_open=False, next_open="Mon 09:30")
    assert decision.action == Action.BUY and decision.quantity == 100 and decision.r_multiple == 1.5
    assert any(c.rule == "market_hours" and "next open (Mon 09:30)" in c.detail for c in decision.checks)
    other_prices = decide(STRATEGY, "X", analysis(Action.BUY, entry=100.5), analysis(Action.BUY, "1w"),
                          AccountState(1e5, 1e5), market_open=True, next_open="")
    assert other_prices.decision_id == decision.decision_id
    assert decision.decision_id != decision_id("t", "X", AS_OF, Action.SELL)


# AS_OF is Friday 2026-11-20 after the close (21:00 UTC), the last session of its week.
MONDAY_OPEN = datetime(2026, 11, 23, 14, 30, tzinfo=UTC)


def dated(signal, timeframe, as_of, data_through):
    return analysis(signal, timeframe, as_of=as_of, data_through=data_through)


def test_analyses_from_the_last_close_back_a_decision_at_the_next_open():
    daily = dated(Action.BUY, "1d", AS_OF, datetime(2026, 11, 20, 14, 30, tzinfo=UTC))
    weekly = dated(Action.BUY, "1w", AS_OF, datetime(2026, 11, 16, 14, 30, tzinfo=UTC))
    decision = decide(STRATEGY, "X", daily, weekly, AccountState(1e5, 1e5), market_open=True, next_open="",
                      decided_at=MONDAY_OPEN)
    assert decision.action == Action.BUY and decision.as_of == MONDAY_OPEN  # placed as of the decision's run


def test_a_weekly_analysis_that_saw_past_the_decision_is_look_ahead():
    # A replay as of Wednesday 2026-11-18, but the 1w partition was materialized after Friday's close.
    wednesday = datetime(2026, 11, 18, 22, 0, tzinfo=UTC)
    daily = dated(Action.BUY, "1d", wednesday, datetime(2026, 11, 18, 14, 30, tzinfo=UTC))
    weekly = dated(Action.BUY, "1w", AS_OF, datetime(2026, 11, 16, 14, 30, tzinfo=UTC))
    decision = decide(STRATEGY, "X", daily, weekly, AccountState(1e5, 1e5), market_open=False, next_open="",
                      decided_at=wednesday)
    assert decision.action == Action.NO_TRADE and decision.quantity == 0
    assert "the 1w analysis saw the bar of 2026-11-16, which closed at 2026-11-20 21:00 UTC" in decision.rationale
    assert "look-ahead" in decision.rationale and "X|1w" in decision.rationale


@pytest.mark.parametrize("timeframe, analysed_at, decided_at, newer", [
    ("1d", datetime(2026, 11, 19, 22, 0, tzinfo=UTC), MONDAY_OPEN, 1),  # Friday's session closed since
    ("1w", datetime(2026, 11, 6, 22, 0, tzinfo=UTC), MONDAY_OPEN, 2),  # two weeks closed since
])
def test_analyses_overtaken_by_newer_closed_bars_are_no_trade(timeframe, analysed_at, decided_at, newer):
    through = datetime(analysed_at.year, analysed_at.month, analysed_at.day, 14, 30, tzinfo=UTC)
    fresh_daily = dated(Action.BUY, "1d", AS_OF, datetime(2026, 11, 20, 14, 30, tzinfo=UTC))
    fresh_weekly = dated(Action.BUY, "1w", AS_OF, datetime(2026, 11, 16, 14, 30, tzinfo=UTC))
    stale = dated(Action.BUY, timeframe, analysed_at, through)
    daily, weekly = (stale, fresh_weekly) if timeframe == "1d" else (fresh_daily, stale)
    decision = decide(STRATEGY, "X", daily, weekly, AccountState(1e5, 1e5), market_open=True, next_open="",
                      decided_at=decided_at)
    assert decision.action == Action.NO_TRADE
    assert f"the {timeframe} analysis is out of date" in decision.rationale and f"{newer} " in decision.rationale
    assert f"materialize X|{timeframe} first" in decision.rationale


def test_a_weekly_one_week_old_still_confirms():
    daily = dated(Action.BUY, "1d", AS_OF, datetime(2026, 11, 20, 14, 30, tzinfo=UTC))
    last_week = dated(Action.BUY, "1w", datetime(2026, 11, 13, 22, 0, tzinfo=UTC),
                      datetime(2026, 11, 9, 14, 30, tzinfo=UTC))
    decision = decide(STRATEGY, "X", daily, last_week, AccountState(1e5, 1e5), market_open=True, next_open="",
                      decided_at=MONDAY_OPEN)
    assert decision.action == Action.BUY


def test_a_strategy_that_trades_only_while_open_sends_nothing_when_closed():
    only_open = STRATEGY.model_copy(update={"orders": STRATEGY.orders.model_copy(
        update={"when_market_closed": "no_trade"})})
    decision = decide(only_open, "X", analysis(Action.BUY), analysis(Action.BUY, "1w"), AccountState(1e5, 1e5),
                      market_open=False, next_open="Mon 09:30")
    assert decision.action == Action.NO_TRADE and "orders.when_market_closed: no_trade" in decision.rationale
