"""The production deployment without Docker: the parts of docker-compose.yml as real processes.

One package-scoped fixture starts, once for the whole folder:
- fresh PostgreSQL databases on 127.0.0.1:5432 for Dagster's storage and the trading database
  (the trading one made by deploy/postgres-init.sh, as the postgres container does);
- a local S3 server (moto) standing in for MinIO, its bucket made by deploy/create_bucket.py;
- DAGSTER_HOME holding deploy/dagster.yaml and deploy/workspace.yaml verbatim (the image's files);
- the code location, the webserver and the daemon, each started with its command from
  docker-compose.yml (only host, ports and paths rewritten for this machine).

Everything listens on 127.0.0.1 only. Every process is killed with SIGKILL at the end, also on
failure, and the databases are dropped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml

from trading_pipeline_tests.conftest import POSTGRES_ADMIN_URL
from trading_pipeline_tests.deploy.processes import ProcessSet, free_port, graphql

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
BIN = Path(sys.executable).parent  # dagster, dagster-webserver, dagster-daemon sit beside python
CONTAINER_HOME = "/opt/dagster/dagster_home"
BUCKET = "trading-charts-deploy-test"
AS_OF = "2026-09-01T21:30:00+00:00"  # the simulated market (seed 0) gives SPY an accepted BUY here
SYMBOL = "SPY"
STARTUP_TIMEOUT_S = 120
RUN_TIMEOUT_S = 150

# Variables of the outer environment that must not leak into the deployment under test.
ISOLATED_PREFIXES = ("TRADING_", "DAGSTER_", "AWS_", "OPENAI_", "IBKR_", "IBEAM_", "BROWSER_PATH")


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def base_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ISOLATED_PREFIXES)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def local_command(argv: list[str], replacements: dict[str, str]) -> list[str]:
    """A compose command for this machine: container host, ports and paths swapped in each argument."""
    out = []
    for arg in argv:
        for old, new in replacements.items():
            arg = arg.replace(old, new)
        out.append(arg)
    return out


def healthcheck_argv(service: dict, replacements: dict[str, str]) -> list[str]:
    test = service["healthcheck"]["test"]
    kind, rest = test[0], test[1:]
    if kind == "CMD":
        return local_command(rest, replacements)
    assert kind == "CMD-SHELL", test
    return ["sh", "-c", local_command([rest[0].replace("$$", "$")], replacements)[0]]


@dataclass
class Deployment:
    tmp: Path
    processes: ProcessSet
    dagster_home: Path
    dagster_db: str
    trading_db: str
    trading_db_url: str
    dagster_db_url: str
    s3_endpoint: str
    grpc_port: int
    web_port: int
    dagster_env: dict[str, str]
    code_env: dict[str, str]
    replacements: dict[str, str]
    setup_output: dict[str, str] = field(default_factory=dict)

    @property
    def webserver_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        return graphql(self.webserver_url, query, variables)

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="deploy-test",
                            aws_secret_access_key="deploy-test-secret", region_name="us-east-1")

    def run_healthcheck(self, service_name: str, extra_env: dict[str, str] | None = None):
        service = compose_file()["services"][service_name]
        argv = healthcheck_argv(service, self.replacements)
        return subprocess.run(argv, env={**self.dagster_env, **(extra_env or {})}, check=False, capture_output=True, text=True,
                              timeout=60)


@contextlib.contextmanager
def instance_from(dagster_home: Path, env: dict[str, str]):
    """The Dagster instance configured by `dagster_home`/dagster.yaml, with `env` as the environment
    its {env: ...} settings read (restored afterwards)."""
    from dagster import DagsterInstance

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("DAGSTER_")})
    try:
        with DagsterInstance.from_config(str(dagster_home)) as instance:
            yield instance
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _wait(description: str, check, timeout: float, processes: ProcessSet, watch: list[str]) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for name in watch:
            processes.assert_running(name)
        try:
            if check():
                return
        except Exception as error:  # noqa: BLE001 - keep trying until the deadline
            last = error
        time.sleep(0.5)
    logs = "\n".join(f"--- {name}\n{processes.log_tail(name)}" for name in watch)
    raise AssertionError(f"{description} not ready after {timeout:.0f} s (last error: {last!r})\n{logs}")


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="package")
def deployment(tmp_path_factory) -> Deployment:
    tmp = tmp_path_factory.mktemp("deployment")
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    admin_url = sa.engine.make_url(POSTGRES_ADMIN_URL)
    suffix = uuid.uuid4().hex[:10]
    dagster_db, trading_db = f"tp_deploy_{suffix}_dagster", f"tp_deploy_{suffix}_trading"
    processes = ProcessSet(tmp / "logs")
    try:
        yield _start(tmp, processes, admin, admin_url, dagster_db, trading_db)
    finally:
        processes.kill_all()
        with admin.connect() as connection:
            for name in (dagster_db, trading_db):
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _start(tmp: Path, processes: ProcessSet, admin, admin_url, dagster_db: str, trading_db: str) -> Deployment:
    compose = compose_file()
    services = compose["services"]
    env = base_environment()
    pg_host, pg_port, pg_user = admin_url.host or "127.0.0.1", str(admin_url.port or 5432), admin_url.username
    pg_password = admin_url.password or ""
    setup_output: dict[str, str] = {}

    # PostgreSQL: Dagster's database as POSTGRES_DB would be; the trading one by the init script.
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{dagster_db}"'))
    init_env = {**env, "PGHOST": pg_host, "PGPORT": pg_port, "PGPASSWORD": pg_password,
                "POSTGRES_USER": pg_user, "POSTGRES_DB": dagster_db, "TRADING_POSTGRES_DB": trading_db}
    for attempt in ("first", "again"):  # the second run must change nothing (idempotent)
        result = subprocess.run(["sh", str(REPO / "deploy/postgres-init.sh")], env=init_env, check=False, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        setup_output[f"postgres-init {attempt}"] = result.stdout + result.stderr

    # S3: a local server in place of MinIO; the bucket made the way the create-bucket service does.
    s3_port = free_port()
    processes.start("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], env)
    _wait("S3 server", lambda: _port_open(s3_port), 30, processes, ["s3"])
    s3_endpoint = f"http://127.0.0.1:{s3_port}"
    s3_env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "deploy-test",
              "AWS_SECRET_ACCESS_KEY": "deploy-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
              "TRADING_S3_BUCKET": BUCKET,
              # as compose sets it: chart links at the bucket's URL, charts/ readable without credentials
              "TRADING_CHART_BASE_URL": f"{s3_endpoint}/{BUCKET}"}
    bucket_argv = local_command(services["create-bucket"]["command"],
                                {"/opt/dagster/app/deploy": str(REPO / "deploy")})
    for attempt in ("first", "again"):
        result = subprocess.run(bucket_argv, env={**env, **s3_env}, check=False, capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, result.stdout + result.stderr
        setup_output[f"create-bucket {attempt}"] = result.stdout

    # DAGSTER_HOME as the Dockerfile lays it out: the compose instance and workspace files as they are.
    dagster_home = tmp / "dagster_home"
    (dagster_home / "storage").mkdir(parents=True)
    for name in ("dagster.yaml", "workspace.yaml"):
        shutil.copy(REPO / "deploy" / name, dagster_home / name)
    grpc_port, web_port = free_port(), free_port()
    replacements = {"0.0.0.0": "127.0.0.1", "4000": str(grpc_port), "3000": str(web_port),
                    CONTAINER_HOME: str(dagster_home)}
    dagster_env = {**env, "DAGSTER_HOME": str(dagster_home),
                   "DAGSTER_POSTGRES_HOST": pg_host, "DAGSTER_POSTGRES_PORT": pg_port,
                   "DAGSTER_POSTGRES_USER": pg_user, "DAGSTER_POSTGRES_PASSWORD": pg_password,
                   "DAGSTER_POSTGRES_DB": dagster_db,
                   "DAGSTER_GRPC_HOST": "127.0.0.1", "DAGSTER_GRPC_PORT": str(grpc_port)}
    trading_db_url = admin_url.set(database=trading_db).render_as_string(hide_password=False)
    code_env = {**dagster_env, **s3_env,
                "TRADING_DATABASE_URL": trading_db_url,
                "TRADING_CHART_STORE": "s3",
                "TRADING_DATA_DIR": str(tmp / "data"),
                "TRADING_STRATEGIES_FILE": str(REPO / "trading_pipeline/data/strategies.yaml"),
                "TRADING_ORDERS_ENABLED": "yes",
                # A paper deployment replaying AS_OF: its clock is that point, so the decision is current when sent.
                "TRADING_AS_OF": AS_OF,
                # Smaller charts render faster; the size is not what this test is about.
                "TRADING_CHART_WIDTH": "960", "TRADING_CHART_HEIGHT": "540"}

    # The code location, then the webserver and the daemon, with their compose commands.
    processes.start("user_code", local_command(services["user_code"]["command"], replacements), code_env, cwd=tmp)
    grpc_check = healthcheck_argv(services["user_code"], replacements)
    _wait("code location (gRPC health check)",
          lambda: subprocess.run(grpc_check, env=dagster_env, check=False, capture_output=True, timeout=30).returncode == 0,
          STARTUP_TIMEOUT_S, processes, ["user_code"])
    tolerance = services["daemon"]["environment"]["DAGSTER_DAEMON_HEARTBEAT_TOLERANCE"]
    daemon_env = {**dagster_env, "DAGSTER_DAEMON_HEARTBEAT_TOLERANCE": tolerance}
    # The configure-pools one-shot, before the daemon starts (as compose orders them).
    result = subprocess.run(local_command(services["configure-pools"]["command"], replacements), env=dagster_env,
                            check=False, capture_output=True, text=True, timeout=120, cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    setup_output["configure-pools"] = result.stdout
    processes.start("webserver", local_command(services["webserver"]["command"], replacements), dagster_env, cwd=tmp)
    processes.start("daemon", local_command(services["daemon"]["command"], replacements), daemon_env, cwd=tmp)

    deployment = Deployment(tmp=tmp, processes=processes, dagster_home=dagster_home, dagster_db=dagster_db,
                            trading_db=trading_db, trading_db_url=trading_db_url,
                            dagster_db_url=admin_url.set(database=dagster_db).render_as_string(hide_password=False),
                            s3_endpoint=s3_endpoint, grpc_port=grpc_port, web_port=web_port,
                            dagster_env=daemon_env, code_env=code_env, replacements=replacements,
                            setup_output=setup_output)
    _wait("webserver /server_info",
          lambda: httpx.get(f"{deployment.webserver_url}/server_info", timeout=5).status_code == 200,
          STARTUP_TIMEOUT_S, processes, ["webserver", "user_code"])
    _wait("code location loaded in the webserver", lambda: _location_loaded(deployment),
          STARTUP_TIMEOUT_S, processes, ["webserver", "user_code"])
    return deployment


LOCATION_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message }
        }
      }
    }
  }
}
"""


