"""build_chart_figure: traces, visible window, title and latest-value labels."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from trading_pipeline.core.chart_figure import (
    REQUIRED_COLUMNS,
    ST_DOWN,
    ST_UP,
    ChartFill,
    build_chart_figure,
    build_decision_figure,
)
from trading_pipeline.errors import BarDataError

AS_OF = datetime(2025, 6, 2, 21, 37, 12, tzinfo=UTC)


def make_indicator_frame(n: int = 400, timeframe: str = "1d", seed: int = 7) -> pd.DataFrame:
    """A synthetic indicator frame: random-walk OHLCV plus plain pandas indicators.

    Daily bars skip weekends and a few holidays, so the index has real calendar gaps.
    """
    rng = np.random.default_rng(seed)
    if timeframe == "1w":
        index = pd.date_range(end="2025-05-26", periods=n, freq="W-MON", tz="UTC")
    else:
        days = pd.bdate_range(end="2025-05-30", periods=n + 12, tz="UTC")
        holidays = days[5::37][:12]  # drop a few weekdays like exchange holidays
        index = days.difference(holidays)[-n:]
    step = 0.012 if timeframe == "1d" else 0.03
    close = 100 * np.exp(np.cumsum(rng.normal(0.0004, step, n)))
    open_ = np.r_[close[0], close[:-1]] * (1 + rng.normal(0, step / 4, n))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, step / 2, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, step / 2, n)))
    volume = rng.lognormal(14, 0.4, n).round()
    df = pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index)
    c = df["close"]
    for w in (20, 50, 200):
        df[f"sma_{w}"] = c.rolling(w).mean()
    delta = c.diff()
    gain = delta.clip(lower=0).ewm(alpha=1 / 14, min_periods=14, adjust=False).mean()
    loss = (-delta.clip(upper=0)).ewm(alpha=1 / 14, min_periods=14, adjust=False).mean()
    df["rsi_14"] = 100 - 100 / (1 + gain / loss)
    ema12 = c.ewm(span=12, min_periods=12, adjust=False).mean()
    ema26 = c.ewm(span=26, min_periods=26, adjust=False).mean()
    df["macd"] = ema12 - ema26
    df["macd_signal"] = df["macd"].ewm(span=9, min_periods=9, adjust=False).mean()
    df["macd_hist"] = df["macd"] - df["macd_signal"]
    std = c.rolling(20).std(ddof=0)
    df["bb_middle"] = df["sma_20"]
    df["bb_upper"] = df["bb_middle"] + 2 * std
    df["bb_lower"] = df["bb_middle"] - 2 * std
    prev_close = c.shift()
    tr = pd.concat(
        [df["high"] - df["low"], (df["high"] - prev_close).abs(), (df["low"] - prev_close).abs()],
        axis=1,
    ).max(axis=1)
    df["atr_14"] = tr.ewm(alpha=1 / 14, min_periods=14, adjust=False).mean()
    # SuperTrend(10, 3) on the ATR above
    hl2 = (df["high"] + df["low"]) / 2
    upper = (hl2 + 3 * df["atr_14"]).to_numpy().copy()
    lower = (hl2 - 3 * df["atr_14"]).to_numpy().copy()
    st = np.full(n, np.nan)
    direction = np.full(n, np.nan)
    closes = c.to_numpy()
    for i in range(n):
        if np.isnan(upper[i]):
            continue
        if i == 0 or np.isnan(st[i - 1]):
            direction[i], st[i] = 1.0, lower[i]
            continue
        if direction[i - 1] == 1:
            lower[i] = max(lower[i], lower[i - 1]) if closes[i - 1] > lower[i - 1] else lower[i]
            if closes[i] < lower[i]:
                direction[i], st[i] = -1.0, upper[i]
            else:
                direction[i], st[i] = 1.0, lower[i]
        else:
            upper[i] = min(upper[i], upper[i - 1]) if closes[i - 1] < upper[i - 1] else upper[i]
            if closes[i] > upper[i]:
                direction[i], st[i] = 1.0, lower[i]
            else:
                direction[i], st[i] = -1.0, upper[i]
    df["supertrend"] = st
    df["supertrend_direction"] = direction
    return df[list(REQUIRED_COLUMNS)].astype(float)


@pytest.fixture(scope="module")
def daily() -> pd.DataFrame:
    return make_indicator_frame(400, "1d")


@pytest.fixture(scope="module")
def weekly() -> pd.DataFrame:
    return make_indicator_frame(260, "1w")


def _trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, f"expected exactly one trace named {name!r}, got {len(found)}"
    return found[0]


def _annotation_texts(fig) -> list[str]:
    """Annotation texts without HTML tags (<b> etc.)."""
    return [re.sub(r"<[^>]+>", "", a.text) for a in fig.layout.annotations]


def test_expected_traces_exist(daily):
    fig = build_chart_figure(daily, "AAPL", "1d", AS_OF)
    names = [t.name for t in fig.data]
    for name in (
        "OHLC", "SMA 20", "SMA 50", "SMA 200", "Bollinger 20/2", "Bollinger lower",
        "SuperTrend up", "SuperTrend down", "Volume", "MACD", "MACD signal", "MACD hist",
        "RSI 14", "ATR 14",
    ):  # fmt: skip
        assert name in names
    assert _trace(fig, "OHLC").type == "candlestick"
    assert _trace(fig, "Volume").type == "bar"
    assert _trace(fig, "MACD hist").type == "bar"
    assert _trace(fig, "Bollinger lower").fill == "tonexty"
    # each indicator sits in its own panel (y axis)
    assert _trace(fig, "OHLC").yaxis == "y"
    assert _trace(fig, "Volume").yaxis == "y2"
    assert _trace(fig, "MACD").yaxis == "y3"
    assert _trace(fig, "RSI 14").yaxis == "y4"
    assert _trace(fig, "ATR 14").yaxis == "y5"


def test_supertrend_split_by_direction(daily):
    fig = build_chart_figure(daily, "AAPL", "1d", AS_OF)
    view = daily.iloc[-150:]
    up = _trace(fig, "SuperTrend up").y
    down = _trace(fig, "SuperTrend down").y
    for i, d in enumerate(view["supertrend_direction"]):
        st = view["supertrend"].iloc[i]
        if d == 1:
            assert up[i] == pytest.approx(st) and down[i] is None
        elif d == -1:
            assert down[i] == pytest.approx(st) and up[i] is None
    # the fixture has both regimes in the window, so both traces really draw something
    assert any(v is not None for v in up) and any(v is not None for v in down)


def _with_directions(frame: pd.DataFrame, directions: list[float]) -> pd.DataFrame:
    """`frame` with the last len(directions) SuperTrend directions replaced."""
    out = frame.copy()
    out.iloc[-len(directions) :, out.columns.get_loc("supertrend_direction")] = directions
    return out


def test_supertrend_one_bar_runs_are_dots_not_per_bar_markers(daily):
    # window of 150 bars: up, except one-bar down runs at 100 and at the last bar, and a
    # one-bar up run at 120 between two down runs
    directions = [1.0] * 150
    directions[100] = -1.0
    directions[115:120] = [-1.0] * 5
    directions[121:125] = [-1.0] * 4
    directions[149] = -1.0
    frame = _with_directions(daily, directions)
    fig = build_chart_figure(frame, "AAPL", "1d", AS_OF)
    labels = [ts.strftime("%Y-%m-%d") for ts in frame.index[-150:]]
    st = frame["supertrend"].iloc[-150:]

    down_dots = _trace(fig, "SuperTrend down (1 bar)")
    assert list(down_dots.x) == [labels[100], labels[149]]
    assert list(down_dots.y) == pytest.approx([st.iloc[100], st.iloc[149]])
    up_dots = _trace(fig, "SuperTrend up (1 bar)")
    assert list(up_dots.x) == [labels[120]] and list(up_dots.y) == pytest.approx([st.iloc[120]])
    for dots, color in ((down_dots, ST_DOWN), (up_dots, ST_UP)):
        assert dots.mode == "markers" and dots.marker.color == color and dots.showlegend is False
        assert (dots.xaxis, dots.yaxis) == ("x", "y")
    # the lines themselves carry no markers: no SVG node per bar
    for name in ("SuperTrend up", "SuperTrend down"):
        assert _trace(fig, name).mode == "lines"
    assert all(len(t.x) <= 2 for t in fig.data if t.type == "scatter" and "markers" in (t.mode or ""))


def test_supertrend_without_one_bar_runs_has_no_dots(daily):
    frame = _with_directions(daily, [1.0] * 75 + [-1.0] * 75)
    fig = build_chart_figure(frame, "AAPL", "1d", AS_OF)
    assert not [t.name for t in fig.data if t.name.endswith("(1 bar)")]


@pytest.mark.parametrize(("timeframe", "expected"), [("1d", 150), ("1w", 104)])
def test_x_range_covers_exactly_last_bars(daily, weekly, timeframe, expected):
    frame = daily if timeframe == "1d" else weekly
    fig = build_chart_figure(frame, "MSFT", timeframe, AS_OF)
    want = [ts.strftime("%Y-%m-%d") for ts in frame.index[-expected:]]
    for trace in fig.data:
        if trace.name.endswith("(1 bar)"):  # SuperTrend dots: only their own bars
            assert set(trace.x) <= set(want), trace.name
            continue
        assert list(trace.x) == want, trace.name
    start, end = fig.layout.xaxis.range
    assert start == -0.5 and expected - 0.5 + 2 <= end <= expected - 0.5 + 0.04 * expected + 1
    assert fig.layout.xaxis.type == "category"
    assert list(fig.layout.xaxis.categoryarray) == want
    candles = _trace(fig, "OHLC")
    assert list(candles.close) == pytest.approx(frame["close"].iloc[-expected:].tolist())


def test_bars_shown_override_and_short_history(daily):
    fig = build_chart_figure(daily, "MSFT", "1d", AS_OF, bars_shown=30)
    assert len(_trace(fig, "OHLC").x) == 30
    assert tuple(fig.layout.xaxis.range) == (-0.5, 31.5)  # 2 empty slots after the last candle
    short = daily.iloc[:40]  # fewer bars than bars_shown: draw them all (SMA 200 all NaN)
    fig = build_chart_figure(short, "MSFT", "1d", AS_OF)
    assert len(_trace(fig, "OHLC").x) == 40
    assert all(v is None for v in _trace(fig, "SMA 200").y)
    assert "SMA200 n/a" not in " ".join(_annotation_texts(fig))  # NaN values get no label


def test_indicators_are_not_recomputed(daily):
    """Values drawn are the frame's values (computed on full history), not a recomputation."""
    fig = build_chart_figure(daily, "AAPL", "1d", AS_OF)
    view = daily.iloc[-150:]
    assert _trace(fig, "SMA 200").y[0] == pytest.approx(view["sma_200"].iloc[0])
    assert _trace(fig, "RSI 14").y[-1] == pytest.approx(view["rsi_14"].iloc[-1])


