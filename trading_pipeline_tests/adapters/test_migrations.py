"""The Alembic revisions build exactly the schema the models describe, on SQLite and PostgreSQL;
a start on a current database changes nothing, one on an older database upgrades it."""

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from trading_pipeline.adapters import model_calls, trading_db  # noqa: F401  (all models)


def test_migrations_match_models_and_are_idempotent(database_url):
    engine = trading_db.get_engine(database_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, trading_db.Base.metadata) == []
        revision = context.get_current_revision()
    assert revision is not None
    trading_db.upgrade_schema(engine)  # a second start
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == revision
        tables = set(sa.inspect(connection).get_table_names())
    assert {"strategies", "symbols", "decisions", "orders", "order_events", "executions", "charts",
            "position_snapshots", "account_snapshots", "paper_orders", "paper_fills", "llm_calls",
            "llm_response_cache", "alembic_version"} <= tables


def test_a_database_behind_the_head_is_upgraded_at_the_next_start(database_url):
    """A start skips Alembic's env.py only when the database is at the head already (migrations.is_current)."""
    from alembic import command

    from trading_pipeline import migrations

    engine = trading_db.get_engine(database_url)
    config = migrations.alembic_config(database_url)
    with engine.begin() as connection:
        head = MigrationContext.configure(connection).get_current_revision()
        config.attributes["connection"] = connection
        command.downgrade(config, "-1")  # as a database left by the previous release
        assert not migrations.is_current(config, connection)
    trading_db.upgrade_schema(engine)
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head
        assert migrations.is_current(config, connection)
        assert "backtest_trades" in sa.inspect(connection).get_table_names()


def test_a_downgrade_that_cannot_hold_a_snapshot_stops_and_keeps_it(database_url):
    """0007 made daily_pnl nullable (an unknown P&L); going back must not drop those snapshots quietly."""
    import pytest
    from alembic import command

    from trading_pipeline import migrations

    engine = trading_db.get_engine(database_url)
    config = migrations.alembic_config(database_url)
    with engine.begin() as connection:
        head = MigrationContext.configure(connection).get_current_revision()
        connection.execute(sa.insert(trading_db.AccountSnapshotRow).values(
            broker="ibkr", equity=1000.0, cash=1000.0, gross_exposure=0.0, daily_pnl=None, open_positions=0))
    with pytest.raises(RuntimeError, match=r"1 account snapshot\(s\) have an unknown daily P&L.*DELETE FROM"), \
            engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0006_answered_model")
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(trading_db.AccountSnapshotRow)).scalar() == 1
        assert MigrationContext.configure(connection).get_current_revision() == head  # nothing half done