def _location_loaded(deployment: Deployment) -> bool:
    entries = deployment.graphql(LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
    for entry in entries:
        error = entry["locationOrLoadError"]
        if error and error["__typename"] == "PythonError":
            raise AssertionError(f"code location {entry['name']} failed to load: {error['message']}")
    return any(e["name"] == "trading_pipeline" and e["loadStatus"] == "LOADED"
               and e["locationOrLoadError"]["__typename"] == "RepositoryLocation" for e in entries)


LAUNCH_MUTATION = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}
"""

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status tags { key value } }
  }
}
"""


def launch_run(deployment: Deployment, job: str, partition: str) -> str:
    params = {
        "selector": {"repositoryLocationName": "trading_pipeline", "repositoryName": "__repository__",
                     "jobName": job},
        "runConfigData": {},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition},
                                       {"key": "trading/as_of", "value": AS_OF}]},
    }
    result = deployment.graphql(LAUNCH_MUTATION, {"params": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def await_runs(deployment: Deployment, run_ids: list[str]) -> dict[str, str]:
    statuses: dict[str, str] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        for run_id in run_ids:
            run = deployment.graphql(RUN_QUERY, {"runId": run_id})["runOrError"]
            statuses[run_id] = run["status"]
        if all(s in ("SUCCESS", "FAILURE", "CANCELED") for s in statuses.values()):
            return statuses
        for name in ("user_code", "webserver", "daemon"):
            deployment.processes.assert_running(name)
        time.sleep(1)
    logs = "\n".join(f"--- {n}\n{deployment.processes.log_tail(n)}" for n in ("daemon", "user_code"))
    raise AssertionError(f"runs not finished after {RUN_TIMEOUT_S} s: {statuses}\n{logs}")


@dataclass
class Materialized:
    analyze_runs: dict[str, str]  # partition -> run id
    decide_run: str
    statuses: dict[str, str]


@pytest.fixture(scope="package")
def materialized(deployment: Deployment) -> Materialized:
    """SPY's two timeframes, then its decision and order, launched through GraphQL and awaited."""
    analyze = {f"{SYMBOL}|{tf}": launch_run(deployment, "analyze_timeframe", f"{SYMBOL}|{tf}") for tf in ("1d", "1w")}
    statuses = await_runs(deployment, list(analyze.values()))
    decide = launch_run(deployment, "decide_and_order", SYMBOL)
    statuses.update(await_runs(deployment, [decide]))
    return Materialized(analyze_runs=analyze, decide_run=decide, statuses=statuses)