def test_no_rangeslider_and_layout(daily):
    fig = build_chart_figure(daily, "AAPL", "1d", AS_OF, width=1600, height=900)
    for key in ("xaxis", "xaxis2", "xaxis3", "xaxis4", "xaxis5"):
        assert fig.layout[key].rangeslider.visible is False
    assert (fig.layout.width, fig.layout.height) == (1600, 900)
    assert fig.layout.paper_bgcolor == "#ffffff" and fig.layout.plot_bgcolor == "#ffffff"
    # legend sits above the price panel, not over the candles
    assert fig.layout.legend.yanchor == "bottom" and fig.layout.legend.y >= 1.0


def test_title_has_symbol_timeframe_as_of_and_last_close(daily, weekly):
    fig = build_chart_figure(daily, "AAPL", "1d", AS_OF)
    title = fig.layout.title.text
    assert "AAPL" in title and "1d" in title
    assert "2025-06-02 21:37 UTC" in title
    assert f"{daily['close'].iloc[-1]:.2f}" in title
    wtitle = build_chart_figure(weekly, "AAPL", "1w", AS_OF).layout.title.text
    assert "1w" in wtitle and f"{weekly['close'].iloc[-1]:.2f}" in wtitle


def _volume_text(v: float) -> str:
    return f"vol {v / 1e6:.2f}M" if v >= 1e6 else f"vol {v / 1e3:.2f}K"


