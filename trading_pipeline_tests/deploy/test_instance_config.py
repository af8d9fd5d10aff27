"""Both Dagster instance files load for real: deploy/dagster.yaml (docker compose) against the
test PostgreSQL, and deploy/local/dagster.yaml (laptop) with no PostgreSQL at all."""

from __future__ import annotations

import json
import shutil

import yaml
from dagster import DagsterInstance
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.runs import SqliteRunStorage
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from sqlalchemy.pool import NullPool

from trading_pipeline.graph.instance_storage import QuickSqliteEventLogStorage
from trading_pipeline.graph.run_launcher import WarmingQueuedRunCoordinator, WarmRunLauncher
from trading_pipeline_tests.deploy.conftest import REPO, instance_from


def test_compose_instance_is_postgres_with_queue_limits_and_run_retries(deployment, materialized):
    with instance_from(deployment.dagster_home, deployment.dagster_env) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        # Every process keeps its event-log connection (Dagster's default opens one per event).
        assert not isinstance(instance.event_log_storage._engine.pool, NullPool)
        # The very database the test created (not a default one).
        assert instance.run_storage.postgres_url.endswith(f"/{deployment.dagster_db}")
        assert instance.run_storage.postgres_url.startswith("postgresql+psycopg2://")
        coordinator = instance.run_coordinator
        assert isinstance(coordinator, QueuedRunCoordinator)
        queue = instance.get_concurrency_config().run_queue_config  # what the daemon's queue applies
        assert_decisions_keep_a_run_slot(queue)
        assert queue.max_user_code_failure_retries == 3 and queue.user_code_failure_retry_delay == 30
        assert coordinator.dequeue_interval_seconds == 1 and coordinator.dequeue_use_threads
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_start_timeout_seconds == 180
        assert instance.run_launcher.__class__.__name__ == "DefaultRunLauncher"
        assert not instance.nux_enabled
        # It is the instance the running webserver and daemon use: the runs launched through them are in it.
        run_ids = {*materialized.analyze_runs.values(), materialized.decide_run}
        assert run_ids <= {record.dagster_run.run_id for record in instance.get_run_records()}


def test_laptop_instance_loads_without_postgres(tmp_path, monkeypatch):
    """`make demo` and `make dev` copy deploy/local/dagster.yaml into DAGSTER_HOME: it must never
    need PostgreSQL. It is not at the repository root, where Dagster would read it when run without
    DAGSTER_HOME and warn about it when run with one (dagster-notes.md, section 3)."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # where its SQLite files go (as the Makefile sets it)
    assert not (REPO / "dagster.yaml").exists()
    text = (REPO / "deploy/local/dagster.yaml").read_text()
    settings = yaml.safe_load(text)
    assert "postgres" not in json.dumps(settings).lower()  # comments may mention it; settings may not
    shutil.copy(REPO / "deploy/local/dagster.yaml", tmp_path / "dagster.yaml")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_storage, SqliteRunStorage)
        assert isinstance(instance.event_log_storage, QuickSqliteEventLogStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert_decisions_keep_a_run_slot(instance.get_concurrency_config().run_queue_config)
        assert instance.run_coordinator.dequeue_interval_seconds == 0.5 and instance.run_coordinator.dequeue_use_threads
        # Runs forked from a warm worker (warmed when the daemon starts); a dead run process is failed.
        assert isinstance(instance.run_coordinator, WarmingQueuedRunCoordinator)
        assert isinstance(instance.run_launcher, WarmRunLauncher)
        assert instance.run_monitoring_enabled and instance.run_monitoring_start_timeout_seconds == 180
        assert instance.get_runs_count() == 0  # storage works
    assert (tmp_path / "history" / "runs" / "index.db").is_file()  # Dagster's own layout under DAGSTER_HOME


def assert_decisions_keep_a_run_slot(queue) -> None:
    """Runs other than decide-and-order (analysis runs, backfills) can never take every run slot."""
    limits = {(limit["key"], limit.get("value")): limit["limit"] for limit in queue.tag_concurrency_limits}
    others = limits[("trading/phase", "analyze")] + limits[("dagster/backfill", None)]
    assert others < queue.max_concurrent_runs
