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


def _one_ibkr_order_and_fill(connection, account_values: dict | None = None) -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 11, 20, tzinfo=UTC)
    connection.execute(sa.insert(trading_db.DecisionRow).values(
        decision_id="d-1", strategy="s", symbol="AAPL", as_of=now, data_through=now, proposed_action="BUY",
        action="BUY", confidence=0.7, quantity=50, rationale="r"))
    connection.execute(sa.insert(trading_db.OrderRow).values(
        client_order_id="tp-d-1-sl", decision_id="d-1", symbol="AAPL", role="stop_loss", side="SELL",
        order_type="STP", quantity=50, price=85.0, tif="GTC", broker="ibkr", status="Submitted",
        **(account_values or {})))
    connection.execute(sa.insert(trading_db.ExecutionRow).values(
        execution_id="e-1", client_order_id="tp-d-1", symbol="AAPL", side="BUY", quantity=50.0, price=100.0,
        broker="ibkr", executed_at=now, **(account_values or {})))


def test_a_database_with_orders_from_before_the_account_column_keeps_them_for_the_ibkr_account_that_runs(
        database_url):
    """0008 added orders.account, executions.account and the snapshots' account (two IBKR accounts,
    DU… and U…, on one database): the rows an existing user has keep NULL, and every IBKR account
    reads them as its own (a working stop is never orphaned by the upgrade); another broker's
    reading does not."""
    from alembic import command

    from trading_pipeline import migrations

    engine = trading_db.get_engine(database_url)
    config = migrations.alembic_config(database_url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0007_unknown_daily_pnl")  # the release before, with its rows
        assert "account" not in {c["name"] for c in sa.inspect(connection).get_columns("orders")}
        assert "account" not in {c["name"] for c in sa.inspect(connection).get_columns("account_snapshots")}
        assert "account" not in {c["name"] for c in sa.inspect(connection).get_columns("position_snapshots")}
        _one_ibkr_order_and_fill(connection)
        connection.execute(sa.insert(trading_db.AccountSnapshotRow).values(
            broker="ibkr", equity=1000.0, cash=1000.0, gross_exposure=0.0, daily_pnl=0.0, open_positions=1))
        connection.execute(sa.insert(trading_db.PositionSnapshotRow).values(
            broker="ibkr", symbol="AAPL", quantity=50.0, average_price=100.0, market_price=100.0, unrealized_pnl=0.0))
    trading_db.upgrade_schema(engine)
    with engine.connect() as connection:
        assert connection.execute(sa.select(trading_db.OrderRow.account, trading_db.OrderRow.status)).all() == [
            (None, "Submitted")]
        assert connection.execute(sa.select(trading_db.ExecutionRow.account)).all() == [(None,)]
        for reader in (trading_db.BrokerKey("ibkr", "DU1234567"), trading_db.BrokerKey("ibkr", "U7654321")):
            assert connection.execute(sa.select(trading_db.OrderRow.client_order_id).where(
                trading_db.of_broker(trading_db.OrderRow, reader))).scalars().all() == ["tp-d-1-sl"]
            assert connection.execute(sa.select(trading_db.ExecutionRow.execution_id).where(
                trading_db.of_broker(trading_db.ExecutionRow, reader))).scalars().all() == ["e-1"]
            for snapshot in (trading_db.AccountSnapshotRow, trading_db.PositionSnapshotRow):  # the syncs' too
                assert connection.execute(sa.select(snapshot.account).where(
                    trading_db.of_broker(snapshot, reader))).all() == [(None,)]
        assert connection.execute(sa.select(trading_db.OrderRow.client_order_id).where(
            trading_db.of_broker(trading_db.OrderRow, trading_db.BrokerKey("paper")))).scalars().all() == []


def test_a_downgrade_that_would_merge_two_accounts_orders_stops_and_keeps_them(database_url):
    import pytest
    from alembic import command

    from trading_pipeline import migrations

    engine = trading_db.get_engine(database_url)
    config = migrations.alembic_config(database_url)
    with engine.begin() as connection:
        _one_ibkr_order_and_fill(connection, {"account": "DU1234567"})
        connection.execute(sa.insert(trading_db.OrderRow).values(
            client_order_id="tp-d-2", decision_id="d-1", symbol="AAPL", role="entry", side="BUY", order_type="LMT",
            quantity=50, price=100.0, tif="DAY", broker="ibkr", account="U7654321", status="Submitted"))
        head = MigrationContext.configure(connection).get_current_revision()
    with pytest.raises(RuntimeError, match=r"orders of ibkr \(2 accounts\) name more than one account"), \
            engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0007_unknown_daily_pnl")
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head
        assert {row.account for row in connection.execute(sa.select(trading_db.OrderRow.account))} == {
            "DU1234567", "U7654321"}
