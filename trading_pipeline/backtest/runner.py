"""One backtest from settings: the strategy, the bars, the analyst, the run, the warnings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path

import pandas as pd

from trading_pipeline import config
from trading_pipeline.adapters.market_data import MarketDataSource
from trading_pipeline.backtest import data
from trading_pipeline.backtest.engine import Backtest, BacktestAnalyst, BacktestResult, code_version
from trading_pipeline.backtest.settings import INDICATOR_GRID_KEYS, BacktestSettings
from trading_pipeline.core import market_calendar
from trading_pipeline.core.indicators import IndicatorParams
from trading_pipeline.core.market_calendar import CALENDAR_END, CALENDAR_START
from trading_pipeline.core.strategies import StrategiesFile, Strategy, load_strategies
from trading_pipeline.errors import ConfigError, UserError

MIN_TRADES = 30

# Training-data cutoffs as the vendors state them (approximate: set `model_cutoff` to override).
MODEL_KNOWLEDGE_CUTOFFS: dict[str, date] = {
    "gpt-4o": date(2023, 10, 1),
    "gpt-4o-mini": date(2023, 10, 1),
    "gpt-4.1": date(2024, 6, 1),
    "gpt-4.1-mini": date(2024, 6, 1),
    "gpt-4.1-nano": date(2024, 6, 1),
    "gpt-5": date(2024, 9, 30),
    "gpt-5-mini": date(2024, 5, 31),
    "gpt-5-nano": date(2024, 5, 31),
}


def strategy_named(strategies_file: StrategiesFile, name: str) -> Strategy:
    for strategy in strategies_file.strategies:
        if strategy.name == name:
            return strategy
    names = ", ".join(s.name for s in strategies_file.strategies)
    raise ConfigError(f"strategy {name!r} is not in the strategies file (it has: {names})",
                      "pass one of those names, or point TRADING_STRATEGIES_FILE at the file that defines it")


def with_overrides(strategy: Strategy, settings: BacktestSettings, point: dict[str, float]) -> tuple[Strategy, IndicatorParams | None]:
    """The strategy (and indicator settings) with a grid point's values and the run's symbols."""
    risk_values = {k: v for k, v in point.items() if k not in INDICATOR_GRID_KEYS}
    indicator_values = {k: v for k, v in point.items() if k in INDICATOR_GRID_KEYS}
    risk = type(strategy.risk).model_validate({**strategy.risk.model_dump(), **risk_values})
    updated = strategy.model_copy(update={"risk": risk, "symbols": list(settings.symbols or strategy.symbols)})
    return updated, (IndicatorParams(**indicator_values) if indicator_values else None)


def knowledge_cutoff_warning(settings: BacktestSettings, model: str | None) -> str | None:
    if settings.analyst != "llm_replay":
        return None
    cutoff = settings.model_cutoff or (MODEL_KNOWLEDGE_CUTOFFS.get((model or "").lower()))
    if cutoff is None:
        return (f"the knowledge cutoff of model {model!r} is unknown: if the window ({settings.start}..) lies "
                "before it, the model may know what happened next; set model_cutoff to check")
    if settings.start < cutoff:
        return (f"the window starts {settings.start}, before model {model}'s knowledge cutoff {cutoff}: the model "
                "may have seen this history (and what came after) in training; anonymized charts reduce this, "
                "results before the cutoff are not evidence of skill")
    return None


def check_window(settings: BacktestSettings, now: datetime | None = None) -> None:
    """Refuse (UserError) a window outside the exchange calendar, or one holding a session that has
    not closed by `now` (default: the deployment's now, config.trading_now): the simulated market
    would invent its bars, IBKR and CSV files have none, and a backtest replays the past only."""
    first, last = date.fromisoformat(CALENDAR_START), date.fromisoformat(CALENDAR_END)
    if settings.start < first or settings.end >= last:  # the last session's close is past the calendar's end
        raise UserError(f"the window {settings.start}..{settings.end} is outside the exchange calendar, which runs "
                        f"from {first} to {last}",
                        f"choose a start on or after {first} (later still for the indicators' warm-up) and an end "
                        f"before {last}")
    now = now or config.trading_now()
    calendar = market_calendar.calendar()
    closed = market_calendar.last_closed_session(now)
    if closed is not None and closed >= calendar.last_session:
        return  # every session of the calendar has closed
    unclosed = calendar.next_session(closed) if closed is not None else calendar.first_session
    if unclosed.date() <= settings.end:
        when = f"{pd.Timestamp(now).tz_convert('UTC'):%Y-%m-%d %H:%M} UTC"
        missing = "the simulated market would invent them" if settings.data == "simulated" else \
            f"the {settings.data} data cannot have them"
        if closed is None:
            raise UserError(f"no session of the exchange calendar has closed as of {when}: a backtest needs "
                            "completed sessions", "check TRADING_AS_OF (or the run's trading/as_of tag)")
        raise UserError(
            f"the window ends {settings.end}, after the last completed session {closed.date()} (as of {when}): "
            f"the session of {unclosed.date()} has not closed, so its bars do not exist yet ({missing})",
            f"set end to {closed.date()} or earlier (--end, or the backtest config's end); a backtest replays "
            "completed sessions only")


def load(settings: BacktestSettings, *, strategies_file: StrategiesFile | None = None,
         source: MarketDataSource | None = None,
         now: datetime | None = None) -> tuple[Strategy, dict[str, dict[str, pd.DataFrame]], dict[str, pd.Series]]:
    """The strategy, its bars for the window plus warm-up, and the extra benchmark closes. The window
    is checked first (`check_window`, against `now`)."""
    check_window(settings, now)
    strategies_file = strategies_file or load_strategies()
    strategy = strategy_named(strategies_file, settings.strategy)
    symbols = list(settings.symbols or strategy.symbols)
    source = source or data.source_for(settings.data, seed=settings.seed, csv_dir=settings.csv_dir)
    window = data.Window.of(settings.start, settings.end)
    bars = data.load_bars(source, symbols, settings.start, window, settings.warmup_bars)
    extra: dict[str, pd.Series] = {}
    wanted = {settings.benchmark} - {"equal_weight"} | ({"SPY"} if "SPY" in symbols else set())
    for symbol in sorted(wanted):
        frame = bars[symbol]["1d"] if symbol in bars else \
            data.load_bars(source, [symbol], settings.start, window, settings.warmup_bars)[symbol]["1d"]
        closes = frame["close"]
        extra[symbol] = pd.Series(closes.to_numpy(), index=pd.DatetimeIndex(
            closes.index.tz_convert("America/New_York").date, name="session"))
    return strategy, bars, extra


def run_backtest(settings: BacktestSettings, *, strategies_file: StrategiesFile | None = None,
                 source: MarketDataSource | None = None, analyst: BacktestAnalyst | None = None,
                 progress: Callable[[int, int], None] | None = None, loaded=None,
                 point: dict[str, float] | None = None, on_decision=None) -> BacktestResult:
    strategy, bars, extra = loaded or load(settings, strategies_file=strategies_file, source=source)
    strategy, params = with_overrides(strategy, settings, point or {})
    bars = {symbol: bars[symbol] for symbol in strategy.symbols}
    result = Backtest(settings, strategy, bars, analyst=analyst, indicator_params=params,
                      data_digest=data.data_digest(bars), code=code_version(), progress=progress,
                      on_decision=on_decision).run()
    result.extra_benchmarks = extra
    warning = knowledge_cutoff_warning(settings, getattr(analyst, "model", None))
    if warning:
        result.warnings.append(warning)
    warning = replay_missed_everything_warning(analyst, result.analyst_counters)
    if warning:
        result.warnings.append(warning)
    if strategy.orders.when_market_closed == "no_trade":
        result.warnings.append(
            f"strategy {strategy.name} has orders.when_market_closed: no_trade, and a backtest decides at each "
            "session's close (market closed): every proposal is rejected by the market_hours gate")
    closed = sum(t.closed for t in result.trades)
    if closed < MIN_TRADES:
        result.warnings.append(f"only {closed} closed trades (fewer than {MIN_TRADES}): the trade statistics say "
                               "little; lengthen the window or add symbols")
    return result


def replay_missed_everything_warning(analyst, counters: dict[str, int]) -> str | None:
    """llm_replay without a single cached answer: every decision is NO_TRADE, which says nothing about
    the model; say why and what to check rather than leave a flat curve to be read as a result."""
    if counters.get("cache_misses", 0) == 0 or counters.get("cache_hits", 0) > 0:
        return None
    model = getattr(analyst, "model", "the model")
    held = len(getattr(getattr(analyst, "caller", None), "answers", ()) or ())
    where = (f"the response cache holds no answer of {model}" if not held else
             f"none of the {held:,} cached answers of {model} is for these charts and prompts")
    return (f"llm_replay found no cached answer for any of its {counters['cache_misses']:,} calls ({where}): every "
            "decision is NO_TRADE, so this run says nothing about the model. The cache (llm_response_cache in the "
            "trading database, TRADING_DATABASE_URL) is filled by live runs of the openai analyst on the same bars; "
            "check --model (the model those runs used), --anonymized-charts, and the trading database")


def history_cache_folder() -> Path:
    return config.data_dir() / "backtest_history"
