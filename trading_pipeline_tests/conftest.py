"""Shared fixtures: trading databases on SQLite and on the real PostgreSQL at 127.0.0.1:5432."""

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import sqlalchemy as sa

POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


# The deploy package runs on one worker: its package-scoped deployment (deploy/conftest.py) is started
# once, and its tests, each starting servers and browsers, don't compete with each other for the cores.
ONE_WORKER_PACKAGES = ("trading_pipeline_tests/deploy/",)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which a run without it doesn't load
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs the suite on pytest-xdist workers with `--dist loadfile`: a module's tests stay
    on one worker, so its module-scoped set-ups (a demo UI, a browser, an emulator) are made once.
    Here that also keeps each package of ONE_WORKER_PACKAGES on one worker. (pytest-xdist's own
    `xdist_group` marks can't do it: pytest 9.2 ignores the node id they rewrite.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class PackageAwareFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return next((p for p in ONE_WORKER_PACKAGES if nodeid.startswith(p)), super()._split_scope(nodeid))

    return PackageAwareFileScheduling(config, log)


@pytest.fixture
def postgres_url():
    """A fresh database on the real PostgreSQL server, dropped afterwards."""
    name = f"tp_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    from trading_pipeline.adapters.trading_db import get_engine

    get_engine(url).dispose()
    get_engine.cache_clear()
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trading.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server (moto in server mode) on loopback for the whole session."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        server.kill()
        pytest.fail("moto server did not start")
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(10)


@pytest.fixture(autouse=True)
def _no_defs_state_storage_left_behind():
    """A Dagster instance puts its definitions-state storage in a context variable that outlives it
    (Dagster does not always reset it); a later test building definitions outside any instance
    then fails with "Attempted to resolve undefined DagsterInstance weakref", depending on which
    tests a pytest worker ran before. Each test starts with none."""
    from dagster._core.storage.defs_state.base import _current_storage

    _current_storage.set(None)
    yield


@pytest.fixture(autouse=True)
def _environment_restored():
    """The code under test may set variables for the rest of its process, as a command may (the
    demo turns paper orders on and sets TRADING_AS_OF): a test's variables must not reach the
    tests a pytest worker runs after it (orders sent where a test expects them off, say)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
