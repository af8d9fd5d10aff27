"""Consolidation: the daily analysis leads, the weekly confirms; then the risk gates decide."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from trading_pipeline.core.analysis import Action, TimeframeAnalysis, TradeDecision
from trading_pipeline.core.market_calendar import bar_close_time, isoformat, periods_closed_between
from trading_pipeline.core.risk import TICK, AccountState, MarketContext, Proposal, evaluate
from trading_pipeline.core.strategies import Strategy

LEAD, CONFIRM = "1d", "1w"


@dataclass(frozen=True)
class Consolidated:
    proposal: Proposal
    confirmation: str
    rationale: str


def consolidate(daily: TimeframeAnalysis, weekly: TimeframeAnalysis) -> Consolidated:
    """Combine the per-timeframe analyses into one proposal. Fails closed on any invalid input."""
    invalid = [a for a in (daily, weekly) if not a.valid]
    if invalid:
        reasons = "; ".join(f"{a.timeframe}: {a.invalid_reason}" for a in invalid)
        return Consolidated(Proposal(Action.NO_TRADE, None, None, [], 0.0), "none",
                            f"NO_TRADE because an analysis is unusable ({reasons})")
    lead = daily.signal
    if lead not in (Action.BUY, Action.SELL):
        return Consolidated(Proposal(Action.HOLD, None, None, [], daily.confidence), "none",
                            f"HOLD: the daily analysis shows no setup ({daily.rationale})")
    opposite = Action.SELL if lead == Action.BUY else Action.BUY
    if weekly.signal == opposite:
        return Consolidated(
            Proposal(Action.HOLD, None, None, [], daily.confidence), "unconfirmed",
            f"HOLD: daily {lead.value} is opposed by weekly {weekly.signal.value} "
            f"(daily: {daily.rationale} | weekly: {weekly.rationale})")
    if weekly.signal == lead:
        confirmation, confidence = "confirmed (strong)", min(1.0, (daily.confidence + weekly.confidence) / 2 + 0.1)
    else:
        confirmation, confidence = "partially confirmed (weekly neutral)", max(0.0, daily.confidence - 0.1)
    return Consolidated(
        Proposal(lead, daily.entry, daily.stop, list(daily.targets), round(confidence, 2)),
        confirmation,
        f"{lead.value} led by the daily analysis, {confirmation} by the weekly "
        f"(daily: {daily.rationale} | weekly: {weekly.rationale})")


# How many newer periods may have closed between an analysis and the decision that uses it: the
# daily must be the latest (the close schedule runs after every session, the market-open sensor
# decides before the next one closes); the weekly may lag one week (its schedule runs after the
# daily's, and a weekly confirmation a week old still says which way the larger trend points).
MAX_NEWER_PERIODS = {"1d": 0, "1w": 1}


def analyses_out_of_date(daily: TimeframeAnalysis, weekly: TimeframeAnalysis, decided_at: datetime) -> str | None:
    """Why these analyses cannot back a decision at `decided_at`, or None.

    Look-ahead: an analysis saw a bar that had not closed by `decided_at` (e.g. the 1w partition
    was materialized now and the decision replays an earlier point in time). Staleness: newer
    bars had closed by `decided_at` than the analysis saw (its schedule is off, or a run failed).
    """
    problems = []
    for analysis in (daily, weekly):
        tf, symbol = analysis.timeframe, analysis.symbol
        closed_at = bar_close_time(analysis.data_through, tf)
        if closed_at is not None and closed_at > decided_at:
            problems.append(
                f"the {tf} analysis saw the bar of {analysis.data_through:%Y-%m-%d}, which closed at "
                f"{closed_at:%Y-%m-%d %H:%M} UTC, after this decision's point in time {decided_at:%Y-%m-%d %H:%M} UTC "
                f"(look-ahead): materialize {symbol}|{tf} with the run tag trading/as_of={decided_at.isoformat()}")
            continue
        newer = periods_closed_between(analysis.as_of, decided_at, tf)
        if newer > MAX_NEWER_PERIODS[tf]:
            unit = "session" if tf == "1d" else "week"
            problems.append(
                f"the {tf} analysis is out of date: it was made as of {analysis.as_of:%Y-%m-%d %H:%M} UTC and "
                f"{newer} {unit}(s) closed after it, by {decided_at:%Y-%m-%d %H:%M} UTC (at most "
                f"{MAX_NEWER_PERIODS[tf]} allowed): materialize {symbol}|{tf} first (the {tf} close schedule does)")
    return "; ".join(problems) or None


def decision_id(strategy: str, symbol: str, data_through: datetime, action: Action) -> str:
    """Same strategy, symbol, daily bars and direction => same decision, whatever the run.

    Prices are left out on purpose: a re-materialized partition whose analyst answers with
    slightly different numbers is still the same decision and must not send a second order.
    """
    key = f"{strategy}|{symbol}|{isoformat(data_through)}|{action.value}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def decide(
    strategy: Strategy,
    symbol: str,
    daily: TimeframeAnalysis,
    weekly: TimeframeAnalysis,
    account: AccountState,
    *,
    market_open: bool,
    next_open: str,
    kill_switch: tuple[bool, str] = (False, ""),
    consolidator: Callable[[TimeframeAnalysis, TimeframeAnalysis], Consolidated] = consolidate,
    decided_at: datetime | None = None,
    tick: float = TICK,
) -> TradeDecision:
    """Consolidate (by default the deterministic rule above; the OpenAI analyst brings its own,
    equally fail-closed) and let the risk gates decide. `decided_at` is the decision's point in
    time (the run's as_of; default the daily analysis's): analyses that saw past it, or that
    newer closed bars have overtaken, give NO_TRADE before any consolidation (or model call).
    `tick` is the contract's minimum price increment: prices are rounded to it before the gates."""
    decided_at = decided_at or daily.as_of
    out_of_date = analyses_out_of_date(daily, weekly, decided_at)
    if out_of_date:
        consolidated = Consolidated(Proposal(Action.NO_TRADE, None, None, [], 0.0), "none",
                                    f"NO_TRADE because the analyses do not match this point in time: {out_of_date}")
    else:
        consolidated = consolidator(daily, weekly)
    proposal = consolidated.proposal
    market = MarketContext(daily.last_close, daily.atr, daily.recent_high, daily.recent_low,
                           market_open, next_open, tick)
    verdict = evaluate(proposal, symbol, market, account, strategy.risk,
                       kill_switch=kill_switch, tif=strategy.orders.tif,
                       when_market_closed=strategy.orders.when_market_closed)
    if proposal.action in (Action.BUY, Action.SELL):
        action = proposal.action if verdict.accepted else Action.NO_TRADE
    else:
        action = proposal.action
    rationale = consolidated.rationale
    if proposal.action in (Action.BUY, Action.SELL) and not verdict.accepted:
        rationale = ("NO_TRADE: risk gates rejected the proposal: "
                     + "; ".join(f"{c.rule}: {c.detail}" for c in verdict.checks if not c.passed)
                     + f". Proposal: {rationale}")
    charts = {a.timeframe: a.chart for a in (daily, weekly) if a.chart is not None}
    return TradeDecision.model_validate(dict(  # one dict: the constructor's validation, no keyword repacking
        decision_id=decision_id(strategy.name, symbol, daily.data_through, proposal.action),
        strategy=strategy.name, symbol=symbol, as_of=decided_at, data_through=daily.data_through,
        proposed_action=proposal.action, action=action,
        entry=verdict.entry, stop=verdict.stop, targets=verdict.targets,
        r_multiple=verdict.r_multiple, profit_margin=verdict.profit_margin,
        confidence=proposal.confidence, quantity=verdict.quantity,
        closes_position=verdict.closes_position, account_equity=account.equity,
        confirmation=consolidated.confirmation, rationale=rationale, checks=verdict.checks,
        charts=charts, analysts={a.timeframe: a.analyst for a in (daily, weekly)},
    ))


