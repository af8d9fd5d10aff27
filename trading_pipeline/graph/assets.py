"""The asset graph: each asset function reads like the pipeline step it is.

market_bars → indicator_frames → chart_images → ai_analyses   (symbol × timeframe)
→ trade_decisions → orders                                      (symbol; both timeframes fan in)
"""


import base64
import dataclasses
import io
import os
from dataclasses import dataclass
from datetime import datetime, timezone

import dagster as dg

from trading_pipeline import config
from trading_pipeline.core.analysis import ChartSource, OrderRecord, TimeframeAnalysis, TradeDecision
from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.core.strategies import StrategiesFile
from trading_pipeline.errors import UserError
from trading_pipeline.graph import checks
from trading_pipeline.graph.partitions import build_partitions, symbol_and_timeframe
from trading_pipeline.graph.resources import (
    AnalystResource,
    BrokerResource,
    ChartRendererResource,
    ChartStoreResource,
    MarketDataResource,
    TradingDatabaseResource,
)

AS_OF_TAG = "trading/as_of"
# Reads may retry; order submission never does (exactly once is enforced, but not by retrying).
READ_RETRY = dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
THUMBNAIL_WIDTH = 480  # the event log stores the thumbnail: keep it small


def run_as_of(context) -> datetime:
    """The run's point in time: the `trading/as_of` tag, else TRADING_AS_OF, else the run's creation."""
    if context.run.tags.get(AS_OF_TAG):
        return config.parse_as_of(context.run.tags[AS_OF_TAG], f"run tag {AS_OF_TAG}")
    if os.environ.get("TRADING_AS_OF"):
        return config.parse_as_of(os.environ["TRADING_AS_OF"], "TRADING_AS_OF")
    record = context.instance.get_run_record_by_id(context.run.run_id)
    created = record.create_timestamp if record else datetime.now(timezone.utc)
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    return created.astimezone(timezone.utc).replace(microsecond=0)


def _fail(error: UserError) -> dg.Failure:
    # A user error will not fix itself: never retried, whatever the step's retry policy.
    return dg.Failure(description=str(error), metadata={"problem": error.problem, "fix": error.fix},
                      allow_retries=False)


@dataclass(frozen=True)
class ChartImageRef:
    """Reference to a stored chart PNG (the PNG itself lives in the chart store)."""

    symbol: str
    timeframe: str
    as_of: datetime
    uri: str
    key: str
    sha256: str
    size_bytes: int
    width: int
    height: int

    def source(self) -> ChartSource:
        return ChartSource(uri=self.uri, sha256=self.sha256)


