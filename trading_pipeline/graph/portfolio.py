"""Portfolio assets (unpartitioned): positions, executions and the account summary, kept in step
with the broker by one sync step, and the order-status sensor that runs it during market hours."""

from datetime import datetime, timedelta, timezone

import dagster as dg

from trading_pipeline.graph.assets import run_as_of
from trading_pipeline.graph.resources import BrokerResource, MarketDataResource, TradingDatabaseResource

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


def _table(rows: list[dict], columns: list[str]) -> dg.MetadataValue:
    if not rows:
        return dg.MetadataValue.md("_none_")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |")
    return dg.MetadataValue.md("\n".join(lines))


@dg.multi_asset(
    outs={
        "positions": dg.AssetOut(description="Open positions at the broker with unrealized P&L.",
                                 group_name="portfolio"),
        "executions": dg.AssetOut(description="Fills recorded from the broker; P&L and realized R per decision.",
                                  group_name="portfolio"),
        "account_summary": dg.AssetOut(description="Equity, cash, exposure and today's P&L.",
                                       group_name="portfolio"),
    },
    check_specs=[dg.AssetCheckSpec("no_drift", asset="positions",
                                   description="The broker's orders and positions match what the pipeline sent and recorded.")],
)
def portfolio_sync(context: dg.AssetExecutionContext, broker: BrokerResource, market_data: MarketDataResource,
                   trading_db: TradingDatabaseResource):
    from trading_pipeline.adapters.portfolio_sync import sync_portfolio
    from trading_pipeline.core.strategies import TimeframeSettings

    as_of = run_as_of(context)
    the_broker = broker.broker()
    symbols = set(the_broker.account({}).positions)
    if hasattr(the_broker, "working_symbols"):
        symbols |= set(the_broker.working_symbols())
    source = market_data.source()
    history = TimeframeSettings(period=fill_history(
        as_of, the_broker.working_since() if hasattr(the_broker, "working_since") else None))
    bars = {}
    for symbol in sorted(symbols):
        try:
            bars[symbol] = source.fetch(symbol, "1d", history, as_of)
        except Exception as error:  # a symbol without data must not stop the others' sync
            context.log.warning(f"no prices for {symbol}: {error}")
    if hasattr(the_broker, "simulate_fills"):
        for line in the_broker.simulate_fills(bars):
            context.log.info(f"paper broker: {line}")
    marks = {symbol: float(frame["close"].iloc[-1]) for symbol, frame in bars.items() if not frame.empty}
    report = sync_portfolio(trading_db.sessions(), the_broker, marks)
    for change in report.status_changes:
        context.log.info(change)
    for problem in report.drift:
        context.log.warning(f"drift: {problem}")
    account = report.account
    yield dg.Output(report.positions, output_name="positions", metadata={
        "positions": _table(report.positions, ["symbol", "quantity", "average_price", "market_price",
                                               "market_value", "unrealized_pnl"]),
        "count": len(report.positions)})
    yield dg.Output(report.trades, output_name="executions", metadata={
        "trades": _table(report.trades, ["decision_id", "symbol", "side", "quantity", "entry", "exit", "status",
                                         "realized_pnl", "r_multiple"]),
        "new_executions": report.new_executions,
        "order_status_changes": dg.MetadataValue.md("\n".join(f"- {c}" for c in report.status_changes) or "_none_")})
    summary = {"equity": account.equity, "cash": account.cash, "gross_exposure": round(account.gross_exposure, 2),
               "daily_pnl": account.daily_pnl, "open_positions": account.open_positions, "broker": the_broker.name}
    yield dg.Output(summary, output_name="account_summary", metadata={**summary, "as_of": as_of.isoformat()})
    yield dg.AssetCheckResult(check_name="no_drift", asset_key="positions", passed=not report.drift,
                              severity=dg.AssetCheckSeverity.WARN,
                              metadata={"drift": dg.MetadataValue.md("\n".join(f"- {d}" for d in report.drift) or "none")})


sync_portfolio_job = dg.define_asset_job(
    SYNC_JOB, selection=dg.AssetSelection.assets("positions", "executions", "account_summary"),
    description="Advance order states, record executions, refresh positions and the account, flag drift.")


def market_session_active(now: datetime) -> bool:
    """True during regular hours and shortly after the close (exchange calendar: holidays, early closes)."""
    from trading_pipeline.core import market_calendar

    return market_calendar.is_open(now) or market_calendar.is_open(now - AFTER_CLOSE_GRACE)


@dg.sensor(job=sync_portfolio_job, minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="During market hours, syncs orders, executions and positions with the broker every 5 minutes. "
                       "Read-only towards the broker; off until you turn it on.")
def order_status_sensor(context: dg.SensorEvaluationContext):
    now = datetime.now(timezone.utc)
    if not market_session_active(now):
        return dg.SkipReason(f"market closed at {now.isoformat(timespec='minutes')}: nothing to sync")
    bucket = now.replace(second=0, microsecond=0)
    bucket -= timedelta(minutes=bucket.minute % (SENSOR_INTERVAL_SECONDS // 60))
    return dg.RunRequest(run_key=f"order-status-{bucket.isoformat()}")
