"""The Dockerfile without a Docker engine: the build context that .dockerignore leaves builds the
package (the image's `pip install .`), and the image's paths and command are the ones
docker-compose.yml and deploy/ rely on."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from trading_pipeline_tests.deploy.conftest import REPO, compose_file


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = current.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            current = ""
    return instructions


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins (`!` re-includes); a pattern matching a folder
    excludes what is below it; `**/x` matches x at any depth."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], pattern[3:]) for prefix in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
        if hit:
            result = not negate
    return result


def build_context(target: Path) -> list[str]:
    patterns = dockerignore_patterns()
    copied = []
    for root, dirs, names in os.walk(REPO):
        base = Path(root).relative_to(REPO).as_posix()
        prefix = "" if base == "." else base + "/"
        dirs[:] = [d for d in dirs if not ignored(prefix + d, patterns)]  # do not walk into .venv, .git
        for name in names:
            relative = prefix + name
            if not ignored(relative, patterns):
                destination = target / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / relative, destination)
                copied.append(relative)
    return copied


def test_dockerignore_keeps_secrets_and_clutter_out_but_the_package_in():
    patterns = dockerignore_patterns()
    for path in (".env", ".env.production", ".git/config", ".venv/bin/python", "trading_pipeline/__pycache__/x.pyc",
                 "trading_pipeline_tests/conftest.py", ".dagster_home/dagster.yaml", "bench/pipeline.py"):
        assert ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "trading_pipeline/definitions.py", "trading_pipeline/data/strategies.yaml",
                 "deploy/dagster.yaml", "deploy/workspace.yaml", "deploy/create_bucket.py", ".env.example"):
        assert not ignored(path, patterns), path


def test_image_instructions_match_compose_and_deploy():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert keywords[0] == "FROM" and instructions[0][1].startswith("python:3.11-")
    env = " ".join(a for k, a in instructions if k == "ENV")
    assert "DAGSTER_HOME=/opt/dagster/dagster_home" in env and "BROWSER_PATH=/usr/bin/chromium" in env
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert "apt-get install" in runs and " chromium" in runs  # kaleido's browser, from Debian
    copies = [a.split() for k, a in instructions if k == "COPY"]
    sources = {source for args in copies for source in args[:-1]}
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        assert not ignored(source, dockerignore_patterns()), f"COPY {source} is excluded by .dockerignore"
    home_copy = next(args for args in copies if "deploy/dagster.yaml" in args)
    assert home_copy[-1] == "${DAGSTER_HOME}/" and "deploy/workspace.yaml" in home_copy
    assert ["deploy/create_bucket.py", "./deploy/"] in copies
    workdir = next(a for k, a in instructions if k == "WORKDIR")
    compose = compose_file()["services"]
    assert compose["create-bucket"]["command"][1] == f"{workdir}/deploy/create_bucket.py"
    cmd = json.loads(next(a for k, a in instructions if k == "CMD"))
    assert cmd == compose["user_code"]["command"]  # the image alone serves the code location
    for name in ("webserver", "daemon"):
        assert "/opt/dagster/dagster_home/workspace.yaml" in compose[name]["command"]
    assert ("USER", "dagster") in instructions


def test_build_context_builds_the_package(tmp_path):
    """What `pip install .` in the image builds: a wheel from the .dockerignore'd context only, with
    the build backend pyproject.toml asks for (pip's isolated build, as in the image)."""
    context = tmp_path / "context"
    copied = build_context(context)
    assert "pyproject.toml" in copied and "trading_pipeline/definitions.py" in copied
    assert not any(p.startswith(("trading_pipeline_tests/", ".git/", ".venv/")) or p == ".env" for p in copied)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                             "-w", str(tmp_path / "wheels"), str(context)], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = next((tmp_path / "wheels").glob("trading_pipeline-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"trading_pipeline/definitions.py", "trading_pipeline/data/strategies.yaml"} <= names
    assert not any(n.startswith("trading_pipeline_tests/") for n in names)
