"""Decision charts in a batch: a decision with levels (or fills) is drawn and stored; a HOLD or
NO_TRADE is not (it would be the 1d analysis chart again) and costs no render, so the orders of a
decide run do not wait for pictures of the symbols that trade nothing."""

from concurrent.futures import Future
from datetime import UTC, datetime

from trading_pipeline.core.analysis import Action, TradeDecision
from trading_pipeline.core.chart_figure import ChartFill
from trading_pipeline.graph.assets.decision_chart import DecisionChart, render_decision_charts
from trading_pipeline.graph.resources import ChartStoreResource
from trading_pipeline_tests.core.test_chart_figure import make_indicator_frame

AS_OF = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


def decision(symbol: str, action: Action, entry: float | None = 100.0, stop: float | None = 96.0) -> TradeDecision:
    return TradeDecision(decision_id=f"d-{symbol}", strategy="s", symbol=symbol, as_of=AS_OF, data_through=AS_OF,
                         proposed_action=action, action=action, entry=entry, stop=stop,
                         targets=[106.0] if entry is not None else [], r_multiple=1.5 if entry is not None else None,
                         profit_margin=0.06, confidence=0.7, quantity=50 if entry is not None else 0,
                         rationale="test", account_equity=100_000.0)


class RecordingRenderer:
    """The chart renderer resource's shape; records the figures it was given, renders nothing."""

    width, height = 1280, 720

    def __init__(self):
        self.asked = 0
        self.titles: list[str] = []

    def renderer(self):
        self.asked += 1
        return self

    def render_each_pipelined(self, figs, width, height):
        futures = []
        for fig in figs:
            self.titles.append(fig.layout.title.text)
            future = Future()
            future.set_result(PNG)
            futures.append(future)
        return futures


def test_only_decisions_with_levels_or_fills_are_drawn(tmp_path, monkeypatch):
    monkeypatch.setattr("trading_pipeline.graph.assets.decision_chart.thumbnail_markdown", lambda png: "![t](x)")
    frame = make_indicator_frame(300, "1d")
    store = ChartStoreResource(mode="local", local_dir=str(tmp_path))
    renderer = RecordingRenderer()
    fill = ChartFill(AS_OF, 100.0, "BUY", 50, "entry")
    charts = [DecisionChart(decision("AAA", Action.HOLD, None, None), frame),
              DecisionChart(decision("BBB", Action.BUY), frame),
              DecisionChart(decision("CCC", Action.NO_TRADE, None, None), frame),
              DecisionChart(decision("DDD", Action.SELL, 100.0, 100.0), frame),  # entry = stop: no levels
              DecisionChart(decision("EEE", Action.HOLD, None, None), frame, fills=[fill])]  # the sync's redraw
    metadata = render_decision_charts(charts, renderer, store)

    assert [("BBB" in t, "EEE" in t) for t in renderer.titles] == [(True, False), (False, True)]
    drawn = {chart.decision.symbol: entry for chart, entry in zip(charts, metadata, strict=True)}
    for symbol in ("BBB", "EEE"):
        assert drawn[symbol]["decision_chart"].value.endswith(f"-d-{symbol}.png")
        assert "decision_thumbnail" in drawn[symbol]
    assert len(list(tmp_path.rglob("*.png"))) == 2
    for symbol, action in (("AAA", "HOLD"), ("CCC", "NO_TRADE"), ("DDD", "SELL")):
        text = drawn[symbol]["decision_chart"].value
        assert text.startswith(f"not drawn: {action} has no entry and stop") and "1d analysis chart" in text
        assert "decision_thumbnail" not in drawn[symbol]


def test_no_browser_is_asked_for_when_no_decision_has_anything_to_draw(tmp_path):
    renderer = RecordingRenderer()
    frame = make_indicator_frame(300, "1d")
    metadata = render_decision_charts([DecisionChart(decision(s, Action.HOLD, None, None), frame) for s in "XY"],
                                      renderer, ChartStoreResource(mode="local", local_dir=str(tmp_path)))
    assert renderer.asked == 0 and renderer.titles == []
    assert all(m["decision_chart"].value.startswith("not drawn: HOLD") for m in metadata)
