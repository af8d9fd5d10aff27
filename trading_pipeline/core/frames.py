"""The frame that flows between market_bars, indicator_frames, chart_images and the analysts."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the code location imports this module: keep pandas out of its import
    import pandas as pd

TIMEFRAMES: tuple[str, ...] = ("1d", "1w")
OHLCV_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")


@dataclass(frozen=True)
class MarketFrame:
    """Bars (and, after indicator_frames, indicator columns) for one symbol and timeframe.

    `frame` has a UTC DatetimeIndex of bar *start* times, sorted, unique, and holds only bars
    that had closed by `as_of` (the run's point in time): no asset ever sees a later bar.
    """

    symbol: str
    timeframe: str
    as_of: datetime  # timezone-aware UTC
    source: str  # which market data source produced the bars, e.g. "simulated"
    frame: pd.DataFrame = field(repr=False)

    @property
    def last_close(self) -> float:
        return float(self.frame["close"].iloc[-1])

    @property
    def last_bar_start(self) -> pd.Timestamp:
        return self.frame.index[-1]

    def with_frame(self, frame: pd.DataFrame) -> MarketFrame:
        return MarketFrame(self.symbol, self.timeframe, self.as_of, self.source, frame)
