"""The decision drawn on its daily chart (entry, stop, targets, R; fills once the sync sees them),
stored and linked like the other charts. Used by trade_decisions and, with fills, by the sync."""

import dagster as dg

from trading_pipeline.core.analysis import TradeDecision
from trading_pipeline.errors import UserError
from trading_pipeline.graph.assets.common import thumbnail_markdown
from trading_pipeline.graph.resources import ChartRendererResource, ChartStoreResource


def decision_chart_key(decision: TradeDecision) -> str:
    from trading_pipeline.adapters.chart_store import chart_key

    return chart_key(decision.symbol, "decision", decision.as_of).replace(".png", f"-{decision.decision_id}.png")


def render_decision_chart(decision: TradeDecision, daily_frame, renderer: ChartRendererResource,
                          store: ChartStoreResource, fills=(), log=None) -> dict:
    """Metadata entries for the decision chart: a link that opens in a browser and a thumbnail.
    A chart that cannot be drawn never fails the decision: the entry says why instead."""
    from trading_pipeline.core.chart_figure import build_decision_figure

    try:
        figure = build_decision_figure(
            daily_frame, decision.symbol, decision.as_of, action=decision.action, entry=decision.entry,
            stop=decision.stop, targets=decision.targets, r_multiple=decision.r_multiple, fills=fills,
            width=renderer.width, height=renderer.height)
        png = renderer.renderer().render_png(figure, renderer.width, renderer.height)
        chart_store = store.store()
        stored = chart_store.put_png(decision_chart_key(decision), png)
        url = chart_store.public_url(stored.key)
    except UserError as error:
        if log is not None:
            log.warning(f"{decision.symbol}: no decision chart: {error.problem}")
        return {"decision_chart": dg.MetadataValue.text(f"not drawn: {error.problem}")}
    return {"decision_chart": dg.MetadataValue.url(url),
            "decision_thumbnail": dg.MetadataValue.md(thumbnail_markdown(png))}
