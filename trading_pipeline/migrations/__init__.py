"""Alembic migrations of the trading database. `upgrade(url)` brings any database to the head
revision; the Dagster resources and `make demo` call it, so users never run Alembic by hand.
To write a new revision after changing the models in adapters/trading_db.py:
    .venv/bin/python -m trading_pipeline.migrations revision "what changed"
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, connection=None) -> None:
    from alembic import command

    config = alembic_config(url)
    if connection is not None:
        if is_current(config, connection):
            return
        config.attributes["connection"] = connection
    command.upgrade(config, "head")


def is_current(config, connection) -> bool:
    """Is the database at the head revision already? Asked without Alembic's env.py, whose imports
    (every model module, the backtest's with pandas and numba) cost a fresh process 1-2 s: every run
    process opens the database, and nearly always finds it current."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(config).get_heads())
    return set(MigrationContext.configure(connection).get_current_heads()) == heads


def main(argv: list[str]) -> int:
    from alembic import command

    if len(argv) != 2 or argv[0] != "revision":
        print('usage: python -m trading_pipeline.migrations revision "message"', file=sys.stderr)
        return 2
    url = "sqlite:///" + str(HERE / "_autogenerate.db")
    try:
        upgrade(url)
        command.revision(alembic_config(url), message=argv[1], autogenerate=True)
    finally:
        (HERE / "_autogenerate.db").unlink(missing_ok=True)
    return 0

