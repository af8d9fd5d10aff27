"""The local UI of a `make demo` run, as processes on loopback: the demo in a fresh DAGSTER_HOME
(`python -m trading_pipeline.demo --symbols SPY`: the default replays the point where SPY's BUY is
sent and later filled), then the Dagster webserver on that home (workspace.yaml verbatim, as
`make dev` loads it) and the chart server (`python -m trading_pipeline.chart_server`, as `make dev`
starts it). Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) that may only talk
to 127.0.0.1. Used by test_browser_demo.py and screenshots.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from trading_pipeline_tests.deploy.conftest import BIN, REPO, _location_loaded, _port_open, _wait, base_environment
from trading_pipeline_tests.deploy.processes import METADATA_ENTRY_FRAGMENT, ProcessSet, free_port, graphql

CHROMIUM = os.environ.get("TEST_CHROMIUM", "/usr/bin/chromium")
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
DEMO_TIMEOUT_S = 240
STARTUP_TIMEOUT_S = 120

METADATA_QUERY = """
query Latest($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) {
    __typename
    ... on AssetNode {
      latestMaterializationByPartition(partitions: $partitions) {
        partition
        metadataEntries {
          ...Entry
        }
      }
      assetMaterializations(limit: 1) {
        metadataEntries {
          ...Entry
        }
      }
    }
  }
}
""" + METADATA_ENTRY_FRAGMENT


def _values(entries: list[dict]) -> dict:
    return {e["label"]: next((e[k] for k in ("text", "mdStr", "jsonString", "intValue", "floatValue", "url")
                              if k in e), None) for e in entries}


@dataclass
class DemoUI:
    home: Path
    processes: ProcessSet
    web_port: int
    chart_port: int
    demo_output: str

    @property
    def webserver_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def chart_server_url(self) -> str:
        return f"http://127.0.0.1:{self.chart_port}"

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        return graphql(self.webserver_url, query, variables)

    def metadata(self, asset: str, partition: str | None = None) -> dict:
        """The latest materialization's metadata of `asset` (of `partition` if partitioned)."""
        node = self.graphql(METADATA_QUERY, {"key": {"path": [asset]}, "partitions": [partition] if partition else []})
        node = node["assetNodeOrError"]
        assert node["__typename"] == "AssetNode", node
        if partition:
            (event,) = node["latestMaterializationByPartition"]
        else:
            events = node["assetMaterializations"]
            event = events[0] if events else None
        assert event is not None, f"{asset} {partition or ''}: never materialized"
        return _values(event["metadataEntries"])


@contextlib.contextmanager
def demo_ui(tmp: Path, chart_size: tuple[int, int] = (960, 540)) -> Iterator[DemoUI]:
    """Run the demo into `tmp`/dagster_home, then serve its UI and charts; everything killed at the end."""
    home = tmp / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "deploy/local/dagster.yaml", home / "dagster.yaml")  # what `make demo` copies
    shutil.copy(REPO / "workspace.yaml", tmp / "workspace.yaml")  # its `working_directory: .` is tmp
    web_port, chart_port = free_port(), free_port()
    env = {**base_environment(), "DAGSTER_HOME": str(home), "TRADING_CHART_SERVER_PORT": str(chart_port),
           # smaller charts render faster; their links and levels are what is looked at
           "TRADING_CHART_WIDTH": str(chart_size[0]), "TRADING_CHART_HEIGHT": str(chart_size[1])}
    env.setdefault("PYTHONPATH", str(REPO))
    # cwd tmp: no .env of the checkout is read (the demo and the chart server read ./.env)
    demo = subprocess.run([sys.executable, "-m", "trading_pipeline.demo", "--symbols", "SPY"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, check=False)
    output = demo.stdout + demo.stderr
    assert demo.returncode == 0, output
    processes = ProcessSet(tmp / "logs")
    try:
        processes.start("charts", [sys.executable, "-m", "trading_pipeline.chart_server"], env, cwd=tmp)
        processes.start("webserver", [str(BIN / "dagster-webserver"), "-w", "workspace.yaml",
                                      "-h", "127.0.0.1", "-p", str(web_port)], env, cwd=tmp)
        ui = DemoUI(home=home, processes=processes, web_port=web_port, chart_port=chart_port, demo_output=output)
        _wait("chart server", lambda: _port_open(chart_port), 30, processes, ["charts"])
        _wait("webserver /server_info", lambda: httpx.get(f"{ui.webserver_url}/server_info", timeout=5).status_code == 200,
              STARTUP_TIMEOUT_S, processes, ["webserver"])
        _wait("code location loaded in the webserver", lambda: _location_loaded(ui), STARTUP_TIMEOUT_S, processes,
              ["webserver"])
        yield ui
    finally:
        processes.kill_all()


@contextlib.contextmanager
def chromium(profile: Path, viewport: dict[str, int]):
    """A headless Chromium context (Debian's binary; Playwright downloads no browser) that may only
    talk to 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        raise AssertionError(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set TEST_CHROMIUM)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, viewport=viewport,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        # Every page, new tabs too, may only talk to loopback: other requests are aborted and listed.
        blocked: list[str] = []

        def only_loopback(route):
            url = urlparse(route.request.url)
            if url.scheme in ("http", "https", "ws", "wss") and url.hostname not in LOCAL_HOSTS:
                blocked.append(route.request.url)
                return route.abort()
            return route.continue_()

        context.route("**/*", only_loopback)
        context.blocked = blocked
        try:
            yield context
        finally:
            context.close()


def loopback_page(context):
    """A new page of a `chromium()` context; `page.blocked` lists the requests aborted (not loopback)."""
    page = context.new_page()
    page.blocked = context.blocked
    return page
