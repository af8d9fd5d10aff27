"""IBKR history rules, kept pure so they are checked before any request and tested directly.

- `validate_history_request(period, bar)`: IBKR's period syntax and its period -> allowed bars
  table (reference section 5, "Step Size" in IBKR's docs). A pair IBKR would refuse never leaves
  this process.
- `plan_pages(...)`: maps a strategy period (e.g. '2y', '6y') to the request(s) that cover it:
  the strategy's own period when IBKR's table allows the bar and it holds at most 1000 points,
  else pages of the longest allowed period, each anchored with `startTime`.
- `normalize_bars(...)`: IBKR `data[]` -> our frame (UTC session-open index, float64, shares).
- `data_delay(...)` / `unfinished_bars_error(...)`: which bars of an answer cannot be final yet (not
  closed when asked for; delayed data, `mdAvailability` D or a `mktDataDelay`, closed within the delay).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pandas as pd

from trading_pipeline.adapters.ibkr.errors import IBKRHistoryRequestError, IBKRMalformedAnswer
from trading_pipeline.core.market_calendar import session_start_index

BARS: tuple[str, ...] = ("1min", "2min", "3min", "5min", "10min", "15min", "30min",
                         "1h", "2h", "3h", "4h", "8h", "1d", "1w", "1m")
_BAR_RANK = {bar: i for i, bar in enumerate(BARS)}

PERIOD_RE = re.compile(r"^(\d{1,4})(min|h|d|w|m|y)$")
PERIOD_LIMITS = {"min": 30, "h": 8, "d": 1000, "w": 792, "m": 182, "y": 15}
_UNIT_DAYS = {"min": 1 / 1440, "h": 1 / 24, "d": 1.0, "w": 7.0, "m": 30.0, "y": 365.0}

# IBKR's table: a period uses the row of the shortest listed period that is at least as long.
# (row, row length in days, shortest allowed bar, longest allowed bar, default bar)
STEP_TABLE: tuple[tuple[str, float, str, str], ...] = (
    ("1min", 1 / 1440, "1min", "1min"),
    ("1h", 1 / 24, "1min", "8h"),
    ("1d", 1.0, "1min", "8h"),
    ("1w", 7.0, "10min", "1w"),
    ("1m", 30.0, "1h", "1m"),
    ("3m", 91.0, "2h", "1m"),
    ("6m", 182.0, "4h", "1m"),
    ("1y", 365.0, "8h", "1m"),
    ("2y", 730.0, "1d", "1m"),
    ("3y", 1095.0, "1d", "1m"),
    ("15y", 5479.0, "1w", "1m"),
)
MAX_POINTS = 1000  # IBKR returns at most 1000 points per response
# The longest single request per bar we page with: 3y of daily bars (~756), 15y of weekly (~783).
PAGE_PERIOD = {"1d": "3y", "1w": "15y"}
TIMEFRAME_BAR = {"1d": "1d", "1w": "1w"}
BAR_SECONDS = {"1d": 86_400, "1w": 7 * 86_400}
_TABLE_TEXT = ("1min:1min; 1h:1min-8h; 1d:1min-8h; 1w:10min-1w; 1m:1h-1m; 3m:2h-1m; 6m:4h-1m; "
               "1y:8h-1m; 2y:1d-1m; 3y:1d-1m; 15y:1w-1m")


def parse_period(period: str) -> tuple[int, str]:
    match = PERIOD_RE.match(period or "")
    if not match:
        raise IBKRHistoryRequestError(
            f"history period {period!r} is not in IBKR's format",
            "use a number and a lower-case unit: {1-30}min, {1-8}h, {1-1000}d, {1-792}w, {1-182}m or {1-15}y "
            "(e.g. 2y, 260w, 500d)")
    count, unit = int(match.group(1)), match.group(2)
    if not 1 <= count <= PERIOD_LIMITS[unit]:
        raise IBKRHistoryRequestError(
            f"history period {period!r} is outside IBKR's range for unit {unit!r} (1-{PERIOD_LIMITS[unit]})",
            f"use a period of 1-{PERIOD_LIMITS[unit]}{unit}, or a larger unit")
    return count, unit


def period_days(period: str) -> float:
    count, unit = parse_period(period)
    return count * _UNIT_DAYS[unit]


def step_row(period: str) -> tuple[str, str, str]:
    """(table row, shortest bar, longest bar) that IBKR applies to `period`."""
    days = period_days(period)
    for row, row_days, low, high in STEP_TABLE:
        if days <= row_days + 1e-9:
            return row, low, high
    row, _, low, high = STEP_TABLE[-1]
    return row, low, high


def allowed_bars(period: str) -> tuple[str, ...]:
    _, low, high = step_row(period)
    return BARS[_BAR_RANK[low]:_BAR_RANK[high] + 1]


def validate_history_request(period: str, bar: str) -> None:
    """Raise IBKRHistoryRequestError unless IBKR accepts `bar` for `period` (checked before any call)."""
    if bar not in _BAR_RANK:
        raise IBKRHistoryRequestError(f"history bar {bar!r} is not one IBKR knows",
                                      f"use one of {', '.join(BARS)}")
    row, low, high = step_row(period)
    if bar not in allowed_bars(period):
        raise IBKRHistoryRequestError(
            f"IBKR does not allow bar {bar} for period {period}: periods up to {row} take bars {low} to {high} "
            f"(IBKR's table: {_TABLE_TEXT})",
            f"choose a bar from {low} to {high} for period {period}, or a period whose row allows {bar}")


def estimated_points(period: str, bar: str) -> int:
    """Upper estimate of how many bars IBKR returns for (period, bar); for the 1000-point limit."""
    count, unit = parse_period(period)
    if bar == "1d":
        # 'd' periods count trading days (30d returned 29-30 daily bars in a recorded response)
        return count if unit == "d" else math.ceil(period_days(period) * 253 / 365)
    if bar == "1w":
        return math.ceil(count / 5) + 1 if unit == "d" else math.ceil(period_days(period) / 7) + 1
    if bar == "1m":
        return math.ceil(period_days(period) / 30) + 1
    minutes = {"min": 1, "h": 60}
    match = re.match(r"^(\d+)(min|h)$", bar)
    bar_minutes = int(match.group(1)) * minutes[match.group(2)]  # type: ignore[union-attr]
    return math.ceil(period_days(period) * 24 * 60 / bar_minutes)


def format_start_time(moment: datetime) -> str:
    """IBKR's `startTime`: UTC `YYYYMMDD-HH:mm:ss`."""
    return pd.Timestamp(moment).tz_convert("UTC").strftime("%Y%m%d-%H:%M:%S")


