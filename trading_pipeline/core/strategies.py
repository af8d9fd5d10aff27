"""The strategies file: which symbols trade, on which timeframes, under which risk limits.

Pure: parses YAML and validates it with pydantic. Errors name the file, the line and the fix.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trading_pipeline.core.frames import TIMEFRAMES
from trading_pipeline.errors import StrategiesFileError

# IBKR history periods ("2y", "260w", ...); the units are the ones /iserver/marketdata/history takes.
PERIOD_PATTERN = re.compile(r"^(\d{1,4})(d|w|m|y)$")
PERIOD_LIMITS = {"d": 1000, "w": 792, "m": 182, "y": 15}
# Dagster partition keys reject | , [ ] and "..."; IBKR symbols use letters, digits, '.' and ' '.
# The slowest indicator, SMA 200, needs 200 bars; the run-time check counts the real bars.
MIN_HISTORY_BARS = 200
BARS_PER_YEAR = {"1d": 252, "1w": 52}
SYMBOL_PATTERN = re.compile(r"^[A-Z][A-Z0-9.]{0,11}$")


class _Strict(BaseModel):
    # No .inf or .nan: a risk limit of infinity is a typo, not a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TimeframeSettings(_Strict):
    period: str = Field(description="History to load, in IBKR's period units: e.g. 2y, 260w, 500d.")

    @field_validator("period", mode="before")
    @classmethod
    def _period_with_its_unit(cls, value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(  # noqa: TRY004 - pydantic reports a ValueError (not a TypeError) with the line
                f"period {value!r} is a number without its unit: write it like '{value:g}y' (years), "
                f"'{value:g}w', '{value:g}m' or '{value:g}d'")
        return value

    @field_validator("period")
    @classmethod
    def _valid_period(cls, value: str) -> str:
        match = PERIOD_PATTERN.fullmatch(value)  # fullmatch: "2y\n" is not a period
        if not match:
            raise ValueError(f"period {value!r} is not like '2y', '260w', '18m' or '500d'")
        count, unit = int(match.group(1)), match.group(2)
        if not 1 <= count <= PERIOD_LIMITS[unit]:
            raise ValueError(f"period {value!r}: IBKR accepts 1-{PERIOD_LIMITS[unit]}{unit}")
        return value

    def calendar_days(self) -> int:
        count, unit = PERIOD_PATTERN.fullmatch(self.period).groups()  # type: ignore[union-attr]
        return int(count) * {"d": 1, "w": 7, "m": 31, "y": 366}[unit]

    def expected_bars(self, timeframe: str) -> int:
        """Roughly how many bars the period holds (NYSE: ~252 sessions, 52 weeks a year)."""
        return int(self.calendar_days() / 365.25 * BARS_PER_YEAR[timeframe])


class RiskSettings(_Strict):
    min_r: float = Field(1.0, gt=0, description="Minimum reward/risk to the first target.")
    min_profit_margin: float = Field(0.05, ge=0, lt=1, description="Minimum |target1-entry|/entry.")
    risk_per_trade: float = Field(0.01, gt=0, le=0.05, description="Share of equity lost if the stop is hit.")
    max_position_share: float = Field(0.10, gt=0, le=1, description="Cap on one position's value / equity.")
    max_open_positions: int = Field(10, ge=1)
    max_gross_exposure: float = Field(0.90, gt=0, le=2, description="Cap on sum(|position value|) / equity.")
    allow_short: bool = Field(False, description="May a SELL open a short position?")
    daily_loss_limit: float = Field(0.03, gt=0, le=1, description="Stop new orders after losing this share today.")
    min_confidence: float = Field(0.5, ge=0, le=1, description="Proposals below this confidence are not traded.")
    min_stop_atr: float = Field(0.25, ge=0, le=10, description="Minimum entry-to-stop distance, in ATRs (and at "
                                "least one tick): a stop inside the noise gives an absurd size and R.")


class OrderSettings(_Strict):
    enabled: bool = Field(False, description="May this strategy send orders at all? Off unless said.")
    tif: str = Field("DAY", pattern="^(DAY|GTC)$")
    when_market_closed: str = Field(
        "next_open", pattern="^(next_open|no_trade)$",
        description="A decision made while the market is closed: next_open sends the order for the next "
                    "open; no_trade sends nothing (orders only while the market is open).")
    max_decision_age_minutes: int | None = Field(
        None, ge=1, le=7 * 24 * 60,
        description="A decision older than this when its order would go out is not sent. Whatever this says, a "
                    "decision is never sent once a session has closed after it (its prices are history).")


class Strategy(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str = ""
    symbols: list[str] = Field(min_length=1)
    timeframes: dict[str, TimeframeSettings]
    risk: RiskSettings = RiskSettings()
    orders: OrderSettings = OrderSettings()
    trade_at_open: bool = Field(True, description="The market-open sensor decides (and orders) for this strategy.")

    @field_validator("symbols", mode="before")
    @classmethod
    def _no_yaml_booleans(cls, symbols):
        # YAML 1.1 reads ON, OFF, YES, NO as booleans.
        if isinstance(symbols, list) and any(isinstance(s, bool) for s in symbols):
            raise ValueError("a symbol was read as a boolean (ON, OFF, YES, NO): quote it, e.g. 'ON'")
        return symbols

    @field_validator("symbols")
    @classmethod
    def _valid_symbols(cls, symbols: list[str]) -> list[str]:
        bad = [symbol for symbol in symbols if not isinstance(symbol, str) or not SYMBOL_PATTERN.fullmatch(symbol)]
        if bad:  # every bad one at once, each with how to write it
            raise ValueError("; ".join(_bad_symbol(symbol) for symbol in bad))
        duplicates = sorted({s for s in symbols if symbols.count(s) > 1})
        if duplicates:
            raise ValueError(f"symbols listed twice: {', '.join(duplicates)}")
        return symbols

    @field_validator("timeframes")
    @classmethod
    def _both_timeframes(cls, timeframes: dict[str, TimeframeSettings]) -> dict[str, TimeframeSettings]:
        if set(timeframes) != set(TIMEFRAMES):
            raise ValueError(
                f"timeframes must be exactly {', '.join(TIMEFRAMES)} (the daily analysis leads, "
                f"the weekly confirms); got {', '.join(map(str, timeframes)) or 'none'}"
            )
        for timeframe, settings in timeframes.items():
            expected = settings.expected_bars(timeframe)
            if expected < MIN_HISTORY_BARS:
                needed = math.ceil(MIN_HISTORY_BARS / BARS_PER_YEAR[timeframe] * 10) / 10
                raise ValueError(
                    f"{timeframe} period {settings.period} gives about {expected} bars; SMA 200 needs "
                    f"{MIN_HISTORY_BARS} — use at least {needed:g}y (e.g. {math.ceil(needed)}y)")
        return timeframes


def _bad_symbol(symbol: object) -> str:
    text = f"symbol {symbol!r} is not an upper-case ticker like 'AAPL' or 'BRK.B'"
    if isinstance(symbol, str) and SYMBOL_PATTERN.fullmatch(symbol.strip().upper()):
        return f"{text}: write {symbol.strip().upper()!r}"
    return f"{text} (a letter, then up to 11 letters, digits or dots; a share class as BRK.B, not BRK/B)"


class StrategiesFile(_Strict):
    strategies: list[Strategy] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> StrategiesFile:
        names = [s.name for s in self.strategies]
        if len(set(names)) != len(names):
            raise ValueError(f"strategy names must be unique: {names}")
        return self

    def symbols(self) -> list[str]:
        return [symbol for strategy in self.strategies for symbol in strategy.symbols]

    def strategy_for(self, symbol: str) -> Strategy:
        for strategy in self.strategies:
            if symbol in strategy.symbols:
                return strategy
        raise StrategiesFileError(
            f"symbol {symbol!r} is not in any strategy of the strategies file",
            "add it to a strategy's symbols, or materialize only the symbols the file lists",
        )


# Aliases share a block (one risk: for several strategies); past this many repeated values they are
# a nested-alias bomb ("billion laughs"): a few lines that expand to billions of values.
MAX_ALIAS_REPEATED_VALUES = 10_000


class _SelfReference(Exception):
    def __init__(self, line: int):
        self.line = line


class _TooManyRepeats(Exception):
    def __init__(self, line: int):
        self.line = line


class _AliasLinesLoader(yaml.SafeLoader):
    """Composes like SafeLoader and records the 1-based line of each alias (*name), in file order;
    the node graph keeps only the anchored node an alias points at, not where the alias was."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.alias_lines: list[int] = []

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.alias_lines.append(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)


