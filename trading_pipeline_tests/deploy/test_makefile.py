"""The Makefile's commands: what `make demo` and `make test` install, and `make dev` for real
(the Dagster UI through `dg dev` plus the chart server, both stopped by one Ctrl-C).

`make dev` runs against a stand-in virtualenv folder whose python and dg exec the test's own
interpreter's, with the install stamps already made, so nothing is installed here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from trading_pipeline.adapters.chart_store import LocalChartStore
from trading_pipeline_tests.deploy.processes import ProcessSet, free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PNG = b"\x89PNG\r\n\x1a\n" + b"chart" * 50
TEST_TOOLS = ("pytest", "pytest-xdist", "moto", "playwright", "ruff", "check-jsonschema")


def _dry_run(target: str, venv: Path) -> str:
    """The commands `make <target>` would run for a fresh checkout (nothing installed yet)."""
    # Under `make test PYTEST_WORKERS=0 PYTEST_ARGS=...` its variables reach this make through the environment.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTEST_WORKERS", "PYTEST_ARGS")}
    result = subprocess.run(["make", "-n", "-C", str(REPO), target, f"VENV={venv}"],
                            capture_output=True, text=True, check=True, timeout=60, env=env)
    return result.stdout


def test_demo_installs_the_package_without_test_tools(tmp_path):
    demo = _dry_run("demo", tmp_path / "venv")
    installs = [line for line in demo.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs == [f"{tmp_path / 'venv'}/bin/pip install -q -e ."], installs
    assert "[test]" not in demo
    dev = _dry_run("dev", tmp_path / "venv")
    assert "[test]" not in dev and "pip install -q -e ." in dev
    test = _dry_run("test", tmp_path / "venv")
    assert "pip install -q -e '.[test]'" in test and "-m pytest -q -n 2 --dist loadfile" in test  # on 2 workers


def test_test_tools_are_an_extra_not_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dependencies = " ".join(project["dependencies"]).lower()
    extra = " ".join(project["optional-dependencies"]["test"]).lower()
    for tool in TEST_TOOLS:
        assert tool in extra and tool not in dependencies, tool
    assert "dagster-dg-cli" in dependencies  # `dg dev` is what make dev runs


def test_one_code_location_name_everywhere():
    import yaml

    name = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]["code_location_name"]
    for workspace in ("workspace.yaml", "deploy/workspace.yaml"):
        entries = yaml.safe_load((REPO / workspace).read_text())["load_from"]
        assert [next(iter(e.values()))["location_name"] for e in entries] == [name], workspace
    makefile = (REPO / "Makefile").read_text()
    assert "dg dev -w workspace.yaml" in makefile and "dagster dev" not in makefile.replace("`dagster dev`", "")


def _stand_in_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, target in (("python", sys.executable), ("dg", str(BIN / "dg"))):
        script = venv / "bin" / name
        script.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        script.chmod(0o755)
    for stamp in (".created", ".installed-demo"):
        (venv / stamp).touch()
    future = time.time() + 3600  # newer than pyproject.toml, so make installs nothing
    os.utime(venv / ".installed-demo", (future, future))
    return venv


def _wait_for(check, what: str, procs: ProcessSet, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        procs.assert_running("make")
        try:
            result = check()
            if result:
                return result
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout:.0f} s:\n{procs.log_tail('make')}")
        time.sleep(0.5)


@pytest.mark.skipif(not (BIN / "dg").exists(), reason="dagster-dg-cli is not installed (pip install -e .)")
# Ctrl-C in the terminal sends SIGINT to the whole foreground group; a process manager stopping the
# service (systemd's default KillMode) sends SIGTERM to the whole group.
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_make_dev_serves_the_ui_and_the_charts_and_ctrl_c_stops_both(tmp_path, stop):
    venv = _stand_in_venv(tmp_path)
    data = tmp_path / "trading"
    key = "charts/SPY/1d/2026-01-28T210000Z.png"
    LocalChartStore(data).put_png(key, PNG)
    ui_port, chart_port = free_port(), free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "TRADING_DATA_DIR": str(data),
           "TRADING_CHART_SERVER_PORT": str(chart_port), "PYTHONPATH": str(REPO)}
    env.pop("MAKEFLAGS", None)
    procs = ProcessSet(tmp_path / "logs")
    make = procs.start("make", ["make", "-C", str(REPO), "dev", f"VENV={venv}", f"DAGSTER_PORT={ui_port}"], env)
    try:
        chart = _wait_for(lambda: httpx.get(f"http://127.0.0.1:{chart_port}/{key}", timeout=2), "chart server", procs)
        assert chart.status_code == 200 and chart.headers["content-type"] == "image/png" and chart.content == PNG
        query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"

        def locations():
            response = httpx.post(f"http://127.0.0.1:{ui_port}/graphql", json={"query": query}, timeout=5)
            entries = response.json()["data"]["workspaceOrError"]["locationEntries"]
            return entries if entries and all(e["loadStatus"] == "LOADED" for e in entries) else None

        assert [e["name"] for e in _wait_for(locations, "Dagster UI", procs)] == ["trading_pipeline"]
        assert (tmp_path / "home" / "dagster.yaml").read_text() == (REPO / "deploy/local/dagster.yaml").read_text()

        os.killpg(make.pid, stop)  # the whole group, as a terminal or a process manager does
        make.wait(timeout=60)
        deadline = time.monotonic() + 20
        while procs.survivors() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert procs.survivors() == [], procs.log_tail("make")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{chart_port}/{key}", timeout=2)
        log = (tmp_path / "logs" / "make.log").read_text(errors="replace")
        assert "superseded" not in log  # `dagster dev` would print "dev_command is superseded"
        assert "Found a dagster instance configuration" not in log
        assert f"chart server: http://127.0.0.1:{chart_port}/charts/" in log
        assert "Error 130" not in log and "Error 143" not in log and "***" not in log  # a stop, not an error
    finally:
        procs.kill_all()


def _fake_python(folder: Path, name: str, answer: str | None) -> None:
    """An interpreter on the PATH answering pick-python.sh's probe with `answer` ("<µs> <path>"), or
    failing it (too old, no venv) when None."""
    script = folder / name
    script.write_text("#!/bin/sh\ncat >/dev/null\n" + (f"echo '{answer}'\n" if answer else "exit 1\n"))
    script.chmod(0o755)


def test_the_venv_is_built_on_the_fastest_python_found(tmp_path):
    """`make` without PYTHON builds .venv on the fastest Python 3.11+ that can make a venv: a pyenv
    build without profile-guided optimization runs the pipeline's Python code 1.3-2x slower."""
    _fake_python(tmp_path, "python3.13", None)  # fails the probe: skipped
    _fake_python(tmp_path, "python3.12", f"2 {tmp_path}/python3.12")
    _fake_python(tmp_path, "python3.11", f"1 {tmp_path}/python3.11")
    _fake_python(tmp_path, "python3", f"1 {tmp_path}/python3.11")  # the same interpreter: counted once
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    result = subprocess.run(["sh", str(REPO / "deploy/local/pick-python.sh")], capture_output=True, text=True,
                            check=True, timeout=120, env=env)
    assert result.stdout.strip() == f"{tmp_path}/python3.11"
    assert f"{tmp_path}/python3.12 0 ms" in result.stderr and result.stderr.count(f"{tmp_path}/python3.11 0 ms") == 1
    assert "PYTHON=... chooses another" in result.stderr
    # PYTHON given: used as it is, nothing probed.
    created = subprocess.run(["make", "-n", "-C", str(REPO), "PYTHON=python3.12", f"VENV={tmp_path}/venv",
                              f"{tmp_path}/venv/.created"], capture_output=True, text=True, check=True, timeout=60)
    assert 'python="python3.12"' in created.stdout


def test_the_dagster_home_make_creates_is_private(tmp_path):
    # DAGSTER_HOME holds the runs' logs, the asset values (decisions, orders, positions) and, by
    # default, the trading database: with `mkdir -p` and the usual umask it was 0755.
    home = tmp_path / "home"
    subprocess.run(["make", "-s", "-C", str(REPO), f"{home}/dagster.yaml", f"DAGSTER_HOME={home}"],
                   check=True, capture_output=True, env={k: v for k, v in os.environ.items() if k != "MAKEFLAGS"})
    assert (home / "dagster.yaml").read_text() == (REPO / "deploy/local/dagster.yaml").read_text()
    assert home.stat().st_mode & 0o777 == 0o700
