"""The laptop instance's SQLite storage records what Dagster's own records, batched or not."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from trading_pipeline.graph.assets.batch import PartitionOutcome, materialize_partitions, partitioned_checks, range_tags
from trading_pipeline.graph.instance_storage import QuickSqliteStorage
from trading_pipeline.graph.io_managers import BatchFilesystemIOManager

KEYS = ["A", "B", "C"]
letters = dg.StaticPartitionsDefinition(KEYS)


@dg.asset(partitions_def=letters, backfill_policy=dg.BackfillPolicy.single_run(),
          check_specs=partitioned_checks([dg.AssetCheckSpec("positive", asset="numbers")], letters))
def numbers(context):
    def make(key: str, _) -> PartitionOutcome:
        return PartitionOutcome(ord(key), {"value": ord(key)},
                                [dg.AssetCheckResult(check_name="positive", passed=key != "B")])

    yield from materialize_partitions(context, make)


def record_of_a_batched_run(storage: dict, home) -> dict:
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({"storage": storage, "telemetry": {"enabled": False}}))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = dg.materialize([numbers], instance=instance, resources={"io_manager": BatchFilesystemIOManager()},
                                tags=range_tags("A", "C"))
        assert result.success
        key = dg.AssetKey("numbers")
        logs = instance.all_logs(result.run_id)
        materializations = instance.fetch_materializations(key, limit=10).records
        checks = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(key, "positive"), limit=10)
        return {
            "events": sorted((e.dagster_event_type.value, e.get_dagster_event().partition or "")
                             for e in logs if e.is_dagster_event and e.dagster_event.asset_key),
            "materialized": sorted(instance.get_materialized_partitions(key)),
            "metadata": sorted((r.partition_key, r.asset_materialization.metadata["value"].value)
                               for r in materializations),
            "checks": sorted((c.partition, c.status.value) for c in checks),
            "last_run": instance.get_asset_records([key])[0].asset_entry.last_run_id == result.run_id,
        }


@pytest.mark.parametrize("batch_size", ["1000", "0"])  # batched writes (this module's default) and single ones
def test_records_equal_dagsters_own_sqlite_storage(tmp_path, monkeypatch, batch_size):
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", batch_size)
    ours = record_of_a_batched_run({"custom": {"module": "trading_pipeline.graph.instance_storage",
                                               "class": "QuickSqliteStorage",
                                               "config": {"base_dir": str(tmp_path / "ours")}}}, tmp_path / "ours")
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "0")
    dagsters = record_of_a_batched_run({"sqlite": {"base_dir": str(tmp_path / "dagster")}}, tmp_path / "dagster")
    assert ours == dagsters
    assert ours["last_run"] and ours["materialized"] == KEYS and ours["checks"] == [("A", "SUCCEEDED"), ("B", "FAILED"), ("C", "SUCCEEDED")]
    assert ("ASSET_MATERIALIZATION_PLANNED", "B") in ours["events"]  # the UI's in-progress partitions


def test_a_watcher_in_another_process_sees_every_event_of_a_running_run_and_the_wal_is_folded_in_at_close(tmp_path):
    """The webserver shows a running run's events when Dagster's watch sees the run's file change.
    The run's process keeps its connection (no checkpoint per write): each write must still wake the
    watcher of another storage on the same files, and every event must be readable there at once."""
    import threading
    import time

    writer = QuickSqliteStorage.from_local(str(tmp_path)).event_log_storage  # the run's process
    watcher = QuickSqliteStorage.from_local(str(tmp_path)).event_log_storage  # the webserver's
    entry = dg.EventLogEntry(error_info=None, level=20, user_message="first", run_id="some-run", timestamp=1.0)
    writer.store_event(entry)
    seen, woken = [], threading.Event()

    def on_event(event, _cursor):
        seen.append(event.user_message)
        woken.set()

    watcher.watch("some-run", None, on_event)
    try:
        time.sleep(0.5)  # the observer thread starts watching
        for i in range(5):
            woken.clear()
            writer.store_event(entry._replace(user_message=f"event {i}", timestamp=2.0 + i))
            assert woken.wait(10), f"the watcher was not woken by write {i}; it saw {seen}"
        writer.store_event_batch([entry._replace(user_message=f"batched {i}", timestamp=9.0 + i) for i in range(3)])
        deadline = time.monotonic() + 10
        while "batched 2" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m for m in seen if m != "first"] == [*(f"event {i}" for i in range(5)),
                                                   *(f"batched {i}" for i in range(3))]
    finally:
        watcher.end_watch("some-run", on_event)
        watcher.dispose()
    run_file = tmp_path / "history" / "runs" / "some-run.db"
    wal = run_file.with_name("some-run.db-wal")
    assert wal.exists() and wal.stat().st_size > 0  # the writer's events sit in the WAL while it runs
    writer.dispose()  # a run's process closes its storage at its end: the WAL is folded into the file
    assert not wal.exists() or wal.stat().st_size == 0
    reader = QuickSqliteStorage.from_local(str(tmp_path)).event_log_storage
    assert len(reader.get_logs_for_run("some-run")) == 9
    reader.dispose()