def test_latest_value_annotations(daily):
    fig = build_chart_figure(daily, "AAPL", "1d", AS_OF)
    last = daily.iloc[-1]
    texts = _annotation_texts(fig)
    for expected in (
        f"close {last['close']:.2f}",
        f"SMA20 {last['sma_20']:.2f}",
        f"SMA50 {last['sma_50']:.2f}",
        f"SMA200 {last['sma_200']:.2f}",
        f"ST {last['supertrend']:.2f}",
        f"RSI {last['rsi_14']:.1f}",
        f"ATR {last['atr_14']:.2f}",
        _volume_text(last["volume"]),
    ):
        assert expected in texts, (expected, texts)
    assert any(t.startswith("MACD ") for t in texts)
    assert any(t.startswith("signal ") for t in texts)
    # one label per panel at least, each on the panel's own y axis
    yrefs = {a.yref for a in fig.layout.annotations}
    assert {"y", "y2", "y3", "y4", "y5"} <= yrefs
    # labels sit in the right margin (outside the plot area), not over the candles
    assert all(a.xref == "paper" and a.x >= 1.0 for a in fig.layout.annotations)


def test_labels_in_a_panel_do_not_overlap(daily):
    fig = build_chart_figure(daily, "AAPL", "1d", AS_OF)
    height_px = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    for ref, axis in (("y", "yaxis"), ("y3", "yaxis3")):
        ax = fig.layout[axis]
        lo, hi = ax.range
        px_per_unit = (ax.domain[1] - ax.domain[0]) * height_px / (hi - lo)
        ys = sorted(a.y for a in fig.layout.annotations if a.yref == ref)
        gaps = [(b - a) * px_per_unit for a, b in itertools.pairwise(ys)]
        assert all(g >= 21.9 for g in gaps), gaps
        assert all(lo <= y <= hi for y in ys)


