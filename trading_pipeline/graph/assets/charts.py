"""Chart images: a multi-panel PNG per symbol × timeframe, stored in the chart store. A batched
run renders all its charts through one Chromium, building and storing some while others render."""

import os
from concurrent.futures import Future

import dagster as dg

from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.graph.assets.batch import (
    BATCH_POLICY,
    PartitionOutcome,
    materialize_partitions,
    partition_keys,
)
from trading_pipeline.graph.assets.common import ChartImageRef, thumbnail_markdown
from trading_pipeline.graph.resources import ChartRendererResource, ChartStoreResource, TradingDatabaseResource


def build_chart_assets(symbol_timeframe) -> list:
    # On Celery (TRADING_EXECUTOR=celery), charts can go to the workers that have Chromium: those
    # started with `-q <TRADING_CELERY_CHART_QUEUE>` (default: the queue every step goes to).
    chart_queue = os.environ.get("TRADING_CELERY_CHART_QUEUE", "").strip()

    @dg.asset(
        partitions_def=symbol_timeframe,
        group_name="trading",
        op_tags={"dagster-celery/queue": chart_queue} if chart_queue else None,
        retry_policy=dg.RetryPolicy(max_retries=1, delay=2),
        backfill_policy=BATCH_POLICY,
        description="A multi-panel chart PNG in the chart store; thumbnail and location in the metadata.",
    )
    def chart_images(
        context: dg.AssetExecutionContext,
        indicator_frames,
        chart_renderer: ChartRendererResource,
        chart_store: ChartStoreResource,
        trading_db: TradingDatabaseResource,
    ):
        from trading_pipeline.adapters.chart_store import chart_key
        from trading_pipeline.adapters.records import record_chart

        keys = partition_keys(context)
        frames_by_key = indicator_frames if len(keys) > 1 else {keys[0]: indicator_frames}
        pngs = render_all(chart_renderer, {key: frames for key, frames in frames_by_key.items()
                                           if isinstance(frames, MarketFrame)})
        store, sessions = chart_store.store(), trading_db.sessions()

        def store_chart(key: str, frames: MarketFrame) -> PartitionOutcome:
            png = pngs[key].result()  # the later charts still render meanwhile
            if isinstance(png, Exception):
                raise png
            stored = store.put_png(chart_key(frames.symbol, frames.timeframe, frames.as_of), png)
            ref = ChartImageRef(frames.symbol, frames.timeframe, frames.as_of, stored.uri, stored.key,
                                stored.sha256, stored.size_bytes, chart_renderer.width, chart_renderer.height)
            record_chart(sessions, key=ref.key, symbol=ref.symbol, timeframe=ref.timeframe, as_of=ref.as_of,
                         uri=ref.uri, sha256=ref.sha256, size_bytes=ref.size_bytes, width=ref.width, height=ref.height)
            return PartitionOutcome(
                value=ref,
                metadata={
                    "thumbnail": dg.MetadataValue.md(thumbnail_markdown(png)),
                    # an http(s) link a browser opens (it refuses file:// from a web page)
                    "chart": dg.MetadataValue.url(store.public_url(stored.key)),
                    "sha256": stored.sha256,
                    "size_bytes": stored.size_bytes,
                    "pixels": f"{chart_renderer.width}x{chart_renderer.height}",
                },
            )

        yield from materialize_partitions(context, store_chart, indicator_frames)

    return [chart_images]


def render_all(chart_renderer: ChartRendererResource, frames_by_key: dict[str, MarketFrame]) -> dict[str, Future]:
    """{key: Future of that chart's PNG, or of its error}: each figure is built while the ones before
    it render, through one browser (`ChartRenderer.render_each_pipelined`)."""
    from trading_pipeline.core.chart_figure import build_chart_figure

    results: dict[str, Future] = {}
    rendered_keys = []

    def figures():
        for key, frames in frames_by_key.items():
            try:
                figure = build_chart_figure(frames.frame, frames.symbol, frames.timeframe, frames.as_of,
                                            width=chart_renderer.width, height=chart_renderer.height)
            except Exception as error:  # noqa: BLE001 - that chart's failure, reported for its partition
                results[key] = Future()
                results[key].set_result(error)
                continue
            rendered_keys.append(key)
            yield figure

    futures = chart_renderer.renderer().render_each_pipelined(figures(), chart_renderer.width, chart_renderer.height)
    results.update(zip(rendered_keys, futures, strict=True))
    return results
