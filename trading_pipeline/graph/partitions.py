"""Partitions: symbols from the strategies file (read when the code location loads) × timeframes.

Adding a symbol to the strategies file and reloading the code location makes its partitions
appear; no code change.
"""

from __future__ import annotations

import functools
import os

import dagster as dg

from trading_pipeline.core.frames import TIMEFRAMES
from trading_pipeline.core.strategies import StrategiesFile, load_strategies


@functools.lru_cache(maxsize=4)
def _load(path: str | None) -> StrategiesFile:
    return load_strategies(path)


def strategies() -> StrategiesFile:
    return _load(os.environ.get("TRADING_STRATEGIES_FILE") or None)


def build_partitions(strategies_file: StrategiesFile):
    symbols = dg.StaticPartitionsDefinition(strategies_file.symbols())
    symbol_timeframe = dg.MultiPartitionsDefinition(
        {"symbol": symbols, "timeframe": dg.StaticPartitionsDefinition(list(TIMEFRAMES))})
    return symbols, symbol_timeframe


def symbol_and_timeframe(context) -> tuple[str, str]:
    """Read the multi-partition key; a run launched with only a string tag hands us a str."""
    key = context.partition_key
    if not isinstance(key, dg.MultiPartitionKey):
        key = context.assets_def.partitions_def.get_partition_key_from_str(str(key))
    dims = key.keys_by_dimension
    return dims["symbol"], dims["timeframe"]