def _thumbnail_markdown(png: bytes) -> str:
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH))
    buffer = io.BytesIO()
    image.convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(buffer, format="PNG", optimize=True)
    return f"![chart](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def build_assets(strategies_file: StrategiesFile) -> list:
    symbols, symbol_timeframe = build_partitions(strategies_file)
    from_both_timeframes = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="symbol")

    @dg.asset(
        partitions_def=symbol_timeframe,
        group_name="trading",
        check_specs=checks.bar_check_specs("market_bars"),
        retry_policy=READ_RETRY,
        pool="market_data",
        description="OHLCV bars for one symbol and timeframe: UTC bar starts, only bars closed by the run's as_of.",
    )
    def market_bars(context: dg.AssetExecutionContext, market_data: MarketDataResource,
                    trading_db: TradingDatabaseResource):
        symbol, timeframe = symbol_and_timeframe(context)
        strategy = strategies_file.strategy_for(symbol)
        as_of = run_as_of(context)
        source = market_data.source()
        try:
            frame = source.fetch(symbol, timeframe, strategy.timeframes[timeframe], as_of)
        except UserError as error:
            raise _fail(error) from None
        bars = MarketFrame(symbol, timeframe, as_of, source.name, frame)
        context.log.info(f"{symbol} {timeframe}: {len(frame)} bars from {source.name} up to {as_of.isoformat()}")
        contract_metadata = {}
        if hasattr(source, "contract"):  # IBKR: keep the conid the bars (and orders) refer to
            from trading_pipeline.adapters.records import record_contract

            contract = source.contract(symbol)
            record_contract(trading_db.sessions(), strategy, symbol, contract.conid, contract.exchange)
            contract_metadata = {"conid": contract.conid, "exchange": contract.exchange}
        return dg.MaterializeResult(
            value=bars,
            metadata={
                **contract_metadata,
                "source": source.name,
                "as_of": as_of.isoformat(),
                "bars": len(frame),
                "first_bar": str(frame.index[0]) if len(frame) else "none",
                "last_bar": str(frame.index[-1]) if len(frame) else "none",
                "last_close": float(frame["close"].iloc[-1]) if len(frame) else float("nan"),
                "history_period": strategy.timeframes[timeframe].period,
            },
            check_results=checks.bar_checks(bars, strategy.timeframes[timeframe].period),
        )

    @dg.asset(
        partitions_def=symbol_timeframe,
        group_name="trading",
        check_specs=checks.indicator_check_specs("indicator_frames"),
        description="Bars plus SMA 20/50/200, RSI 14, MACD 12/26/9, Bollinger 20/2, ATR 14, SuperTrend 10/3.",
    )
    def indicator_frames(context: dg.AssetExecutionContext, market_bars: MarketFrame):
        import pandas as pd

        from trading_pipeline.core.indicators import compute_indicators

        try:
            enriched = market_bars.with_frame(compute_indicators(market_bars.frame))
        except UserError as error:
            raise _fail(error) from None
        last = enriched.frame.iloc[-1]
        latest = {column: (None if pd.isna(value) else round(float(value), 4)) for column, value in last.items()}
        return dg.MaterializeResult(
            value=enriched,
            metadata={"last_bar": str(enriched.last_bar_start), "latest_values": dg.MetadataValue.json(latest)},
            check_results=checks.indicator_checks(enriched),
        )

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
            raise _fail(error) from None
        stored = chart_store.store().put_png(chart_key(frames.symbol, frames.timeframe, frames.as_of), png)
        ref = ChartImageRef(frames.symbol, frames.timeframe, frames.as_of, stored.uri, stored.key,
                            stored.sha256, stored.size_bytes, chart_renderer.width, chart_renderer.height)
        record_chart(trading_db.sessions(), key=ref.key, symbol=ref.symbol, timeframe=ref.timeframe, as_of=ref.as_of,
                     uri=ref.uri, sha256=ref.sha256, size_bytes=ref.size_bytes, width=ref.width, height=ref.height)
        link = dg.MetadataValue.url(stored.uri) if stored.uri.startswith(("http", "file")) else dg.MetadataValue.text(stored.uri)
        return dg.MaterializeResult(
            value=ref,
            metadata={
                "thumbnail": dg.MetadataValue.md(_thumbnail_markdown(png)),
                "chart": link,
                "sha256": stored.sha256,
                "size_bytes": stored.size_bytes,
                "pixels": f"{chart_renderer.width}x{chart_renderer.height}",
            },
        )

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
        reader = _analyst_for_run(context, analyst, sessions)
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
            "entry": _nan_if_none(analysis.entry),
            "stop": _nan_if_none(analysis.stop),
            "targets": dg.MetadataValue.json(analysis.targets),
            "rationale": dg.MetadataValue.md(analysis.rationale),
            "chart": dg.MetadataValue.text(chart_images.uri),
            "data_through": analysis.data_through.isoformat(),
        }
        metadata.update(_model_call_metadata(context, analyst, sessions, indicator_frames.symbol,
                                             indicator_frames.timeframe, "timeframe_analysis"))
        if not analysis.valid:
            context.log.warning(f"{indicator_frames.symbol} {indicator_frames.timeframe}: analysis unusable, "
                                f"NO_TRADE: {analysis.invalid_reason}")
        return dg.MaterializeResult(
            value=analysis,
            metadata=metadata,
            check_results=checks.analysis_checks(analysis),
        )

    @dg.asset(
        partitions_def=symbols,
        group_name="trading",
        ins={"ai_analyses": dg.AssetIn(partition_mapping=from_both_timeframes)},
        check_specs=checks.decision_check_specs("trade_decisions"),
        retry_policy=dg.RetryPolicy(max_retries=2, delay=5),
        pool="llm",  # the OpenAI analyst's consolidation call
        description="Daily analysis leads, weekly confirms; deterministic risk gates decide BUY/SELL/HOLD/NO_TRADE.",
    )
    def trade_decisions(
        context: dg.AssetExecutionContext,
        ai_analyses: dict,
        analyst: AnalystResource,
        broker: BrokerResource,
        trading_db: TradingDatabaseResource,
    ):
        from trading_pipeline.adapters.portfolio_sync import working_entries
        from trading_pipeline.adapters.records import record_decision, record_strategy, sent_decision
        from trading_pipeline.core import market_calendar
        from trading_pipeline.core.decisions import decide

        symbol = context.partition_key
        strategy = strategies_file.strategy_for(symbol)
        by_timeframe = {analysis.timeframe: analysis for analysis in ai_analyses.values()}
        daily, weekly = by_timeframe["1d"], by_timeframe["1w"]
        sessions = trading_db.sessions()
        record_strategy(sessions, strategy)
        the_broker = broker.broker()
        decided_at = run_as_of(context)  # this run's point in time, not the analyses' (may be older)
        # Orders sent earlier that may still fill count for the limits (and block a second order).
        account = dataclasses.replace(the_broker.account({symbol: daily.last_close}, as_of=decided_at),
                                      working_entries=working_entries(sessions, the_broker))
        kill = config.KillSwitch.read()
        reader = _analyst_for_run(context, analyst, sessions)
        try:
            decision = decide(
                strategy, symbol, daily, weekly, account,
                market_open=market_calendar.is_open(decided_at),
                next_open=market_calendar.describe_next_open(decided_at),
                kill_switch=(kill.engaged, kill.reason),
                consolidator=reader.consolidate,
                decided_at=decided_at,
            )
        finally:
            reader.close()
        already = sent_decision(sessions, decision.decision_id)
        if already is not None:
            context.log.info(f"decision {decision.decision_id} already has orders; keeping it as it was")
            decision = already
        else:
            record_decision(sessions, decision)
        return dg.MaterializeResult(
            value=decision,
            metadata={**_decision_metadata(decision, already is not None),
                      **_model_call_metadata(context, analyst, sessions, symbol, None, "consolidation")},
            check_results=checks.decision_checks(decision, strategy),
        )

    @dg.asset(
        partitions_def=symbols,
        group_name="trading",
        pool="broker_orders",  # no retry policy: an order step is never retried automatically
        description="What was sent to the broker for the decision (exactly once), or why nothing was.",
    )
    def orders(
        context: dg.AssetExecutionContext,
        trade_decisions: TradeDecision,
        broker: BrokerResource,
        trading_db: TradingDatabaseResource,
    ):
        from trading_pipeline.adapters.order_desk import OrderDesk
        from trading_pipeline.core.orders import build_legs

        decision = trade_decisions
        strategy = strategies_file.strategy_for(decision.symbol)
        the_broker = broker.broker()
        kill = config.KillSwitch.read()
        reason = None
        if not decision.actionable:
            reason = f"decision is {decision.action.value}: {decision.rationale}"
        elif not broker.orders_enabled:
            reason = "orders are off: set TRADING_ORDERS_ENABLED=yes to let the pipeline send orders"
        elif not strategy.orders.enabled:
            reason = f"strategy {strategy.name!r} has orders.enabled: false in the strategies file"
        elif kill.engaged:
            reason = f"kill switch engaged: {kill.reason}"
        elif held := broker.placement_held():
            reason = held
        if reason is not None:
            record = OrderRecord(decision_id=decision.decision_id, symbol=decision.symbol, status="not_sent",
                                 reason=reason, broker=the_broker.name)
        else:
            legs = build_legs(decision, strategy.orders.tif, decision.closes_position)
            desk = OrderDesk(trading_db.sessions(), the_broker)
            try:
                record = (desk.close_once if decision.closes_position else desk.submit_once)(
                    decision, legs, decision.entry)
            except UserError as error:  # an exit that cannot be confirmed cancelled: nothing sent
                raise _fail(error) from None
        context.log.info(f"{decision.symbol}: {record.status}: {record.reason}")
        return dg.MaterializeResult(value=record, metadata=_order_metadata(record))

    return [market_bars, indicator_frames, chart_images, ai_analyses, trade_decisions, orders]


