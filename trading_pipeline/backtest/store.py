"""Backtest results in the trading database (migration 0003): one row per run, keyed by the run
key (settings + code version + data), with its trades, daily equity and decisions.

Storing a run again under the same key replaces its rows: the same key gives the same result
(the tests hold two runs equal), so nothing is lost.
"""

from __future__ import annotations

import math
from datetime import date, datetime

from sqlalchemy import JSON, Boolean, Date, Float, ForeignKey, Integer, String, Text, delete, insert
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from trading_pipeline.adapters.trading_db import Base, utcnow
from trading_pipeline.backtest.engine import BacktestResult


class BacktestRunRow(Base):
    __tablename__ = "backtest_runs"
    run_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    strategy: Mapped[str] = mapped_column(String(64), index=True)
    start: Mapped[date] = mapped_column(Date)
    end: Mapped[date] = mapped_column(Date)
    analyst: Mapped[str] = mapped_column(String(128))
    settings: Mapped[dict] = mapped_column(JSON)
    code_version: Mapped[str] = mapped_column(String(32))
    data_digest: Mapped[str] = mapped_column(String(64))
    result_digest: Mapped[str] = mapped_column(String(64))
    summary: Mapped[dict] = mapped_column(JSON)  # the report's figures
    warnings: Mapped[list] = mapped_column(JSON, default=list)
    chart_uri: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BacktestTradeRow(Base):
    __tablename__ = "backtest_trades"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_key: Mapped[str] = mapped_column(ForeignKey("backtest_runs.run_key", ondelete="CASCADE"), index=True)
    symbol: Mapped[str] = mapped_column(String(16))
    direction: Mapped[int] = mapped_column(Integer)
    quantity: Mapped[float] = mapped_column(Float)
    decision_id: Mapped[str] = mapped_column(String(40))
    planned_entry: Mapped[float] = mapped_column(Float)
    stop: Mapped[float] = mapped_column(Float)
    target: Mapped[float] = mapped_column(Float)
    entry_price: Mapped[float] = mapped_column(Float)
    entry_at: Mapped[datetime]
    exit_price: Mapped[float | None] = mapped_column(Float)
    exit_at: Mapped[datetime | None]
    exit_reason: Mapped[str | None] = mapped_column(String(16))
    commission: Mapped[float] = mapped_column(Float)
    pnl: Mapped[float | None] = mapped_column(Float)
    r_multiple: Mapped[float | None] = mapped_column(Float)
    sessions_held: Mapped[int | None] = mapped_column(Integer)


class BacktestEquityRow(Base):
    __tablename__ = "backtest_equity"
    run_key: Mapped[str] = mapped_column(ForeignKey("backtest_runs.run_key", ondelete="CASCADE"), primary_key=True)
    session: Mapped[date] = mapped_column(Date, primary_key=True)
    equity: Mapped[float] = mapped_column(Float)
    cash: Mapped[float] = mapped_column(Float)
    gross_exposure: Mapped[float] = mapped_column(Float)


class BacktestDecisionRow(Base):
    __tablename__ = "backtest_decisions"
    run_key: Mapped[str] = mapped_column(ForeignKey("backtest_runs.run_key", ondelete="CASCADE"), primary_key=True)
    session: Mapped[date] = mapped_column(Date, primary_key=True)
    symbol: Mapped[str] = mapped_column(String(16), primary_key=True)
    decision_id: Mapped[str] = mapped_column(String(40))
    proposed_action: Mapped[str] = mapped_column(String(10))
    action: Mapped[str] = mapped_column(String(10))
    quantity: Mapped[int] = mapped_column(Integer)
    entry: Mapped[float | None] = mapped_column(Float)
    stop: Mapped[float | None] = mapped_column(Float)
    target: Mapped[float | None] = mapped_column(Float)
    r_multiple: Mapped[float | None] = mapped_column(Float)
    failed_gates: Mapped[list] = mapped_column(JSON, default=list)
    invalid_analysis: Mapped[bool] = mapped_column(Boolean)


def _plain(value):
    """JSON-safe: NaN and infinities become None; pandas tables become records."""
    import pandas as pd

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return {str(i): _plain(row.to_dict()) for i, row in value.iterrows()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _plain(value.item())
    return value


def save(sessions: sessionmaker[Session], result: BacktestResult, summary: dict, chart_uri: str | None = None) -> str:
    key = result.run_key
    s = result.settings
    with sessions.begin() as session:
        for table in (BacktestDecisionRow, BacktestEquityRow, BacktestTradeRow, BacktestRunRow):
            session.execute(delete(table).where(table.run_key == key))
        session.add(BacktestRunRow(
            run_key=key, strategy=s.strategy, start=s.start, end=s.end, analyst=result.analyst,
            settings=s.model_dump(mode="json"), code_version=result.code_version, data_digest=result.data_digest,
            result_digest=summary["result_digest"], summary=_plain({k: v for k, v in summary.items()
                                                                    if k not in ("run_key", "result_digest")}),
            warnings=list(result.warnings), chart_uri=chart_uri))
        session.flush()
        if result.trades:
            session.execute(insert(BacktestTradeRow), [{
                "run_key": key, "symbol": t.symbol, "direction": t.direction, "quantity": t.quantity,
                "decision_id": t.decision_id, "planned_entry": t.planned_entry, "stop": t.stop, "target": t.target,
                "entry_price": t.entry_price, "entry_at": t.entry_at, "exit_price": t.exit_price, "exit_at": t.exit_at,
                "exit_reason": t.exit_reason, "commission": t.commission,
                "pnl": t.pnl if t.closed else None, "r_multiple": t.r_multiple if t.closed else None,
                "sessions_held": t.sessions_held if t.closed else None} for t in result.trades])
        session.execute(insert(BacktestEquityRow), [
            {"run_key": key, "session": day.date(), "equity": float(e), "cash": float(c), "gross_exposure": float(g)}
            for day, e, c, g in zip(result.equity.index, result.equity, result.cash, result.gross_exposure, strict=True)])
        if result.decisions:
            session.execute(insert(BacktestDecisionRow), [{
                "run_key": key, "session": d.session, "symbol": d.symbol, "decision_id": d.decision_id,
                "proposed_action": d.proposed, "action": d.action, "quantity": d.quantity, "entry": d.entry,
                "stop": d.stop, "target": d.target, "r_multiple": d.r_multiple, "failed_gates": list(d.failed_gates),
                "invalid_analysis": d.invalid_analysis} for d in result.decisions])
    return key
