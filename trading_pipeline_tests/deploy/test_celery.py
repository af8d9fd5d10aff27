"""Scale-out on Celery: two workers on loopback (Redis at 127.0.0.1:6379 as the broker) run the
steps of a batched run of the code location's analyze_timeframe job (TRADING_EXECUTOR=celery), on a
PostgreSQL Dagster instance; every partition gets its materialization and both workers ran steps
(the chart steps routed to the second worker's queue with TRADING_CELERY_CHART_QUEUE)."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from trading_pipeline_tests.deploy.conftest import REPO, base_environment
from trading_pipeline_tests.deploy.processes import ProcessSet

BIN = Path(sys.executable).parent
REDIS = ("127.0.0.1", 6379)
SYMBOLS = ["SPY", "AAPL"]
AS_OF = "2026-09-01T21:30:00+00:00"
# The first takes every step from the default queue, the second the charts (as a machine with Chromium would).
WORKERS = {"celery-test-a": "dagster", "celery-test-b": "charts"}


def redis_up() -> bool:
    import socket

    try:
        socket.create_connection(REDIS, timeout=1).close()
        return True
    except OSError:
        return False


def wait_for_workers(broker: str, env: dict, processes: ProcessSet, timeout: float = 60) -> None:
    from celery import Celery

    app = Celery(broker=broker, backend=broker)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for name in WORKERS:
                processes.assert_running(name)
            replies = app.control.ping(timeout=1.0) or []
            answered = {name.split("@")[0] for reply in replies for name in reply}
            if set(WORKERS) <= answered:
                return
        raise AssertionError(f"workers not up after {timeout:.0f} s:\n"
                             + "\n".join(processes.log_tail(name) for name in WORKERS))
    finally:
        app.close()


@pytest.fixture
def dagster_postgres_url():
    """A fresh database for the Dagster instance (the trading-database fixture would migrate it)."""
    import uuid

    import sqlalchemy as sa

    from trading_pipeline_tests.conftest import POSTGRES_ADMIN_URL

    name = f"tp_celery_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.mark.skipif(not redis_up(), reason="needs Redis on 127.0.0.1:6379 (the Celery broker)")
def test_a_batch_runs_across_two_celery_workers(tmp_path, dagster_postgres_url, monkeypatch):
    postgres_url = dagster_postgres_url
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "storage": {"postgres": {"postgres_url": postgres_url}}, "telemetry": {"enabled": False}}))
    strategies = tmp_path / "strategies.yaml"
    strategies.write_text("strategies:\n  - name: celery_test\n    symbols: [" + ", ".join(SYMBOLS) + "]\n"
                          "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n")
    broker = f"redis://{REDIS[0]}:{REDIS[1]}/{random.randint(1, 15)}"  # a db apart from other tests
    env = {**base_environment(), "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO),
           "TRADING_EXECUTOR": "celery", "TRADING_CELERY_BROKER": broker,
           "TRADING_STRATEGIES_FILE": str(strategies), "TRADING_DATA_DIR": str(tmp_path / "data"),
           "TRADING_CELERY_CHART_QUEUE": "charts", "TRADING_CHART_WIDTH": "640", "TRADING_CHART_HEIGHT": "360"}
    # The instance's tables made once, as a deployment's first start makes them: two workers making
    # them in the same empty database at the same moment race ("alembic_version already exists").
    with dg.DagsterInstance.from_config(str(home)):
        pass
    processes = ProcessSet(tmp_path / "logs")
    begun = time.monotonic()
    try:
        for name, queue in WORKERS.items():
            processes.start(name, [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                                   "-y", str(REPO / "deploy/celery.yaml"), "-n", name, "-q", queue, "-l", "WARNING",
                                   "--", "--concurrency=1"], env, cwd=tmp_path)
        wait_for_workers(broker, env, processes)
        print(f"workers up after {time.monotonic() - begun:.1f} s")

        for name, value in env.items():
            if name.startswith(("TRADING_", "DAGSTER_HOME")):
                monkeypatch.setenv(name, value)
        from trading_pipeline.graph import partitions

        partitions._load.cache_clear()
        from trading_pipeline_tests.deploy import celery_jobs

        tags = {"dagster/asset_partition_range_start": f"{SYMBOLS[0]}|1d",
                "dagster/asset_partition_range_end": f"{SYMBOLS[-1]}|1d", "trading/as_of": AS_OF}
        started = time.monotonic()
        with dg.DagsterInstance.from_config(str(home)) as instance:
            result = dg.execute_job(dg.reconstructable(celery_jobs.analyze_timeframe), instance=instance, tags=tags)
            assert result.success, processes.log_tail(WORKERS[0]) + processes.log_tail(WORKERS[1])
            workers = {record.dagster_event.engine_event_data.metadata["Celery worker"].value.split("@")[0]
                       for record in instance.all_logs(result.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
                       if "Celery worker" in (record.dagster_event.engine_event_data.metadata or {})}
            assert workers == set(WORKERS)  # both took steps
            charts = {record.dagster_event.engine_event_data.metadata["Celery worker"].value.split("@")[0]
                      for record in instance.all_logs(result.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
                      if record.step_key == "chart_images"
                      and "Celery worker" in (record.dagster_event.engine_event_data.metadata or {})}
            assert charts == {"celery-test-b"}
            for asset in ("market_bars", "chart_images", "ai_analyses"):
                materialized = instance.get_materialized_partitions(dg.AssetKey(asset))
                assert materialized == {f"{s}|1d" for s in SYMBOLS}
        print(f"run {time.monotonic() - started:.1f} s")
    finally:
        processes.kill_all()
        partitions._load.cache_clear()
    assert not processes.survivors()
