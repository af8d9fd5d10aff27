"""Shared small backtests: three symbols of the simulated market over a few months (hundreds of
decisions, a dozen trades), and the same bars written as CSV files."""

from __future__ import annotations

from datetime import date

import pytest

from trading_pipeline.backtest import runner
from trading_pipeline.backtest.settings import BacktestSettings
from trading_pipeline.core.strategies import parse_strategies

STRATEGIES = parse_strategies("""\
strategies:
  - name: bt_test
    symbols: [SPY, AAPL, MSFT]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
    orders: {enabled: true}
""")
START, END = date(2024, 1, 1), date(2024, 9, 30)


def settings(**changes) -> BacktestSettings:
    return BacktestSettings(**{"strategy": "bt_test", "start": START, "end": END, **changes})


def run(settings_: BacktestSettings, loaded=None, **kwargs):
    return runner.run_backtest(settings_, strategies_file=STRATEGIES, loaded=loaded, **kwargs)


@pytest.fixture(scope="session")
def simulated():
    """(settings, loaded bars, result) of the base run."""
    base = settings()
    loaded = runner.load(base, strategies_file=STRATEGIES)
    return base, loaded, run(base, loaded)


def write_csv(folder, bars) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for symbol, by_timeframe in bars.items():
        for timeframe, frame in by_timeframe.items():
            out = frame.copy()
            out.index = out.index.strftime("%Y-%m-%dT%H:%M:%SZ")
            out.to_csv(folder / f"{symbol}_{timeframe}.csv", index_label="time", float_format="%.17g")


@pytest.fixture(scope="session")
def csv_data(tmp_path_factory, simulated):
    """The simulated bars as CSV files, loaded back through the csv source, and the run on them."""
    _, (_, bars, _), _ = simulated
    folder = tmp_path_factory.mktemp("csv")
    write_csv(folder, bars)
    csv_settings = settings(data="csv", csv_dir=str(folder))
    loaded = runner.load(csv_settings, strategies_file=STRATEGIES)
    return csv_settings, loaded, run(csv_settings, loaded)