def decision_not_current(decision: TradeDecision, now: datetime, max_age_minutes: int | None = None) -> str | None:
    """Why a decision can no longer be sent at `now`, or None. A decision is current from its point
    in time until the next session closes (its prices are then history), and no longer than
    `max_age_minutes` when the strategy says so. A replay of the past is the backtest's job."""
    made = decision.as_of
    if made > now:
        return (f"the decision is for {made:%Y-%m-%d %H:%M} UTC, after the send time {now:%Y-%m-%d %H:%M} UTC "
                "(a run tag trading/as_of in the future?); nothing is sent ahead of its time")
    closed = periods_closed_between(made, now, "1d")
    if closed:
        return (f"the decision was made at {made:%Y-%m-%d %H:%M} UTC and {closed} session(s) closed since, by "
                f"{now:%Y-%m-%d %H:%M} UTC: its prices are history. Materialize {decision.symbol}'s analyses and "
                "trade_decisions again for a current decision (replaying the past is the backtest's job)")
    age = (now - made).total_seconds() / 60
    if max_age_minutes is not None and age > max_age_minutes:
        return (f"the decision is {age:.0f} minutes old, over the strategy's orders.max_decision_age_minutes "
                f"{max_age_minutes}: materialize trade_decisions again for a current decision")
    return None
