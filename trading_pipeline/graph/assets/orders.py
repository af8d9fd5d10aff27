"""Orders: what was sent to the broker for a decision (exactly once), or why nothing was.

The switches are the deployment's (config.SafetySwitches, read now, never from run config); the
decision must still be current at send time; entries re-check the account's limits under the
account lock; exits turn the position's stop into a market order (adapters/order_desk.py).
A batched run sends its symbols' orders one after the other in symbol order (a deterministic
order under the account's limits); one symbol's failure does not stop the others.
"""

import dagster as dg

from trading_pipeline import config
from trading_pipeline.core.analysis import OrderRecord, TradeDecision
from trading_pipeline.core.strategies import StrategiesFile, Strategy
from trading_pipeline.errors import UserError
from trading_pipeline.graph.assets.batch import BATCH_POLICY, PartitionOutcome, materialize_partitions, partition_keys
from trading_pipeline.graph.assets.common import fail
from trading_pipeline.graph.resources import BrokerResource, MarketDataResource, TradingDatabaseResource


def build_order_assets(strategies_file: StrategiesFile, symbols) -> list:
    @dg.asset(
        partitions_def=symbols,
        group_name="trading",
        pool="broker_orders",  # no retry policy: an order step is never retried automatically
        backfill_policy=BATCH_POLICY,
        description="What was sent to the broker for the decision (exactly once), or why nothing was.",
    )
    def orders(
        context: dg.AssetExecutionContext,
        trade_decisions,  # a TradeDecision, or {symbol: TradeDecision} in a batched run
        broker: BrokerResource,
        market_data: MarketDataResource,
        trading_db: TradingDatabaseResource,
    ):
        from trading_pipeline.adapters.order_desk import OrderDesk

        sessions = trading_db.sessions()
        try:
            the_broker = broker.broker(symbols=tuple(strategies_file.symbols()))
        except UserError as error:  # bad gateway answer, wrong account
            raise fail(error) from None
        desk = OrderDesk(sessions, the_broker)
        batched = len(partition_keys(context)) > 1
        handled: list[str] = []  # "SYMBOL status", in the order the batch handled them

        def send(_symbol: str, decision: TradeDecision) -> PartitionOutcome:
            strategy = strategies_file.strategy_for(decision.symbol)
            # What an earlier run did for this decision is what the asset shows, whatever the switches say now.
            record = desk.recorded(decision)
            if record is None:
                now = config.trading_now()
                reason = why_not_sent(decision, strategy, broker, now)  # read before each order of a batch
                if reason is not None:
                    record = OrderRecord(decision_id=decision.decision_id, symbol=decision.symbol, status="not_sent",
                                         reason=reason, broker=the_broker.name)
                elif decision.closes_position:
                    record = desk.exit_once(decision, placed_at=now,
                                            stopped=lambda: orders_turned_off() or no_longer_current(decision, strategy))
                else:
                    record = _send_entry(desk, decision, strategy, the_broker, market_data, sessions, now, context)
            if batched:  # one line for the batch below (each log line is an event-log write)
                handled.append(f"{decision.symbol} {record.status}")
            else:
                context.log.info(f"{decision.symbol}: {record.status}: {record.reason}")
            return PartitionOutcome(value=record, metadata=order_metadata(record))

        # A user error (an exit whose state is unknown) fails that symbol's order; a run of one symbol fails.
        yield from materialize_partitions(context, send, trade_decisions, in_key_order=True)
        if handled:
            context.log.info(f"{ORDER_SEQUENCE_LOG}{', '.join(handled)} (each partition's metadata says why)")

    return [orders]


ORDER_SEQUENCE_LOG = "orders, in the order handled: "


