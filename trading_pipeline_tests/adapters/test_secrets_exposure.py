"""Secrets and account data stay out of logs and out of other users' reach: the alert webhook's
URL (it carries a token) in the HTTP stack's log lines, the trading database's file modes."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from trading_pipeline.adapters import alerts

TOKEN = "s3cr3tT0kenXYZ"


@pytest.fixture
def webhook_url():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(int(self.path.rsplit("/", 1)[-1].split("-")[0]) if "-" in self.path else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/services/T0/B0/{TOKEN}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("suffix, posted", [("", True), ("/500-fails", False)])
def test_the_alert_webhooks_url_is_in_no_log_line_even_at_debug(webhook_url, caplog, suffix, posted):
    # Celery workers log at INFO (dagster-celery's default), where httpx writes every request's
    # full URL: "HTTP Request: POST http://…/services/T0/B0/<token> …".
    caplog.set_level(logging.DEBUG)
    assert alerts.send_alert("run failed", environ={"TRADING_ALERT_WEBHOOK_URL": webhook_url + suffix}) is posted
    lines = [record.getMessage() for record in caplog.records]
    assert any("run failed" in line for line in lines)
    assert not [line for line in lines if TOKEN in line]
    if not posted:
        assert any("alert webhook at 127.0.0.1 failed: HTTPStatusError" in line for line in lines)


def test_other_httpx_requests_are_still_logged(webhook_url, caplog):
    import httpx

    caplog.set_level(logging.INFO)
    alerts.send_alert("x", environ={"TRADING_ALERT_WEBHOOK_URL": webhook_url})
    other = webhook_url.replace(TOKEN, "other")
    httpx.post(other, json={})
    assert any(other in record.getMessage() for record in caplog.records if record.name == "httpx")
