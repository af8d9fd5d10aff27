"""Fixtures: the local OpenAI-compatible server, real indicator frames, a chart PNG, a trading DB."""

import functools
import hashlib
import io
from datetime import UTC, datetime

import pandas as pd
import pytest
import sqlalchemy as sa

from trading_pipeline.adapters.model_calls import ModelCallRow, ModelResponseCacheRow
from trading_pipeline.core.analysis import ChartSource
from trading_pipeline_tests.adapters.openai.local_server import LocalOpenAIServer

AS_OF = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
API_KEY = "sk-test-SECRETKEY-0123456789abcdef"


@pytest.fixture(scope="session")
def server():
    local = LocalOpenAIServer().start()
    yield local
    local.stop()


@pytest.fixture
def openai_server(server):
    server.reset()
    return server


@functools.lru_cache(maxsize=4)
def market_frame(symbol: str, timeframe: str):
    from trading_pipeline.core.frames import MarketFrame
    from trading_pipeline.core.indicators import compute_indicators
    from trading_pipeline.core.market_sim import simulate_bars

    years = 2 if timeframe == "1d" else 6
    start = pd.Timestamp(AS_OF) - pd.DateOffset(years=years)
    bars = simulate_bars(symbol, timeframe, start, pd.Timestamp(AS_OF))
    return MarketFrame(symbol, timeframe, AS_OF, "simulated", compute_indicators(bars))


@pytest.fixture
def daily():
    return market_frame("AAPL", "1d")


@pytest.fixture
def weekly():
    return market_frame("AAPL", "1w")


@pytest.fixture(scope="session")
def png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 36), (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def sessions(tmp_path):
    from trading_pipeline.adapters.trading_db import session_factory

    return session_factory(f"sqlite:///{tmp_path / 'trading.db'}")


@pytest.fixture
def make_analyst(openai_server, sessions):
    """make_analyst(**env) -> OpenAIAnalyst against the local server, fast retries, run id 'run-1'."""
    from trading_pipeline.adapters.openai_analyst import OpenAIAnalyst

    created = []

    def make(run_id="run-1", run_tags=None, **env):
        environ = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": openai_server.base_url, "OPENAI_MODEL": "gpt-4.1-mini",
                   "TRADING_LLM_BACKOFF_SECONDS": "0.01", "TRADING_LLM_BACKOFF_MAX_SECONDS": "0.05",
                   "OPENAI_TIMEOUT_SECONDS": "5", **{k: str(v) for k, v in env.items()}}
        analyst = OpenAIAnalyst.from_env(environ, sessions, run_id=run_id, run_tags=run_tags)
        created.append(analyst)
        return analyst

    yield make
    for analyst in created:
        analyst.close()


def chart_for(png: bytes) -> ChartSource:
    return ChartSource(uri="file:///charts/AAPL/1d/test.png", sha256=hashlib.sha256(png).hexdigest())


def rows(sessions) -> list[ModelCallRow]:
    with sessions() as session:
        return list(session.execute(sa.select(ModelCallRow).order_by(ModelCallRow.id)).scalars())


def cached_entries(sessions) -> int:
    with sessions() as session:
        return session.execute(sa.select(sa.func.count()).select_from(ModelResponseCacheRow)).scalar_one()
