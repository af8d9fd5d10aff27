"""Walk-forward: each fold chooses a grid point on its in-sample part and is scored on the
out-of-sample part that follows it; the out-of-sample parts joined are the honest result.

The window's sessions are cut into folds + 1 equal parts; fold k is in-sample on part k and
out-of-sample on part k + 1 (a rolling window). Every run reads the same bars (loaded once, with
the warm-up before the window's start): a later part's warm-up is simply the bars before it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import pandas as pd

from trading_pipeline.backtest.engine import BacktestResult
from trading_pipeline.backtest.runner import run_backtest
from trading_pipeline.backtest.settings import BacktestSettings
from trading_pipeline.backtest.statistics import equity_statistics, trade_statistics
from trading_pipeline.core import market_calendar
from trading_pipeline.errors import ConfigError


@dataclass
class Fold:
    number: int
    in_sample: tuple[date, date]
    out_of_sample: tuple[date, date]
    chosen: dict[str, float]
    scores: list[tuple[dict[str, float], float]]
    in_sample_result: BacktestResult
    out_of_sample_result: BacktestResult


@dataclass
class WalkForward:
    metric: str
    folds: list[Fold]
    in_sample_equity: pd.Series
    out_of_sample_equity: pd.Series


def split(start: date, end: date, folds: int) -> list[tuple[tuple[date, date], tuple[date, date]]]:
    sessions = market_calendar.calendar().sessions_in_range(pd.Timestamp(start), pd.Timestamp(end))
    parts = folds + 1
    if len(sessions) < parts * 20:
        raise ConfigError(f"{len(sessions)} sessions cannot be cut into {parts} parts of at least 20 sessions",
                          "use fewer folds or a longer window")
    bounds = [round(i * len(sessions) / parts) for i in range(parts + 1)]
    ranges = [(sessions[a].date(), sessions[b - 1].date()) for a, b in itertools.pairwise(bounds)]
    return [(ranges[k], ranges[k + 1]) for k in range(folds)]


def grid_points(grid: dict[str, tuple[float, ...]]) -> list[dict[str, float]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def score(result: BacktestResult, metric: str) -> float:
    value = trade_statistics(result.trades)["expectancy_r"] if metric == "expectancy_r" else \
        equity_statistics(result.equity)[metric]
    return float(value) if value is not None and math.isfinite(value) else -math.inf


def joined(curves: list[pd.Series], initial: float) -> pd.Series:
    """Consecutive equity curves chained into one, each continuing from where the last ended."""
    pieces, level = [], initial
    for curve in curves:
        scaled = curve / curve.iloc[0] * level
        pieces.append(scaled)
        level = float(scaled.iloc[-1])
    return pd.concat(pieces)


def walk_forward(settings: BacktestSettings, loaded, *, analyst_factory: Callable[[], object] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> WalkForward:
    points = grid_points(settings.grid)
    windows = split(settings.start, settings.end, settings.folds)
    total, done = len(windows) * (len(points) + 1), 0
    folds = []
    for number, (in_sample, out_of_sample) in enumerate(windows, start=1):
        part = settings.model_copy(update={"start": in_sample[0], "end": in_sample[1], "folds": 0, "grid": {}})
        scores, results = [], []
        for point in points:
            result = run_backtest(part, loaded=loaded, point=point,
                                  analyst=analyst_factory() if analyst_factory else None)
            scores.append((point, score(result, settings.grid_metric)))
            results.append(result)
            done += 1
            if progress:
                progress(done, total)
        best = max(range(len(points)), key=lambda i: scores[i][1])  # ties: the first declared
        later = settings.model_copy(update={"start": out_of_sample[0], "end": out_of_sample[1], "folds": 0, "grid": {}})
        tested = run_backtest(later, loaded=loaded, point=points[best],
                              analyst=analyst_factory() if analyst_factory else None)
        done += 1
        if progress:
            progress(done, total)
        folds.append(Fold(number, in_sample, out_of_sample, points[best], scores, results[best], tested))
    return WalkForward(settings.grid_metric, folds,
                       joined([f.in_sample_result.equity for f in folds], settings.initial_cash),
                       joined([f.out_of_sample_result.equity for f in folds], settings.initial_cash))
