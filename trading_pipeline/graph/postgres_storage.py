"""Dagster's PostgreSQL storage for docker compose (deploy/dagster.yaml), with cheaper event writes.

The same tables and behaviour as `storage: postgres`. What differs is how an event is written:
Dagster's PostgreSQL event log opens a new connection for every write in every process but the
webserver (a new server process each time: 8-12 ms an asset event, 12-19 on a busy machine, a
batched run writes ~14 per partition). Here each process keeps one connection open for the event
log, as the webserver does (2-3 ms an event), and a batch of asset events (a batched run's
materializations of one asset, a run's planned materializations) is written as one: Dagster
hands storages batches only when DAGSTER_EVENT_BATCH_SIZE is set, which this module sets, unless
the deployment does, in every process that loads this storage. Measured with bench/daemon.py
(docs/production.md, Batched runs).
"""

from __future__ import annotations

import os

from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

# Large enough that a batched run's events of one output (or its planned events) are one batch.
os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", "1000")

_NO_STATEMENT_TIMEOUT = 0  # the webserver sets its own; runs and the daemon have none, as with Dagster's
_POOL_RECYCLE_S = 3600  # the webserver's default


class PooledPostgresStorage(DagsterPostgresStorage):
    """`storage: postgres` whose event log keeps one connection per process. In dagster.yaml:
    storage: {custom: {module: trading_pipeline.graph.postgres_storage, class: PooledPostgresStorage,
    config: {postgres_db: {...}}}} (the same settings as under `storage: postgres`)."""

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True,
                 inst_data: ConfigurableClassData | None = None, token_provider=None):
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        # Dagster's own switch from a connection per use to a kept one (what dagster-webserver calls).
        self.event_log_storage.optimize_for_webserver(
            statement_timeout=_NO_STATEMENT_TIMEOUT, pool_recycle=_POOL_RECYCLE_S, max_overflow=2)

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> PooledPostgresStorage:
        return cls(postgres_url=pg_url_from_config(config_value), inst_data=inst_data,
                   should_autocreate_tables=config_value.get("should_autocreate_tables", True),
                   token_provider=get_token_provider_from_config(config_value))
