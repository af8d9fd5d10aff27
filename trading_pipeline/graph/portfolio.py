"""Portfolio assets (unpartitioned): positions, executions and the account summary, kept in step
with the broker by one sync step, and the order-status sensor that runs it during market hours."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from trading_pipeline.graph.assets import run_as_of
from trading_pipeline.graph.resources import (
    BrokerResource,
    ChartRendererResource,
    ChartStoreResource,
    MarketDataResource,
    TradingDatabaseResource,
)

DECISION_CHART_PERIOD = "2y"  # enough daily bars for SMA 200 on a decision chart drawn again with its fills
MARK_HISTORY = "3m"  # daily bars for the marks; more when a paper order has been working longer
MAX_HISTORY_DAYS = 1000  # IBKR's limit for a period in days
SYNC_JOB = "sync_portfolio"
SENSOR_INTERVAL_SECONDS = 300
AFTER_CLOSE_GRACE = timedelta(minutes=30)  # catch fills reported just after the close


def fill_history(as_of: datetime, working_since: datetime | None) -> str:
    """The daily history the sync fetches: the marks' 3 months, or back to the session before the
    oldest working paper order was placed, so its fills are read from every bar it was live in."""
    from trading_pipeline.core.strategies import TimeframeSettings

    default_days = TimeframeSettings(period=MARK_HISTORY).calendar_days()
    if working_since is None:
        return MARK_HISTORY
    days = (as_of - working_since).days + 7  # a week's margin for weekends and holidays
    return MARK_HISTORY if days <= default_days else f"{min(days, MAX_HISTORY_DAYS)}d"


# Metadata tables: (key, header, format); numbers right-aligned and rounded as a trader reads them.
def _quantity(value) -> str:
    return f"{value:,.0f}"


def _price(value) -> str:
    return f"{value:,.2f}"


def _signed(value) -> str:
    return f"{value:+,.2f}"


POSITION_COLUMNS = [("symbol", "symbol", None), ("quantity", "qty", _quantity), ("average_price", "avg price", _price),
                    ("market_price", "mark", _price), ("unrealized_pnl", "unrealized P&L", _signed),
                    ("market_value", "value", _price), ("stop", "stop", _price)]
TRADE_COLUMNS = [("symbol", "symbol", None), ("side", "side", None), ("quantity", "qty", _quantity),
                 ("entry", "entry", _price), ("exit", "exit", _price), ("realized_pnl", "P&L", _signed),
                 ("r_multiple", "R", _signed), ("status", "status", None), ("exit_reason", "exit by", None),
                 ("commission", "comm.", _price), ("holding_time", "held", None), ("decision_id", "decision", None)]
LEG_COLUMNS = [("role", "role", None), ("side", "side", None), ("order_type", "type", None),
               ("quantity", "qty", _quantity), ("price", "price", _price), ("status", "status", None),
               ("filled_quantity", "filled", _quantity), ("average_fill_price", "avg fill", _price),
               ("commission", "comm.", _price), ("client_order_id", "cOID", None)]


def _table(rows: list[dict], columns: list[tuple]) -> dg.MetadataValue:
    """A markdown table; the most telling columns come first so a narrow panel shows them."""
    if not rows:
        return dg.MetadataValue.md("_none_")
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---:" if fmt else ":---" for _, _, fmt in columns) + "|"]
    for row in rows:
        cells = ["" if row.get(key) is None else fmt(row[key]) if fmt else str(row[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def _bullets(lines: list[str]) -> dg.MetadataValue:
    return dg.MetadataValue.md("\n".join(f"- {line}" for line in lines) or "_none_")


def order_observation(outcome: dict) -> dg.AssetObservation:
    """What a decision's orders became, on the `orders` asset's partition (the symbol): the sync
    observes it, it does not re-materialize it (the asset's value stays what the orders step sent)."""
    return dg.AssetObservation(asset_key="orders", partition=outcome["symbol"], metadata={
        "decision_id": outcome["decision_id"],
        "client_order_id": outcome["client_order_id"],
        "status": outcome["status"],
        "filled": f"{outcome['filled_quantity']:,.0f}/{outcome['quantity']:,}",
        "average_fill_price": (dg.MetadataValue.float(round(float(outcome["average_fill_price"]), 2))
                               if outcome["average_fill_price"] is not None else "none"),
        "filled_child": outcome["filled_child"] or "none",
        "commission": dg.MetadataValue.float(float(outcome["commission"])),
        "legs": _table(outcome["legs"], LEG_COLUMNS),
        "changes": _bullets(outcome["changes"]),
    })


def decision_chart_with_fills(outcome: dict, sessions, source, renderer, store, log) -> dg.AssetObservation | None:
    """The decision chart drawn again with the order's fills, observed on `trade_decisions` (the
    same link: the chart in the store now shows the fills)."""
    from sqlalchemy import select

    from trading_pipeline.adapters.records import sent_decision
    from trading_pipeline.adapters.trading_db import ExecutionRow
    from trading_pipeline.core.chart_figure import ChartFill
    from trading_pipeline.core.indicators import compute_indicators
    from trading_pipeline.core.strategies import TimeframeSettings
    from trading_pipeline.errors import UserError
    from trading_pipeline.graph.assets.decision_chart import render_decision_chart

    decision = sent_decision(sessions, outcome["decision_id"])
    if decision is None:
        return None
    roles = {leg["client_order_id"]: leg["role"].replace("_", " ") for leg in outcome["legs"]}
    with sessions() as session:
        fills = [ChartFill(e.executed_at, e.price, e.side, e.quantity, roles.get(e.client_order_id, ""))
                 for e in session.scalars(select(ExecutionRow).where(ExecutionRow.client_order_id.in_(list(roles))))]
    try:  # the daily chart as the decision saw it; the fills after it get their own slots
        frame = compute_indicators(source.fetch(decision.symbol, "1d", TimeframeSettings(period=DECISION_CHART_PERIOD),
                                                 decision.as_of))
    except UserError as error:
        log.warning(f"{decision.symbol}: decision chart not redrawn with its fills: {error.problem}")
        return None
    metadata = render_decision_chart(decision, frame, renderer, store, fills=fills, log=log)
    return dg.AssetObservation(asset_key="trade_decisions", partition=decision.symbol, metadata={
        **metadata, "decision_id": decision.decision_id, "fills_drawn": len(fills)})


@dg.multi_asset(
    outs={
        "positions": dg.AssetOut(description="Open positions at the broker with unrealized P&L and their stop.",
                                 group_name="portfolio"),
        "executions": dg.AssetOut(description="The books by position: fills matched FIFO into trades, with "
                                              "net P&L, realized R and what closed them.",
                                  group_name="portfolio"),
        "account_summary": dg.AssetOut(description="Equity, cash, exposure and today's P&L.",
                                       group_name="portfolio"),
    },
    # Downstream of every symbol's orders: the lineage runs bars -> ... -> order -> fill -> position.
    deps=[dg.AssetDep("orders", partition_mapping=dg.AllPartitionMapping())],
    check_specs=[dg.AssetCheckSpec("no_drift", asset="positions",
                                   description="The broker's orders and positions match what the pipeline sent and "
                                               "recorded, and every pipeline position has a working stop-loss.")],
)
def portfolio_sync(context: dg.AssetExecutionContext, broker: BrokerResource, market_data: MarketDataResource,
                   trading_db: TradingDatabaseResource, chart_renderer: ChartRendererResource,
                   chart_store: ChartStoreResource):
    from trading_pipeline.adapters.market_data import marks_from_daily_bars
    from trading_pipeline.adapters.portfolio_sync import symbols_in_play, sync_portfolio, working_symbols
    from trading_pipeline.core.strategies import TimeframeSettings

    as_of = run_as_of(context)
    sessions = trading_db.sessions()
    # Positions under the pipeline's own symbols (IBKR's BRK B is the strategy's BRK.B): under another
    # name a position would look gone, and the sync cancel its stop as orphaned.
    the_broker = broker.broker(symbols=tuple(sorted(symbols_in_play(sessions))))
    symbols = set(the_broker.account({}, as_of).positions) | working_symbols(sessions, the_broker)
    if hasattr(the_broker, "working_symbols"):
        symbols |= set(the_broker.working_symbols())
    source = market_data.source()
    history = TimeframeSettings(period=fill_history(
        as_of, the_broker.working_since() if hasattr(the_broker, "working_since") else None))
    bars = {}
    for symbol in sorted(symbols):
        try:
            bars[symbol] = source.fetch(symbol, "1d", history, as_of)
        except Exception as error:  # noqa: BLE001 -- a symbol without data must not stop the others' sync
            context.log.warning(f"no prices for {symbol}: {error}")
    if hasattr(the_broker, "simulate_fills"):
        for line in the_broker.simulate_fills(bars):
            context.log.info(f"paper broker: {line}")
    report = sync_portfolio(sessions, the_broker, marks_from_daily_bars(bars, as_of), as_of)
    for change in report.status_changes:
        context.log.info(change)
    for line in report.other_brokers:
        context.log.warning(line)
    for problem in report.drift:
        if problem in report.unprotected:
            context.log.error(f"UNPROTECTED POSITION: {problem}")
        else:
            context.log.warning(f"drift: {problem}")
    for outcome in report.orders:
        context.log_event(order_observation(outcome))
        if any(leg["filled_quantity"] for leg in outcome["legs"]):
            observed = decision_chart_with_fills(outcome, sessions, source, chart_renderer, chart_store, context.log)
            if observed is not None:
                context.log_event(observed)
    account = report.account
    yield dg.Output(report.positions, output_name="positions", metadata={
        "positions": _table(report.positions, POSITION_COLUMNS),
        "count": len(report.positions)})
    yield dg.Output(report.trades, output_name="executions", metadata={
        "trades": _table(report.trades, TRADE_COLUMNS),
        "realized_pnl": dg.MetadataValue.float(float(round(sum(t["realized_pnl"] for t in report.trades), 2))),
        "new_executions": report.new_executions,
        "order_status_changes": _bullets(report.status_changes),
        "other_brokers_orders": _bullets(report.other_brokers)})
    summary = {"equity": round(account.equity, 2), "cash": round(account.cash, 2),
               "gross_exposure": round(account.gross_exposure, 2),
               "daily_pnl": None if account.daily_pnl is None else round(account.daily_pnl, 2),
               "open_positions": account.open_positions, "broker": the_broker.name}
    if account.daily_pnl is None:  # entries are refused until it is known again: say why where it is shown
        summary["daily_pnl_unknown"] = account.daily_pnl_unknown
        context.log.warning(f"today's P&L is unknown, new entries are refused (exits and stops go on): "
                            f"{account.daily_pnl_unknown}")
    yield dg.Output(summary, output_name="account_summary", metadata={**summary, "as_of": as_of.isoformat()})
    yield dg.AssetCheckResult(check_name="no_drift", asset_key="positions", passed=not report.drift,
                              severity=dg.AssetCheckSeverity.ERROR if report.unprotected
                              else dg.AssetCheckSeverity.WARN,
                              metadata={"drift": _bullets(report.drift)})


sync_portfolio_job = dg.define_asset_job(
    SYNC_JOB, selection=dg.AssetSelection.assets("positions", "executions", "account_summary"),
    description="Advance order states (reconcile crash leftovers), record executions, resize stops to their "
                "positions, cancel those whose position is gone, refresh positions and the account at the "
                "marks, keep the books, flag drift.")


def market_session_active(now: datetime) -> bool:
    """True during regular hours and shortly after the close (exchange calendar: holidays, early closes)."""
    from trading_pipeline.core import market_calendar

    return market_calendar.is_open(now) or market_calendar.is_open(now - AFTER_CLOSE_GRACE)


@dg.sensor(job=sync_portfolio_job, minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="During market hours, syncs orders, executions and positions with the broker every 5 minutes. "
                       "Sends no new order; it resizes a protective stop (and take-profit) that is larger than "
                       "its position, and cancels one whose position is gone. Off until you turn it on.")
def order_status_sensor(context: dg.SensorEvaluationContext):
    now = datetime.now(UTC)
    if not market_session_active(now):
        return dg.SkipReason(f"market closed at {now.isoformat(timespec='minutes')}: nothing to sync")
    bucket = now.replace(second=0, microsecond=0)
    bucket -= timedelta(minutes=bucket.minute % (SENSOR_INTERVAL_SECONDS // 60))
    return dg.RunRequest(run_key=f"order-status-{bucket.isoformat()}")
