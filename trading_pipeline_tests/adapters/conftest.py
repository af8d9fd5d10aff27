"""Fixtures of the portfolio sync's tests (test_portfolio_sync.py, test_sync_*.py)."""

import pytest

from trading_pipeline.adapters.trading_db import session_factory


@pytest.fixture
def sessions(database_url):
    """SQLite and PostgreSQL: for what stores or reads order times and states."""
    return session_factory(database_url)


@pytest.fixture
def memory_sessions(tmp_path):
    """SQLite only: for the sync's logic against BookBroker (keeps the suite fast)."""
    return session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
