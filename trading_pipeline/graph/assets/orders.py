"""Orders: what was sent to the broker for a decision (exactly once), or why nothing was."""

import dagster as dg

from trading_pipeline import config
from trading_pipeline.core.analysis import OrderRecord, TradeDecision
from trading_pipeline.core.strategies import StrategiesFile
from trading_pipeline.errors import UserError
from trading_pipeline.graph.assets.common import fail
from trading_pipeline.graph.resources import BrokerResource, TradingDatabaseResource


def build_order_assets(strategies_file: StrategiesFile, symbols) -> list:
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
                raise fail(error) from None
        context.log.info(f"{decision.symbol}: {record.status}: {record.reason}")
        return dg.MaterializeResult(value=record, metadata=order_metadata(record))

    return [orders]


def order_metadata(record: OrderRecord) -> dict:
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
