"""Dagster's SQLite storage for the laptop instance (deploy/local/dagster.yaml), with cheaper event writes.

Same files, tables and behaviour as Dagster's default SQLite storage (`storage: sqlite`): runs.db,
one <run_id>.db per run plus index.db under history/runs, schedules.db. What differs is how an event
is written. Dagster's event log builds a new SQLAlchemy engine for every write and closes its
connection after it; the last connection to close checkpoints the WAL into the database file. So
each asset event cost an engine, a cold statement cache, and a commit plus checkpoint in the run's
file and again in index.db (3 of them for a check evaluation): 10-40 ms each on 2 cores, and a
batched run writes ~14 asset events per partition. Measured with bench/daemon.py (docs/production.md).

Here:
- each database file keeps one engine (its compiled statements are reused);
- index.db keeps one open connection: nothing watches that file, so it need not be checkpointed per write;
- a run's own file keeps its connection too. Closing it after each write checkpointed the WAL into
  the file, with a flush to the disk each time (9-17 ms a write here, a dozen per partition); the
  webserver shows a running run's new events when Dagster's watch sees that file change, which now
  is a touch of its modification time after each write (inotify and FSEvents report both). The
  WAL is checkpointed when the process closes its storage (a run's process does at its end), and
  by SQLite every 1000 pages; readers see committed events in the WAL either way;
- whether index.db has a table or a finished data migration is asked once, not per event;
- `synchronous=NORMAL` (SQLite's recommendation with WAL): a commit no longer waits for the disk;
  an application crash loses nothing, a power cut may lose the last events, never the database
  (orders are exactly-once through the trading database, not this log);
- a batch of asset events (a batched run's materializations of one asset, a run's planned
  materializations) is written in one transaction per file. Dagster hands storages batches only when
  DAGSTER_EVENT_BATCH_SIZE is set: this module sets it, unless the deployment does, in every process
  that loads this storage (webserver, daemon, run workers).

Docker compose uses PostgreSQL (deploy/dagster.yaml), whose Dagster storage writes batches itself.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
import yaml
from dagster._core.events import ASSET_EVENTS
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import INDEX_SHARD_NAME, SqliteEventLogStorage
from dagster._core.storage.sqlalchemy_compat import db_result
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage, _event_logs_directory
from dagster._serdes import ConfigurableClassData

# Large enough that a batched run's events of one output (or its planned events) are one batch.
os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", "1000")

_RUN_ENGINES_KEPT = 16  # engines of run files kept per process (the webserver reads many runs)


class QuickSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's per-run SQLite event log with engines kept, index.db kept open and batched writes."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self._engines: OrderedDict[str, sa.Engine] = OrderedDict()
        self._present: set[tuple[str, str]] = set()  # tables and finished data migrations seen in index.db
        super().__init__(base_dir, inst_data)

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> QuickSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str) -> sa.Engine:
        engine = self._engines.get(shard)
        if engine is not None:
            self._engines.move_to_end(shard)
            return engine
        # One connection kept open per file (see the module's doc).
        engine = sa.create_engine(self.conn_string_for_shard(shard),
                                  connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}, pool_size=1, max_overflow=2)
        sa.event.listen(engine, "connect", _commit_without_waiting_for_the_disk)
        self._engines[shard] = engine
        runs = [name for name in self._engines if name != INDEX_SHARD_NAME]
        for name in runs[:-_RUN_ENGINES_KEPT]:
            self._engines.pop(name).dispose()
        return engine

    @contextmanager
    def _connect(self, shard: str) -> Iterator[sa.Connection]:
        with self._db_lock:
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    # Dagster asks these for every asset event and check evaluation (a new engine and a query each
    # time); a table or a finished migration never goes away, so a yes is remembered.
    def has_table(self, table_name: str) -> bool:
        if ("table", table_name) not in self._present and super().has_table(table_name):
            self._present.add(("table", table_name))
        return ("table", table_name) in self._present

    def has_secondary_index(self, name: str) -> bool:
        if ("index", name) not in self._present and super().has_secondary_index(name):
            self._present.add(("index", name))
        return ("index", name) in self._present

    def _signal_watchers(self, run_id: str) -> None:
        """Tell the processes watching the run's file (the webserver) that it has new events."""
        try:
            os.utime(self.path_for_shard(run_id))
        except OSError:  # not created (nothing written) or removed meanwhile: nobody to tell
            pass

    def store_event(self, event: EventLogEntry) -> None:
        super().store_event(event)
        self._signal_watchers(event.run_id)

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        """The batch in one transaction on the run's file and one on index.db (Dagster's SQLite
        storage writes them one by one, each with its own transactions)."""
        if len({event.run_id for event in events}) != 1:
            super().store_event_batch(events)
            return
        # Each event serialized once (its thumbnail and all), for both files; one executemany here.
        rows = [self._event_to_row(event) for event in events]
        with self.run_connection(events[0].run_id) as conn:
            conn.execute(SqlEventLogStorageTable.insert(), rows)
        self._signal_watchers(events[0].run_id)
        asset_rows = [(event, row) for event, row in zip(events, rows, strict=True) if event.is_dagster_event
                      and event.dagster_event_type in ASSET_EVENTS and event.get_dagster_event().asset_key]
        if not asset_rows:
            return
        asset_events = [event for event, _ in asset_rows]
        with self.index_transaction() as conn:  # mirrored in index.db, as store_event does
            event_ids = []
            for _, row in asset_rows:
                with db_result(conn, SqlEventLogStorageTable.insert().values(**row)) as result:
                    event_ids.append(result.inserted_primary_key[0])
            self._store_asset_event_tags(conn, asset_events, event_ids)
            for event, event_id in zip(asset_events, event_ids, strict=True):
                self._store_asset_event(conn, event, event_id)

    def dispose(self) -> None:
        super().dispose()
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()


def _commit_without_waiting_for_the_disk(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class QuickSqliteStorage(DagsterSqliteStorage):
    """`storage: sqlite` with `QuickSqliteEventLogStorage` as its event log. In dagster.yaml:
    storage: {custom: {module: trading_pipeline.graph.instance_storage, class: QuickSqliteStorage,
    config: {base_dir: {env: DAGSTER_HOME}}}}"""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        super().__init__(base_dir, inst_data)
        self._event_log_storage = QuickSqliteEventLogStorage(_event_logs_directory(base_dir))

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> QuickSqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)

    @property
    def event_storage_data(self) -> ConfigurableClassData:
        return ConfigurableClassData(__name__, QuickSqliteEventLogStorage.__name__,
                                     yaml.dump({"base_dir": _event_logs_directory(self.base_dir)},
                                               default_flow_style=False))
