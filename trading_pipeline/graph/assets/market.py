"""Bars and indicators, one symbol × timeframe partition at a time."""

import dagster as dg

from trading_pipeline.core.frames import MarketFrame
from trading_pipeline.core.strategies import StrategiesFile
from trading_pipeline.errors import UserError
from trading_pipeline.graph import checks
from trading_pipeline.graph.assets.common import READ_RETRY, fail, run_as_of
from trading_pipeline.graph.partitions import symbol_and_timeframe
from trading_pipeline.graph.resources import MarketDataResource, TradingDatabaseResource


def build_market_assets(strategies_file: StrategiesFile, symbol_timeframe) -> list:
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
            raise fail(error) from None
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
            raise fail(error) from None
        last = enriched.frame.iloc[-1]
        latest = {column: (None if pd.isna(value) else round(float(value), 4)) for column, value in last.items()}
        return dg.MaterializeResult(
            value=enriched,
            metadata={"last_bar": str(enriched.last_bar_start), "latest_values": dg.MetadataValue.json(latest)},
            check_results=checks.indicator_checks(enriched),
        )

    return [market_bars, indicator_frames]
