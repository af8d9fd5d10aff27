"""No look-ahead, shown the ways freqtrade's lookahead/recursive analyses show it: indicators read
in place equal indicators recomputed on the prefix; corrupting every bar after a decision changes
nothing before it; cutting the data one bar after an entry or exit gives the same trades; 300,
600 or 1200 bars of warm-up give the same decisions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trading_pipeline.backtest.engine import prepare
from trading_pipeline.core import rules_analyst
from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.core.indicators import compute_indicators
from trading_pipeline_tests.backtest.conftest import run, settings


def test_indicators_read_in_place_equal_indicators_recomputed_on_the_prefix(simulated):
    _, (_, bars, _), _ = simulated
    for timeframe in ("1d", "1w"):
        frame = bars["AAPL"][timeframe]
        series = prepare("AAPL", timeframe, frame)
        for end in np.linspace(205, len(frame), 7).astype(int):
            recomputed = compute_indicators(frame.iloc[:end])
            pd.testing.assert_frame_equal(series.frame.iloc[:end], recomputed, check_exact=True)
            as_of = series.closes[end - 1]
            in_place = rules_analyst.analyze_at(series.columns, end, symbol="AAPL", timeframe=timeframe,
                                                as_of=as_of, data_through=series.starts[end - 1])
            assert in_place == rules_analyst.analyze(MarketFrame("AAPL", timeframe, as_of, "simulated", recomputed))


def corrupt_after(bars, moment, how: str):
    """Every bar that closed after `moment`, in every series: prices x1000, or rows shuffled."""
    from trading_pipeline.core.market_calendar import bar_close_times

    rng = np.random.default_rng(7)
    changed = {}
    for symbol, by_timeframe in bars.items():
        changed[symbol] = {}
        for timeframe, frame in by_timeframe.items():
            later = (bar_close_times(frame.index, timeframe) > moment).to_numpy()
            frame = frame.copy()
            if how == "x1000":
                frame.loc[later, ["open", "high", "low", "close"]] *= 1000
            else:
                rows = frame.loc[later].to_numpy()
                frame.loc[later, :] = rows[rng.permutation(len(rows))]
            changed[symbol][timeframe] = frame
    return changed


def before(result, moment):
    decisions = [d for d in result.decisions if d.decided_at <= moment]
    fills = [f for f in result.fills if f.at <= moment]
    return decisions, fills


@pytest.mark.parametrize("how", ["x1000", "shuffled"])
def test_corrupting_every_later_bar_changes_no_earlier_decision_simulated(simulated, how):
    base_settings, (strategy, bars, extra), base = simulated
    sessions = sorted({d.decided_at for d in base.decisions})
    for moment in (sessions[len(sessions) // 3], sessions[2 * len(sessions) // 3]):
        poisoned = run(base_settings, (strategy, corrupt_after(bars, pd.Timestamp(moment), how), extra))
        assert before(poisoned, moment) == before(base, moment)
        assert before(base, moment)[0]  # something was compared
        assert poisoned.decisions != base.decisions  # the corruption did reach the later decisions


def test_corrupting_every_later_bar_changes_no_earlier_decision_csv(csv_data):
    csv_settings, (strategy, bars, extra), base = csv_data
    sessions = sorted({d.decided_at for d in base.decisions})
    moment = sessions[len(sessions) // 2]
    poisoned = run(csv_settings, (strategy, corrupt_after(bars, pd.Timestamp(moment), "x1000"), extra))
    assert before(poisoned, moment) == before(base, moment)


def test_csv_and_simulated_give_the_same_run(simulated, csv_data):
    assert csv_data[2].decisions == simulated[2].decisions
    assert csv_data[2].fills == simulated[2].fills


def cut_after(bars, last_session_start):
    """The data as it was after the session starting at `last_session_start` closed."""
    from trading_pipeline.core.market_calendar import bar_close_time, bar_close_times

    cut_close = pd.Timestamp(bar_close_time(last_session_start, "1d"))
    return {symbol: {tf: frame.loc[(bar_close_times(frame.index, tf) <= cut_close).to_numpy()]
                     for tf, frame in by_timeframe.items()} for symbol, by_timeframe in bars.items()}


def next_session_start(bars, moment):
    index = bars["SPY"]["1d"].index
    return index[index.searchsorted(pd.Timestamp(moment), side="right")].to_pydatetime()


def test_cutting_the_data_one_bar_after_each_entry_and_exit_gives_the_same_trades(simulated):
    base_settings, (strategy, bars, extra), base = simulated
    closed = [t for t in base.trades if t.closed]
    assert len(closed) >= 3
    for trade in closed[:3]:
        for moment, exited in ((trade.entry_at, False), (trade.exit_at, True)):
            cut = next_session_start(bars, moment)
            end = pd.Timestamp(cut).tz_convert("America/New_York").date()
            shorter = run(base_settings.model_copy(update={"end": end}), (strategy, cut_after(bars, cut), extra))
            same = [t for t in shorter.trades if t.decision_id == trade.decision_id]
            assert len(same) == 1
            again = same[0]
            assert (again.entry_price, again.entry_at, again.quantity, again.stop, again.target) == \
                (trade.entry_price, trade.entry_at, trade.quantity, trade.stop, trade.target)
            if exited:
                assert (again.exit_price, again.exit_at, again.exit_reason) == \
                    (trade.exit_price, trade.exit_at, trade.exit_reason)
            earlier = [t for t in base.trades if t.closed and t.exit_at <= moment]
            assert [t for t in shorter.trades if t.closed] == earlier


def test_300_600_or_1200_bars_of_warm_up_give_the_same_decisions():
    from datetime import date

    results = [run(settings(start=date(2024, 3, 1), end=date(2024, 6, 28), warmup_bars=n, symbols=("SPY", "AAPL")))
               for n in (300, 600, 1200)]
    assert results[0].decisions and any(d.action == "BUY" for d in results[0].decisions)
    for other in results[1:]:
        assert other.decisions == results[0].decisions
        assert other.fills == results[0].fills
