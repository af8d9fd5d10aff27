"""Alembic environment: the models' metadata, and a connection passed in by `upgrade()`."""

from alembic import context
from sqlalchemy import create_engine

from trading_pipeline.adapters import model_calls, trading_db  # noqa: F401  (model_calls: its tables)
from trading_pipeline.backtest import store  # noqa: F401  (its tables)

target_metadata = trading_db.Base.metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        _migrate(connection)
    engine.dispose()


def _migrate(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER much
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run()
