"""The trading database: decisions, orders and their events, executions (SQLAlchemy 2.0).

SQLite file by default, PostgreSQL in production (TRADING_DATABASE_URL). The paper broker keeps
its own simulated broker-side state here too, in tables prefixed `paper_`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from trading_pipeline.errors import UserError


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True)}


class StrategyRow(Base):
    """The strategies file as last seen by the pipeline (kept for history and joins)."""

    __tablename__ = "strategies"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SymbolRow(Base):
    __tablename__ = "symbols"
    symbol: Mapped[str] = mapped_column(String(16), primary_key=True)
    strategy: Mapped[str] = mapped_column(ForeignKey("strategies.name"), index=True)
    conid: Mapped[int | None] = mapped_column(Integer)  # IBKR contract id, once resolved
    exchange: Mapped[str | None] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ChartRow(Base):
    __tablename__ = "charts"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    symbol: Mapped[str] = mapped_column(String(16), index=True)
    timeframe: Mapped[str] = mapped_column(String(4))
    as_of: Mapped[datetime]
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DecisionRow(Base):
    __tablename__ = "decisions"
    decision_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    strategy: Mapped[str] = mapped_column(String(64), index=True)
    symbol: Mapped[str] = mapped_column(String(16), index=True)
    as_of: Mapped[datetime]
    data_through: Mapped[datetime]
    proposed_action: Mapped[str] = mapped_column(String(10))
    action: Mapped[str] = mapped_column(String(10))
    entry: Mapped[float | None] = mapped_column(Float)
    stop: Mapped[float | None] = mapped_column(Float)
    targets: Mapped[list] = mapped_column(JSON, default=list)
    r_multiple: Mapped[float | None] = mapped_column(Float)
    profit_margin: Mapped[float | None] = mapped_column(Float)
    confidence: Mapped[float] = mapped_column(Float)
    quantity: Mapped[int] = mapped_column(Integer)
    rationale: Mapped[str] = mapped_column(Text)
    checks: Mapped[list] = mapped_column(JSON, default=list)
    charts: Mapped[dict] = mapped_column(JSON, default=dict)
    payload: Mapped[dict] = mapped_column(JSON, default=dict)  # the whole TradeDecision, as JSON
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class OrderRow(Base):
    """An order leg as the pipeline knows it. The client order id is unique: one per decision leg."""

    __tablename__ = "orders"
    client_order_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    decision_id: Mapped[str] = mapped_column(ForeignKey("decisions.decision_id"), index=True)
    parent_client_order_id: Mapped[str | None] = mapped_column(String(64))
    symbol: Mapped[str] = mapped_column(String(16), index=True)
    role: Mapped[str] = mapped_column(String(16))  # entry, stop_loss, take_profit, exit
    side: Mapped[str] = mapped_column(String(4))
    order_type: Mapped[str] = mapped_column(String(12))
    quantity: Mapped[int] = mapped_column(Integer)
    price: Mapped[float | None] = mapped_column(Float)  # none for a market order
    tif: Mapped[str] = mapped_column(String(4))
    broker: Mapped[str] = mapped_column(String(16))
    # The broker's account the order was sent to (`Broker.account_id`: IBKR's DU…/U… id; NULL for the
    # paper broker, and for rows written before revision 0008): see `of_broker`.
    account: Mapped[str | None] = mapped_column(String(32))
    # A protective stop turned into a market exit by this decision (the exit stays in the stop's
    # one-cancels-other group, so the position is never without an order that closes it).
    exit_decision_id: Mapped[str | None] = mapped_column(String(40), index=True)
    broker_order_id: Mapped[str | None] = mapped_column(String(64))
    # "submitting" is written before the broker call: a crash leaves it, and the next attempt
    # reconciles with the broker instead of sending again.
    status: Mapped[str] = mapped_column(String(24))
    filled_quantity: Mapped[float] = mapped_column(Float, default=0.0)
    average_fill_price: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class OrderEventRow(Base):
    __tablename__ = "order_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    client_order_id: Mapped[str] = mapped_column(ForeignKey("orders.client_order_id"), index=True)
    status: Mapped[str] = mapped_column(String(24))
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(default=utcnow)


class ExecutionRow(Base):
    __tablename__ = "executions"
    execution_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_order_id: Mapped[str] = mapped_column(String(64), index=True)
    symbol: Mapped[str] = mapped_column(String(16), index=True)
    side: Mapped[str] = mapped_column(String(4))
    quantity: Mapped[float] = mapped_column(Float)
    price: Mapped[float] = mapped_column(Float)
    broker: Mapped[str] = mapped_column(String(16))
    account: Mapped[str | None] = mapped_column(String(32))  # as OrderRow.account
    executed_at: Mapped[datetime]
    commission: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")  # fees included


class PositionSnapshotRow(Base):
    __tablename__ = "position_snapshots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    taken_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    broker: Mapped[str] = mapped_column(String(16))
    account: Mapped[str | None] = mapped_column(String(32))  # as OrderRow.account
    symbol: Mapped[str] = mapped_column(String(16), index=True)
    quantity: Mapped[float] = mapped_column(Float)
    average_price: Mapped[float] = mapped_column(Float)
    market_price: Mapped[float] = mapped_column(Float)
    unrealized_pnl: Mapped[float] = mapped_column(Float)


class AccountSnapshotRow(Base):
    __tablename__ = "account_snapshots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    taken_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    broker: Mapped[str] = mapped_column(String(16))
    account: Mapped[str | None] = mapped_column(String(32))  # as OrderRow.account
    equity: Mapped[float] = mapped_column(Float)
    cash: Mapped[float] = mapped_column(Float)
    gross_exposure: Mapped[float] = mapped_column(Float)
    daily_pnl: Mapped[float | None] = mapped_column(Float)  # None: the broker could not say it
    open_positions: Mapped[int] = mapped_column(Integer)


class PaperOrderRow(Base):
    """Broker-side state of the paper broker (what a real broker would hold)."""

    __tablename__ = "paper_orders"
    broker_order_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    client_order_id: Mapped[str] = mapped_column(String(64), unique=True)
    parent_broker_order_id: Mapped[int | None] = mapped_column(Integer)
    symbol: Mapped[str] = mapped_column(String(16), index=True)
    side: Mapped[str] = mapped_column(String(4))
    order_type: Mapped[str] = mapped_column(String(12))
    quantity: Mapped[int] = mapped_column(Integer)
    price: Mapped[float | None] = mapped_column(Float)  # none for a market order
    tif: Mapped[str] = mapped_column(String(4))
    status: Mapped[str] = mapped_column(String(24))
    filled_quantity: Mapped[float] = mapped_column(Float, default=0.0)
    average_fill_price: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When it started working for fill purposes: its placement, its last modification, or its
    # parent's fill (a bracket child; None while it waits for the parent).
    live_since: Mapped[datetime | None]
    detail: Mapped[str | None] = mapped_column(Text)  # why it is in its status (cancel reason, fill note)


class PaperFillRow(Base):
    __tablename__ = "paper_fills"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    broker_order_id: Mapped[int] = mapped_column(ForeignKey("paper_orders.broker_order_id"), index=True)
    symbol: Mapped[str] = mapped_column(String(16), index=True)
    side: Mapped[str] = mapped_column(String(4))
    quantity: Mapped[float] = mapped_column(Float)
    price: Mapped[float] = mapped_column(Float)
    executed_at: Mapped[datetime] = mapped_column(default=utcnow)
    commission: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")  # fees included


class BrokerAccount(Protocol):
    """What `of_broker` reads of a broker (any `Broker`, or a `BrokerKey`)."""

    name: str

    @property
    def account_id(self) -> str | None: ...


@dataclass(frozen=True)
class BrokerKey:
    """A broker's name and account as the rows store them (`OrderRow.broker`, `OrderRow.account`)."""

    name: str
    account_id: str | None = None


