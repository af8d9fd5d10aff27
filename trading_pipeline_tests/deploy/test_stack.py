"""The running deployment: runs launched through the webserver's GraphQL API go through the
queue (daemon) into the code location (gRPC server), store charts in S3, write Dagster's events
and the trading records to PostgreSQL, and their lineage reads back from an order to its chart.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import subprocess

import sqlalchemy as sa

from trading_pipeline.graph.pools import POOL_LIMITS
from trading_pipeline_tests.deploy.conftest import AS_OF, BUCKET, SYMBOL, compose_file, healthcheck_argv, instance_from
from trading_pipeline_tests.deploy.processes import METADATA_ENTRY_FRAGMENT, free_port

CHAIN = ["market_bars", "indicator_frames", "chart_images", "ai_analyses", "trade_decisions", "orders"]
TIMEFRAME_ASSETS = CHAIN[:4]

GRAPH_QUERY = """
query {
  assetNodes {
    assetKey { path }
    groupName
    jobNames
    dependencyKeys { path }
    dependedByKeys { path }
  }
}
"""

LATEST_QUERY = """
query Latest($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) {
    __typename
    ... on AssetNode {
      latestMaterializationByPartition(partitions: $partitions) {
        runId
        partition
        tags { key value }
        metadataEntries {
          ...Entry
        }
      }
    }
  }
}
""" + METADATA_ENTRY_FRAGMENT


def latest(deployment, asset: str, partitions: list[str]) -> dict[str, dict]:
    node = deployment.graphql(LATEST_QUERY, {"key": {"path": [asset]}, "partitions": partitions})["assetNodeOrError"]
    assert node["__typename"] == "AssetNode", node
    events = {}
    for event in node["latestMaterializationByPartition"]:
        assert event is not None, f"{asset}: a partition of {partitions} was never materialized"
        values = {}
        for entry in event["metadataEntries"]:
            values[entry["label"]] = next((entry[k] for k in ("text", "mdStr", "jsonString", "intValue", "floatValue",
                                                             "url") if k in entry), None)
        events[event["partition"]] = {"run_id": event["runId"], "metadata": values,
                                      "tags": {t["key"]: t["value"] for t in event["tags"]}}
    return events


def test_runs_went_through_the_queue_and_succeeded(deployment, materialized):
    assert set(materialized.statuses.values()) == {"SUCCESS"}, materialized.statuses
    run_ids = [*materialized.analyze_runs.values(), materialized.decide_run]
    engine = sa.create_engine(deployment.dagster_db_url)
    try:
        with engine.connect() as connection:
            stored = set(connection.execute(sa.text("SELECT run_id FROM runs")).scalars())
            for run_id in run_ids:
                events = set(connection.execute(
                    sa.text("SELECT dagster_event_type FROM event_logs WHERE run_id = :r AND dagster_event_type IS NOT NULL"),
                    {"r": run_id}).scalars())
                # Queued by the webserver, launched by the daemon, run in the code location.
                assert {"PIPELINE_ENQUEUED", "PIPELINE_STARTING", "PIPELINE_START", "PIPELINE_SUCCESS",
                        "ASSET_MATERIALIZATION"} <= events, (run_id, sorted(events))
    finally:
        engine.dispose()
    assert set(run_ids) <= stored  # Dagster's run storage is the PostgreSQL database


def test_asset_graph_reads_back_as_one_chain(deployment):
    nodes = {tuple(n["assetKey"]["path"]): n for n in deployment.graphql(GRAPH_QUERY)["assetNodes"]}
    for upstream, downstream in itertools.pairwise(CHAIN):
        assert [upstream] in [k["path"] for k in nodes[(downstream,)]["dependencyKeys"]], (upstream, downstream)
        assert [downstream] in [k["path"] for k in nodes[(upstream,)]["dependedByKeys"]], (upstream, downstream)
    assert nodes[("market_bars",)]["dependencyKeys"] == []
    assert {nodes[(name,)]["groupName"] for name in CHAIN} == {"trading"}
    assert "analyze_timeframe" in nodes[("chart_images",)]["jobNames"]
    assert "decide_and_order" in nodes[("orders",)]["jobNames"]


def test_lineage_from_the_order_back_to_the_chart_in_s3(deployment, materialized):
    partitions = list(materialized.analyze_runs)  # SPY|1d, SPY|1w
    by_asset = {name: latest(deployment, name, partitions) for name in TIMEFRAME_ASSETS}
    by_asset.update({name: latest(deployment, name, [SYMBOL]) for name in ("trade_decisions", "orders")})

    # Each materialization comes from the run launched for its partition.
    for name in TIMEFRAME_ASSETS:
        for partition, run_id in materialized.analyze_runs.items():
            assert by_asset[name][partition]["run_id"] == run_id, (name, partition)
    for name in ("trade_decisions", "orders"):
        assert by_asset[name][SYMBOL]["run_id"] == materialized.decide_run

    s3 = deployment.s3_client()
    chart_uris = {}
    for partition in partitions:
        timeframe = partition.split("|")[1]
        chart = by_asset["chart_images"][partition]["metadata"]
        # The link a browser opens: the bucket's URL (TRADING_CHART_BASE_URL), as compose sets it.
        link = chart["chart"]
        bucket_url = f"{deployment.s3_endpoint}/{BUCKET}/"
        assert link.startswith(f"{bucket_url}charts/{SYMBOL}/{timeframe}/"), link
        key = link.removeprefix(bucket_url)
        uri = f"s3://{BUCKET}/{key}"
        png = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert hashlib.sha256(png).hexdigest() == chart["sha256"] and len(png) == chart["size_bytes"]
        thumbnail = chart["thumbnail"]
        assert thumbnail.startswith("![chart](data:image/png;base64,")
        assert base64.b64decode(thumbnail.split(",", 1)[1].rstrip(")")).startswith(b"\x89PNG")
        # The analysis names the chart it read; the bars are those at the run's as_of.
        assert by_asset["ai_analyses"][partition]["metadata"]["chart"] == link
        assert by_asset["market_bars"][partition]["metadata"]["as_of"] == AS_OF
        assert by_asset["market_bars"][partition]["metadata"]["last_bar"] < AS_OF
        chart_uris[timeframe] = uri

    decision = by_asset["trade_decisions"][SYMBOL]["metadata"]
    order = by_asset["orders"][SYMBOL]["metadata"]
    assert json.loads(decision["charts"]) == chart_uris  # the decision names both charts
    assert order["decision_id"] == decision["decision_id"]
    assert decision["action"] == "BUY" and order["status"] != "not_sent", (decision["action"], order)

    # The trading database is the PostgreSQL one: the decision and its bracket's three legs are there.
    engine = sa.create_engine(deployment.trading_db_url)
    try:
        with engine.connect() as connection:
            row = connection.execute(sa.text("SELECT symbol, action FROM decisions WHERE decision_id = :d"),
                                     {"d": decision["decision_id"]}).one()
            legs = connection.execute(sa.text("SELECT client_order_id FROM orders WHERE decision_id = :d"),
                                      {"d": decision["decision_id"]}).scalars().all()
    finally:
        engine.dispose()
    assert tuple(row) == (SYMBOL, "BUY")
    assert len(legs) == 3 and order["client_order_id"] in legs  # entry, stop, target; one id each


def test_asset_values_live_in_the_storage_volume(deployment, materialized):
    """docker-compose.yml mounts the dagster-storage volume on DAGSTER_HOME/storage: that is where
    the run workers keep asset values (and the webserver reads run logs)."""
    storage = deployment.dagster_home / "storage"
    for name in TIMEFRAME_ASSETS:
        assert (storage / name / SYMBOL / "1d").is_file(), sorted(p.name for p in storage.iterdir())
    assert (storage / "orders" / SYMBOL).is_file()
    volume_targets = [v.split(":")[1] for v in compose_file()["services"]["user_code"]["volumes"]
                      if v.startswith("dagster-storage:")]
    assert volume_targets == ["/opt/dagster/dagster_home/storage"]


def test_compose_health_checks_pass_against_the_running_processes(deployment, materialized):
    services = compose_file()["services"]
    for name in ("user_code", "webserver", "daemon"):
        result = deployment.run_healthcheck(name)
        assert result.returncode == 0, (name, result.stdout, result.stderr)
    assert "Daemon live" in deployment.run_healthcheck("daemon").stdout

    pg = deployment.dagster_env
    result = deployment.run_healthcheck("postgres", {"PGHOST": pg["DAGSTER_POSTGRES_HOST"],
                                                     "PGPORT": pg["DAGSTER_POSTGRES_PORT"],
                                                     "POSTGRES_USER": pg["DAGSTER_POSTGRES_USER"],
                                                     "POSTGRES_DB": deployment.dagster_db})
    assert result.returncode == 0 and "accepting connections" in result.stdout, (result.stdout, result.stderr)

    # The check can fail: nothing answers on a free port.
    dead = healthcheck_argv(services["user_code"], {"4000": str(free_port())})
    assert subprocess.run(dead, env=deployment.dagster_env, check=False, capture_output=True, timeout=60).returncode != 0


def test_pools_have_their_limits_in_postgres(deployment):
    """The configure-pools one-shot wrote the limits to Dagster's storage, where every run sees them."""
    with instance_from(deployment.dagster_home, deployment.dagster_env) as instance:
        limits = {pool: instance.event_log_storage.get_concurrency_info(pool).slot_count for pool in POOL_LIMITS}
    assert limits == POOL_LIMITS and limits["broker_orders"] == 1


def test_setup_steps_are_idempotent(deployment):
    """deploy/postgres-init.sh and deploy/create_bucket.py ran twice at start-up; the second time
    created nothing."""
    assert "CREATE DATABASE" in deployment.setup_output["postgres-init first"]
    assert "CREATE DATABASE" not in deployment.setup_output["postgres-init again"]
    assert "created" in deployment.setup_output["create-bucket first"]
    assert "already exists" in deployment.setup_output["create-bucket again"]
    # The chart links (TRADING_CHART_BASE_URL) work without credentials: charts/ only is public-read.
    assert f"chart PNGs readable at {deployment.s3_endpoint}/{BUCKET}/charts/*" in \
        deployment.setup_output["create-bucket first"]
    engine = sa.create_engine(deployment.trading_db_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT current_database()")).scalar() == deployment.trading_db
    finally:
        engine.dispose()
