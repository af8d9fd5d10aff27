"""Build the chart figure (plotly) for one symbol x timeframe from an indicator frame.

Pure: builds a `plotly.graph_objects.Figure`, renders nothing and computes no indicator.
The indicators were computed on the full history upstream; this module only slices off the
last `bars_shown` bars and draws them.

Layout (shared x, one row per panel): price (candles, SMA 20/50/200, Bollinger band,
SuperTrend green/red), volume, MACD, RSI (30/70), ATR. The x axis is categorical (one slot
per bar), so weekends, holidays and missing weeks leave no holes. The latest value of each
series is written in the right margin of its panel, at the series' level. Daily and weekly
bars are labelled with their session's date; a few empty slots follow the last candle.

`build_decision_figure` draws a trade decision on the daily chart like a trading platform's
position tool: a red zone entry -> stop, a green zone entry -> first target, a labelled line
per level (price and R multiple) and, when the order filled, a marker per fill.

plotly is imported inside the builders so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from trading_pipeline.errors import BarDataError

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

DEFAULT_BARS_SHOWN: dict[str, int] = {"1d": 150, "1w": 104}
FALLBACK_BARS_SHOWN = 150
TIMEFRAME_NAMES: dict[str, str] = {"1d": "daily", "1w": "weekly"}
# Bars labelled with their session's date (on the exchange's clock), not a UTC time.
SESSION_TIMEFRAMES = frozenset({"1d", "1w"})
EXCHANGE_TZ = "America/New_York"  # the XNYS calendar every market-data mode follows
RIGHT_ROOM_SHARE = 0.03
RIGHT_ROOM_MIN_BARS = 2

REQUIRED_COLUMNS: tuple[str, ...] = (
    "open", "high", "low", "close", "volume",
    "sma_20", "sma_50", "sma_200",
    "rsi_14", "macd", "macd_signal", "macd_hist",
    "bb_upper", "bb_middle", "bb_lower",
    "atr_14", "supertrend", "supertrend_direction",
)  # fmt: skip

# Panel order, y-axis title and relative height (price gets half of the plot area).
PANELS: tuple[tuple[str, str, float], ...] = (
    ("price", "Price", 0.50),
    ("volume", "Volume", 0.11),
    ("macd", "MACD 12/26/9", 0.14),
    ("rsi", "RSI 14", 0.13),
    ("atr", "ATR 14", 0.12),
)
PANEL_ROW = {name: i + 1 for i, (name, _, _) in enumerate(PANELS)}

# Colours: candles/volume in the usual teal/red; SuperTrend in darker green/red so it
# stands apart from the candles; SMAs in hues that are neither green nor red.
UP = "#26a69a"
DOWN = "#ef5350"
ST_UP = "#1b7f3b"
ST_DOWN = "#c62828"
SMA_COLORS = {"sma_20": "#f57c00", "sma_50": "#1e63d6", "sma_200": "#6a1b9a"}
BB_LINE = "rgba(90, 110, 140, 0.55)"
BB_FILL = "rgba(100, 140, 200, 0.08)"
MACD_COLOR = "#1e63d6"
SIGNAL_COLOR = "#f57c00"
HIST_UP = "rgba(38, 166, 154, 0.65)"
HIST_DOWN = "rgba(239, 83, 80, 0.65)"
RSI_COLOR = "#7b1fa2"
ATR_COLOR = "#5d4037"
GRID = "#ececec"
AXIS_LINE = "#c8c8c8"
TEXT = "#222222"

# Fixed pixel margins (at the default 1920x1080; they do not scale with the size).
MARGIN = {"l": 90, "r": 175, "t": 96, "b": 74}
VERTICAL_SPACING = 0.025
BASE_FONT = 15
LABEL_FONT = 14
ST_DOT_SIZE = 5  # marker for a SuperTrend run of a single bar
LABEL_GAP_PX = 22  # minimum vertical distance between two value labels in one panel
MAX_TICKS = 14


def build_chart_figure(
    frame: pd.DataFrame,
    symbol: str,
    timeframe: str,
    as_of: datetime,
    *,
    bars_shown: int | None = None,
    width: int = 1920,
    height: int = 1080,
    right_room: float | None = None,
) -> go.Figure:
    """Return the chart figure for the last `bars_shown` bars of `frame`.

    `frame` is an indicator frame (UTC DatetimeIndex of bar starts, columns REQUIRED_COLUMNS,
    NaNs allowed in warm-up rows). `bars_shown` defaults to DEFAULT_BARS_SHOWN[timeframe]
    (150 daily, 104 weekly). The figure's layout carries `width` x `height`. `right_room` is
    the number of empty bar slots after the last candle (default ~3 % of the window, at least 2).
    """
    import plotly.graph_objects as go
    import plotly.io as pio

    _check_frame(frame, symbol, timeframe)
    if bars_shown is None:
        bars_shown = DEFAULT_BARS_SHOWN.get(timeframe, FALLBACK_BARS_SHOWN)
    if bars_shown < 1:
        raise ValueError(f"bars_shown must be at least 1, got {bars_shown}")

    view = frame.iloc[-bars_shown:]
    n = len(view)
    x = _x_labels(view.index, timeframe)

    domains = _row_domains([h for _, _, h in PANELS], VERTICAL_SPACING)
    traces: list[dict[str, Any]] = []

    def add(row: int, trace: dict[str, Any]) -> None:
        traces.append({**trace, "x": x, "xaxis": _axis_key("x", row), "yaxis": _axis_key("y", row)})

    # ---- price panel -------------------------------------------------------------------
    row = PANEL_ROW["price"]
    add(row, {
        "type": "scatter", "y": _values(view["bb_upper"]), "name": "Bollinger 20/2",
        "legendgroup": "bb", "mode": "lines", "line": {"color": BB_LINE, "width": 1},
        "connectgaps": False,
    })  # fmt: skip
    add(row, {
        "type": "scatter", "y": _values(view["bb_lower"]), "name": "Bollinger lower",
        "legendgroup": "bb", "showlegend": False, "mode": "lines",
        "line": {"color": BB_LINE, "width": 1}, "fill": "tonexty", "fillcolor": BB_FILL,
        "connectgaps": False,
    })  # fmt: skip
    add(row, {
        "type": "candlestick", "name": "OHLC", "showlegend": False,
        "open": _values(view["open"]), "high": _values(view["high"]),
        "low": _values(view["low"]), "close": _values(view["close"]),
        "increasing": {"line": {"color": UP, "width": 1}, "fillcolor": UP},
        "decreasing": {"line": {"color": DOWN, "width": 1}, "fillcolor": DOWN},
        "whiskerwidth": 0,
    })  # fmt: skip
    for column, label in (("sma_20", "SMA 20"), ("sma_50", "SMA 50"), ("sma_200", "SMA 200")):
        add(row, {
            "type": "scatter", "y": _values(view[column]), "name": label, "mode": "lines",
            "line": {"color": SMA_COLORS[column], "width": 1.6}, "connectgaps": False,
        })  # fmt: skip
    # SuperTrend: one trace per direction, None where the other direction (or warm-up)
    # holds, so each colour is drawn only over its own bars, with gaps between runs.
    direction = view["supertrend_direction"]
    supertrend = _values(view["supertrend"])
    for sign, label, color in ((1, "SuperTrend up", ST_UP), (-1, "SuperTrend down", ST_DOWN)):
        mask = (direction == sign).to_numpy().tolist()
        add(row, {
            "type": "scatter", "y": [v if m else None for v, m in zip(supertrend, mask, strict=True)],
            "name": label, "legendgroup": label, "mode": "lines", "connectgaps": False,
            "line": {"color": color, "width": 2.2},
        })  # fmt: skip
        # A one-bar run has no line segment: show it as a dot. The dots are their own trace
        # holding only those bars; markers on the line trace would put an SVG node (size 0)
        # on every bar, which costs render time and draws nothing.
        dots = [i for i in _isolated(mask) if supertrend[i] is not None]
        if dots:
            traces.append({
                "type": "scatter", "x": [x[i] for i in dots], "y": [supertrend[i] for i in dots],
                "name": f"{label} (1 bar)", "legendgroup": label, "showlegend": False,
                "mode": "markers", "marker": {"color": color, "size": ST_DOT_SIZE},
                "xaxis": _axis_key("x", row), "yaxis": _axis_key("y", row),
            })  # fmt: skip

    # ---- volume ------------------------------------------------------------------------
    up_bar = (view["close"] >= view["open"]).to_numpy().tolist()
    add(PANEL_ROW["volume"], {
        "type": "bar", "y": _values(view["volume"]), "name": "Volume", "showlegend": False,
        "marker": {"color": [UP if u else DOWN for u in up_bar], "line": {"width": 0}},
        "opacity": 0.8,
    })  # fmt: skip

    # ---- MACD --------------------------------------------------------------------------
    row = PANEL_ROW["macd"]
    hist = _values(view["macd_hist"])
    add(row, {
        "type": "bar", "y": hist, "name": "MACD hist", "showlegend": False,
        "marker": {
            "color": [HIST_UP if (v is not None and v >= 0) else HIST_DOWN for v in hist],
            "line": {"width": 0},
        },
    })  # fmt: skip
    add(row, {
        "type": "scatter", "y": _values(view["macd"]), "name": "MACD", "showlegend": False,
        "mode": "lines", "line": {"color": MACD_COLOR, "width": 1.6}, "connectgaps": False,
    })  # fmt: skip
    add(row, {
        "type": "scatter", "y": _values(view["macd_signal"]), "name": "MACD signal",
        "showlegend": False, "mode": "lines", "line": {"color": SIGNAL_COLOR, "width": 1.4},
        "connectgaps": False,
    })  # fmt: skip

    # ---- RSI, ATR ----------------------------------------------------------------------
    add(PANEL_ROW["rsi"], {
        "type": "scatter", "y": _values(view["rsi_14"]), "name": "RSI 14", "showlegend": False,
        "mode": "lines", "line": {"color": RSI_COLOR, "width": 1.6}, "connectgaps": False,
    })  # fmt: skip
    add(PANEL_ROW["atr"], {
        "type": "scatter", "y": _values(view["atr_14"]), "name": "ATR 14", "showlegend": False,
        "mode": "lines", "line": {"color": ATR_COLOR, "width": 1.6}, "connectgaps": False,
    })  # fmt: skip

    # ---- axes --------------------------------------------------------------------------
    # Category x: one slot per bar, so non-trading days/weeks leave no holes.
    tickvals, ticktext = _ticks(view.index, timeframe)
    ranges = _panel_ranges(view)
    # a few empty slots right of the last candle, so it does not touch the frame
    x_range = [-0.5, n - 0.5 + (_right_room(n) if right_room is None else float(right_room))]
    layout: dict[str, Any] = {}
    for name, title, _ in PANELS:
        row = PANEL_ROW[name]
        bottom = row == len(PANELS)
        layout[_axis_key("xaxis", row)] = {
            "type": "category", "categoryorder": "array", "categoryarray": x,
            "range": x_range, "rangeslider": {"visible": False},
            "domain": [0.0, 1.0], "anchor": _axis_key("y", row),
            **({} if row == 1 else {"matches": "x"}),
            "tickmode": "array", "tickvals": tickvals, "ticktext": ticktext, "tickangle": 0,
            "showticklabels": bottom, "tickfont": {"size": BASE_FONT},
            "showgrid": True, "gridcolor": GRID, "showline": True, "linecolor": AXIS_LINE,
            "mirror": True, "ticks": "", "showspikes": False,
        }  # fmt: skip
        layout[_axis_key("yaxis", row)] = {
            "domain": domains[row - 1], "anchor": _axis_key("x", row),
            "title": {"text": title, "font": {"size": BASE_FONT}, "standoff": 8},
            "range": ranges[name], "showgrid": True, "gridcolor": GRID, "zeroline": False,
            "showline": True, "linecolor": AXIS_LINE, "mirror": True, "ticks": "",
            "tickfont": {"size": 14}, "nticks": 4,
        }  # fmt: skip
    price_axis = layout[_axis_key("yaxis", PANEL_ROW["price"])]
    price_axis.update(nticks=10, tickformat=".4f" if ranges["price"][1] < 10 else ",.2f")
    volume_ticks = _volume_ticks(ranges["volume"][1])
    layout[_axis_key("yaxis", PANEL_ROW["volume"])].update(
        tickmode="array", tickvals=volume_ticks, ticktext=[_fmt_volume_tick(v) for v in volume_ticks])
    layout[_axis_key("yaxis", PANEL_ROW["rsi"])].update(tickmode="array", tickvals=[30, 70])

    # RSI 30-70 band and guides, MACD zero line (full-width shapes on the panel's y axis).
    rsi_x, rsi_y = _axis_key("x", PANEL_ROW["rsi"]), _axis_key("y", PANEL_ROW["rsi"])
    macd_x, macd_y = _axis_key("x", PANEL_ROW["macd"]), _axis_key("y", PANEL_ROW["macd"])
    shapes: list[dict[str, Any]] = [
        {"type": "rect", "xref": f"{rsi_x} domain", "x0": 0, "x1": 1, "yref": rsi_y,
         "y0": 30, "y1": 70, "fillcolor": "rgba(123, 31, 162, 0.05)", "line": {"width": 0},
         "layer": "below"},
        *({"type": "line", "xref": f"{rsi_x} domain", "x0": 0, "x1": 1, "yref": rsi_y,
           "y0": level, "y1": level, "line": {"color": "#9e9e9e", "width": 1, "dash": "dash"}}
          for level in (30, 70)),
        {"type": "line", "xref": f"{macd_x} domain", "x0": 0, "x1": 1, "yref": macd_y,
         "y0": 0, "y1": 0, "line": {"color": "#bdbdbd", "width": 1}},
    ]  # fmt: skip

    # ---- latest-value labels in the right margin ---------------------------------------
    plot_height_px = height - MARGIN["t"] - MARGIN["b"]
    last = view.iloc[-1]
    last_up = bool(last["close"] >= last["open"])
    dp = _price_decimals(last["close"])
    # dotted line at the last close across the price panel, leading the eye to its label
    if _finite(last["close"]):
        shapes.append({
            "type": "line", "xref": "x domain", "x0": 0, "x1": 1, "yref": "y",
            "y0": float(last["close"]), "y1": float(last["close"]),
            "line": {"color": UP if last_up else DOWN, "width": 1, "dash": "dot"},
        })  # fmt: skip
    st_color = ST_UP if last["supertrend_direction"] == 1 else ST_DOWN
    hist_color = ST_UP if _finite(last["macd_hist"]) and last["macd_hist"] >= 0 else ST_DOWN
    labels: dict[str, list[tuple[Any, str, str]]] = {
        "price": [
            (last["close"], f"<b>close {_fmt_price(last['close'], dp)}</b>", UP if last_up else DOWN),
            (last["sma_20"], f"SMA20 {_fmt_price(last['sma_20'], dp)}", SMA_COLORS["sma_20"]),
            (last["sma_50"], f"SMA50 {_fmt_price(last['sma_50'], dp)}", SMA_COLORS["sma_50"]),
            (last["sma_200"], f"SMA200 {_fmt_price(last['sma_200'], dp)}", SMA_COLORS["sma_200"]),
            (last["supertrend"], f"ST {_fmt_price(last['supertrend'], dp)}", st_color),
        ],
        "volume": [(last["volume"], f"vol {_fmt_volume(last['volume'])}", UP if last_up else DOWN)],
        "macd": [
            (last["macd"], f"MACD {_fmt_osc(last['macd'])}", MACD_COLOR),
            (last["macd_signal"], f"signal {_fmt_osc(last['macd_signal'])}", SIGNAL_COLOR),
            (last["macd_hist"], f"hist {_fmt_osc(last['macd_hist'])}", hist_color),
        ],
        "rsi": [(last["rsi_14"], f"RSI {_fmt_fixed(last['rsi_14'], 1)}", RSI_COLOR)],
        "atr": [(last["atr_14"], f"ATR {_fmt_price(last['atr_14'], dp)}", ATR_COLOR)],
    }
    annotations: list[dict[str, Any]] = []
    for name, items in labels.items():
        row = PANEL_ROW[name]
        lo, hi = ranges[name]
        d0, d1 = domains[row - 1]
        finite = [(float(v), t, c) for v, t, c in items if _finite(v)]
        placed = _spread_labels([v for v, _, _ in finite], lo, hi, (d1 - d0) * plot_height_px, LABEL_GAP_PX)
        for (_, text, color), y in zip(finite, placed, strict=True):
            annotations.append({
                "x": 1.0, "xref": "paper", "xanchor": "left", "xshift": 6,
                "y": y, "yref": _axis_key("y", row), "yanchor": "middle",
                "text": text, "showarrow": False, "align": "left",
                "font": {"size": LABEL_FONT, "color": "#ffffff"},
                "bgcolor": color, "bordercolor": color, "borderpad": 3,
            })  # fmt: skip

    # ---- title, legend, overall style --------------------------------------------------
    as_of_utc = _as_utc(as_of)
    tf_name = TIMEFRAME_NAMES.get(timeframe)
    tf_text = f"{timeframe} ({tf_name})" if tf_name else timeframe
    title = (
        f"<b>{symbol}</b>  ·  {tf_text}  ·  as of {as_of_utc:%Y-%m-%d %H:%M} UTC"
        f"  ·  last close <b>{_fmt_price(last['close'], dp)}</b>"
        f"  ·  last {n} bars {x[0]} → {x[-1]}"
    )
    layout.update(
        width=width,
        height=height,
        template=pio.templates["plotly_white"],  # the object: unvalidated, a name would reach plotly.js as is
        paper_bgcolor="#ffffff",
        plot_bgcolor="#ffffff",
        font={"family": "DejaVu Sans, Arial, sans-serif", "size": BASE_FONT, "color": TEXT},
        title={
            "text": title,
            "x": 0.5,
            "xanchor": "center",
            "y": 1.0,
            "yref": "container",
            "yanchor": "top",
            "pad": {"t": 14},
            "font": {"size": 22},
        },
        # one horizontal row between the title and the price panel: never over the candles
        legend={
            "orientation": "h",
            "x": 0.0,
            "xanchor": "left",
            "y": 1.0,
            "yanchor": "bottom",
            "font": {"size": 14},
            "bgcolor": "rgba(255,255,255,0)",
        },
        margin={**MARGIN, "pad": 2},
        bargap=0.15,
        hovermode=False,
        showlegend=True,
        shapes=shapes,
        annotations=annotations,
    )
    # Not validated property by property: plotly's checks cost 30-50 ms of CPU a chart (most of
    # building it) and find nothing in a figure this module always builds the same way. The
    # tests rebuild every figure with validation and compare (test_chart_figure.py).
    return go.Figure(data=traces, layout=layout, _validate=False)


# ---- decision chart --------------------------------------------------------------------

ZONE_RISK = "rgba(239, 83, 80, 0.16)"
ZONE_REWARD = "rgba(38, 166, 154, 0.16)"
ENTRY_COLOR = "#455a64"
STOP_COLOR = "#c62828"
TARGET_COLOR = "#1b7f3b"
FILL_BUY = "#1e63d6"
FILL_SELL = "#e65100"
DECISION_ROOM_SHARE = 0.15  # the position tool's zones need room right of the last candle
DECISION_ROOM_MIN_BARS = 12
LEVEL_LABEL_GAP_PX = 26
NO_LEVEL_ACTIONS = frozenset({"HOLD", "NO_TRADE"})


def decision_has_levels(action: Any, entry: float | None, stop: float | None) -> bool:
    """Whether a decision chart draws levels (zones, entry, stop, targets): a BUY or SELL with a
    finite entry and stop apart. Without them, and without fills, it is the daily chart alone."""
    return (str(getattr(action, "value", action)).upper() not in NO_LEVEL_ACTIONS and _finite(entry)
            and _finite(stop) and entry != stop)


@dataclass(frozen=True)
class ChartFill:
    """One execution to mark on a decision chart: when, at what price, which side, how many."""

    time: datetime
    price: float
    side: str  # "BUY" | "SELL"
    quantity: float
    label: str = ""  # e.g. "entry", "stop", "target"; shown before the side


def build_decision_figure(
    frame: pd.DataFrame,
    symbol: str,
    as_of: datetime,
    *,
    action: Any,
    entry: float | None,
    stop: float | None,
    targets: Sequence[float] = (),
    r_multiple: float | None = None,
    fills: Iterable[ChartFill] = (),
    timeframe: str = "1d",
    bars_shown: int | None = None,
    width: int = 1920,
    height: int = 1080,
) -> go.Figure:
    """The daily chart of `frame` with the decision drawn on it (see the module docstring).

    `action` is an Action or its value. BUY/SELL with entry and stop get the zones, one line per
    level (entry, stop, each target) labelled with its price and R multiple (|level - entry| /
    |entry - stop|), and the decision's `r_multiple` in the title. HOLD, NO_TRADE, or a trade
    without entry/stop gets no levels and a title saying so. `fills` are drawn as markers at
    their session and price; a fill after the last bar gets its own slot right of it.
    """
    _check_frame(frame, symbol, timeframe)
    action_name = str(getattr(action, "value", action)).upper()
    fills = sorted(fills, key=lambda f: _as_utc(f.time))
    window = frame.iloc[-(bars_shown or DEFAULT_BARS_SHOWN.get(timeframe, FALLBACK_BARS_SHOWN)):]
    labels = _x_labels(window.index, timeframe)
    fill_slots, extra_slots = _fill_slots(fills, labels, timeframe)
    n = len(labels)
    has_levels = decision_has_levels(action_name, entry, stop)
    room = _right_room(n) + len(extra_slots)
    dp = _price_decimals(entry if _finite(entry) else window["close"].iloc[-1])
    if has_levels:  # the zones and their labels need room
        room = max(DECISION_ROOM_MIN_BARS, math.ceil(n * DECISION_ROOM_SHARE), len(extra_slots) + 4)
        if extra_slots:  # the level labels (right-aligned at the end) start after the fills' slots
            share = min(0.5, _level_label_px(_fmt_price(float(entry), dp)) / (width - MARGIN["l"] - MARGIN["r"]))
            room = max(room, math.ceil((len(extra_slots) + 1 + share * n) / (1 - share)))
    fig = build_chart_figure(frame, symbol, timeframe, as_of, bars_shown=len(window),
                             width=width, height=height, right_room=room)
    if extra_slots:  # sessions after the last bar that hold fills
        categories = labels + extra_slots
        for axis in [k for k in fig.layout.to_plotly_json() if k.startswith("xaxis")]:
            fig.layout[axis].categoryarray = categories

    x_end = n - 0.5 + room
    levels: list[tuple[float, str, str]] = []
    if has_levels:
        entry, stop = float(entry), float(stop)
        risk = abs(entry - stop)
        first_target = next((float(t) for t in targets if _finite(t)), None)
        # the zones start at the last closed bar: the order works from the next session on
        zones = [(stop, ZONE_RISK)] + ([(first_target, ZONE_REWARD)] if first_target is not None else [])
        for level, color in zones:
            fig.add_shape(type="rect", xref="x", yref="y", x0=n - 1, x1=x_end, y0=entry, y1=level,
                          fillcolor=color, line={"width": 0}, layer="below")
        levels.append((entry, f"<b>{action_name} entry {_fmt_price(entry, dp)}</b>", ENTRY_COLOR))
        levels.append((stop, f"stop {_fmt_price(stop, dp)}  ·  −1R ({_fmt_price(risk, dp)})", STOP_COLOR))
        finite_targets = [float(t) for t in targets if _finite(t)]
        for i, target in enumerate(finite_targets, 1):
            name = "target" if len(finite_targets) == 1 else f"target {i}"
            levels.append((target, f"{name} {_fmt_price(target, dp)}  ·  +{abs(target - entry) / risk:.2f}R", TARGET_COLOR))
        for level, _, color in levels:
            fig.add_shape(type="line", xref="x domain", x0=0, x1=1, yref="y", y0=level, y1=level,
                          line={"color": color, "width": 1.4, "dash": "dash"})
    # the price axis shows every level and fill
    lo, hi = fig.layout.yaxis.range
    values = [v for v, _, _ in levels] + [float(f.price) for f in fills if _finite(f.price)]
    if values and (min(values) < lo or max(values) > hi):
        lo, hi = min(lo, *values), max(hi, *values)
        pad = (hi - lo) * 0.03
        lo, hi = lo - pad, hi + pad
        fig.layout.yaxis.range = [lo, hi]
    if levels:
        domain = fig.layout.yaxis.domain
        panel_px = (domain[1] - domain[0]) * (height - MARGIN["t"] - MARGIN["b"])
        placed = _spread_labels([v for v, _, _ in levels], lo, hi, panel_px, LEVEL_LABEL_GAP_PX)
        for (_, text, color), y in zip(levels, placed, strict=True):
            fig.add_annotation(x=x_end, xref="x", xanchor="right", xshift=-4, y=y, yref="y",
                               yanchor="middle", text=text, showarrow=False, align="right",
                               font={"size": LABEL_FONT, "color": "#ffffff"}, bgcolor=color,
                               bordercolor=color, borderpad=3)

    for side, color, symbol_name in (("BUY", FILL_BUY, "triangle-up"), ("SELL", FILL_SELL, "triangle-down")):
        marks = [(slot, f) for slot, f in zip(fill_slots, fills, strict=True)
                 if slot is not None and f.side.upper() == side and _finite(f.price)]
        if not marks:
            continue
        fig.add_trace({
            "type": "scatter", "mode": "markers+text", "name": f"{side.lower()} fill",
            "x": [slot for slot, _ in marks], "y": [float(f.price) for _, f in marks],
            "text": [f"{(f.label + ' ').lstrip()}{side} {f.quantity:g} @ {_fmt_price(f.price, dp)}"
                     f" ({_as_utc(f.time).astimezone(_exchange_zone()):%b %d})" for _, f in marks],
            "textposition": [_fill_text_position(f, fills, slot in extra_slots) for slot, f in marks],
            "textfont": {"size": LABEL_FONT, "color": color},
            "marker": {"symbol": symbol_name, "size": 16, "color": color, "line": {"color": "#ffffff", "width": 1}},
            "xaxis": "x", "yaxis": "y",
        })  # fmt: skip

    as_of_text = f"{_as_utc(as_of):%Y-%m-%d %H:%M} UTC"
    if has_levels:
        r_text = f"  ·  R <b>{r_multiple:.2f}</b>" if _finite(r_multiple) else ""
        headline = (f"<b>{symbol}</b>  ·  decision <b>{action_name}</b>  ·  as of {as_of_text}"
                    f"  ·  entry {_fmt_price(entry, dp)}  ·  stop {_fmt_price(stop, dp)}{r_text}")
    elif action_name in NO_LEVEL_ACTIONS:
        headline = f"<b>{symbol}</b>  ·  decision <b>{action_name}</b>: no trade, no levels  ·  as of {as_of_text}"
    else:
        headline = (f"<b>{symbol}</b>  ·  decision <b>{action_name}</b> without entry and stop: "
                    f"no levels  ·  as of {as_of_text}")
    fig.layout.title.text = headline
    return fig


def _level_label_px(price_text: str) -> float:
    """About how wide a level label is (the longest: "stop <price>  ·  −1R (<risk>)" or a
    target's), in pixels at LABEL_FONT, with its padding and shift."""
    return (20 + 2 * len(price_text)) * 0.6 * LABEL_FONT + 14


def _fill_text_position(fill: ChartFill, fills: Sequence[ChartFill], after_last_bar: bool) -> str:
    """Where a fill's text goes: away from the nearest other fill by price (an entry and its stop
    are often close), else below a buy and above a sell; left of a marker after the last bar, so
    it runs over the last candles rather than under the level labels at the right."""
    others = [float(o.price) for o in fills if o is not fill and _finite(o.price)]
    if others:
        nearest = min(others, key=lambda price: abs(price - float(fill.price)))
        vertical = "top" if nearest <= float(fill.price) else "bottom"
    else:
        vertical = "bottom" if fill.side.upper() == "BUY" else "top"
    return f"{vertical} {'left' if after_last_bar else 'center'}"


def _exchange_zone():
    from zoneinfo import ZoneInfo

    return ZoneInfo(EXCHANGE_TZ)


def _fill_slots(fills: Sequence[ChartFill], labels: list[str], timeframe: str) -> tuple[list[Any], list[str]]:
    """The x slot (category label) of each fill and the labels of sessions after the window.

    A fill sits on the bar of its session date (New York); a date between two bars (no
    session) on the bar before; a date after the last bar on a new slot of its own; a date
    before the window nowhere (None).
    """
    import pandas as pd

    slots: list[Any] = []
    extra: list[str] = []
    if not labels:
        return [None] * len(fills), extra
    first, last = labels[0], labels[-1]
    for f in fills:
        day = _x_labels(pd.DatetimeIndex([_as_utc(f.time)]), timeframe if timeframe in SESSION_TIMEFRAMES else "1d")[0]
        if day < first:
            slots.append(None)
        elif day in labels:
            slots.append(day)
        elif day > last:
            if day not in extra:
                extra.append(day)
            slots.append(day)
        else:
            slots.append(max(label for label in labels if label <= day))
    return slots, sorted(extra)


# ---- helpers ---------------------------------------------------------------------------


def _check_frame(frame: pd.DataFrame, symbol: str, timeframe: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise BarDataError(
            f"Cannot chart {symbol} {timeframe}: the indicator frame lacks columns {missing}.",
            "Build the chart from the output of indicator_frames (it adds every indicator "
            "column); do not pass raw bars.",
        )
    if len(frame) == 0:
        raise BarDataError(
            f"Cannot chart {symbol} {timeframe}: the indicator frame has no bars.",
            "Check that market_bars returned bars for this symbol and timeframe.",
        )


def _row_domains(heights: Sequence[float], spacing: float) -> list[list[float]]:
    """Paper-y domains, top row first (what make_subplots computes for row_heights)."""
    usable = 1.0 - spacing * (len(heights) - 1)
    total = sum(heights)
    top = 1.0
    out = []
    for h in heights:
        size = usable * h / total
        out.append([max(0.0, top - size), top])
        top -= size + spacing
    return out


def _axis_key(prefix: str, row: int) -> str:
    return prefix if row == 1 else f"{prefix}{row}"


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _values(series: pd.Series) -> list[float | None]:
    """Floats with NaN replaced by None (plotly leaves a gap; JSON stays valid)."""
    return [float(v) if _finite(v) else None for v in series.to_numpy()]


def _isolated(mask: Sequence[bool]) -> list[int]:
    """Positions of one-bar runs: True with False (or the window's edge) on both sides."""
    n = len(mask)
    return [
        i for i, m in enumerate(mask)
        if m and (i == 0 or not mask[i - 1]) and (i == n - 1 or not mask[i + 1])
    ]  # fmt: skip


def _session_dates(index: pd.DatetimeIndex, timeframe: str) -> pd.DatetimeIndex | None:
    """For daily and weekly bars: each bar's session date on the exchange's clock, else None.

    Daily and weekly bars are stamped with their (first) session's open in UTC; the date a
    trader knows them by is that session's date in New York (the calendar every mode uses).
    Bars all stamped at midnight UTC are dates already and keep them.
    """
    if timeframe not in SESSION_TIMEFRAMES:
        return None
    naive = index.tz_convert("UTC").tz_localize(None) if index.tz is not None else index
    if all(ts.hour == 0 and ts.minute == 0 for ts in naive):
        return naive  # date-only stamps (midnight UTC): the date is the session's
    return index.tz_convert(EXCHANGE_TZ).tz_localize(None).normalize() if index.tz is not None else naive.normalize()


def _x_labels(index: pd.DatetimeIndex, timeframe: str) -> list[str]:
    """Category labels, one per bar: the session date for daily/weekly bars, else the UTC start."""
    dates = _session_dates(index, timeframe)
    if dates is not None:
        return [ts.strftime("%Y-%m-%d") for ts in dates]
    if all(ts.hour == 0 and ts.minute == 0 for ts in index):
        return [ts.strftime("%Y-%m-%d") for ts in index]
    return [ts.strftime("%Y-%m-%d %H:%M") for ts in index]


def _ticks(index: pd.DatetimeIndex, timeframe: str) -> tuple[list[str], list[str]]:
    """Tick positions at calendar boundaries: the finest step giving <= MAX_TICKS ticks."""
    labels = _x_labels(index, timeframe)
    dates = _session_dates(index, timeframe)
    stamps = list(dates if dates is not None else index)  # Timestamps once: indexing pandas per bar is slow
    # (key function for the period a bar belongs to, label format)
    steps: list[tuple[Any, str]] = [
        (lambda t: (t.isocalendar()[0], t.isocalendar()[1]), "%b %d"),
        (lambda t: (t.year, t.month, t.day >= 15), "%b %d"),
        (lambda t: (t.year, t.month), "%b %Y"),
        (lambda t: (t.year, (t.month - 1) // 2), "%b %Y"),
        (lambda t: (t.year, (t.month - 1) // 3), "%b %Y"),
        (lambda t: (t.year, (t.month - 1) // 6), "%b %Y"),
        (lambda t: t.year, "%Y"),
    ]
    chosen: list[int] = []
    fmt = "%Y"
    for key, fmt in steps:
        keys = [key(t) for t in stamps]
        starts = [i for i in range(1, len(stamps)) if keys[i] != keys[i - 1]]
        if len(starts) <= MAX_TICKS:
            chosen = starts
            break
    if not chosen:  # very long history: thin the yearly ticks evenly
        starts = [i for i in range(1, len(stamps)) if stamps[i].year != stamps[i - 1].year]
        stride = max(1, math.ceil(len(starts) / MAX_TICKS))
        chosen, fmt = starts[::stride], "%Y"
    texts = []
    for k, i in enumerate(chosen):
        text = stamps[i].strftime(fmt)
        # sub-year labels carry the year on the first tick and wherever the year changes
        if "%Y" not in fmt and (k == 0 or stamps[i].year != stamps[chosen[k - 1]].year):
            text += f"<br>{stamps[i].year}"
        texts.append(text)
    return [labels[i] for i in chosen], texts


def _span(values: Sequence[float], pad_frac: float, fallback: tuple[float, float]) -> list[float]:
    finite = [float(v) for v in values if _finite(v)]
    if not finite:
        return list(fallback)
    lo, hi = min(finite), max(finite)
    if hi == lo:
        pad = abs(hi) * 0.01 or 1.0
    else:
        pad = (hi - lo) * pad_frac
    return [lo - pad, hi + pad]


def _panel_ranges(view: pd.DataFrame) -> dict[str, list[float]]:
    price_cols = ["low", "high", "sma_20", "sma_50", "sma_200", "bb_upper", "bb_lower", "supertrend"]
    price_vals = [v for c in price_cols for v in view[c].to_numpy()]
    macd_vals = [v for c in ("macd", "macd_signal", "macd_hist") for v in view[c].to_numpy()]
    macd = _span(macd_vals + [0.0], 0.08, (-1.0, 1.0))
    vol = [float(v) for v in view["volume"].to_numpy() if _finite(v)]
    atr = _span(view["atr_14"].to_numpy(), 0.1, (0.0, 1.0))
    rsi = _span(view["rsi_14"].to_numpy(), 0.0, (50.0, 50.0))
    rsi = [max(0.0, rsi[0] - 5.0), min(100.0, rsi[1] + 5.0)]
    return {
        "price": _span(price_vals, 0.04, (0.0, 1.0)),
        "volume": [0.0, (max(vol) if vol else 1.0) * 1.08 or 1.0],
        "macd": macd,
        # 20..80 always visible (so 30/70 are), wider only when RSI goes there
        "rsi": [min(15.0, rsi[0]), max(85.0, rsi[1])],
        "atr": [max(0.0, atr[0]), atr[1]],
    }


def _spread_labels(values: Sequence[float], lo: float, hi: float, panel_px: float, gap_px: float) -> list[float]:
    """Y positions (data units) near `values`, at least `gap_px` apart, inside [lo, hi]."""
    if not values:
        return []
    span = hi - lo
    if span <= 0 or panel_px <= 0:
        return list(values)
    gap = gap_px * span / panel_px
    half = gap / 2
    order = sorted(range(len(values)), key=lambda i: values[i])
    pos = [min(max(values[i], lo + half), hi - half) for i in order]
    for k in range(1, len(pos)):  # push up
        pos[k] = max(pos[k], pos[k - 1] + gap)
    if pos[-1] > hi - half:  # pushed past the top: push back down from the top
        pos[-1] = hi - half
        for k in range(len(pos) - 2, -1, -1):
            pos[k] = min(pos[k], pos[k + 1] - gap)
    out = [0.0] * len(values)
    for k, i in enumerate(order):
        out[i] = pos[k]
    return out


def _as_utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


def _price_decimals(close: Any) -> int:
    """2 decimals for stocks; 4 when the price is below 10 (FX pairs, penny stocks)."""
    return 2 if _finite(close) and abs(float(close)) >= 10 else 4


def _fmt_price(v: Any, decimals: int) -> str:
    return f"{float(v):.{decimals}f}" if _finite(v) else "n/a"


def _fmt_osc(v: Any) -> str:
    if not _finite(v):
        return "n/a"
    v = float(v)
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.4f}"


def _fmt_fixed(v: Any, digits: int) -> str:
    return f"{float(v):.{digits}f}" if _finite(v) else "n/a"


def _fmt_volume(v: Any) -> str:
    if not _finite(v):
        return "n/a"
    v = float(v)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suffix}"
    return f"{v:.0f}"


def _right_room(bars: int) -> float:
    """Empty category slots right of the last candle: ~3 % of the window, at least 2."""
    return float(max(RIGHT_ROOM_MIN_BARS, math.ceil(bars * RIGHT_ROOM_SHARE)))


def _volume_ticks(top: float) -> list[float]:
    """0 and two or three round steps (1, 2, 2.5, 5 x 10^k) up to `top`: the largest round step
    that fits twice (the next one up is at most twice as big, so at most three fit)."""
    if not _finite(top) or top <= 0:
        return [0.0]
    half = top / 2
    magnitude = 10 ** math.floor(math.log10(half))
    step = max(m * scale for scale in (magnitude / 10, magnitude) for m in (1, 2, 2.5, 5) if m * scale <= half)
    return [float(step * i) for i in range(int(top // step) + 1)]


def _fmt_volume_tick(v: float) -> str:
    """Compact volume: 0, 500K, 1.2M, 2.5B (no trailing .0)."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.2f}".rstrip("0").rstrip(".") + suffix
    return f"{v:g}"
