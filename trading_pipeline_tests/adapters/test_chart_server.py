"""The loopback chart server and the chart stores' browser links (public_url)."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest

from trading_pipeline.adapters.chart_store import (
    PRESIGNED_URL_SECONDS,
    LocalChartStore,
    S3ChartStore,
    chart_base_url,
    chart_key,
    chart_server_port,
)
from trading_pipeline.chart_server import make_server, resolve_chart
from trading_pipeline.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n" + b"chart" * 200
AS_OF = datetime(2026, 1, 28, 21, 0, tzinfo=UTC)
KEY = chart_key("BRK.B", "1d", AS_OF)


@pytest.fixture
def chart_root(tmp_path) -> Path:
    root = tmp_path / "trading"
    LocalChartStore(root).put_png(KEY, PNG)
    (root / "trading.db").write_bytes(b"SQLite format 3\0 secret")  # what a traversal would be after
    (root / "charts" / "notes.txt").write_text("not a chart")
    (tmp_path / "outside.png").write_bytes(PNG)
    return root


@pytest.fixture
def server(chart_root):
    srv = make_server(chart_root, 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(port: int, raw_path: str, method: str = "GET") -> tuple[int, str, bytes]:
    """Send `raw_path` exactly as given (no client-side normalisation of `..`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest(method, raw_path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def test_serves_a_stored_chart_as_png(server):
    status, content_type, body = _get(server.server_port, "/" + KEY)
    assert (status, content_type, body) == (200, "image/png", PNG)
    status, content_type, body = _get(server.server_port, "/" + KEY, "HEAD")
    assert (status, content_type, body) == (200, "image/png", b"")


def test_binds_loopback_only(server):
    assert server.server_address[0] == "127.0.0.1"


@pytest.mark.parametrize("path", [
    "/charts/../trading.db",
    "/charts/BRK.B/../../trading.db",
    "/charts/%2e%2e/trading.db",
    "/charts/%2E%2E/%2E%2E/outside.png",
    "/charts/..%2f..%2foutside.png",
    "/../outside.png",
    "/charts/notes.txt",
    "/charts/",
    "/charts/BRK.B/1d/",
    "/trading.db",
    "/charts/BRK.B/1d/missing.png",
    "/charts\\..\\trading.db",
])
def test_nothing_but_chart_pngs_no_traversal(server, path):
    status, _, body = _get(server.server_port, path)
    assert status == 404 and b"SQLite" not in body and PNG not in body


def test_symlink_out_of_the_chart_folder_is_refused(chart_root, tmp_path):
    link = chart_root / "charts" / "escape.png"
    link.symlink_to(tmp_path / "outside.png")
    assert resolve_chart(chart_root, "/charts/escape.png") is None
    assert resolve_chart(chart_root, "/" + KEY) == (chart_root / KEY).resolve()


def test_local_store_links_to_the_chart_server_and_the_link_works(server, chart_root):
    store = LocalChartStore(chart_root, f"http://127.0.0.1:{server.server_port}/")
    url = store.public_url(KEY)
    assert url == f"http://127.0.0.1:{server.server_port}/charts/BRK.B/1d/2026-01-28T210000Z.png"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "image/png"
        assert response.read() == PNG


def test_base_url_and_port_from_the_environment():
    assert chart_base_url("local", {}) == "http://127.0.0.1:3001"
    assert chart_base_url("local", {"TRADING_CHART_SERVER_PORT": "3100"}) == "http://127.0.0.1:3100"
    assert chart_base_url("s3", {}) is None  # presigned links
    minio = {"TRADING_CHART_BASE_URL": "http://127.0.0.1:9000/trading-charts/"}
    assert chart_base_url("s3", minio) == "http://127.0.0.1:9000/trading-charts"
    assert chart_base_url("local", minio) == "http://127.0.0.1:9000/trading-charts"
    assert LocalChartStore(Path("/x")).public_url(KEY).startswith("http://127.0.0.1:3001/charts/")
    with pytest.raises(ConfigError) as info:
        chart_base_url("local", {"TRADING_CHART_BASE_URL": "file:///tmp"})
    assert "http" in info.value.fix
    with pytest.raises(ConfigError):
        chart_server_port({"TRADING_CHART_SERVER_PORT": "web"})


def test_resources_give_the_store_its_base_url(monkeypatch, tmp_path):
    from trading_pipeline.graph.resources import resources_from_env

    environ = {"DAGSTER_HOME": str(tmp_path), "TRADING_CHART_SERVER_PORT": "3123"}
    store = resources_from_env(environ)["chart_store"].store()
    assert store.public_url(KEY) == "http://127.0.0.1:3123/" + KEY


def test_s3_links_base_url_or_presigned_for_seven_days(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    public = S3ChartStore(client, "links-test", "prod", base_url="http://127.0.0.1:9000/links-test")
    public.put_png(KEY, PNG)
    assert public.public_url(KEY) == "http://127.0.0.1:9000/links-test/prod/charts/BRK.B/1d/2026-01-28T210000Z.png"
    presigned = S3ChartStore(client, "links-test", "prod").public_url(KEY)
    assert presigned.startswith(f"{s3_endpoint}/links-test/prod/charts/BRK.B/1d/")
    query = parse_qs(urlsplit(presigned).query)
    if "X-Amz-Expires" in query:  # SigV4
        assert query["X-Amz-Expires"] == [str(PRESIGNED_URL_SECONDS)]
    else:  # boto3's default query signing for S3 (SigV2): an absolute expiry time
        assert abs(int(query["Expires"][0]) - time.time() - PRESIGNED_URL_SECONDS) < 60
    with urllib.request.urlopen(presigned, timeout=10) as response:
        assert response.read() == PNG


def test_python_m_chart_server_serves_the_data_dir(chart_root):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "TRADING_DATA_DIR": str(chart_root), "TRADING_CHART_SERVER_PORT": str(port),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "trading_pipeline.chart_server"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert f"http://127.0.0.1:{port}/charts/" in proc.stdout.readline()
        deadline = time.monotonic() + 10
        while True:
            try:
                status, content_type, body = _get(port, "/" + KEY)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert (status, content_type, body) == (200, "image/png", PNG)
        # a second server on the same port says what to do
        second = subprocess.run([sys.executable, "-m", "trading_pipeline.chart_server"], env=env,
                                capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 2 and "TRADING_CHART_SERVER_PORT" in second.stderr
    finally:
        proc.terminate()
        proc.wait(10)
