"""What a backtest run is: one strategy over a window, with its analyst, costs and data source.

The same fields are the Dagster asset's `Config` and the command's options; a run's key hashes
these settings with the code version and the data (engine.run_key).
"""

from __future__ import annotations

import math
from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trading_pipeline.core.strategies import MIN_HISTORY_BARS, SYMBOL_PATTERN, RiskSettings

# Grid keys: the strategy's risk settings, plus the SuperTrend multiplier of the indicators.
INDICATOR_GRID_KEYS = ("supertrend_multiplier",)
GRID_KEYS = tuple(RiskSettings.model_fields) + INDICATOR_GRID_KEYS
GRID_METRICS = ("sharpe", "total_return", "expectancy_r", "calmar")
MAX_GRID_POINTS = 64


class BacktestSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: str = Field(description="Strategy name in the strategies file.")
    start: date = Field(description="First session whose close makes a decision.")
    end: date = Field(description="Last session of the window (its close is the last mark).")
    analyst: Literal["rules", "llm_replay"] = "rules"
    commission: Literal["ibkr_fixed", "ibkr_tiered", "none"] = "ibkr_fixed"
    slippage_bps: float = Field(5.0, ge=0, le=500, description="Paid on stop and market fills.")
    initial_cash: float = Field(100_000.0, gt=0, allow_inf_nan=False)
    benchmark: str = Field("equal_weight", description="equal_weight (buy-and-hold of the strategy's "
                                                       "symbols) or a symbol such as SPY.")
    data: Literal["simulated", "csv", "ibkr"] = "simulated"
    csv_dir: str | None = None
    seed: int = Field(0, description="Simulated market seed.")
    symbols: tuple[str, ...] | None = Field(None, description="Replace the strategy's symbols (what-if).")
    warmup_bars: int = Field(300, ge=MIN_HISTORY_BARS + 10,
                             description="Bars of each timeframe before `start` (indicator warm-up).")
    folds: int = Field(0, ge=0, le=24, description="Walk-forward folds; 0 = one plain run.")
    grid: dict[str, tuple[float, ...]] = Field(default_factory=dict,
                                               description="Walk-forward settings to choose from in-sample.")
    grid_metric: Literal["sharpe", "total_return", "expectancy_r", "calmar"] = "sharpe"
    # llm_replay: which model's cached answers, and what it may already know.
    model: str | None = Field(None, description="llm_replay: the model whose cached answers are replayed "
                                                "(default OPENAI_MODEL or the analyst's default).")
    model_cutoff: date | None = Field(None, description="The model's knowledge cutoff (a warning when the "
                                                        "window starts before it).")
    anonymized_charts: bool = Field(False, description="llm_replay: replay the answers given on anonymized charts "
                                                       "(OPENAI_ANONYMIZE_CHARTS=yes; no symbol, dates or "
                                                       "absolute prices), anonymized by the same code.")

    @field_validator("grid")
    @classmethod
    def _known_grid_keys(cls, grid: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
        unknown = sorted(set(grid) - set(GRID_KEYS))
        if unknown:
            raise ValueError(f"grid keys {unknown} are not settings; use some of {', '.join(GRID_KEYS)}")
        if any(not values for values in grid.values()):
            raise ValueError("every grid key needs at least one value")
        for key, values in grid.items():
            for value in values:  # each value as the strategies file (or the indicators) would take it
                if key in INDICATOR_GRID_KEYS:
                    if not (math.isfinite(value) and value > 0):
                        raise ValueError(f"grid {key}={value:g}: must be a number > 0")
                    continue
                try:
                    RiskSettings.model_validate({key: value})
                except ValidationError as error:
                    raise ValueError(f"grid {key}={value:g}: {error.errors()[0]['msg']}") from None
        points = 1
        for values in grid.values():
            points *= len(values)
        if points > MAX_GRID_POINTS:
            raise ValueError(f"the grid has {points} points; keep it to {MAX_GRID_POINTS} (walk-forward runs "
                             "each of them on every fold's in-sample part)")
        return grid

    @field_validator("symbols")
    @classmethod
    def _tickers(cls, symbols: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for symbol in symbols or ():
            if not SYMBOL_PATTERN.fullmatch(symbol):
                raise ValueError(f"symbol {symbol!r} is not an upper-case ticker like 'AAPL' or 'BRK.B' (as in the "
                                 "strategies file)")
        return symbols

    @field_validator("benchmark")
    @classmethod
    def _benchmark(cls, benchmark: str) -> str:
        if benchmark != "equal_weight" and not SYMBOL_PATTERN.fullmatch(benchmark):
            raise ValueError(f"benchmark {benchmark!r} is neither equal_weight nor an upper-case ticker like 'SPY'")
        return benchmark

    @model_validator(mode="after")
    def _window(self) -> BacktestSettings:
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        if self.data == "csv" and not self.csv_dir:
            raise ValueError("data: csv needs csv_dir (a folder of <SYMBOL>_<timeframe>.csv files)")
        if self.grid and not self.folds:
            raise ValueError("a grid is chosen per walk-forward fold: set folds >= 1 too")
        return self