def _compose(text: str) -> tuple[yaml.Node | None, list[int]]:
    loader = _AliasLinesLoader(text)
    try:
        return loader.get_single_node(), loader.alias_lines
    finally:
        loader.dispose()


def _check_aliases(root: yaml.Node, alias_lines: list[int]) -> None:
    """Walk the node graph once, in file order, counting the values each alias repeats. Raises
    _SelfReference (with the anchor's line) for an anchor that contains itself through an alias, and
    _TooManyRepeats (with the alias's line) once aliases repeat more than MAX_ALIAS_REPEATED_VALUES
    values. Linear in the written file: a node reached a second time is an alias, not walked again."""
    sizes: dict[int, int] = {}  # id(node) -> values it stands for once expanded
    open_nodes: set[int] = set()
    aliases = iter(alias_lines)
    repeated = 0

    def size(node: yaml.Node) -> int:
        nonlocal repeated
        if id(node) in open_nodes:
            raise _SelfReference(node.start_mark.line + 1)
        if id(node) in sizes:
            # In file order the k-th node met again is the k-th alias the composer saw.
            line = next(aliases, node.start_mark.line + 1)
            repeated += sizes[id(node)]
            if repeated > MAX_ALIAS_REPEATED_VALUES:
                raise _TooManyRepeats(line)
            return sizes[id(node)]
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1 + sum(size(child) for child in children)
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _line_index(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map each key path (as pydantic reports it) to its 1-based line in the file. Run after
    _check_aliases: the graph has no loop and expands to a bounded number of values."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines.update(_line_index(value_node, path + (key,)))
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_index(item, path + (i,)))
    return lines


