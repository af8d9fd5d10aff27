"""What the pipeline records in the trading database besides orders: strategies and their
symbols, charts, and decisions (upserted: a re-materialized partition updates its row)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.trading_db import ChartRow, DecisionRow, OrderRow, StrategyRow, SymbolRow
from trading_pipeline.core.analysis import TradeDecision
from trading_pipeline.core.strategies import Strategy


def _upsert(session: Session, model, key, values: dict) -> None:
    row = session.get(model, key)
    if row is None:
        session.add(model(**values))
    else:
        for name, value in values.items():
            setattr(row, name, value)


def record_strategy(sessions: sessionmaker[Session], strategy: Strategy) -> None:
    with sessions() as session:
        _upsert(session, StrategyRow, strategy.name, {
            "name": strategy.name, "description": strategy.description,
            "settings": strategy.model_dump(mode="json", exclude={"name", "description", "symbols"})})
        session.flush()
        for symbol in strategy.symbols:
            row = session.get(SymbolRow, symbol)
            if row is None:
                session.add(SymbolRow(symbol=symbol, strategy=strategy.name))
            else:
                row.strategy = strategy.name  # a symbol moved to another strategy
        session.commit()


def record_contract(sessions: sessionmaker[Session], strategy: Strategy, symbol: str, conid: int,
                    exchange: str | None) -> None:
    """The IBKR contract a symbol resolved to (conid, listing exchange), kept with the symbol."""
    with sessions() as session:
        row = session.get(SymbolRow, symbol)
    if row is None or row.strategy != strategy.name:  # once, not per symbol: it writes all the strategy's symbols
        record_strategy(sessions, strategy)
    with sessions() as session:
        row = session.get(SymbolRow, symbol)
        row.conid, row.exchange = int(conid), exchange
        session.commit()


def record_chart(sessions: sessionmaker[Session], *, key: str, symbol: str, timeframe: str, as_of, uri: str,
                 sha256: str, size_bytes: int, width: int, height: int) -> None:
    with sessions() as session:
        _upsert(session, ChartRow, key, dict(key=key, symbol=symbol, timeframe=timeframe, as_of=as_of, uri=uri,
                                             sha256=sha256, size_bytes=size_bytes, width=width, height=height))
        session.commit()


def record_decision(sessions: sessionmaker[Session], decision: TradeDecision) -> None:
    """Insert or refresh the decision row (a re-materialized partition updates it in place)."""
    values = decision.model_dump(mode="json", include={
        "decision_id", "strategy", "symbol", "proposed_action", "action", "entry", "stop", "targets",
        "r_multiple", "profit_margin", "confidence", "quantity", "rationale", "checks", "charts"})
    values.update(as_of=decision.as_of, data_through=decision.data_through,
                  payload=decision.model_dump(mode="json"))
    with sessions() as session:
        _upsert(session, DecisionRow, decision.decision_id, values)
        session.commit()


def sent_decision(sessions: sessionmaker[Session], decision_id: str) -> TradeDecision | None:
    """The stored decision if orders were already sent for it: a re-run must not change it."""
    with sessions() as session:
        has_orders = session.scalar(select(OrderRow.client_order_id).where(
            OrderRow.decision_id == decision_id).limit(1))
        row = session.get(DecisionRow, decision_id) if has_orders else None
        return TradeDecision.model_validate(row.payload) if row is not None and row.payload else None
