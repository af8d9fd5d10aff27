"""The decision drawn on its daily chart (entry, stop, targets, R; fills once the sync sees them),
stored and linked like the other charts. Used by trade_decisions (a batched run draws all its
decisions' charts as one batch) and, with fills, by the sync.

Only a decision with levels (a BUY or SELL with entry and stop) or fills is drawn. A HOLD or
NO_TRADE chart would be the daily chart again with a title (the 1d analysis chart, linked on the
decision), and drawing one costs a render (~0.2 s of two busy cores here): at the open, the orders
of the few actionable symbols would wait for the charts of all the others (bench/daemon.py)."""

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import dagster as dg

from trading_pipeline.core.analysis import TradeDecision
from trading_pipeline.errors import UserError
from trading_pipeline.graph.assets.common import thumbnail_markdown
from trading_pipeline.graph.resources import ChartRendererResource, ChartStoreResource

NOTHING_TO_DRAW = object()  # a decision chart skipped: no levels and no fills (see the module doc)


@dataclass(frozen=True)
class DecisionChart:
    """What to draw: the decision on its daily bars (with indicators), and the fills seen so far."""

    decision: TradeDecision
    daily_frame: object  # pandas DataFrame
    fills: Sequence = field(default=())


def decision_chart_key(decision: TradeDecision) -> str:
    from trading_pipeline.adapters.chart_store import chart_key

    return chart_key(decision.symbol, "decision", decision.as_of).replace(".png", f"-{decision.decision_id}.png")


def render_decision_chart(decision: TradeDecision, daily_frame, renderer: ChartRendererResource,
                          store: ChartStoreResource, fills=(), log=None) -> dict:
    """Metadata entries for the decision chart: a link that opens in a browser and a thumbnail.
    A chart that cannot be drawn never fails the decision: the entry says why instead."""
    return render_decision_charts([DecisionChart(decision, daily_frame, fills)], renderer, store, log)[0]


def render_decision_charts(charts: Sequence[DecisionChart], renderer: ChartRendererResource,
                           store: ChartStoreResource, log=None) -> list[dict]:
    """`render_decision_chart` for many decisions, through one browser: each figure is built while
    the ones before it render, and stored while later ones render. Any error (also an unexpected
    one) leaves that chart undrawn, never the decision undecided."""
    from trading_pipeline.core.chart_figure import build_decision_figure, decision_has_levels

    # A PNG Future, the error that left a chart undrawn, or NOTHING_TO_DRAW.
    results: list = [NOTHING_TO_DRAW if not chart.fills and not decision_has_levels(
        chart.decision.action, chart.decision.entry, chart.decision.stop) else None for chart in charts]
    drawn: list[int] = []

    def figures():
        for i, chart in enumerate(charts):
            if results[i] is NOTHING_TO_DRAW:
                continue
            decision = chart.decision
            try:
                figure = build_decision_figure(
                    chart.daily_frame, decision.symbol, decision.as_of, action=decision.action, entry=decision.entry,
                    stop=decision.stop, targets=decision.targets, r_multiple=decision.r_multiple, fills=chart.fills,
                    width=renderer.width, height=renderer.height)
            except Exception as error:  # noqa: BLE001 - that chart's failure, reported in its metadata
                results[i] = error
                continue
            drawn.append(i)
            yield figure

    if any(result is None for result in results):  # no browser asked for when nothing is to be drawn
        try:  # each figure built while the ones before it render; stored below while later ones render
            futures = renderer.renderer().render_each_pipelined(figures(), renderer.width, renderer.height)
            for i, future in zip(drawn, futures, strict=True):
                results[i] = future
        except Exception as error:  # noqa: BLE001 - the browser itself: no chart drawn, decisions go on
            results = [result if isinstance(result, Exception) or result is NOTHING_TO_DRAW else error
                       for result in results]
            drawn = []
    chart_store = store.store() if drawn else None
    metadata = []
    for chart, result in zip(charts, results, strict=True):
        if result is NOTHING_TO_DRAW:
            metadata.append({"decision_chart": dg.MetadataValue.text(
                f"not drawn: {chart.decision.action.value} has no entry and stop to draw; the daily chart is the "
                "1d analysis chart (chart_links)")})
            continue
        try:
            png = result.result() if isinstance(result, Future) else result
            if isinstance(png, Exception):
                raise png
            stored = chart_store.put_png(decision_chart_key(chart.decision), png)
            metadata.append({"decision_chart": dg.MetadataValue.url(chart_store.public_url(stored.key)),
                             "decision_thumbnail": dg.MetadataValue.md(thumbnail_markdown(png))})
        except Exception as error:  # noqa: BLE001 - see the docstring
            problem = error.problem if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            if log is not None:
                log.warning(f"{chart.decision.symbol}: no decision chart: {problem}")
            metadata.append({"decision_chart": dg.MetadataValue.text(f"not drawn: {problem}")})
    return metadata