def _duplicate_key(node: yaml.Node, seen: set[int] | None = None) -> tuple[str, int, int] | None:
    """The first mapping key written twice in one mapping: (key, first line, second line), or None.
    YAML loaders keep the last value silently, which would drop a strategy or a risk limit unseen."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return None
    seen.add(id(node))
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        first_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                if key_node.value in first_lines:
                    return key_node.value, first_lines[key_node.value], line
                first_lines[key_node.value] = line
            children.append(value_node)
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    for child in children:
        found = _duplicate_key(child, seen)
        if found:
            return found
    return None


def _line_for(lines: dict[tuple, int], loc: tuple) -> int:
    # pydantic's loc can end with validator names; use the longest prefix the YAML knows.
    for end in range(len(loc), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in loc[:end])
        if key in lines:
            return lines[key]
    return 1


FIX_HINT = (
    "edit the strategies file at that line; see trading_pipeline/data/strategies.yaml for a "
    "complete, valid example and docs/strategies.md for every field"
)


def _not_valid_yaml(exc: yaml.YAMLError, source: str) -> StrategiesFileError:
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc)
    return StrategiesFileError(f"{where}: not valid YAML ({problem})", FIX_HINT)


def parse_strategies(text: str, source: str = "<strategies>") -> StrategiesFile:
    try:
        root, alias_lines = _compose(text)
        if root is not None:
            _check_aliases(root, alias_lines)
    except yaml.YAMLError as exc:
        raise _not_valid_yaml(exc, source) from None
    except RecursionError:
        raise StrategiesFileError(
            f"{source}: lists or blocks are nested too deeply to read (hundreds of levels)",
            "a strategies file nests a few levels (strategies, a strategy, its risk:); "
            "see trading_pipeline/data/strategies.yaml") from None
    except _SelfReference as loop:
        raise StrategiesFileError(
            f"{source}:{loop.line}: the anchor (&) defined here contains itself through an alias (*)",
            "replace the alias with the values it should repeat, or point it at an anchor outside it") from None
    except _TooManyRepeats as bomb:
        raise StrategiesFileError(
            f"{source}:{bomb.line}: aliases (*) repeat more than {MAX_ALIAS_REPEATED_VALUES:,} values by this "
            "line (aliases of aliases multiply: a few lines can stand for billions of values)",
            "write the values out, or use an alias only to share a block such as one risk: for several "
            "strategies") from None
    try:
        # Built only now that the aliases are known to expand to a bounded number of values.
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # e.g. a tag SafeLoader does not build (!!python/object)
        raise _not_valid_yaml(exc, source) from None
    if root is None or not isinstance(data, dict):
        raise StrategiesFileError(
            f"{source}:1: the file must be a mapping with a top-level 'strategies:' list", FIX_HINT
        )
    duplicate = _duplicate_key(root)
    if duplicate:
        key, first, second = duplicate
        raise StrategiesFileError(
            f"{source}:{second}: {key!r} is written twice in the same block (first at line {first}); "
            "YAML would silently keep only the last one",
            "keep one of the two and merge what the other said into it")
    lines = _line_index(root)
    try:
        parsed = StrategiesFile.model_validate(data)
    except ValidationError as exc:
        messages = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            field = ".".join(str(p) for p in loc) or "(file)"
            message = (_unknown_key(loc) if error["type"] == "extra_forbidden"
                       else error["msg"].removeprefix("Value error, "))  # pydantic's prefix says nothing
            messages.append(f"{source}:{_line_for(lines, loc)}: {field}: {message}")
        raise StrategiesFileError("invalid strategies file:\n  " + "\n  ".join(messages), FIX_HINT) from None

    owner: dict[str, tuple[str, int]] = {}
    for s_index, strategy in enumerate(parsed.strategies):
        for y_index, symbol in enumerate(strategy.symbols):
            line = lines.get(("strategies", s_index, "symbols", y_index), 1)
            if symbol in owner:
                first_strategy, first_line = owner[symbol]
                raise StrategiesFileError(
                    f"{source}:{line}: symbol {symbol} is in strategy {strategy.name!r} and "
                    f"already in {first_strategy!r} (line {first_line}); a symbol belongs to one strategy",
                    "remove it from one of the two strategies",
                )
            owner[symbol] = (strategy.name, line)
    return parsed


def _unknown_key(loc: tuple) -> str:
    """A key the block does not have (a misspelt `min_rr:`): the closest known key and all of them,
    instead of pydantic's "Extra inputs are not permitted"."""
    model: type[BaseModel] | None = StrategiesFile
    for part in loc[:-1]:  # down the fields to the block the key is in (list indexes, timeframe names skipped)
        if model is not None and isinstance(part, str) and part in model.model_fields:
            model = _model_in(model.model_fields[part].annotation)
    known = list(model.model_fields) if model is not None else []
    key = str(loc[-1])
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    message = f"unknown key {key!r}" + (f": did you mean {close[0]!r}?" if close else "")
    return message + (f" (this block's keys: {', '.join(known)})" if known else "")


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: itself, or inside list[...], dict[str, ...] or ... | None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


DEFAULT_STRATEGIES_FILE = Path(__file__).resolve().parent.parent / "data" / "strategies.yaml"


def load_strategies(path: str | Path | None = None) -> StrategiesFile:
    file = Path(path) if path else DEFAULT_STRATEGIES_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StrategiesFileError(
            f"strategies file {file} does not exist",
            "set TRADING_STRATEGIES_FILE to an existing YAML file, or unset it to use the demo "
            f"strategies in {DEFAULT_STRATEGIES_FILE}",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StrategiesFileError(
            f"strategies file {file} cannot be read ({exc})",
            "check the path and permissions in TRADING_STRATEGIES_FILE; the file must be UTF-8 YAML",
        ) from None
    return parse_strategies(text, source=str(file))
