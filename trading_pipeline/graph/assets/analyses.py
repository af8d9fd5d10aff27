"""AI analyses: the configured analyst reads one symbol × timeframe; an unusable answer is NO_TRADE."""

import dagster as dg

from trading_pipeline.core.analysis import TimeframeAnalysis
from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.errors import UserError
from trading_pipeline.graph import checks
from trading_pipeline.graph.assets.common import READ_RETRY, ChartImageRef, fail, nan_if_none
from trading_pipeline.graph.resources import AnalystResource, ChartStoreResource, TradingDatabaseResource


def build_analysis_assets(symbol_timeframe) -> list:
    @dg.asset(
        partitions_def=symbol_timeframe,
        group_name="trading",
        check_specs=checks.analysis_check_specs("ai_analyses"),
        retry_policy=READ_RETRY,
        pool="llm",
        description="Per-timeframe analysis (validated model) by the configured analyst; invalid = NO_TRADE.",
    )
    def ai_analyses(
        context: dg.AssetExecutionContext,
        indicator_frames: MarketFrame,
        chart_images: ChartImageRef,
        analyst: AnalystResource,
        chart_store: ChartStoreResource,
        trading_db: TradingDatabaseResource,
    ):
        sessions = trading_db.sessions()
        reader = analyst_for_run(context, analyst, sessions)
        try:
            # Only a model looks at the picture; the rules analyst reads the numbers.
            png = chart_store.store().get_png(chart_images.key) if analyst.mode == "openai" else None
            analysis: TimeframeAnalysis = reader.analyze(indicator_frames, chart_images.source(), png)
        finally:
            reader.close()
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
            "rationale": dg.MetadataValue.md(analysis.rationale),
            "chart": dg.MetadataValue.url(chart_store.store().public_url(chart_images.key)),
            "data_through": analysis.data_through.isoformat(),
        }
        metadata.update(model_call_metadata(context, analyst, sessions, indicator_frames.symbol,
                                            indicator_frames.timeframe, "timeframe_analysis"))
        if not analysis.valid:
            context.log.warning(f"{indicator_frames.symbol} {indicator_frames.timeframe}: analysis unusable, "
                                f"NO_TRADE: {analysis.invalid_reason}")
        return dg.MaterializeResult(
            value=analysis,
            metadata=metadata,
            check_results=checks.analysis_checks(analysis),
        )

    return [ai_analyses]


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