@dataclass(frozen=True)
class HistoryPlan:
    bar: str
    period: str  # period of every request
    paged: bool  # True: several requests anchored with startTime, walking backwards
    anchor: datetime | None  # startTime of the first request (None: up to now)
    reason: str


def plan_pages(timeframe: str, strategy_period: str, as_of: datetime, now: datetime | None = None) -> HistoryPlan:
    """How to fetch `strategy_period` of `timeframe` bars up to `as_of`.

    One request with the strategy's own period when IBKR's table allows the bar for it and it
    holds at most 1000 points (e.g. 2y of 1d, 6y of 1w); otherwise pages of PAGE_PERIOD walking
    back from `as_of` with `startTime` (e.g. 6y of 1d: the table allows only 1w-1m beyond 3y).
    A run at an earlier point in time (`as_of` more than one bar ago) anchors the first request at
    `as_of`; IBKR's example answer shows `startTime` as the end of the returned window.
    """
    if timeframe not in TIMEFRAME_BAR:
        raise IBKRHistoryRequestError(f"timeframe {timeframe!r} has no IBKR bar", "use 1d or 1w")
    bar = TIMEFRAME_BAR[timeframe]
    now = now or datetime.now(UTC)
    as_of = pd.Timestamp(as_of).tz_convert("UTC").to_pydatetime()
    anchor = as_of if (now - as_of) > timedelta(seconds=BAR_SECONDS[bar]) else None
    parse_period(strategy_period)
    if bar in allowed_bars(strategy_period) and estimated_points(strategy_period, bar) <= MAX_POINTS:
        return HistoryPlan(bar, strategy_period, False, anchor,
                           f"period {strategy_period} with bar {bar} is allowed and fits one response")
    page = PAGE_PERIOD[bar]
    why = (f"IBKR's table does not allow bar {bar} for period {strategy_period}"
           if bar not in allowed_bars(strategy_period)
           else f"period {strategy_period} of {bar} bars exceeds {MAX_POINTS} points")
    return HistoryPlan(bar, page, True, anchor, f"{why}: paging with period {page} and startTime")


# ---------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------