def describe_broker(name: str, account: str | None) -> str:
    """'the paper broker', 'the ibkr broker (account DU1234567)'."""
    return f"the {name} broker" + (f" (account {account})" if account else "")


def of_broker(model: type[OrderRow | ExecutionRow | PositionSnapshotRow | AccountSnapshotRow],
              broker: BrokerAccount):
    """The one predicate every query uses to read a broker's rows: the rows of `model` (OrderRow,
    ExecutionRow, PositionSnapshotRow or AccountSnapshotRow: each has `broker` and `account`) written
    for `broker` (a `Broker`, or a `BrokerKey`): its `name` ("paper", "ibkr") and its `account_id`
    (the IBKR account it trades, DU… or U…; None for the paper broker, one simulated account). One
    trading database can hold several: a user who ran on paper, then set TRADING_BROKER=ibkr; or who
    traded the IBKR paper account (DU…) for weeks, then logged the gateway in to the live account
    (U…). Another broker's or another account's open orders are never sent to, asked of, cancelled
    at or counted for this one, its fills are not this account's, and its syncs' position and
    account snapshots are not this account's syncs (the orphan-stop timing and the "since the last
    sync" window read them).

    A row of this broker's name whose account is NULL (written before revision 0008, which added
    the column) belongs to whichever account of that broker runs, as it did before: an upgrade
    never orphans the working stops of an existing user. A broker whose account_id is None reads
    every row of its name. IBKR's account id is its pre-flight's (`/iserver/accounts`, cached for
    the brokerage session), asked once per call."""
    account = broker.account_id
    if account is None:
        return model.broker == broker.name
    return (model.broker == broker.name) & (model.account.is_(None) | (model.account == account))