def test_missing_columns_is_a_bar_data_error(daily):
    with pytest.raises(BarDataError) as info:
        build_chart_figure(daily.drop(columns=["rsi_14"]), "AAPL", "1d", AS_OF)
    assert "rsi_14" in str(info.value) and info.value.fix


def test_import_does_not_load_plotly():
    code = (
        "import sys, trading_pipeline.core.chart_figure\n"
        "assert 'plotly' not in sys.modules, 'plotly imported at module level'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_low_priced_instrument_gets_four_decimals(daily):
    fx = daily.copy()
    price_like = [c for c in fx.columns if c not in ("volume", "rsi_14", "supertrend_direction")]
    fx[price_like] = fx[price_like] * 0.0123
    fig = build_chart_figure(fx, "EUR.USD", "1d", AS_OF)
    last = fx.iloc[-1]
    assert f"{last['close']:.4f}" in fig.layout.title.text
    texts = _annotation_texts(fig)
    assert f"close {last['close']:.4f}" in texts and f"ATR {last['atr_14']:.4f}" in texts
    assert fig.layout.yaxis.tickformat == ".4f"


# ---- dates, room and volume ticks ------------------------------------------------------


def _at_session_open(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with bars stamped like IBKR and the simulated market do: the session's open in UTC."""
    out = frame.copy()
    out.index = out.index + pd.Timedelta(hours=14, minutes=30)
    return out


@pytest.mark.parametrize("timeframe", ["1d", "1w"])
def test_daily_and_weekly_bars_are_labelled_with_dates_not_utc_times(daily, weekly, timeframe):
    frame = _at_session_open(daily if timeframe == "1d" else weekly)
    fig = build_chart_figure(frame, "AAPL", timeframe, AS_OF)
    shown = frame.index[-len(_trace(fig, "OHLC").x):]
    dates = [ts.strftime("%Y-%m-%d") for ts in shown]
    assert list(fig.layout.xaxis.categoryarray) == dates
    assert list(_trace(fig, "OHLC").x) == dates
    assert set(fig.layout.xaxis5.tickvals) <= set(dates)
    assert "14:30" not in fig.layout.title.text
    assert f"{dates[0]} → {dates[-1]}" in fig.layout.title.text


def test_session_date_is_new_yorks_date_not_utcs():
    # a bar starting at 01:00 UTC belongs to the previous evening's session in New York
    frame = make_indicator_frame(60, "1d")
    frame.index = frame.index + pd.Timedelta(hours=1)
    fig = build_chart_figure(frame, "AAPL", "1d", AS_OF)
    expected = (frame.index[-1] - pd.Timedelta(days=1)).strftime("%Y-%m-%d")
    assert fig.layout.xaxis.categoryarray[-1] == expected


def test_intraday_bars_keep_their_utc_time(daily):
    frame = _at_session_open(daily)
    fig = build_chart_figure(frame, "AAPL", "1h", AS_OF)
    assert fig.layout.xaxis.categoryarray[-1] == frame.index[-1].strftime("%Y-%m-%d %H:%M")


def test_room_right_of_the_last_candle(daily):
    fig = build_chart_figure(daily, "AAPL", "1d", AS_OF)
    assert fig.layout.xaxis.range[1] - (150 - 0.5) == 5  # 3 % of 150 bars, rounded up
    fig = build_chart_figure(daily, "AAPL", "1d", AS_OF, right_room=20)
    assert fig.layout.xaxis.range[1] == 169.5


def test_volume_axis_has_round_compact_ticks(daily):
    for scale, texts in ((1.0, None), (40.0, None), (0.001, None)):
        frame = daily.copy()
        frame["volume"] = frame["volume"] * scale
        fig = build_chart_figure(frame, "AAPL", "1d", AS_OF)
        axis = fig.layout.yaxis2
        assert axis.tickmode == "array"
        values, texts = list(axis.tickvals), list(axis.ticktext)
        top = axis.range[1]
        assert values[0] == 0 and len(values) in (3, 4) and values[-1] <= top  # two or three steps
        step = values[1]
        mantissa = step / 10 ** np.floor(np.log10(step))
        assert round(mantissa, 6) in (1, 2, 2.5, 5)
        assert all(re.fullmatch(r"0|\d+(\.\d+)?[KMB]?", t) for t in texts), texts
    fig = build_chart_figure(daily, "AAPL", "1d", AS_OF)
    vmax = fig.layout.yaxis2.range[1]
    assert vmax > 1e6  # lognormal(14, .4): millions
    assert any(t.endswith("M") for t in fig.layout.yaxis2.ticktext)


# ---- decision chart -------------------------------------------------------------------


def _shapes(fig, kind):
    return [s for s in fig.layout.shapes if s.type == kind]


def _level_labels(fig) -> list[str]:
    return [re.sub(r"<[^>]+>", "", a.text) for a in fig.layout.annotations if a.xref == "x"]


def test_buy_decision_draws_zones_levels_and_r():
    frame = _at_session_open(make_indicator_frame(300, "1d"))
    last = float(frame["close"].iloc[-1])
    entry, stop, target = round(last, 2), round(last * 0.95, 2), round(last * 1.10, 2)
    fig = build_decision_figure(frame, "AAPL", AS_OF, action="BUY", entry=entry, stop=stop,
                                targets=[target, round(last * 1.2, 2)], r_multiple=2.0)
    rects = _shapes(fig, "rect")
    risk = [r for r in rects if "239, 83, 80" in r.fillcolor]
    reward = [r for r in rects if "38, 166, 154, 0.16" in r.fillcolor]
    assert len(risk) == 1 and (risk[0].y0, risk[0].y1) == (entry, stop)
    assert len(reward) == 1 and (reward[0].y0, reward[0].y1) == (entry, target)
    # the zones start at the last candle and run to the right edge of the room after it
    assert risk[0].x0 == 149 and risk[0].x1 == fig.layout.xaxis.range[1]  # 150 bars shown
    assert fig.layout.xaxis.range[1] - 149.5 >= 12
    labels = _level_labels(fig)
    assert f"BUY entry {entry:.2f}" in labels
    assert any(t.startswith(f"stop {stop:.2f}") and "−1R" in t for t in labels)
    assert any(t.startswith(f"target 1 {target:.2f}") and t.endswith("+2.00R") for t in labels)
    assert any(t.startswith("target 2 ") and t.endswith("+4.00R") for t in labels)
    lines = {round(s.y0, 2) for s in _shapes(fig, "line") if s.line.dash == "dash" and s.yref == "y"}
    assert {entry, stop, target} <= lines
    lo, hi = fig.layout.yaxis.range
    assert lo < stop and hi > last * 1.2
    title = fig.layout.title.text
    assert "AAPL" in title and "BUY" in title and "R <b>2.00</b>" in title
    assert list(fig.layout.xaxis.categoryarray)[-1] == frame.index[-1].strftime("%Y-%m-%d")


def test_sell_decision_zones_point_the_other_way(daily):
    last = float(daily["close"].iloc[-1])
    fig = build_decision_figure(daily, "AAPL", AS_OF, action="SELL", entry=last, stop=last * 1.04,
                                targets=[last * 0.9], r_multiple=2.5)
    risk = next(r for r in _shapes(fig, "rect") if "239, 83, 80" in r.fillcolor)
    reward = next(r for r in _shapes(fig, "rect") if "38, 166, 154, 0.16" in r.fillcolor)
    assert risk.y1 > risk.y0 and reward.y1 < reward.y0
    assert any(t.endswith("+2.50R") for t in _level_labels(fig))


@pytest.mark.parametrize("action", ["NO_TRADE", "HOLD"])
def test_no_trade_and_hold_have_no_levels_and_say_so(daily, action):
    fig = build_decision_figure(daily, "AAPL", AS_OF, action=action, entry=None, stop=None, targets=[],
                                r_multiple=None)
    plain = build_chart_figure(daily, "AAPL", "1d", AS_OF)
    assert len(fig.layout.shapes) == len(plain.layout.shapes)  # nothing drawn beyond the chart
    assert _level_labels(fig) == []
    assert f"decision <b>{action}</b>: no trade, no levels" in fig.layout.title.text
    assert fig.layout.yaxis.range == plain.layout.yaxis.range


def test_action_enum_is_accepted(daily):
    from trading_pipeline.core.analysis import Action

    fig = build_decision_figure(daily, "AAPL", AS_OF, action=Action.NO_TRADE, entry=101.0, stop=99.0,
                                targets=[110.0], r_multiple=None)
    assert "NO_TRADE" in fig.layout.title.text and _level_labels(fig) == []


def test_trade_without_stop_draws_no_levels(daily):
    fig = build_decision_figure(daily, "AAPL", AS_OF, action="BUY", entry=101.0, stop=None, targets=[110.0],
                                r_multiple=None)
    assert _level_labels(fig) == [] and "without entry and stop" in fig.layout.title.text


def test_fills_are_marked_at_their_session_and_price():
    frame = _at_session_open(make_indicator_frame(300, "1d"))
    last_date = frame.index[-1]
    inside = frame.index[-10] + pd.Timedelta(minutes=5)
    after = last_date + pd.Timedelta(days=3, hours=2)  # a session after the chart's last bar
    before = frame.index[0]  # outside the 150-bar window: not drawn
    fills = [ChartFill(after.to_pydatetime(), 120.5, "SELL", 204, "target"),
             ChartFill(inside.to_pydatetime(), 101.25, "BUY", 204, "entry"),
             ChartFill(before.to_pydatetime(), 99.0, "BUY", 1)]
    last = float(frame["close"].iloc[-1])
    fig = build_decision_figure(frame, "AAPL", AS_OF, action="BUY", entry=last, stop=last - 3, targets=[last + 6],
                                r_multiple=2.0, fills=fills)
    buys, sells = _trace(fig, "buy fill"), _trace(fig, "sell fill")
    assert list(buys.x) == [inside.strftime("%Y-%m-%d")] and list(buys.y) == [101.25]
    assert buys.text[0].startswith("entry BUY 204 @ 101.25")
    assert list(sells.x) == [after.strftime("%Y-%m-%d")] and list(sells.y) == [120.5]
    assert buys.marker.symbol == "triangle-up" and sells.marker.symbol == "triangle-down"
    # the later session got a slot of its own after the last bar, on every panel's axis
    categories = list(fig.layout.xaxis.categoryarray)
    assert categories[-1] == after.strftime("%Y-%m-%d") and categories[-2] == last_date.strftime("%Y-%m-%d")
    assert list(fig.layout.xaxis5.categoryarray) == categories
    lo, hi = fig.layout.yaxis.range
    assert lo < 101.25 and hi > 120.5


def test_fills_after_the_last_bar_stay_clear_of_the_level_labels_and_of_each_other():
    """An entry filled the next session and its stop hit days later: both slots come after the
    last bar, left of the level labels (which are right-aligned at the end of the room), and each
    fill's text sits on the side away from the other fill."""
    frame = _at_session_open(make_indicator_frame(300, "1d"))
    last_date, last = frame.index[-1], float(frame["close"].iloc[-1])
    entry_day, stop_day = last_date + pd.Timedelta(days=1, hours=2), last_date + pd.Timedelta(days=6, hours=2)
    fills = [ChartFill(entry_day.to_pydatetime(), last, "BUY", 100, "entry"),
             ChartFill(stop_day.to_pydatetime(), last * 0.96, "SELL", 100, "stop")]
    width = 1600
    fig = build_decision_figure(frame, "AAPL", AS_OF, action="BUY", entry=last, stop=last * 0.96,
                                targets=[last * 1.08], r_multiple=2.0, fills=fills, width=width, height=900)
    buys, sells = _trace(fig, "buy fill"), _trace(fig, "sell fill")
    assert list(buys.textposition) == ["top left"] and list(sells.textposition) == ["bottom left"]
    categories = list(fig.layout.xaxis.categoryarray)
    last_fill_slot = categories.index(stop_day.strftime("%Y-%m-%d"))
    labels = [a for a in fig.layout.annotations if a.xref == "x" and a.xanchor == "right"]
    assert len(labels) == 3  # entry, stop, target
    x_end = labels[0].x
    x_lo, x_hi = fig.layout.xaxis.range
    slot_px = (width - 90 - 175) / (x_hi - x_lo)
    widest_px = max(len(a.text) for a in labels) * 0.6 * 14 + 14
    assert x_end - widest_px / slot_px > last_fill_slot + 0.5


def test_decision_chart_of_an_empty_frame_is_a_bar_data_error(daily):
    with pytest.raises(BarDataError) as info:
        build_decision_figure(daily.iloc[:0], "AAPL", AS_OF, action="BUY", entry=1.0, stop=0.9, targets=[1.2])
    assert "no bars" in str(info.value) and info.value.fix


@pytest.mark.parametrize("kind", ["1d", "1w", "BUY", "SELL", "HOLD"])
def test_figures_built_without_validation_equal_their_validated_rebuild(daily, weekly, kind):
    """The builders skip plotly's property checks (for speed): plotly must accept every figure
    as built and change nothing in it, so plotly.js draws exactly what a validated figure gives."""
    import json

    import plotly.graph_objects as go

    if kind in ("1d", "1w"):
        fig = build_chart_figure(daily if kind == "1d" else weekly, "AAPL", kind, AS_OF)
    else:
        last = float(daily["close"].iloc[-1])
        sign = -1 if kind == "SELL" else 1
        fig = build_decision_figure(daily, "AAPL", AS_OF, action=kind, entry=last, stop=last * (1 - sign * 0.05),
                                    targets=[last * (1 + sign * 0.1)], r_multiple=2.0,
                                    fills=[ChartFill(AS_OF, last, "BUY", 10, "entry"),
                                           ChartFill(datetime(2025, 6, 10, 15, tzinfo=UTC), last * 0.95, "SELL", 10)])

    def as_json(figure):
        return json.dumps(figure.to_dict(), sort_keys=True, default=str)

    assert as_json(fig) == as_json(go.Figure(fig.to_dict()))  # validating: raises on any invalid property
    assert isinstance(fig.to_dict()["layout"]["template"], dict)  # the theme itself, not its name
