"""A trading database made before paper commissions upgrades in place: its orders keep working
from when they did, its fills and executions cost nothing retroactively."""

from datetime import UTC, datetime

import pandas as pd
import sqlalchemy as sa
from alembic import command

from trading_pipeline import migrations
from trading_pipeline.adapters.broker import PaperBroker
from trading_pipeline.adapters.trading_db import get_engine, session_factory

PLACED = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
FILLED = datetime(2026, 9, 2, 13, 30, tzinfo=UTC)


def test_an_existing_database_upgrades_and_its_orders_keep_their_live_time(database_url):
    command.upgrade(migrations.alembic_config(database_url), "0002")
    old = sa.create_engine(database_url)
    with old.begin() as connection:
        rows = [(1, "old", None, "Filled", 50.0), (2, "old-sl", 1, "Submitted", 0.0), (3, "old-tp", 1, "Submitted", 0.0),
                (4, "wait", None, "Submitted", 0.0), (5, "wait-sl", 4, "PreSubmitted", 0.0)]
        for order_id, coid, parent, status, filled in rows:
            connection.execute(sa.text(
                "INSERT INTO paper_orders (broker_order_id, client_order_id, parent_broker_order_id, symbol, side, "
                "order_type, quantity, price, tif, status, filled_quantity, created_at) VALUES "
                "(:id, :coid, :parent, 'AAPL', 'BUY', 'LMT', 50, 100.0, 'GTC', :status, :filled, :placed)"),
                {"id": order_id, "coid": coid, "parent": parent, "status": status, "filled": filled, "placed": PLACED})
        connection.execute(sa.text("INSERT INTO paper_fills (broker_order_id, symbol, side, quantity, price, executed_at)"
                                   " VALUES (1, 'AAPL', 'BUY', 50, 100.0, :at)"), {"at": FILLED})
        connection.execute(sa.text("INSERT INTO executions (execution_id, client_order_id, symbol, side, quantity, "
                                   "price, broker, executed_at) VALUES ('paper-1', 'old', 'AAPL', 'BUY', 50, 100.0, "
                                   "'paper', :at)"), {"at": FILLED})
    old.dispose()

    get_engine.cache_clear()
    sessions = session_factory(database_url)  # migrates to the newest revision, as every start does
    with sessions() as session:
        live = dict(session.execute(sa.text("SELECT client_order_id, live_since FROM paper_orders")).all())
        assert session.execute(sa.text("SELECT commission FROM executions")).scalar_one() == 0.0

    def utc(value):  # SQLite answers naive text, PostgreSQL an aware datetime
        if value is None:
            return None
        stamp = pd.Timestamp(value)
        return (stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")).to_pydatetime()

    assert {coid: utc(at) for coid, at in live.items()} == {
        "old": PLACED, "old-sl": FILLED, "old-tp": FILLED, "wait": PLACED, "wait-sl": None}
    broker = PaperBroker(sessions, 100_000.0)
    assert broker.executions("old")[0].commission == 0.0
    assert broker.account({}, as_of=FILLED).cash == 100_000 - 5_000
