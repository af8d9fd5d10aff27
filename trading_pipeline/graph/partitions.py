"""Partitions: symbols from the strategies file (read when the code location loads) × timeframes.

Adding a symbol to the strategies file and reloading the code location makes its partitions
appear; no code change.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import dagster as dg

from trading_pipeline.core.frames import TIMEFRAMES
from trading_pipeline.core.strategies import StrategiesFile, load_strategies

# Why the last load fell back to the last good strategies file (shown on the `strategies` asset), or None.
LOAD_PROBLEMS: dict[str | None, str] = {}


@functools.lru_cache(maxsize=4)
def _load(path: str | None) -> StrategiesFile:
    """Load the strategies file; keep a copy of the last good one so that a bad edit followed by
    a reload or restart keeps the code location up on the last good version (the
    strategies_file_sensor and this warning report the bad edit)."""
    from trading_pipeline import config
    from trading_pipeline.core.strategies import DEFAULT_STRATEGIES_FILE
    from trading_pipeline.errors import StrategiesFileError

    source = Path(path or DEFAULT_STRATEGIES_FILE).resolve()
    # One copy per strategies file: a different file never falls back to another's last version.
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    last_good = config.data_dir() / f"strategies.last_good.{digest}.yaml"
    try:
        loaded = load_strategies(path)
    except StrategiesFileError as error:
        if not last_good.exists():  # nothing good has loaded yet: the error stops the load
            raise
        logging.getLogger(__name__).error(
            f"{error}\nUsing the last good strategies file {last_good} until the file is fixed.")
        LOAD_PROBLEMS[path] = f"{error}\n\nThe code location runs on the last good copy ({last_good}) until the file is fixed."
        return load_strategies(last_good)
    LOAD_PROBLEMS.pop(path, None)
    try:
        last_good.parent.mkdir(parents=True, exist_ok=True)
        last_good.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    except OSError:
        pass  # a read-only data dir only loses the fallback
    return loaded


def strategies() -> StrategiesFile:
    return _load(os.environ.get("TRADING_STRATEGIES_FILE") or None)


def strategies_load_problem() -> str | None:
    """Why the strategies file in use is the last good copy (a rejected edit), or None."""
    return LOAD_PROBLEMS.get(os.environ.get("TRADING_STRATEGIES_FILE") or None)


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
