"""The laptop instance (deploy/local/dagster.yaml) end to end: `dagster-daemon` and the webserver on
loopback launch batched runs through the warm run launcher; each run's process is forked from the
worker the daemon warmed at start, runs as a normal run (materializations, checks, the order), and a
run of the daemon's own instance shows where its process came from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from trading_pipeline.adapters.render_protocol import ping
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.assets.batch import range_tags
from trading_pipeline.graph.run_launcher import WORKER_PID_TAG
from trading_pipeline_tests.deploy.conftest import LAUNCH_MUTATION, LOCATION_QUERY, REPO, RUN_QUERY
from trading_pipeline_tests.deploy.processes import ProcessSet, free_port, graphql

BIN = Path(sys.executable).parent
LOCATION = {"repositoryLocationName": "trading_pipeline", "repositoryName": "__repository__"}
SYMBOLS = ["SPY", "AAPL"]
AS_OF = "2026-09-01T21:30:00+00:00"  # a Tuesday's close on the simulated market


@pytest.fixture(scope="module")
def laptop_daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warm")
    home = tmp / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy/local/dagster.yaml", home / "dagster.yaml")
    (tmp / "strategies.yaml").write_text("strategies:\n  - name: warm\n    symbols: [" + ", ".join(SYMBOLS) + "]\n"
                                         "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRADING_", "DAGSTER_", "OPENAI_", "IBKR_"))}
    env.update({"DAGSTER_HOME": str(home), "TRADING_STRATEGIES_FILE": str(tmp / "strategies.yaml"),
                "TRADING_DATA_DIR": str(tmp / "data"), "PYTHONPATH": str(REPO)})
    subprocess.run([sys.executable, "-m", "trading_pipeline.graph.pools"], env=env, cwd=tmp, check=True,
                   capture_output=True)
    processes = ProcessSet(tmp / "logs")
    url = f"http://127.0.0.1:{free_port()}"
    workspace = ["-w", str(REPO / "workspace.yaml")]
    processes.start("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", url.rsplit(":", 1)[1],
                                  *workspace], env, cwd=tmp)
    processes.start("daemon", [str(BIN / "dagster-daemon"), "run", *workspace], env, cwd=tmp)
    try:
        deadline = time.monotonic() + 180
        while True:
            for name in ("webserver", "daemon"):
                processes.assert_running(name)
            try:
                entries = graphql(url, LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
            except Exception:  # noqa: BLE001 - not up yet
                entries = []
            if any(e["locationOrLoadError"]["__typename"] == "RepositoryLocation" for e in entries):
                break
            assert time.monotonic() < deadline, processes.log_tail("webserver")
            time.sleep(0.5)
        yield url, home, processes
    finally:
        processes.kill_all()


def launch_and_wait(url: str, processes: ProcessSet, job: str, tags: dict[str, str]) -> str:
    params = {"selector": {**LOCATION, "jobName": job}, "runConfigData": {},
              "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}}
    result = graphql(url, LAUNCH_MUTATION, {"params": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    run_id = result["run"]["runId"]
    deadline = time.monotonic() + 300
    while (status := graphql(url, RUN_QUERY, {"runId": run_id})["runOrError"]["status"]) not in ("SUCCESS", "FAILURE",
                                                                                           "CANCELED"):
        processes.assert_running("daemon")
        assert time.monotonic() < deadline, f"run {run_id} still {status}:\n{processes.log_tail('daemon')}"
        time.sleep(0.3)
    assert status == "SUCCESS", processes.log_tail("daemon", 80)
    return run_id


def messages(instance, run_id: str) -> list[str]:
    return [(e.dagster_event.message if e.dagster_event else e.user_message) or "" for e in instance.all_logs(run_id)]


def test_batched_runs_start_forked_from_the_warm_worker_and_materialize_every_partition(laptop_daemon,
                                                                                       monkeypatch):
    url, home, processes = laptop_daemon
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the instance file's storage reads it
    analyze = [launch_and_wait(url, processes, "analyze_timeframe",
                               {**range_tags(f"{SYMBOLS[0]}|{tf}", f"{SYMBOLS[-1]}|{tf}"), AS_OF_TAG: AS_OF})
               for tf in ("1d", "1w")]
    decide = launch_and_wait(url, processes, "decide_and_order", {**range_tags(SYMBOLS[0], SYMBOLS[-1]),
                                                                   AS_OF_TAG: AS_OF})
    with dg.DagsterInstance.from_config(str(home)) as instance:
        worker_pids = set()
        for run_id in [*analyze, decide]:
            run = instance.get_run_by_id(run_id)
            forked = [m for m in messages(instance, run_id) if "forked from the warm run worker" in m]
            assert len(forked) == 1, messages(instance, run_id)
            pid = run.tags[WORKER_PID_TAG]
            assert f"Run process {pid} forked" in forked[0]
            assert any(f"Started process for run (pid: {pid})" in m for m in messages(instance, run_id))
            worker_pids.add(forked[0].split("warm run worker ")[1].split()[0])
        assert len(worker_pids) == 1  # one worker, warmed when the daemon started, served all three
        # Every partition got its own materialization, as with the default launcher.
        for asset in ("market_bars", "indicator_frames", "chart_images", "ai_analyses"):
            materialized = instance.get_materialized_partitions(dg.AssetKey(asset))
            assert materialized == {f"{s}|{tf}" for s in SYMBOLS for tf in ("1d", "1w")}, asset
        assert instance.get_materialized_partitions(dg.AssetKey("trade_decisions")) == set(SYMBOLS)
        assert instance.get_materialized_partitions(dg.AssetKey("orders")) == set(SYMBOLS)
    # The worker is a child of the daemon and still there for the next run.
    worker = int(next(iter(worker_pids)))
    with open(f"/proc/{worker}/stat") as stat:
        parent = int(stat.read().rsplit(")", 1)[1].split()[1])
    assert parent == processes.procs["daemon"].pid
    # Every chart (4 partitions' charts, 2 decision charts at most) was drawn by the one render
    # service the launcher started, not by a Chromium per run.
    with open(f"/proc/{worker}/environ", "rb") as environ:
        variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
    service = ping(variables[b"TRADING_RENDER_SOCKET"].decode())
    assert service["starts"] == 1 and service["figures"] >= 4