def _analyst_for_run(context, analyst: AnalystResource, sessions):
    try:
        return analyst.for_run(sessions, context.run.run_id, context.run.tags)
    except UserError as error:
        raise _fail(error) from None


def _model_call_metadata(context, analyst: AnalystResource, sessions, symbol: str, timeframe: str | None,
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
        "llm_cost_usd": _nan_if_none(calls.get("cost_usd")),
        "llm_cache_hits": calls.get("cache_hits", 0),
        "llm_latency_ms": calls.get("latency_ms_total", 0.0),
    }


def _nan_if_none(value):
    return float("nan") if value is None else value


def _decision_metadata(decision: TradeDecision, unchanged: bool) -> dict:
    checks_table = dg.MetadataValue.md(
        "| rule | passed | detail |\n|---|---|---|\n"
        + "\n".join(f"| {c.rule} | {'yes' if c.passed else '**no**'} | {c.detail.replace('|', '/')} |"
                    for c in decision.checks)
    ) if decision.checks else dg.MetadataValue.text("no gates run: nothing to trade")
    metadata = {
        "decision_id": decision.decision_id,
        "action": decision.action.value,
        "proposed_action": decision.proposed_action.value,
        "confirmation": decision.confirmation,
        "entry": _nan_if_none(decision.entry),
        "stop": _nan_if_none(decision.stop),
        "targets": dg.MetadataValue.json(decision.targets),
        "r_multiple": _nan_if_none(decision.r_multiple),
        "profit_margin": _nan_if_none(decision.profit_margin),
        "confidence": decision.confidence,
        "quantity": decision.quantity,
        "rationale": dg.MetadataValue.md(decision.rationale),
        "risk_gates": checks_table,
        "charts": dg.MetadataValue.json({tf: c.uri for tf, c in decision.charts.items()}),
        "data_through": decision.data_through.isoformat(),
        "decided_at": decision.as_of.isoformat(),  # the run's point in time: when the order goes out
    }
    if unchanged:
        metadata["note"] = "orders were already sent for this decision; the stored decision is kept unchanged"
    return metadata


def _order_metadata(record: OrderRecord) -> dict:
    return {
        "status": record.status,
        "reason": record.reason,
        "broker": record.broker,
        "client_order_id": record.client_order_id or "none",
        "broker_order_ids": dg.MetadataValue.json(record.broker_order_ids),
        "legs": dg.MetadataValue.json([leg.model_dump() for leg in record.legs]),
        "filled_quantity": record.filled_quantity,
        "decision_id": record.decision_id,
    }