# `t` is epoch milliseconds: 1e11 ms is March 1973, 4102444800000 ms is 2100-01-01. A value outside is
# in another unit (seconds, microseconds), which would silently misdate every bar, or no bar's time at
# all (pandas' timestamps end in 2262: a later one crashed the run), so it is refused.
_T_MS_RANGE = (1e11, 4_102_444_800_000)
_BAD_DATA_FIX = ("this gateway's history answer does not follow IBKR's documented shape (data[] of "
                 "{t: epoch ms, o, h, l, c, v}); check that IBKR_GATEWAY_URL points at the Client Portal gateway, "
                 "or use another market data source (TRADING_MARKET_DATA) until it does")


def _number(value, key: str, bar) -> float:
    if isinstance(value, bool) or value is None:
        raise IBKRMalformedAnswer(f"IBKR history bar {bar!r} has no usable {key!r} ({value!r})", _BAD_DATA_FIX)
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip().replace(",", ""))
    except ValueError:
        raise IBKRMalformedAnswer(f"IBKR history bar {bar!r} has no usable {key!r} ({value!r})", _BAD_DATA_FIX) \
            from None


def raw_bars_frame(data: list[dict]) -> pd.DataFrame:
    """IBKR `data[]` as a frame indexed by IBKR's own `t` (UTC), raw values (volume as IBKR sends it),
    in the order IBKR sent them (callers sort and drop duplicates). Numbers may come as strings;
    a missing or empty `v` is 0. A bar without a usable t/o/h/l/c, or a `t` that is not epoch
    milliseconds, raises IBKRMalformedAnswer naming the bar."""
    if not data:
        return pd.DataFrame(columns=["open", "high", "low", "close", "volume"], dtype="float64",
                            index=pd.DatetimeIndex([], tz="UTC", name="time"))
    rows = []
    for bar in data:
        if not isinstance(bar, dict):
            raise IBKRMalformedAnswer(f"IBKR history data holds {bar!r} where a bar object is documented",
                                      _BAD_DATA_FIX)
        t = _number(bar.get("t"), "t", bar)
        if not _T_MS_RANGE[0] <= t < _T_MS_RANGE[1]:
            raise IBKRMalformedAnswer(
                f"IBKR history bar {bar!r} has t={bar.get('t')!r}, which is not an epoch time in milliseconds "
                "(seconds or microseconds would misdate every bar)", _BAD_DATA_FIX)
        volume = bar.get("v")
        rows.append((int(t), _number(bar.get("o"), "o", bar), _number(bar.get("h"), "h", bar),
                     _number(bar.get("l"), "l", bar), _number(bar.get("c"), "c", bar),
                     0.0 if volume is None or volume == "" else _number(volume, "v", bar)))
    frame = pd.DataFrame(rows, columns=["t", "open", "high", "low", "close", "volume"])
    frame.index = pd.DatetimeIndex(pd.to_datetime(frame.pop("t"), unit="ms", utc=True), name="time")
    return frame.astype("float64")


def normalize_bars(raw: pd.DataFrame, timeframe: str,
                   volume_multiplier: float) -> tuple[pd.DataFrame, int, pd.DatetimeIndex]:
    """Raw IBKR bars -> our frame: index = session-open bar starts (UTC, named "time"), float64
    open/high/low/close/volume with volume in shares. Returns (frame, number of bars dropped
    because no XNYS session matches their date, the bar starts for which IBKR sent several
    different bars). The same bar sent twice is one bar; of different bars for one start (bars
    shorter than asked for, a time sent twice with other prices) the frame keeps the last, and the
    caller refuses the answer if such a start is one it uses (`conflicting_bars_error`)."""
    starts = session_start_index(raw.index, timeframe)
    frame = raw.copy()
    frame.index = pd.DatetimeIndex(starts, name="time")
    frame["volume"] = frame["volume"] * float(volume_multiplier)
    unmatched = int(frame.index.isna().sum())
    frame = frame.loc[~frame.index.isna()]
    same = pd.DataFrame(frame.to_numpy(), index=frame.index).reset_index().duplicated(keep="last").to_numpy()
    frame = frame.loc[~same]
    conflicts = pd.DatetimeIndex(frame.index[frame.index.duplicated()].unique(), name="time")
    frame = frame[~frame.index.duplicated(keep="last")].sort_index()
    return frame.astype("float64"), unmatched, conflicts


