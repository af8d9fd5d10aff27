"""The simulated market: deterministic, no look-ahead, real XNYS sessions, plausible bars."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trading_pipeline.core import market_sim
from trading_pipeline.core.bars import validate_bars
from trading_pipeline.core.indicators import compute_indicators
from trading_pipeline.core.market_sim import simulate_bars
from trading_pipeline.errors import BarDataError

REPO_ROOT = Path(__file__).resolve().parents[2]


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def calendar_week(times: pd.DatetimeIndex) -> pd.PeriodIndex:
    """The Monday-to-Sunday week of each time, by its New York date."""
    return times.tz_convert("America/New_York").tz_localize(None).to_period("W-SUN")


@pytest.fixture(scope="module")
def xnys_schedule() -> pd.DataFrame:
    import exchange_calendars

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Series.values returning an ndarray")  # in exchange_calendars
        return exchange_calendars.get_calendar("XNYS", start="2015-01-01", end="2026-12-31").schedule


# --------------------------------------------------------------------------- determinism


def test_same_request_gives_the_same_bars_even_after_the_cache_is_cleared():
    first = simulate_bars("AAPL", "1d", utc("2023-01-01"), utc("2024-06-01"), seed=3)
    market_sim._path.cache_clear()
    market_sim._daily_path.cache_clear()
    again = simulate_bars("AAPL", "1d", utc("2023-01-01"), utc("2024-06-01"), seed=3)
    pd.testing.assert_frame_equal(first, again)


def test_bars_are_reproducible_across_processes():
    """The seed comes from hashlib, not the per-process salted hash(): a fresh interpreter with
    another hash seed produces the same prices."""
    code = (
        "import pandas as pd; from trading_pipeline.core.market_sim import simulate_bars;"
        "b = simulate_bars('MSFT', '1d', pd.Timestamp('2024-01-01', tz='UTC'), pd.Timestamp('2024-02-01', tz='UTC'));"
        "print(b.to_json(date_format='iso'))"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)},
        ).stdout
        for hash_seed in ("1", "2")
    ]
    here = simulate_bars("MSFT", "1d", utc("2024-01-01"), utc("2024-02-01")).to_json(date_format="iso")
    assert outputs[0] == outputs[1] == here + "\n"


@pytest.mark.parametrize("timeframe", ["1d", "1w"])
def test_no_look_ahead_bars_do_not_change_when_as_of_moves_later(timeframe):
    start = utc("2022-01-01")
    earlier = simulate_bars("NVDA", timeframe, start, utc("2023-03-15 17:00"))
    later = simulate_bars("NVDA", timeframe, start, utc("2024-09-30 12:00"))
    assert len(later) > len(earlier)
    pd.testing.assert_frame_equal(later.iloc[: len(earlier)], earlier)


@pytest.mark.parametrize("timeframe", ["1d", "1w"])
def test_bars_do_not_depend_on_start(timeframe):
    as_of = utc("2024-05-01")
    long = simulate_bars("KO", timeframe, utc("2015-01-01"), as_of)
    short = simulate_bars("KO", timeframe, utc("2023-06-01"), as_of)
    pd.testing.assert_frame_equal(long.loc[short.index], short)
    assert short.index[0] >= utc("2023-06-01") and (long.index < utc("2023-06-01")).sum() > 0


def test_different_symbols_and_seeds_differ():
    window = (utc("2024-01-01"), utc("2024-07-01"))
    aapl = simulate_bars("AAPL", "1d", *window)
    msft = simulate_bars("MSFT", "1d", *window)
    aapl_seed_1 = simulate_bars("AAPL", "1d", *window, seed=1)
    assert aapl.index.equals(msft.index)
    assert not np.allclose(aapl["close"], msft["close"])
    assert not np.allclose(aapl["close"], aapl_seed_1["close"])
    # Not just a scaled copy: the daily returns differ too.
    assert abs(np.corrcoef(np.diff(np.log(aapl["close"])), np.diff(np.log(msft["close"])))[0, 1]) < 0.5


def test_mutating_a_result_does_not_touch_the_cached_path():
    window = ("JPM", "1d", utc("2024-01-01"), utc("2024-03-01"))
    bars = simulate_bars(*window)
    expected = bars.copy()
    bars.loc[bars.index[0], "close"] = -1.0
    pd.testing.assert_frame_equal(simulate_bars(*window), expected)


# --------------------------------------------------------------------------- as_of cut-off


def test_daily_bar_of_a_running_session_is_excluded():
    # 2024-03-13 (US daylight time): session 13:30-20:00 UTC.
    start = utc("2024-03-01")
    during = simulate_bars("AAPL", "1d", start, utc("2024-03-13 17:00"))
    assert during.index[-1] == utc("2024-03-12 13:30")
    just_before_close = simulate_bars("AAPL", "1d", start, utc("2024-03-13 19:59:59"))
    assert just_before_close.index[-1] == utc("2024-03-12 13:30")
    at_close = simulate_bars("AAPL", "1d", start, utc("2024-03-13 20:00"))
    assert at_close.index[-1] == utc("2024-03-13 13:30")


def test_early_close_session_closes_at_its_early_close():
    # 2024-11-29, day after Thanksgiving: 14:30-18:00 UTC (13:00 New York).
    start = utc("2024-11-01")
    assert simulate_bars("AAPL", "1d", start, utc("2024-11-29 17:59")).index[-1] == utc("2024-11-27 14:30")
    assert simulate_bars("AAPL", "1d", start, utc("2024-11-29 18:00")).index[-1] == utc("2024-11-29 14:30")


def test_weekly_bar_of_a_running_week_is_excluded():
    start = utc("2024-01-01")
    # Wednesday 2024-06-12: the week of Monday 06-10 is running, the last bar is the week of 06-03.
    midweek = simulate_bars("AAPL", "1w", start, utc("2024-06-12 22:00"))
    assert midweek.index[-1] == utc("2024-06-03 13:30")
    friday_before_close = simulate_bars("AAPL", "1w", start, utc("2024-06-14 19:59"))
    assert friday_before_close.index[-1] == utc("2024-06-03 13:30")
    friday_close = simulate_bars("AAPL", "1w", start, utc("2024-06-14 20:00"))
    assert friday_close.index[-1] == utc("2024-06-10 13:30")


def test_week_ending_on_thursday_closes_at_thursdays_close():
    # Good Friday 2024-03-29 is a holiday: the week of 03-25 ends with Thursday's session.
    bars = simulate_bars("AAPL", "1w", utc("2024-01-01"), utc("2024-03-28 20:00"))
    assert bars.index[-1] == utc("2024-03-25 13:30")


@pytest.mark.parametrize("timeframe", ["1d", "1w"])
@pytest.mark.parametrize("as_of", ["2024-07-03 16:00", "2024-11-29 17:00", "2024-12-31 23:00", "2025-01-04 12:00"])
def test_no_bar_ends_after_as_of(timeframe, as_of, xnys_schedule):
    bars = simulate_bars("TSLA", timeframe, utc("2024-01-01"), utc(as_of))
    session_close = pd.Series(xnys_schedule["close"].to_numpy(), index=xnys_schedule["open"].to_numpy())
    if timeframe == "1d":
        closes = session_close.loc[bars.index]
    else:
        closes = session_close.groupby(calendar_week(session_close.index)).max().loc[calendar_week(bars.index)]
    assert (closes <= utc(as_of)).all()
    # ... and the next bar would have closed after as_of (it is the unfinished or a future one).
    later = simulate_bars("TSLA", timeframe, utc("2024-01-01"), utc("2025-06-30"))
    assert later.index[len(bars)] > bars.index[-1]
    pd.testing.assert_frame_equal(later.iloc[: len(bars)], bars)


# --------------------------------------------------------------------------- calendar


def test_daily_bars_are_exactly_the_xnys_sessions_stamped_at_the_open(xnys_schedule):
    bars = simulate_bars("SPY", "1d", utc("2016-01-01"), utc("2025-12-31 23:00"))
    in_range = xnys_schedule.loc["2016-01-01":"2025-12-31"]
    assert bars.index.equals(pd.DatetimeIndex(in_range["open"], name="time"))
    dates = set(bars.index.tz_convert("America/New_York").date.astype(str))
    assert "2024-07-04" not in dates and "2024-12-25" not in dates  # holidays
    assert "2024-07-03" in dates and "2024-11-29" in dates  # early closes are sessions
    assert utc("2024-11-29 14:30") in bars.index  # winter: 09:30 New York = 14:30 UTC
    assert utc("2024-07-03 13:30") in bars.index  # summer: 09:30 New York = 13:30 UTC


def test_frame_shape_and_types():
    for timeframe in ("1d", "1w"):
        bars = simulate_bars("AMD", timeframe, utc("2020-01-01"), utc("2024-01-01"))
        assert list(bars.columns) == ["open", "high", "low", "close", "volume"]
        assert all(dtype == np.float64 for dtype in bars.dtypes)
        assert isinstance(bars.index, pd.DatetimeIndex) and str(bars.index.tz) == "UTC"
        assert bars.index.name == "time"
        assert bars.index.is_monotonic_increasing and bars.index.is_unique


def test_enough_history_one_year_daily_and_five_years_weekly():
    daily = simulate_bars("IWM", "1d", utc("2023-01-01"), utc("2024-01-01"))
    assert 250 <= len(daily) <= 253
    weekly = simulate_bars("IWM", "1w", utc("2019-01-07"), utc("2024-01-07"))
    assert 260 <= len(weekly) <= 262


def test_weekly_bars_aggregate_the_daily_bars():
    start, as_of = utc("2022-01-03"), utc("2024-06-30")
    daily = simulate_bars("XOM", "1d", start, as_of)
    weekly = simulate_bars("XOM", "1w", start, as_of)
    groups = daily.groupby(calendar_week(daily.index))
    expected = pd.DataFrame(
        {
            "open": groups["open"].first().to_numpy(),
            "high": groups["high"].max().to_numpy(),
            "low": groups["low"].min().to_numpy(),
            "close": groups["close"].last().to_numpy(),
            "volume": groups["volume"].sum().to_numpy(),
        },
        index=pd.DatetimeIndex([group.index[0] for _, group in groups], name="time"),
    )
    pd.testing.assert_frame_equal(weekly, expected)
    # A holiday week still starts at its first session: 2024-01-01 is a holiday, so Tuesday.
    assert utc("2024-01-02 14:30") in weekly.index


def test_start_before_the_simulation_begins_returns_bars_from_2000():
    bars = simulate_bars("BA", "1d", utc("1990-01-01"), utc("2000-02-01"))
    assert bars.index[0] == utc("2000-01-03 14:30")
    assert len(bars) == 20


def test_empty_when_nothing_closed_in_the_window():
    bars = simulate_bars("BA", "1d", utc("2024-07-04"), utc("2024-07-05 12:00"))
    assert bars.empty and list(bars.columns) == ["open", "high", "low", "close", "volume"]


def test_bad_requests_are_rejected():
    with pytest.raises(BarDataError, match="ends with the session of 2040-12-31"):
        simulate_bars("AAPL", "1d", utc("2040-01-01"), utc("2041-01-02"))
    last_day = simulate_bars("AAPL", "1d", utc("2040-12-01"), utc("2040-12-31 23:59"))
    assert last_day.index[-1] == utc("2040-12-31 14:30")
    with pytest.raises(ValueError, match="timeframe"):
        simulate_bars("AAPL", "1h", utc("2024-01-01"), utc("2024-02-01"))
    with pytest.raises(ValueError, match="timezone-aware"):
        simulate_bars("AAPL", "1d", pd.Timestamp("2024-01-01"), utc("2024-02-01"))
    with pytest.raises(ValueError, match="symbol"):
        simulate_bars("", "1d", utc("2024-01-01"), utc("2024-02-01"))


# --------------------------------------------------------------------------- plausibility

SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "JPM", "XOM", "KO", "PEP", "WMT",
           "SPY", "QQQ", "IWM", "DIS", "NFLX", "AMD", "INTC", "BA", "CSCO", "ORCL", "CVX", "PFE"]


@pytest.mark.parametrize("symbol", SYMBOLS[:8])
def test_bars_are_consistent_and_plausible(symbol):
    bars = simulate_bars(symbol, "1d", utc("2000-01-01"), utc("2040-12-31 23:00"))
    validate_bars(bars)  # sorted unique UTC index, finite positive prices, low <= open/close <= high
    assert len(bars) > 10_000
    body_top, body_bottom = bars[["open", "close"]].max(axis=1), bars[["open", "close"]].min(axis=1)
    assert (bars["high"] >= body_top).all() and (bars["low"] <= body_bottom).all()
    for column in ("open", "high", "low", "close"):
        np.testing.assert_array_equal(bars[column], bars[column].round(2))  # cents
    np.testing.assert_array_equal(bars["volume"], bars["volume"].round(0))  # whole shares
    assert (bars["volume"] > 0).all()

    first_close = bars["close"].iloc[0]
    level = market_sim.KNOWN_PRICE_LEVELS[symbol]
    assert 0.85 * level <= first_close <= 1.15 * level  # starts at the symbol's level
    log_returns = np.diff(np.log(bars["close"].to_numpy()))
    assert 0.008 <= log_returns.std() <= 0.045  # daily volatility of about 1-3 %
    gaps = np.log(bars["open"].to_numpy()[1:] / bars["close"].to_numpy()[:-1])
    assert np.abs(gaps).mean() < np.abs(log_returns).mean()  # opens near the previous close
    assert bars["close"].max() / bars["close"].min() < 200  # no runaway prices over 41 years


def test_known_symbols_trade_near_their_real_level_and_others_in_20_to_500():
    as_of = utc("2026-01-28 22:00")
    for symbol, level in (("SPY", 600), ("QQQ", 520), ("AAPL", 230), ("NVDA", 140), ("KO", 68)):
        closes = simulate_bars(symbol, "1d", as_of - pd.Timedelta(days=365), as_of)["close"]
        assert 0.4 * level <= closes.min() and closes.max() <= 2.5 * level, (symbol, closes.min(), closes.max())
    assert simulate_bars("spy", "1d", as_of - pd.Timedelta(days=30), as_of)["close"].iloc[-1] > 200
    for symbol in ("ZZZT", "ACME"):  # unknown: a level drawn from the seed
        first = simulate_bars(symbol, "1d", utc("2000-01-01"), utc("2000-02-01"))["close"].iloc[0]
        assert 15 <= first <= 650


def test_a_known_level_only_rescales_the_walk():
    """The level changes prices, not the walk: returns are the same as with the drawn level."""
    session_minutes = np.full(300, 390.0)
    drawn = market_sim._simulate_daily_ohlcv(market_sim._rng("SPY", 0), session_minutes)
    fixed = market_sim._simulate_daily_ohlcv(market_sim._rng("SPY", 0), session_minutes, 600.0)
    ratio = fixed["close"] / drawn["close"]
    assert ratio.std() / ratio.mean() < 0.01  # same path up to rounding to cents
    np.testing.assert_array_equal(fixed["volume"], drawn["volume"])


def test_early_close_sessions_trade_less():
    bars = simulate_bars("QQQ", "1d", utc("2000-01-01"), utc("2040-12-31 23:00"))
    local_dates = bars.index.tz_convert("America/New_York")
    black_fridays = bars[(local_dates.month == 11) & (local_dates.day >= 23) & (local_dates.day_of_week == 4)]
    assert bars["volume"].median() > 1.5 * black_fridays["volume"].median()


def test_the_three_of_four_rule_gives_buy_sell_and_hold_across_symbols():
    """Drift regimes make trends: across symbols the rules analyst's four votes (SuperTrend up,
    close > SMA 20, MACD > signal, RSI > 50) give 3-4 bullish (BUY), 0-1 (SELL) and 2-2 (HOLD)."""
    outcomes = {}
    for timeframe, history_days in (("1d", 500), ("1w", 2500)):
        as_of = utc("2025-03-03 22:00")
        for symbol in SYMBOLS:
            last = compute_indicators(simulate_bars(symbol, timeframe, as_of - pd.Timedelta(days=history_days),
                                                    as_of)).iloc[-1]
            bullish = sum(int(vote) for vote in (
                last["supertrend_direction"] > 0,
                last["close"] > last["sma_20"],
                last["macd"] > last["macd_signal"],
                last["rsi_14"] > 50,
            ))
            outcomes[symbol, timeframe] = "BUY" if bullish >= 3 else "SELL" if bullish <= 1 else "HOLD"
    for timeframe in ("1d", "1w"):
        seen = {outcome for (_, tf), outcome in outcomes.items() if tf == timeframe}
        assert seen == {"BUY", "SELL", "HOLD"}, (timeframe, outcomes)
