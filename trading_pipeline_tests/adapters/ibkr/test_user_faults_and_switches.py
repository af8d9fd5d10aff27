"""Errors the user must fix, said as such (issue 12, smaller faults), and the safety switches read
from the environment at send time, never from resource or run config (point 1)."""

import dagster as dg
import pytest

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.ibkr.errors import (
    IBKRConfigError,
    IBKRLiveAccountRefused,
    IBKROrderRejected,
    IBKRPnLUnavailable,
    IBKRRequestError,
)
from trading_pipeline.errors import UserError
from trading_pipeline.graph.ibkr import IBKRResource
from trading_pipeline_tests.adapters.ibkr.test_orders_and_portfolio import ORDERS_POST, bracket


def test_pnl_endpoint_404_says_so_and_what_to_do(emulator_factory, client_factory):
    """The account is still read (exits and stops need it); its P&L is unknown, saying why and the fix."""
    emulator = emulator_factory(positions=2)
    emulator.inject("/iserver/account/pnl/partitioned", method="GET", status=404,
                    raw="<html><head><title>Resource not found</title></head></html>")
    with pytest.raises(IBKRPnLUnavailable) as raised:
        IBKRBroker(client_factory(emulator)).client.pnl()
    error = raised.value
    assert isinstance(error, UserError) and not isinstance(error, IBKRRequestError)
    assert "404" in error.problem and "pnl/partitioned" in error.problem
    assert "daily-loss limit cannot be checked" in error.problem and "exits and stops go on" in error.problem
    assert "update the Client Portal gateway" in error.fix and "IBKR_READ_TIMEOUT" not in error.fix
    assert emulator.count("GET", "/iserver/account/pnl/partitioned") == 1  # not retried: it will not change
    emulator.inject("/iserver/account/pnl/partitioned", method="GET", status=404, raw="<html></html>")
    account = IBKRBroker(client_factory(emulator)).account({})
    assert account.daily_pnl is None and len(account.positions) == 2
    assert "answered 404" in account.daily_pnl_unknown and "update the Client Portal gateway" in account.daily_pnl_unknown
    assert emulator.count("GET", "/iserver/account/pnl/partitioned") == 2


def test_a_declined_question_says_the_decision_stays_rejected(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    emulator.add_question("o451", "The order value exceeds the limit.")
    with pytest.raises(IBKROrderRejected) as raised:
        broker.place("MSFT", bracket(coid="dq-1", entry=100.5), 100.5)
    assert "This decision stays rejected" in raised.value.problem
    assert "never sends the same decision twice" in raised.value.problem
    assert "place it by hand" in raised.value.fix
    assert "the next decision (not this one) will be sent" in raised.value.fix
    assert "IBKR_AUTO_CONFIRM is now o10331, o10152, o403, p12" in raised.value.fix


@pytest.fixture
def broker(client):
    return IBKRBroker(client)


def test_http_url_to_a_tls_gateway_names_the_scheme(emulator_factory, client_factory):
    emulator = emulator_factory(https=True)
    plain = f"http://127.0.0.1:{emulator.port}/v1/api"
    client = client_factory(plain, shared_pacing_dir=emulator.pacing_dir)
    with pytest.raises(IBKRConfigError) as raised:
        client.accounts()
    assert "uses http://" in raised.value.problem and "speaks TLS" in raised.value.problem
    assert raised.value.fix.startswith("use https://")
    assert f"IBKR_GATEWAY_URL=https://127.0.0.1:{emulator.port}/v1/api" in raised.value.fix
    assert "IBKR_READ_TIMEOUT" not in str(raised.value)


def test_http_url_to_a_dead_plain_server_is_still_a_transit_error(client_factory):
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def hang_up():  # accepts and closes at once: neither HTTP nor TLS
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
                connection.close()
            except OSError:
                continue

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        client = client_factory(f"http://127.0.0.1:{server.getsockname()[1]}/v1/api")
        with pytest.raises(IBKRRequestError) as raised:
            client.auth_status()
        assert "in transit" in raised.value.problem
    finally:
        stop.set()
        thread.join()
        server.close()


def test_live_account_refused_whatever_the_resource_config_says(emulator_factory, tmp_path, monkeypatch):
    emulator = emulator_factory(live=True)
    emulator.set_price("MSFT", 100.0)
    # the switch is no resource setting: extra config is dropped, and nothing of it reaches the client
    resource = IBKRResource(gateway_url=emulator.url, state_dir=str(tmp_path), allow_live=True)
    assert not hasattr(resource, "allow_live") and "allow_live" not in IBKRResource.model_fields

    @dg.op
    def send(ibkr: IBKRResource):
        ibkr.broker().place("MSFT", bracket(coid="sw-live"), 100.0)

    @dg.job(resource_defs={"ibkr": resource})
    def orders():
        send()

    with pytest.raises(dg.DagsterInvalidConfigError) as raised:  # a run config cannot set it either
        orders.execute_in_process(run_config={"resources": {"ibkr": {"config": {"allow_live": True}}}})
    assert "allow_live" in str(raised.value)
    with pytest.raises(IBKRLiveAccountRefused):
        orders.execute_in_process()
    assert emulator.count("POST", ORDERS_POST) == 0
    monkeypatch.setenv("TRADING_ALLOW_LIVE", "yes")  # the deployment opts in: read when the order is sent
    assert orders.execute_in_process().success
    assert len(emulator.orders_with_coid("sw-live")) == 1


def test_auto_confirm_is_read_from_the_environment_at_each_question(emulator, broker, monkeypatch):
    emulator.set_price("MSFT", 100.0)
    far = {"entry": 110.0, "stop": 105.0, "target": 120.0}  # >3% from the market: IBKR asks o163
    with pytest.raises(IBKROrderRejected) as raised:
        broker.place("MSFT", bracket(coid="ac-1", **far), 110.0)
    assert raised.value.message_ids == ("o163",)
    monkeypatch.setenv("IBKR_AUTO_CONFIRM", "o10331,o163")  # same client, same process
    assert len(broker.place("MSFT", bracket(coid="ac-2", **far), 110.0)) == 3
    monkeypatch.setenv("IBKR_AUTO_CONFIRM", "o10331")
    with pytest.raises(IBKROrderRejected):
        broker.place("MSFT", bracket(coid="ac-3", **far), 110.0)
    assert [len(emulator.orders_with_coid(c)) for c in ("ac-1", "ac-2", "ac-3")] == [0, 1, 0]