def conflicting_bars_error(raw: pd.DataFrame, timeframe: str, conflicts: pd.DatetimeIndex) -> IBKRMalformedAnswer:
    """The error for several different IBKR bars on the bar starts `conflicts` (in use)."""
    first = conflicts.min()
    starts = pd.DatetimeIndex(session_start_index(raw.index, timeframe))
    times = raw.index[starts == first]
    distinct = len(raw.loc[starts == first].drop_duplicates())
    return IBKRMalformedAnswer(
        f"IBKR's history holds {distinct} different {timeframe} bars for the bar starting {first.isoformat()} "
        f"(IBKR times {', '.join(t.isoformat() for t in times[:4])}; {len(conflicts)} bar(s) affected): not one "
        f"bar per {'session' if timeframe == '1d' else 'week'}, so none of them can be taken as that bar",
        _BAD_DATA_FIX)


# ---------------------------------------------------------------------------------------------
# Delayed data
# ---------------------------------------------------------------------------------------------

# The unit of `mktDataDelay` is unconfirmed: IBKR's doc says ms, a recorded delayed answer (ibind's
# fixture) has 900, i.e. IBKR's usual 15 minutes in seconds. The longer reading is taken as long as it
# is at most MAX_DATA_DELAY (no exchange delays its data by hours); a delayed answer whose delay
# cannot be read is taken as delayed by MAX_DATA_DELAY. Both err towards refusing a bar, never
# towards taking an unfinished one.
MAX_DATA_DELAY = timedelta(hours=1)


def data_delay(answer: dict) -> tuple[timedelta | None, str]:
    """How long after a bar's close IBKR's answer may still lack part of it: None for real-time data
    (`mdAvailability` without D and no positive `mktDataDelay`), else (the delay taken, how it was read)."""
    availability = answer.get("mdAvailability")
    raw_delay = answer.get("mktDataDelay")
    try:
        value = None if isinstance(raw_delay, bool) or raw_delay is None else float(str(raw_delay).strip())
    except ValueError:
        value = None
    if value is not None and not math.isfinite(value):
        value = None
    delayed = (isinstance(availability, str) and "D" in availability) or bool(value and value > 0)
    if not delayed:
        return None, ""
    said = f"mdAvailability {availability!r}"
    if value is None or value <= 0:
        return MAX_DATA_DELAY, (f"{said} with no usable mktDataDelay ({raw_delay!r}): taken as the longest "
                                f"delay accepted, {_minutes(MAX_DATA_DELAY)}")
    readings = [r for r in (timedelta(seconds=value), timedelta(milliseconds=value)) if r <= MAX_DATA_DELAY]
    if not readings:
        return MAX_DATA_DELAY, (f"{said}, mktDataDelay {raw_delay!r} (over {_minutes(MAX_DATA_DELAY)} in seconds "
                                f"and in milliseconds): taken as {_minutes(MAX_DATA_DELAY)}")
    delay = max(readings)
    return delay, (f"{said}, mktDataDelay {raw_delay!r}: taken as {_minutes(delay)} (its unit is unconfirmed; "
                   f"the longer reading up to {_minutes(MAX_DATA_DELAY)})")


def _minutes(delay: timedelta) -> str:
    return f"{delay.total_seconds() / 60:g} min"


def unfinished_bars_error(symbol: str, timeframe: str, closes: pd.Series, asked_at: datetime,
                          delay: timedelta | None, how: str) -> IBKRHistoryRequestError | None:
    """The error for the bars (`closes`: each bar's close, by its start, of the bars closed by the
    run's as_of) that had not closed when the answer was asked for (`asked_at`: an as_of later than
    that time), or closed less than `delay` before it (delayed data holds such a bar as it was before
    its close, so its close, high, low and volume are not final); None when there is none."""
    asked = pd.Timestamp(asked_at)
    open_ = closes[closes > asked]
    if not open_.empty:
        return IBKRHistoryRequestError(
            f"the run's as_of is later than the time IBKR's {timeframe} history for {symbol} was asked for "
            f"({asked.isoformat()}): the bar of {open_.idxmin().isoformat()} closes at {open_.min().isoformat()}, "
            "so what IBKR sent for it is a bar in progress, not its close",
            "use an as_of in the past (the run's trading/as_of tag or TRADING_AS_OF), and check this machine's clock")
    if delay is None:
        return None
    pending = closes[(closes + delay) > asked]
    if pending.empty:
        return None
    final = (pending.max() + delay).isoformat()
    return IBKRHistoryRequestError(
        f"IBKR's {timeframe} history for {symbol} is delayed ({how}): the bar of {pending.idxmax().isoformat()} "
        f"closed at {pending.max().isoformat()} is not final until {final} (asked at "
        f"{asked.isoformat()}); deciding on it would take a close the market never had",
        f"run again after {final}, or give the account real-time market data for this listing "
        "(Client Portal > Settings > Market Data Subscriptions; a paper account needs them shared from the "
        "live one)")
