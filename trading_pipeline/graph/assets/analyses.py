"""AI analyses: the configured analyst reads each symbol × timeframe of the run; an unusable answer, or a
partition whose bars or chart failed in a batched run, is NO_TRADE with the reason."""

import dagster as dg

from trading_pipeline.core.analysis import NO_DATA, TimeframeAnalysis
from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.errors import UserError
from trading_pipeline.graph import checks
from trading_pipeline.graph.assets.batch import (
    BATCH_POLICY,
    PartitionFailure,
    PartitionOutcome,
    materialize_partitions,
    partition_dimensions,
    partition_keys,
    partitioned_checks,
)
from trading_pipeline.graph.assets.common import READ_RETRY, ChartImageRef, fail, nan_if_none, run_as_of
from trading_pipeline.graph.resources import AnalystResource, ChartStoreResource, TradingDatabaseResource
from trading_pipeline.workers import worker_pool


def build_analysis_assets(symbol_timeframe) -> list:
    @dg.asset(
        partitions_def=symbol_timeframe,
        group_name="trading",
        check_specs=partitioned_checks(checks.analysis_check_specs("ai_analyses"), symbol_timeframe),
        retry_policy=READ_RETRY,
        pool="llm",
        backfill_policy=BATCH_POLICY,
        description="Per-timeframe analysis (validated model) by the configured analyst; invalid = NO_TRADE.",
    )
    def ai_analyses(
        context: dg.AssetExecutionContext,
        indicator_frames,
        chart_images,
        analyst: AnalystResource,
        chart_store: ChartStoreResource,
        trading_db: TradingDatabaseResource,
    ):
        keys = partition_keys(context)
        if len(keys) == 1:
            indicator_frames, chart_images = {keys[0]: indicator_frames}, {keys[0]: chart_images}
        # A partition whose bars, indicators or chart failed is analysed as unusable (NO_TRADE, with why).
        inputs = {key: next((v for v in (indicator_frames[key], chart_images[key]) if isinstance(v, PartitionFailure)),
                            (indicator_frames[key], chart_images[key])) for key in keys}
        sessions = trading_db.sessions()
        reader = analyst_for_run(context, analyst, sessions)
        links = chart_store.store()  # the charts' http(s) links for the metadata
        store = links if analyst.mode == "openai" else None

        def analysis_of(frames_and_chart: tuple[MarketFrame, ChartImageRef]) -> TimeframeAnalysis:
            frames, chart = frames_and_chart
            # Only a model looks at the picture; the rules analyst reads the numbers.
            png = store.get_png(chart.key) if store is not None else None
            return reader.analyze(frames, chart.source(), png)

        started: dict = {}

        def analyze(key: str, frames_and_chart: tuple[MarketFrame, ChartImageRef]) -> PartitionOutcome:
            analysis = started[key].result() if key in started else analysis_of(frames_and_chart)
            return analysis_outcome(context, analyst, sessions, analysis, links.public_url(frames_and_chart[1].key))

        def unusable(key: str, failure: PartitionFailure) -> PartitionOutcome:
            dims = partition_dimensions(context, key)
            analysis = TimeframeAnalysis.invalid(
                reason=failure.describe(), symbol=dims["symbol"], timeframe=dims["timeframe"],
                as_of=run_as_of(context), data_through=NO_DATA, analyst=f"none ({failure.asset} failed)",
                last_close=float("nan"), atr=0.0, recent_high=float("nan"), recent_low=float("nan"))
            return analysis_outcome(context, analyst, sessions, analysis, "none")

        # A model answers in seconds: a batch asks it TRADING_LLM_CONCURRENCY at a time (the analyst
        # bounds its requests in flight and its budget across threads); the rules analyst, CPU-bound,
        # one at a time. The partitions are made in order either way.
        workers = getattr(getattr(reader, "settings", None), "concurrency", 1) if len(keys) > 1 else 1
        try:
            with worker_pool(workers, "analyses") as pool:
                if pool is not None:
                    started.update({key: pool.submit(analysis_of, value) for key, value in inputs.items()
                                    if not isinstance(value, PartitionFailure)})
                yield from materialize_partitions(context, analyze, inputs, on_upstream_failure=unusable)
        finally:
            reader.close()

    return [ai_analyses]


def analysis_outcome(context, analyst: AnalystResource, sessions, analysis: TimeframeAnalysis,
                     chart_uri: str) -> PartitionOutcome:
    metadata = {
        "analyst": analysis.analyst,
        "valid": analysis.valid,
        "invalid_reason": analysis.invalid_reason or "",
        "prompt_version": analysis.prompt_version or "none (rules)",
        "signal": analysis.signal.value,
        "trend": analysis.trend.value,
        "confidence": analysis.confidence,
        "entry": nan_if_none(analysis.entry),
        "stop": nan_if_none(analysis.stop),
        "targets": dg.MetadataValue.json(analysis.targets),
        # Plain text, never markdown: a model writes it, and markdown would let it show links or load
        # images from anywhere in the browser of whoever opens the asset.
        "rationale": dg.MetadataValue.text(analysis.rationale),
        "chart": dg.MetadataValue.url(chart_uri) if chart_uri.startswith("http") else dg.MetadataValue.text(chart_uri),
        "data_through": analysis.data_through.isoformat(),
    }
    metadata.update(model_call_metadata(context, analyst, sessions, analysis.symbol, analysis.timeframe,
                                        "timeframe_analysis"))
    if not analysis.valid:
        context.log.warning(f"{analysis.symbol} {analysis.timeframe}: analysis unusable, "
                            f"NO_TRADE: {analysis.invalid_reason}")
    return PartitionOutcome(value=analysis, metadata=metadata, check_results=checks.analysis_checks(analysis))


def analyst_for_run(context, analyst: AnalystResource, sessions):
    try:
        return analyst.for_run(sessions, context.run.run_id, context.run.tags)
    except UserError as error:
        raise fail(error) from None


def model_call_metadata(context, analyst: AnalystResource, sessions, symbol: str, timeframe: str | None,
                        kind: str) -> dict:
    """What the model calls of this step cost: tokens, estimated USD, cache hits, latency."""
    if analyst.mode != "openai":
        return {}
    from trading_pipeline.adapters.model_calls import summarize_calls

    calls = summarize_calls(sessions, run_id=context.run.run_id, symbol=symbol, timeframe=timeframe, kind=kind)
    if calls.get("budget_refusals"):
        context.log.warning(f"{symbol}: the model budget stopped {calls['budget_refusals']} call(s); see model_calls")
    return {
        "model_calls": dg.MetadataValue.json(calls),
        "llm_tokens": calls.get("total_tokens", 0),
        "llm_cost_usd": nan_if_none(calls.get("cost_usd")),
        "llm_cache_hits": calls.get("cache_hits", 0),
        "llm_latency_ms": calls.get("latency_ms_total", 0.0),
    }
