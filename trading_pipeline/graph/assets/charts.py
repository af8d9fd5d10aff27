"""Chart images: a multi-panel PNG per symbol × timeframe, stored in the chart store."""

import dagster as dg

from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.errors import UserError
from trading_pipeline.graph.assets.common import ChartImageRef, fail, thumbnail_markdown
from trading_pipeline.graph.resources import ChartRendererResource, ChartStoreResource, TradingDatabaseResource


def build_chart_assets(symbol_timeframe) -> list:
    @dg.asset(
        partitions_def=symbol_timeframe,
        group_name="trading",
        retry_policy=dg.RetryPolicy(max_retries=1, delay=2),
        description="A multi-panel chart PNG in the chart store; thumbnail and location in the metadata.",
    )
    def chart_images(
        context: dg.AssetExecutionContext,
        indicator_frames: MarketFrame,
        chart_renderer: ChartRendererResource,
        chart_store: ChartStoreResource,
        trading_db: TradingDatabaseResource,
    ):
        from trading_pipeline.adapters.chart_store import chart_key
        from trading_pipeline.adapters.records import record_chart
        from trading_pipeline.core.chart_figure import build_chart_figure

        frames = indicator_frames
        figure = build_chart_figure(frames.frame, frames.symbol, frames.timeframe, frames.as_of,
                                    width=chart_renderer.width, height=chart_renderer.height)
        try:
            png = chart_renderer.renderer().render_png(figure, chart_renderer.width, chart_renderer.height)
        except UserError as error:
            raise fail(error) from None
        stored = chart_store.store().put_png(chart_key(frames.symbol, frames.timeframe, frames.as_of), png)
        ref = ChartImageRef(frames.symbol, frames.timeframe, frames.as_of, stored.uri, stored.key,
                            stored.sha256, stored.size_bytes, chart_renderer.width, chart_renderer.height)
        record_chart(trading_db.sessions(), key=ref.key, symbol=ref.symbol, timeframe=ref.timeframe, as_of=ref.as_of,
                     uri=ref.uri, sha256=ref.sha256, size_bytes=ref.size_bytes, width=ref.width, height=ref.height)
        return dg.MaterializeResult(
            value=ref,
            metadata={
                "thumbnail": dg.MetadataValue.md(thumbnail_markdown(png)),
                # an http(s) link a browser opens (it refuses file:// from a web page)
                "chart": dg.MetadataValue.url(chart_store.store().public_url(stored.key)),
                "sha256": stored.sha256,
                "size_bytes": stored.size_bytes,
                "pixels": f"{chart_renderer.width}x{chart_renderer.height}",
            },
        )

    return [chart_images]
