"""The real IBKRClient over real HTTP against the emulator, started per test on 127.0.0.1.

Waits are scaled down on both sides (the emulator's 1-per-5-s endpoints answer 429 within 0.3 s,
the client spaces them by 0.3 s); `test_default_limits_*` runs the documented defaults.
"""

import dataclasses
import socket

import pytest

from trading_pipeline.adapters.ibkr.client import IBKRClient
from trading_pipeline.adapters.ibkr.pacing import Pacing
from trading_pipeline_tests.emulators.ibkr_gateway import EmulatorConfig, IBKREmulator

FAST = Pacing(slow_endpoint_interval=0.3, tickle_interval=0.2, rate_limit_backoff=0.2, rate_limit_retries=3,
              read_backoff=0.05, poll_interval=0.05, session_polls=5, cancel_timeout=5.0)
EMULATOR_FAST = {"slow_interval": 0.3, "tickle_interval": 0.2}


@pytest.fixture(autouse=True)
def _fresh_contract_cache():
    """The client caches symbol -> contract per process and gateway URL; tests start without it."""
    from trading_pipeline.adapters.ibkr import client

    client._contract_cache.clear()
    client._tick_cache.clear()


@pytest.fixture(autouse=True)
def _default_safety_switches(monkeypatch):
    """The client reads TRADING_ALLOW_LIVE and IBKR_AUTO_CONFIRM at send time: tests start from the
    defaults (no live trading, the built-in allow-list) and set them with monkeypatch."""
    monkeypatch.delenv("TRADING_ALLOW_LIVE", raising=False)
    monkeypatch.delenv("IBKR_AUTO_CONFIRM", raising=False)


@pytest.fixture(scope="session")
def _running_emulators():
    """Servers started once per session; each test gets a fresh gateway state (reset) on one."""
    servers: dict[bool, list[IBKREmulator]] = {False: [], True: []}
    yield servers
    for emulator in servers[False] + servers[True]:
        emulator.stop()


@pytest.fixture
def emulator_factory(tmp_path, _running_emulators):
    in_use: list[IBKREmulator] = []

    def make(https: bool = False, **config) -> IBKREmulator:
        idle = [e for e in _running_emulators[https] if e not in in_use]
        settings = EmulatorConfig(**{**EMULATOR_FAST, **config})
        if idle:
            emulator = idle[0].reset(settings)
        else:
            emulator = IBKREmulator(settings, host="127.0.0.1", port=0, https=https).start()
            _running_emulators[https].append(emulator)
        # every client of one emulator shares one pacing budget, as the runs of a deployment do
        emulator.pacing_dir = tmp_path / f"pacing-{len(in_use)}"
        in_use.append(emulator)
        return emulator

    yield make


@pytest.fixture
def emulator(emulator_factory) -> IBKREmulator:
    return emulator_factory()


@pytest.fixture
def client_factory():
    clients = []

    def make(emulator_or_url, **settings) -> IBKRClient:
        settings.setdefault("pacing", FAST)
        if not isinstance(emulator_or_url, str):
            settings.setdefault("shared_pacing_dir", emulator_or_url.pacing_dir)
        url = emulator_or_url if isinstance(emulator_or_url, str) else emulator_or_url.url
        client = IBKRClient(url, **settings)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(emulator, client_factory) -> IBKRClient:
    return client_factory(emulator)


@pytest.fixture
def fast_graph_pacing(monkeypatch):
    """The graph's IBKR clients (IBKRResource builds them with `Pacing(history_concurrency=...)`)
    pace like the emulator's scaled-down limits too, as FAST does for the clients made here: at
    IBKR's 1 per 5 s, a run's account reads (P&L, portfolio accounts) waited out most of a whole-graph test."""
    from trading_pipeline.adapters.ibkr import pacing
    from trading_pipeline.graph import ibkr

    monkeypatch.setattr(pacing, "Pacing", lambda **limits: dataclasses.replace(FAST, **limits))
    ibkr._shared_client.cache_clear()
    yield
    ibkr._shared_client.cache_clear()


@pytest.fixture
def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def world(emulator_factory, client_factory, tmp_path):
    """make(market_hours=..., symbols=...) -> lifecycle_world.World: an account at the emulator, the
    trading database and one process's order desk."""
    from trading_pipeline_tests.adapters.ibkr.lifecycle_world import world_maker

    return world_maker(emulator_factory, client_factory, tmp_path)
