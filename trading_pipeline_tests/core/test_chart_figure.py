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

from trading_pipeline.core.chart_figure import REQUIRED_COLUMNS, ST_DOWN, ST_UP, build_chart_figure
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
    assert tuple(fig.layout.xaxis.range) == (-0.5, expected - 0.5)
    assert fig.layout.xaxis.type == "category"
    assert list(fig.layout.xaxis.categoryarray) == want
    candles = _trace(fig, "OHLC")
    assert list(candles.close) == pytest.approx(frame["close"].iloc[-expected:].tolist())


def test_bars_shown_override_and_short_history(daily):
    fig = build_chart_figure(daily, "MSFT", "1d", AS_OF, bars_shown=30)
    assert len(_trace(fig, "OHLC").x) == 30
    assert tuple(fig.layout.xaxis.range) == (-0.5, 29.5)
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
