"""The decision drawn on its daily chart (entry, stop, targets, R; fills once the sync sees them),
stored and linked like the other charts. Used by trade_decisions (a batched run draws all its
decisions' charts as one batch) and, with fills, by the sync."""

from collections.abc import Sequence
from dataclasses import dataclass, field

import dagster as dg

from trading_pipeline.core.analysis import TradeDecision
from trading_pipeline.errors import UserError
from trading_pipeline.graph.assets.common import thumbnail_markdown
from trading_pipeline.graph.resources import ChartRendererResource, ChartStoreResource


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
    """`render_decision_chart` for many decisions, rendered as one batch through one browser. Any
    error (also an unexpected one) leaves that chart undrawn, never the decision undecided."""
    from trading_pipeline.core.chart_figure import build_decision_figure

    results: list = [None] * len(charts)
    figures = {}
    for i, chart in enumerate(charts):
        decision = chart.decision
        try:
            figures[i] = build_decision_figure(
                chart.daily_frame, decision.symbol, decision.as_of, action=decision.action, entry=decision.entry,
                stop=decision.stop, targets=decision.targets, r_multiple=decision.r_multiple, fills=chart.fills,
                width=renderer.width, height=renderer.height)
        except Exception as error:  # noqa: BLE001 - that chart's failure, reported in its metadata
            results[i] = error
    if figures:
        try:
            rendered = renderer.renderer().render_each(list(figures.values()), renderer.width, renderer.height)
        except Exception as error:  # noqa: BLE001 - the browser itself: no chart drawn, decisions go on
            rendered = [error] * len(figures)
        for i, png in zip(figures, rendered, strict=True):
            results[i] = png
    chart_store = store.store() if figures else None
    metadata = []
    for chart, png in zip(charts, results, strict=True):
        try:
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
