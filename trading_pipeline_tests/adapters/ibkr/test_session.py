"""Session handling: every auth state and its message, ssodh/init recovery, the pre-flight once per
session, competing sessions, and the errors for a gateway that is down, refuses our IP or has TLS."""

import ast
from pathlib import Path

import pytest

from trading_pipeline.adapters.ibkr.client import IBKRClient
from trading_pipeline.adapters.ibkr.errors import (
    IBKRAccessDenied,
    IBKRAccountError,
    IBKRCompetingSession,
    IBKRConfigError,
    IBKRGatewayUnreachable,
    IBKRNotLoggedIn,
    IBKRSessionError,
    IBKRTLSError,
)
from trading_pipeline.adapters.ibkr.settings import settings_from_env
from trading_pipeline.errors import UserError
from trading_pipeline_tests.adapters.ibkr.conftest import FAST


def test_authenticated_session_preflight_once_and_paper_detected(emulator, client):
    info = client.accounts()
    assert info.account_id == "DU1234567" and info.is_paper and info.reported_is_paper is True
    for _ in range(3):  # snapshot, live orders, order status and trades all need the pre-flight
        client.accounts()
        client.live_orders()
        client.trades(days=1)
    assert emulator.count("GET", "/iserver/accounts") == 1
    assert emulator.count("POST", "/iserver/auth/ssodh/init") == 0
    assert emulator.count("POST", "/iserver/auth/status") == 1  # re-checked at most once a minute


def test_logged_out_gateway_says_to_log_in_in_a_browser(emulator_factory, client_factory):
    emulator = emulator_factory(auth_state="logged_out")
    client = client_factory(emulator)
    with pytest.raises(IBKRNotLoggedIn) as raised:
        client.accounts()
    message = str(raised.value)
    assert "nobody is logged in" in message and "401" in message
    assert f"open http://127.0.0.1:{emulator.port} in a browser" in message and "log in" in message
    assert isinstance(raised.value, UserError)


def test_expired_session_says_to_log_in_again(emulator_factory, client_factory):
    emulator = emulator_factory(auth_state="expired")
    with pytest.raises(IBKRNotLoggedIn) as raised:
        client_factory(emulator).accounts()
    assert "expired" in raised.value.problem and "connected=false" in raised.value.problem
    assert emulator.count("POST", "/iserver/auth/ssodh/init") == 0  # nothing to re-open without a login


def test_connected_but_not_authenticated_is_recovered_with_ssodh_init(emulator_factory, client_factory):
    emulator = emulator_factory(auth_state="connected")
    client = client_factory(emulator)
    assert client.accounts().account_id == "DU1234567"
    assert emulator.count("POST", "/iserver/auth/ssodh/init") == 1
    assert emulator.state.auth_state == "authenticated"


def test_ssodh_init_that_does_not_open_the_session_is_a_clear_error(emulator_factory, client_factory):
    emulator = emulator_factory(auth_state="connected", init_fails=True)
    with pytest.raises(IBKRSessionError) as raised:
        client_factory(emulator).accounts()
    assert "could not be opened" in raised.value.problem and "log in again" in raised.value.fix
    assert emulator.count("POST", "/iserver/auth/ssodh/init") == 1


def test_brokerage_timeout_mid_session_reopens_and_repeats_the_preflight(emulator, client):
    client.accounts()
    client.live_orders()
    emulator.set_auth_state("connected")  # the brokerage session timed out: /iserver answers 'no bridge'
    assert client.live_orders() == []
    assert emulator.count("POST", "/iserver/auth/ssodh/init") == 1
    assert emulator.count("GET", "/iserver/accounts") == 2  # a new session needs a new pre-flight
    assert emulator.requests("GET", "/iserver/account/orders")[-3][3] == 400  # the 'no bridge' answer


def test_competing_session_is_reported_not_taken_over(emulator_factory, client_factory):
    emulator = emulator_factory(auth_state="competing")
    with pytest.raises(IBKRCompetingSession) as raised:
        client_factory(emulator).accounts()
    assert "TWS, IBKR Mobile" in raised.value.problem and "IBKR_TAKE_OVER_SESSION=yes" in raised.value.fix
    assert emulator.count("POST", "/iserver/auth/ssodh/init") == 0
    taken = client_factory(emulator, take_over_competing_session=True)
    assert taken.accounts().account_id == "DU1234567"
    assert emulator.count("POST", "/iserver/auth/ssodh/init") == 1


def test_session_health_tickles_and_reports(emulator, client):
    health = client.session_health()
    assert health.healthy and health.authenticated and health.connected and not health.competing
    assert emulator.count("POST", "/tickle") == 1
    assert "session" not in health.as_dict()  # the tickle's session token is never kept
    emulator.set_auth_state("competing")
    sick = client.session_health()
    assert not sick.healthy and sick.competing and "another session" in sick.detail


def test_gateway_not_running(closed_port, client_factory):
    client = client_factory(f"http://127.0.0.1:{closed_port}/v1/api")
    with pytest.raises(IBKRGatewayUnreachable) as raised:
        client.accounts()
    assert f"nothing answers at http://127.0.0.1:{closed_port}/v1/api" in raised.value.problem
    assert "start the gateway" in raised.value.fix and "IBKR_GATEWAY_URL" in raised.value.fix


def test_ip_not_in_allow_list(emulator_factory, client_factory):
    emulator = emulator_factory(allow_ips=("192.*", "131.216.*"))
    with pytest.raises(IBKRAccessDenied) as raised:
        client_factory(emulator).accounts()
    assert "not in the gateway's allow list" in raised.value.problem and "ips.allow" in raised.value.fix


