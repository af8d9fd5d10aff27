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


def test_a_new_sqlite_trading_database_is_readable_by_its_user_only(tmp_path):
    # It holds the account's orders, fills, positions and P&L and the model calls; with the usual
    # umask 022 it was made 0644 in a 0755 folder, readable by every user of the machine.
    import stat

    import sqlalchemy as sa

    from trading_pipeline.adapters.trading_db import get_engine, session_factory

    database = tmp_path / "data" / "trading.db"
    sessions = session_factory(f"sqlite:///{database}")
    with sessions.begin() as session:  # a write: the -wal and -shm files exist
        session.execute(sa.text("CREATE TABLE probe (x INTEGER)"))
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700
    for companion in ("trading.db-wal", "trading.db-shm"):
        if (database.parent / companion).exists():
            assert stat.S_IMODE((database.parent / companion).stat().st_mode) & 0o077 == 0, companion
    get_engine(f"sqlite:///{database}").dispose()


def test_an_existing_database_and_folder_keep_their_modes(tmp_path):
    import os
    import stat

    from trading_pipeline.adapters.trading_db import get_engine

    folder = tmp_path / "shared"
    folder.mkdir(mode=0o750)
    os.chmod(folder, 0o750)
    get_engine(f"sqlite:///{folder / 'trading.db'}").dispose()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750  # the user's choice, not changed
    assert stat.S_IMODE((folder / "trading.db").stat().st_mode) == 0o600


def test_the_dagster_home_the_demo_creates_is_private(tmp_path, monkeypatch, capsys):
    """Run by hand (not through make), the demo creates DAGSTER_HOME for this user only: it holds
    the runs, their logs and the asset values (orders, positions)."""
    import stat

    from trading_pipeline import demo

    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("TRADING_MARKET_DATA", "bogus")  # stops right after the folder is made
    assert demo.main([]) == 2
    assert "TRADING_MARKET_DATA='bogus'" in capsys.readouterr().err
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
