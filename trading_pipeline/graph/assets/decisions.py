"""Trade decisions: the daily analysis leads, the weekly confirms, the risk gates decide (per symbol)."""

import dataclasses

import dagster as dg

from trading_pipeline import config
from trading_pipeline.core.analysis import TradeDecision
from trading_pipeline.core.strategies import StrategiesFile
from trading_pipeline.errors import UserError
from trading_pipeline.graph import checks
from trading_pipeline.graph.assets.analyses import analyst_for_run, model_call_metadata
from trading_pipeline.graph.assets.common import fail, nan_if_none, run_as_of
from trading_pipeline.graph.resources import (
    AnalystResource,
    BrokerResource,
    MarketDataResource,
    TradingDatabaseResource,
)


def build_decision_assets(strategies_file: StrategiesFile, symbols) -> list:
    from_both_timeframes = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="symbol")

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
        market_data: MarketDataResource,
        trading_db: TradingDatabaseResource,
    ):
        from trading_pipeline.adapters.records import record_decision, record_strategy, sent_decision
        from trading_pipeline.core import market_calendar
        from trading_pipeline.core.decisions import decide

        symbol = context.partition_key
        strategy = strategies_file.strategy_for(symbol)
        by_timeframe = {analysis.timeframe: analysis for analysis in ai_analyses.values()}
        daily, weekly = by_timeframe["1d"], by_timeframe["1w"]
        sessions = trading_db.sessions()
        record_strategy(sessions, strategy)
        decided_at = run_as_of(context)  # this run's point in time, not the analyses' (may be older)
        try:  # the broker's answers (a wrong account, a missing P&L) are the user's to fix: never retried
            the_broker = broker.broker(symbols=tuple(strategies_file.symbols()))
            account, tick = account_for_decision(the_broker, market_data, sessions, symbol, decided_at, context.log)
        except UserError as error:
            raise fail(error) from None
        kill = config.KillSwitch.read()
        reader = analyst_for_run(context, analyst, sessions)
        try:
            decision = decide(
                strategy, symbol, daily, weekly, account,
                market_open=market_calendar.is_open(decided_at),
                next_open=market_calendar.describe_next_open(decided_at),
                kill_switch=(kill.engaged, kill.reason),
                consolidator=reader.consolidate,
                decided_at=decided_at,
                tick=tick,
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
            metadata={**decision_metadata(decision, already is not None),
                      **model_call_metadata(context, analyst, sessions, symbol, None, "consolidation")},
            check_results=checks.decision_checks(decision, strategy),
        )

    return [trade_decisions]


def account_for_decision(the_broker, market_data: MarketDataResource, sessions, symbol: str, decided_at, log):
    """The account as the risk gates see it at the decision's point in time: every position marked
    to its latest closed price (unrealized losses count for equity, size and the loss breaker),
    the orders that may still fill, and the contract's minimum tick."""
    from trading_pipeline.adapters.market_data import marks_for
    from trading_pipeline.adapters.portfolio_sync import working_entries

    held = the_broker.account({}, as_of=decided_at).positions
    marks = marks_for(market_data.source(), {*held, symbol}, decided_at, log=log)
    account = dataclasses.replace(the_broker.account(marks, as_of=decided_at),
                                  working_entries=working_entries(sessions, the_broker))
    return account, the_broker.min_tick(symbol)


def decision_metadata(decision: TradeDecision, unchanged: bool) -> dict:
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
        "entry": nan_if_none(decision.entry),
        "stop": nan_if_none(decision.stop),
        "targets": dg.MetadataValue.json(decision.targets),
        "r_multiple": nan_if_none(decision.r_multiple),
        "profit_margin": nan_if_none(decision.profit_margin),
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