def why_not_sent(decision: TradeDecision, strategy: Strategy, broker: BrokerResource, now) -> str | None:
    """The first reason this decision's order must not go out now, or None."""
    from trading_pipeline.core.decisions import decision_not_current

    if not decision.actionable:
        return f"decision is {decision.action.value}: {decision.rationale}"
    if not config.SafetySwitches.read().orders_enabled:
        return ("orders are off: the deployment sets TRADING_ORDERS_ENABLED=yes to let the pipeline send orders "
                "(environment of the code location; a run's config cannot)")
    if not strategy.orders.enabled:
        return f"strategy {strategy.name!r} has orders.enabled: false in the strategies file"
    kill = config.KillSwitch.read()
    if kill.engaged and not decision.closes_position:  # exits only reduce risk: they still go out
        return f"kill switch engaged: {kill.reason}"
    if held := broker.placement_held():
        return held
    stale = decision_not_current(decision, now, strategy.orders.max_decision_age_minutes)
    if stale:
        return f"decision not current: {stale}"
    return None


def orders_turned_off() -> str | None:
    """Read again under the account lock, right before an exit is sent (the kill switch lets exits
    through; the orders switch does not)."""
    if not config.SafetySwitches.read().orders_enabled:
        return "TRADING_ORDERS_ENABLED was turned off before the exit was sent; nothing sent"
    return None


def no_longer_current(decision: TradeDecision, strategy: Strategy) -> str | None:
    """Checked again under the account lock at the time the order would go out: a run that waited
    for the lock (another run sending, a sync resizing) may reach it after the next session closed
    or past orders.max_decision_age_minutes."""
    from trading_pipeline.core.decisions import decision_not_current

    stale = decision_not_current(decision, config.trading_now(), strategy.orders.max_decision_age_minutes)
    return f"decision not current when it was about to be sent: {stale}; nothing sent" if stale else None


def _send_entry(desk, decision: TradeDecision, strategy: Strategy, the_broker, market_data: MarketDataResource,
                sessions, now, context) -> OrderRecord:
    from trading_pipeline.adapters.market_data import marks_for
    from trading_pipeline.adapters.portfolio_sync import with_working_orders
    from trading_pipeline.core.orders import build_legs, client_order_id
    from trading_pipeline.core.risk import entry_limits

    def limits_now():
        """The account as it is now (other runs may have placed since the decision), marked to market;
        and the switches and the decision's currency read again: under the account lock, right
        before sending, a switch turned off (or the next session's close) while this run waited (the
        lock, the broker's answers) stops the entry."""
        from trading_pipeline.core.analysis import RuleCheck

        if orders_turned_off():
            return 0, [RuleCheck("orders_enabled", False, "TRADING_ORDERS_ENABLED was turned off before the entry "
                                                          "was sent")]
        if (kill := config.KillSwitch.read()).engaged:
            return 0, [RuleCheck("kill_switch", False, f"kill switch engaged before the entry was sent: {kill.reason}")]
        if stale := no_longer_current(decision, strategy):
            return 0, [RuleCheck("decision_current", False, stale)]
        held = the_broker.account({}, as_of=now).positions
        marks = marks_for(market_data.source(), {*held, decision.symbol}, now)
        account = with_working_orders(the_broker.account(marks, as_of=now), sessions, the_broker)
        return entry_limits(decision.symbol, decision.entry, decision.stop, account, strategy.risk,
                            own_order=client_order_id(decision))

    return desk.submit_once(decision, build_legs(decision, strategy.orders.tif), decision.entry,
                            placed_at=now, limits=limits_now)


def order_metadata(record: OrderRecord) -> dict:
    legs = "\n".join(f"| {leg.role} | {leg.side} | {leg.order_type} | {leg.quantity} | "
                      f"{'market' if leg.price is None else f'{leg.price:.2f}'} | {leg.tif} | {leg.client_order_id} |"
                      for leg in record.legs)
    return {
        "status": record.status,
        "reason": dg.MetadataValue.text(record.reason),  # may quote the model's words: never markdown
        "broker": record.broker,
        "client_order_id": record.client_order_id or "none",
        "broker_order_ids": dg.MetadataValue.json(record.broker_order_ids),
        "legs": dg.MetadataValue.md("| role | side | type | quantity | price | tif | cOID |\n|---|---|---|---:|---:|---|---|\n"
                                    + legs) if record.legs else dg.MetadataValue.text("none"),
        "filled_quantity": record.filled_quantity,
        "decision_id": record.decision_id,
    }