def test_self_signed_tls(emulator_factory, client_factory):
    emulator = emulator_factory(https=True)
    assert emulator.url.startswith("https://localhost:")
    with pytest.raises(IBKRTLSError) as raised:
        client_factory(emulator, verify_ssl=True).accounts()
    assert "IBKR_VERIFY_SSL=no" in raised.value.fix
    assert client_factory(emulator).accounts().is_paper  # verification off: the default


def test_a_gateway_certificate_given_in_ibkr_ca_file_is_verified(emulator_factory, client_factory, tmp_path):
    """The gateway's own certificate (IBKR_CA_FILE) lets a client verify TLS, whatever IBKR_VERIFY_SSL
    says; another certificate fails the handshake, with the fix."""
    emulator = emulator_factory(https=True)
    ca_file = settings_from_env({"IBKR_CA_FILE": emulator.certificate})["ca_file"]
    client = client_factory(emulator, ca_file=ca_file)
    assert client.verify_ssl and client.accounts().is_paper
    other = emulator_factory(https=True)  # another self-signed certificate for localhost
    assert other.certificate != emulator.certificate
    with pytest.raises(IBKRTLSError) as raised:
        client_factory(other, ca_file=emulator.certificate).accounts()
    assert "IBKR_CA_FILE" in raised.value.fix


@pytest.mark.parametrize(("content", "problem"), [
    (None, "does not exist"),
    ("not a certificate", "is not a readable PEM certificate"),
])
def test_an_unusable_ibkr_ca_file_stops_the_load_naming_it(tmp_path, content, problem):
    path = tmp_path / "gateway.pem"
    if content is not None:
        path.write_text(content)
    with pytest.raises(IBKRConfigError) as raised:
        settings_from_env({"IBKR_CA_FILE": str(path)})
    assert f"IBKR_CA_FILE='{path}' {problem}" in raised.value.problem


@pytest.mark.parametrize(("url", "warned"), [
    ("https://gateway.example.com:5000/v1/api", True),
    ("https://10.0.0.7:5000/v1/api", True),
    ("http://gateway.example.com:5000/v1/api", True),  # no TLS at all
    ("https://localhost:5000/v1/api", False),
    ("https://127.0.0.1:5000/v1/api", False),
    ("https://ibkr-gateway:5000/v1/api", False),  # docker compose's container on this host
])
def test_a_gateway_across_a_network_without_tls_verification_is_warned_about(url, warned, caplog, monkeypatch):
    from trading_pipeline.adapters.ibkr import client

    monkeypatch.setattr(client, "_WARNED_UNVERIFIED", set())
    with caplog.at_level("WARNING", logger="trading_pipeline.adapters.ibkr"):
        IBKRClient(url).close()
        IBKRClient(url).close()  # a sensor's next tick: said once per process
    said = [r.getMessage() for r in caplog.records if "IBKR_CA_FILE" in r.getMessage()]
    assert len(said) == (1 if warned else 0), said


def test_several_accounts_need_an_account_id(emulator_factory, client_factory):
    emulator = emulator_factory(extra_accounts=("DU7654321",))
    with pytest.raises(IBKRAccountError) as raised:
        client_factory(emulator).accounts()
    assert "DU1234567, DU7654321" in raised.value.problem and "IBKR_ACCOUNT_ID" in raised.value.fix
    chosen = client_factory(emulator, account_id="DU7654321").accounts()
    assert chosen.account_id == "DU7654321"
    assert emulator.count("POST", "/iserver/account") == 1  # switched to it
    with pytest.raises(IBKRAccountError):
        client_factory(emulator, account_id="DU0000000").accounts()


def test_configuration_errors_name_the_variable_and_never_echo_credentials():
    with pytest.raises(IBKRConfigError) as raised:
        IBKRClient("https://localhost:5000", pacing=FAST)
    assert "/v1/api" in raised.value.fix
    with pytest.raises(IBKRConfigError) as raised:
        IBKRClient("https://trader:hunter2@localhost:5000/v1/api", pacing=FAST)
    assert "hunter2" not in str(raised.value)
    with pytest.raises(IBKRConfigError) as raised:
        IBKRClient.from_env({"IBKR_READ_TIMEOUT": "soon"})
    assert "IBKR_READ_TIMEOUT" in raised.value.problem
    with pytest.raises(IBKRConfigError):
        IBKRClient.from_env({"IBKR_HISTORY_CONCURRENCY": "6"})
    client = IBKRClient.from_env({"TRADING_ALLOW_LIVE": "yes", "IBKR_AUTO_CONFIRM": "o10331",
                                  "IBKR_CONIDS": "AAPL=265598", "IBKR_ACCOUNT_ID": "DU1"})
    assert client.switches().allow_live and client.switches().auto_confirm == ("o10331",)
    assert client.conid_overrides == {"AAPL": 265598}
    assert client.gateway_url == "https://localhost:5000/v1/api" and not client.verify_ssl
    client.close()


def test_product_package_holds_no_emulator_and_never_imports_it():
    """The gateway emulator is a test tool: it lives in trading_pipeline_tests/emulators, and no
    module of the product's IBKR package imports it or its server (starlette/uvicorn)."""
    package = Path(__file__).resolve().parents[3] / "trading_pipeline" / "adapters" / "ibkr"
    modules = list(package.glob("*.py"))
    assert {p.name for p in modules} >= {"client.py", "market_data.py", "broker.py", "history.py", "transport.py"}
    assert not any("emulator" in p.name for p in modules)
    for module in modules:
        imported = set()
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        offending = {m for m in imported if m.split(".")[0] in ("starlette", "uvicorn", "trading_pipeline_tests")
                     or "emulator" in m}
        assert not offending, f"{module.name} imports {offending}"
