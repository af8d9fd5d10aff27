"""Child processes for the deployment tests: started in their own sessions, marked, and always
killed (SIGKILL, by PID and process group) at the end, including anything they started.

Every child gets a unique marker in its environment; processes inherit it, so teardown also
finds grandchildren that were re-parented (a run worker's Chromium, say) by reading
/proc/<pid>/environ. Only processes carrying this run's marker are ever signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

MARKER_VARIABLE = "TRADING_PIPELINE_DEPLOY_TEST"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids_with_marker(marker: str) -> list[int]:
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


class ProcessSet:
    """Starts processes with a shared marker; `kill_all()` SIGKILLs all of them and their descendants."""

    def __init__(self, log_dir: Path):
        self.marker = uuid.uuid4().hex
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, env={**env, MARKER_VARIABLE: self.marker}, cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def assert_running(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: pgid == pid
                except ProcessLookupError:
                    pass
        for _ in range(3):  # descendants in other process groups (e.g. choreographer's Chromium)
            leftovers = _pids_with_marker(self.marker)
            if not leftovers:
                break
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def survivors(self) -> list[int]:
        return _pids_with_marker(self.marker)


# The metadata entry kinds the pipeline writes, as a GraphQL fragment (use `...Entry` inside metadataEntries).
METADATA_ENTRY_FRAGMENT = """
fragment Entry on MetadataEntry {
  label
  ... on TextMetadataEntry { text }
  ... on MarkdownMetadataEntry { mdStr }
  ... on JsonMetadataEntry { jsonString }
  ... on IntMetadataEntry { intValue }
  ... on FloatMetadataEntry { floatValue }
  ... on UrlMetadataEntry { url }
}
"""


def graphql(base_url: str, query: str, variables: dict | None = None) -> dict:
    """Ask a Dagster webserver's GraphQL API; an error answer fails the test with its text."""
    import httpx

    response = httpx.post(f"{base_url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body["errors"]
    return body["data"]