MIGRATION_LOCK_ID = 7_420_011  # PostgreSQL advisory lock: one process migrates at a time
ACCOUNT_LOCK_ID = 7_420_012  # PostgreSQL advisory lock: one order placement per account at a time
ACCOUNT_LOCK_TIMEOUT_SECONDS = 120.0


def _lock_not_free(lock: str, timeout: float) -> UserError:
    return UserError(
        f"{lock} was not free within {timeout:g} s: another run or the portfolio sync held it all that time "
        "(it places, changes and cancels orders under it), so nothing was sent or changed under it here",
        "run the step again once the other run has finished; if the lock stays taken, find the run that "
        "holds it in the Dagster UI (a sync waiting on a cancel at the broker, a stuck orders step) and "
        "terminate it: the lock is released when its process ends")


@contextlib.contextmanager
def account_lock(sessions: sessionmaker[Session], timeout: float = ACCOUNT_LOCK_TIMEOUT_SECONDS):
    """Hold the account's order lock: the limit check and the placement of one run happen while no
    other run or process checks or places (else two runs size on the same snapshot and together
    break max_open_positions or the exposure cap). PostgreSQL: a session advisory lock on its own
    connection; SQLite: an exclusive lock on a file beside the database (SQLite's own write lock
    cannot be held across a broker call without blocking every other writer)."""
    engine = sessions.kw["bind"]
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SET lock_timeout = :ms"), {"ms": f"{int(timeout * 1000)}ms"})
            try:
                connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": ACCOUNT_LOCK_ID})
            except OperationalError:
                raise _lock_not_free("the account lock (a PostgreSQL advisory lock)", timeout) from None
            connection.commit()
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": ACCOUNT_LOCK_ID})
                connection.commit()
        return
    database = engine.url.database
    lock_path = Path(f"{database}.account.lock") if database and database != ":memory:" else None
    if lock_path is None:  # an in-memory database lives in one process: a thread lock is enough
        with _MEMORY_LOCK:
            yield
        return
    with open(lock_path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _lock_not_free(f"the account lock {lock_path}", timeout) from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_MEMORY_LOCK = threading.RLock()


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (creates it on an empty database)."""
    from trading_pipeline import migrations

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        migrations.upgrade(engine.url.render_as_string(hide_password=False), connection=connection)


def create_private_file(path: Path) -> None:
    """Create the SQLite file for this user only (0600, its folder 0700 when made here): it holds the
    account's orders, positions and P&L and the model calls. SQLite makes its -wal and -shm files with
    the database file's mode. A file or folder that exists keeps its mode."""
    if str(path) == ":memory:" or path.exists():
        return
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # an empty file is an empty SQLite database


@functools.lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per URL per process, with the schema migrated on first use."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        create_private_file(Path(parsed.database))
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # concurrent runs: WAL + wait on locks
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    upgrade_schema(engine)
    return engine


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)
