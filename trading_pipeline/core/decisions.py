"""Consolidation: the daily analysis leads, the weekly confirms; then the risk gates decide."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from trading_pipeline.core.analysis import Action, TimeframeAnalysis, TradeDecision
from trading_pipeline.core.risk import AccountState, MarketContext, Proposal, evaluate
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


def decision_id(strategy: str, symbol: str, data_through: datetime, action: Action) -> str:
    """Same strategy, symbol, daily bars and direction => same decision, whatever the run.

    Prices are left out on purpose: a re-materialized partition whose analyst answers with
    slightly different numbers is still the same decision and must not send a second order.
    """
    key = f"{strategy}|{symbol}|{data_through.isoformat()}|{action.value}"
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
) -> TradeDecision:
    """Consolidate (by default the deterministic rule above; the OpenAI analyst brings its own,
    equally fail-closed) and let the risk gates decide."""
    consolidated = consolidator(daily, weekly)
    proposal = consolidated.proposal
    market = MarketContext(daily.last_close, daily.atr, daily.recent_high, daily.recent_low,
                           market_open, next_open)
    verdict = evaluate(proposal, symbol, market, account, strategy.risk,
                       kill_switch=kill_switch, tif=strategy.orders.tif)
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
    return TradeDecision(
        decision_id=decision_id(strategy.name, symbol, daily.data_through, proposal.action),
        strategy=strategy.name, symbol=symbol, as_of=daily.as_of, data_through=daily.data_through,
        proposed_action=proposal.action, action=action,
        entry=verdict.entry, stop=verdict.stop, targets=verdict.targets,
        r_multiple=verdict.r_multiple, profit_margin=verdict.profit_margin,
        confidence=proposal.confidence, quantity=verdict.quantity,
        closes_position=verdict.closes_position, account_equity=account.equity,
        confirmation=consolidated.confirmation, rationale=rationale, checks=verdict.checks,
        charts=charts, analysts={a.timeframe: a.analyst for a in (daily, weekly)},
    )
