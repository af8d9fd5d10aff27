"""Bars and indicators per symbol × timeframe partition; a batched run makes many partitions."""

import dagster as dg

from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.core.strategies import StrategiesFile
from trading_pipeline.graph import checks
from trading_pipeline.graph.assets.batch import (
    BATCH_POLICY,
    PartitionOutcome,
    materialize_partitions,
    partition_dimensions,
    partition_keys,
    partitioned_checks,
)
from trading_pipeline.graph.assets.common import READ_RETRY, run_as_of
from trading_pipeline.graph.resources import MarketDataResource, TradingDatabaseResource
from trading_pipeline.workers import worker_pool


def build_market_assets(strategies_file: StrategiesFile, symbol_timeframe) -> list:
    @dg.asset(
        partitions_def=symbol_timeframe,
        group_name="trading",
        check_specs=partitioned_checks(checks.bar_check_specs("market_bars"), symbol_timeframe),
        retry_policy=READ_RETRY,
        pool="market_data",
        backfill_policy=BATCH_POLICY,
        description="OHLCV bars for one symbol and timeframe: UTC bar starts, only bars closed by the run's as_of.",
    )
    def market_bars(context: dg.AssetExecutionContext, market_data: MarketDataResource,
                    trading_db: TradingDatabaseResource):
        from trading_pipeline.adapters.market_data import fetch_concurrency, fetch_many

        as_of = run_as_of(context)
        source = market_data.source()
        keys = partition_keys(context)
        batched = len(keys) > 1
        # A batch fetches as many series at once as the source serves (IBKR: its history requests
        # in flight), the frames then made in partition order; a source that serves one at a time
        # (simulated, csv) fetches inside each partition's step, as a single run does.
        fetched: dict = {}

        def wanted(key: str):
            dims = partition_dimensions(context, key)
            symbol, timeframe = dims["symbol"], dims["timeframe"]
            return symbol, timeframe, strategies_file.strategy_for(symbol)

        def fetch(key: str, _) -> PartitionOutcome:
            symbol, timeframe, strategy = wanted(key)
            frame = (fetched[key].result() if key in fetched
                     else source.fetch(symbol, timeframe, strategy.timeframes[timeframe], as_of))
            bars = MarketFrame(symbol, timeframe, as_of, source.name, frame)
            if not batched:  # a batch logs one line for all (each log line is an event-log write)
                context.log.info(f"{symbol} {timeframe}: {len(frame)} bars from {source.name} up to {as_of.isoformat()}")
            contract_metadata = {}
            if hasattr(source, "contract"):  # IBKR: keep the conid the bars (and orders) refer to
                from trading_pipeline.adapters.records import record_contract

                contract = source.contract(symbol)
                record_contract(trading_db.sessions(), strategy, symbol, contract.conid, contract.exchange)
                contract_metadata = {"conid": contract.conid, "exchange": contract.exchange}
            return PartitionOutcome(
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

        workers = fetch_concurrency(source) if batched else 1
        if workers == 1:
            yield from materialize_partitions(context, fetch)
            return

        def job(key: str):
            try:
                symbol, timeframe, strategy = wanted(key)
                return symbol, timeframe, strategy.timeframes[timeframe]
            except Exception:  # noqa: BLE001 - that partition's own step raises it again, for it alone
                return None

        jobs = {key: request for key in keys if (request := job(key)) is not None}
        context.log.info(f"fetching {len(jobs)} bar series from {source.name}, {workers} at a time")
        with worker_pool(workers, "market-bars") as pool:
            fetched.update(fetch_many(source, jobs, as_of, pool))
            yield from materialize_partitions(context, fetch)

    @dg.asset(
        partitions_def=symbol_timeframe,
        group_name="trading",
        check_specs=partitioned_checks(checks.indicator_check_specs("indicator_frames"), symbol_timeframe),
        backfill_policy=BATCH_POLICY,
        description="Bars plus SMA 20/50/200, RSI 14, MACD 12/26/9, Bollinger 20/2, ATR 14, SuperTrend 10/3.",
    )
    def indicator_frames(context: dg.AssetExecutionContext, market_bars):
        import pandas as pd

        from trading_pipeline.core.indicators import compute_indicators

        def enrich(_key: str, bars: MarketFrame) -> PartitionOutcome:
            enriched = bars.with_frame(compute_indicators(bars.frame))
            last = enriched.frame.iloc[-1]
            latest = {column: (None if pd.isna(value) else round(float(value), 4)) for column, value in last.items()}
            return PartitionOutcome(
                value=enriched,
                metadata={"last_bar": str(enriched.last_bar_start), "latest_values": dg.MetadataValue.json(latest)},
                check_results=checks.indicator_checks(enriched),
            )

        yield from materialize_partitions(context, enrich, market_bars)

    return [market_bars, indicator_frames]
