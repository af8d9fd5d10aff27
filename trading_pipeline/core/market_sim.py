"""The embedded simulated market: deterministic, plausible OHLCV bars on the real NYSE calendar.

Each symbol gets one fixed daily path over every XNYS session from 2000-01-03 to 2040-12-31,
seeded from (symbol, seed) only. A request just slices that path, so a bar never depends on
`start` or `as_of`: moving `as_of` later only appends bars (no look-ahead), and every run
reproduces the same prices.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from trading_pipeline.core.frames import OHLCV_COLUMNS, TIMEFRAMES
from trading_pipeline.errors import BarDataError

FIRST_SESSION = pd.Timestamp("2000-01-03")
LAST_SESSION = pd.Timestamp("2040-12-31")  # the exchange calendar (market_calendar.CALENDAR_END) ends here too
# No later session can close before this, so any as_of before it sees every bar it should.
_END_OF_SIMULATION = pd.Timestamp("2041-01-01", tz="UTC")

_TRADING_DAYS_PER_YEAR = 252
_REGULAR_SESSION_MINUTES = 390.0  # 09:30-16:00 New York

# Price level (USD) each well-known symbol walks around, near where it traded in 2025, so the
# demo's SPY is not at 45. Other symbols draw a level of 20-500 from their seed. Only the level
# is fixed: returns, volatility and volume still come from (symbol, seed).
KNOWN_PRICE_LEVELS: dict[str, float] = {
    "SPY": 600.0, "QQQ": 520.0, "IWM": 220.0, "DIA": 430.0,
    "AAPL": 230.0, "MSFT": 420.0, "NVDA": 140.0, "AMZN": 200.0, "GOOG": 175.0, "GOOGL": 175.0,
    "META": 600.0, "TSLA": 300.0, "AVGO": 300.0, "AMD": 150.0, "INTC": 25.0, "CSCO": 60.0,
    "ORCL": 200.0, "JPM": 240.0, "V": 340.0, "MA": 560.0, "BRK.B": 480.0, "XOM": 110.0,
    "CVX": 150.0, "KO": 68.0, "PEP": 150.0, "WMT": 95.0, "COST": 900.0, "HD": 390.0,
    "DIS": 110.0, "BA": 190.0, "PFE": 25.0, "UNH": 320.0, "LLY": 800.0,
}  # fmt: skip

# Enough per-symbol paths for a large watchlist; one path is ~10,300 sessions (~0.6 MB).
_PATH_CACHE_SIZE = 256


def simulate_bars(symbol: str, timeframe: str, start: pd.Timestamp, as_of: pd.Timestamp, seed: int = 0) -> pd.DataFrame:
    """Simulated OHLCV bars of `symbol` for `timeframe` ("1d" or "1w").

    Returns the bars whose start is >= `start` and which had closed by `as_of` (bar close <= as_of):
      - a daily bar starts at its XNYS session's open and closes at that session's close, including
        early closes (e.g. 18:00 UTC on 2024-11-29), so the session still running at `as_of` is left out;
      - a weekly bar aggregates the sessions of one calendar week (Mon-Fri): open of the first
        session, max high, min low, close of the last session, summed volume. It starts at the first
        session's open and closes at the close of the week's last session, so the week still running
        at `as_of` is left out (a week whose last session is Thursday, e.g. before Good Friday, is
        complete after Thursday's close).

    The index is a sorted, unique, tz-aware UTC DatetimeIndex named "time" holding bar start times
    (as IBKR stamps daily bars with the session open); columns open, high, low, close, volume are
    float64, prices in cents and volume in whole shares.

    Deterministic: the daily path depends only on (symbol, seed), so a bar is identical whatever
    `start` and `as_of` are. Prices exist for XNYS sessions 2000-01-03 .. 2040-12-31; an earlier
    `start` simply yields bars from 2000-01-03 on, and an `as_of` after 2040-12-31 (UTC) raises BarDataError.
    Raises ValueError for an empty symbol, an unknown timeframe or timezone-naive timestamps.
    """
    if not symbol:
        raise ValueError("symbol must be a non-empty string")
    if timeframe not in TIMEFRAMES:
        raise ValueError(f"timeframe must be one of {TIMEFRAMES}, got {timeframe!r}")
    start = _as_utc(start, "start")
    as_of = _as_utc(as_of, "as_of")
    if as_of >= _END_OF_SIMULATION:
        raise BarDataError(
            f"The simulated market ends with the session of {LAST_SESSION.date()}, but bars up to "
            f"{as_of.isoformat()} were requested for {symbol}.",
            f"Use an as_of on or before {LAST_SESSION.date()} (UTC) in simulated mode, or a live data source.",
        )
    path = _path(symbol, seed, timeframe)
    wanted = np.asarray((path.bars.index >= start) & (path.closes <= as_of))
    return path.bars[wanted].copy()


@dataclass(frozen=True)
class _Path:
    bars: pd.DataFrame  # the whole simulated history for one timeframe, indexed by bar start
    closes: pd.DatetimeIndex  # when each bar closes (UTC), aligned with `bars`


@functools.lru_cache(maxsize=_PATH_CACHE_SIZE)
def _path(symbol: str, seed: int, timeframe: str) -> _Path:
    daily = _daily_path(symbol, seed)
    if timeframe == "1d":
        return daily
    return _weekly_path(daily)


@functools.lru_cache(maxsize=_PATH_CACHE_SIZE)
def _daily_path(symbol: str, seed: int) -> _Path:
    schedule = _schedule()
    session_minutes = (schedule["close"] - schedule["open"]).dt.total_seconds().to_numpy() / 60.0
    bars = _simulate_daily_ohlcv(_rng(symbol, seed), session_minutes, KNOWN_PRICE_LEVELS.get(symbol.upper()))
    frame = pd.DataFrame(bars, index=pd.DatetimeIndex(schedule["open"], name="time"))
    closes = pd.DatetimeIndex(schedule["close"])
    return _Path(frame, closes)


def _weekly_path(daily: _Path) -> _Path:
    sessions = daily.bars.index.tz_convert("America/New_York").normalize().tz_localize(None)
    # Monday of each session's calendar week; weeks never span a weekend, as sessions are Mon-Fri.
    week = sessions - pd.to_timedelta(sessions.day_of_week, unit="D")
    frame = daily.bars.assign(bar_start=daily.bars.index, bar_close=daily.closes)
    weekly = frame.groupby(week.to_numpy(), sort=True).agg(
        time=("bar_start", "first"),
        open=("open", "first"),
        high=("high", "max"),
        low=("low", "min"),
        close=("close", "last"),
        volume=("volume", "sum"),
        bar_close=("bar_close", "last"),
    )
    bars = weekly.set_index("time")[list(OHLCV_COLUMNS)]
    return _Path(bars, pd.DatetimeIndex(weekly["bar_close"]))


def _simulate_daily_ohlcv(rng: np.random.Generator, session_minutes: np.ndarray,
                          price_level: float | None = None) -> dict[str, np.ndarray]:
    """A geometric random walk with slow drift regimes, turned into OHLCV bars.

    Per symbol: daily volatility 1-3 %, a starting price (`price_level`, else drawn in 20-500)
    and a typical volume.
    Drift regimes last ~4 months on average, with annual drifts of roughly +-40 %, so some symbols
    trend up, some down and some chop at any date. A weak pull towards the starting price level
    (half-life 1.5 years) keeps 41 years of walk within plausible prices.
    """
    n = len(session_minutes)
    daily_volatility = rng.uniform(0.01, 0.03)
    drawn_price = float(np.exp(rng.uniform(np.log(20.0), np.log(500.0))))  # drawn anyway: same stream after
    start_price = drawn_price if price_level is None else float(price_level)
    base_volume = float(np.exp(rng.uniform(np.log(2e5), np.log(2e7))))

    # Piecewise-constant drift (per session) and a volatility multiplier per regime.
    regime_lengths = rng.geometric(1.0 / 85.0, size=n)  # at most n regimes are needed
    regime_of_session = np.repeat(np.arange(n), regime_lengths)[:n]
    drift_per_regime = rng.normal(0.0, 0.40, size=n) / _TRADING_DAYS_PER_YEAR
    volatility_per_regime = daily_volatility * rng.uniform(0.7, 1.4, size=n)
    drift = drift_per_regime[regime_of_session]
    # Early-close sessions are shorter: less movement and volume.
    session_fraction = session_minutes / _REGULAR_SESSION_MINUTES
    volatility = volatility_per_regime[regime_of_session] * np.sqrt(session_fraction)

    shocks = rng.standard_normal(n)
    gap_share = rng.uniform(0.1, 0.3)  # part of the day's move that happens overnight
    gap_noise = rng.standard_normal(n)
    wick_noise = np.abs(rng.standard_normal((2, n)))
    volume_noise = rng.standard_normal(n)

    # The walk is sequential because of the mean reversion; 10k steps take a few milliseconds.
    mean_reversion = np.log(2.0) / (1.5 * _TRADING_DAYS_PER_YEAR)
    anchor = np.log(start_price)
    log_close = np.empty(n)
    level = anchor
    for i in range(n):
        level += drift[i] - mean_reversion * (level - anchor) + volatility[i] * shocks[i]
        log_close[i] = level
    log_previous_close = np.concatenate(([anchor], log_close[:-1]))
    day_move = log_close - log_previous_close
    log_open = log_previous_close + gap_share * day_move + 0.2 * volatility * gap_noise

    open_ = _cents(np.exp(log_open))
    close = _cents(np.exp(log_close))
    body_top, body_bottom = np.maximum(open_, close), np.minimum(open_, close)
    # Wicks beyond the body; re-clamped after rounding so high >= body >= low holds in cents too.
    high = np.maximum(_cents(body_top * np.exp(0.5 * volatility * wick_noise[0])), body_top)
    low = np.minimum(_cents(body_bottom * np.exp(-0.5 * volatility * wick_noise[1])), body_bottom)

    # Busier on big moves, like real tape; log-normal day-to-day.
    surprise = np.abs(day_move) / volatility
    volume = np.round(base_volume * session_fraction * np.exp(0.35 * volume_noise + 0.3 * surprise - 0.24))
    return {"open": open_, "high": high, "low": low, "close": close, "volume": volume.astype(np.float64)}


def _cents(prices: np.ndarray) -> np.ndarray:
    return np.maximum(np.round(prices, 2), 0.01)


def _rng(symbol: str, seed: int) -> np.random.Generator:
    # hashlib, not hash(): Python salts str hashes per process, which would break reproducibility.
    digest = hashlib.sha256(f"market_sim|{symbol}|{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@functools.lru_cache(maxsize=1)
def _schedule() -> pd.DataFrame:
    """XNYS sessions (index: session date) with UTC open and close times, early closes included."""
    from trading_pipeline.core import market_calendar  # exchange_calendars: slow to import, only needed now

    return market_calendar.calendar().schedule.loc[FIRST_SESSION:LAST_SESSION, ["open", "close"]]


def _as_utc(timestamp: pd.Timestamp, name: str) -> pd.Timestamp:
    timestamp = pd.Timestamp(timestamp)
    if timestamp.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (e.g. pd.Timestamp(..., tz='UTC')), got {timestamp}")
    return timestamp.tz_convert("UTC")
