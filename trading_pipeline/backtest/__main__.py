"""`python -m trading_pipeline.backtest --strategy NAME --start 2020-01-01 --end 2024-12-31`:
run a backtest in this process, show a progress bar, print the report, store the run."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date

from pydantic import ValidationError

from trading_pipeline.errors import UserError

DEFAULT_START, DEFAULT_END = date(2020, 1, 1), date(2024, 12, 31)


def _grid(text: list[str]) -> dict[str, tuple[float, ...]]:
    grid = {}
    for item in text:
        name, _, values = item.partition("=")
        if not values:
            raise UserError(f"--grid {item!r} has no values", "write NAME=V1,V2 (e.g. --grid min_r=1,1.5)")
        numbers = []
        for value in values.split(","):
            try:
                numbers.append(float(value))
            except ValueError:
                raise UserError(f"--grid {item!r}: {value.strip()!r} is not a number",
                                "write NAME=V1,V2 with numbers (e.g. --grid min_r=1,1.5)") from None
        grid[name.strip()] = tuple(numbers)
    return grid


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trading_pipeline.backtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", help="strategy name (default: the first in the strategies file)")
    parser.add_argument("--start", type=date.fromisoformat, default=DEFAULT_START,
                        help="first session, YYYY-MM-DD (default %(default)s)")
    parser.add_argument("--end", type=date.fromisoformat, default=DEFAULT_END,
                        help="last session, YYYY-MM-DD; a closed one (default %(default)s)")
    parser.add_argument("--analyst", choices=("rules", "llm_replay"), default="rules", help="default %(default)s")
    parser.add_argument("--commission", choices=("ibkr_fixed", "ibkr_tiered", "none"), default="ibkr_fixed",
                        help="default %(default)s")
    parser.add_argument("--slippage-bps", type=float, default=5.0,
                        help="basis points stop and market fills lose (default %(default)g)")
    parser.add_argument("--initial-cash", type=float, default=100_000.0, help="default %(default).0f")
    parser.add_argument("--benchmark", default="equal_weight",
                        help="equal_weight or a symbol such as SPY (default %(default)s)")
    parser.add_argument("--data", choices=("simulated", "csv", "ibkr"), default="simulated", help="default %(default)s")
    parser.add_argument("--csv-dir", help="folder of <SYMBOL>_<timeframe>.csv files (--data csv)")
    parser.add_argument("--seed", type=int, default=0, help="simulated market seed (default %(default)s)")
    parser.add_argument("--symbols", help="comma-separated symbols instead of the strategy's")
    parser.add_argument("--warmup-bars", type=int, default=300,
                        help="bars of each timeframe before --start, for the indicators (default %(default)s)")
    parser.add_argument("--folds", type=int, default=0, help="walk-forward folds (0: one plain run)")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                        help="walk-forward grid, repeatable, e.g. --grid min_r=1,1.5 --grid supertrend_multiplier=2,3")
    parser.add_argument("--grid-metric", choices=("sharpe", "total_return", "expectancy_r", "calmar"), default="sharpe",
                        help="default %(default)s")
    parser.add_argument("--model", help="llm_replay: the model whose cached answers are replayed")
    parser.add_argument("--model-cutoff", type=date.fromisoformat, help="llm_replay: the model's knowledge cutoff")
    parser.add_argument("--anonymized-charts", action="store_true", help="llm_replay: the answers given with OPENAI_ANONYMIZE_CHARTS=yes")
    parser.add_argument("--no-save", action="store_true", help="do not store the run in the trading database")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except UserError as error:
        print(f"backtest: {error.problem}\nFix: {error.fix}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trading_pipeline import config
    from trading_pipeline.backtest import replay, runner
    from trading_pipeline.backtest.report import text_report
    from trading_pipeline.backtest.settings import BacktestSettings
    from trading_pipeline.backtest.statistics import summarize
    from trading_pipeline.backtest.walk_forward import walk_forward
    from trading_pipeline.core.strategies import load_strategies

    strategies_file = load_strategies(os.environ.get("TRADING_STRATEGIES_FILE") or None)
    try:
        settings = BacktestSettings(
            strategy=args.strategy or strategies_file.strategies[0].name, start=args.start, end=args.end,
            analyst=args.analyst, commission=args.commission, slippage_bps=args.slippage_bps,
            initial_cash=args.initial_cash, benchmark=args.benchmark, data=args.data, csv_dir=args.csv_dir,
            seed=args.seed, symbols=tuple(s.strip() for s in args.symbols.split(",")) if args.symbols else None,
            warmup_bars=args.warmup_bars, folds=args.folds, grid=_grid(args.grid), grid_metric=args.grid_metric,
            model=args.model, model_cutoff=args.model_cutoff, anonymized_charts=args.anonymized_charts)
    except ValidationError as error:
        raise _invalid_options(error) from None
    runner.check_window(settings)  # before connecting to anything or loading bars
    sessions = None if args.no_save else _sessions()
    source = _ibkr_source() if settings.data == "ibkr" else None
    started = time.perf_counter()
    print(f"Loading bars for {settings.strategy} ({settings.data}) ...", file=sys.stderr)
    loaded = runner.load(settings, strategies_file=strategies_file, source=source)
    analyst_factory = replay.analyst_factory(settings, sessions or _sessions()) \
        if settings.analyst == "llm_replay" else None
    bar = None if args.quiet else tqdm(total=1, unit="session", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh() if done == total or done % 50 == 0 else None

    result = runner.run_backtest(settings, loaded=loaded, progress=progress,
                                 analyst=analyst_factory() if analyst_factory else None)
    walk = walk_forward(settings, loaded, analyst_factory=analyst_factory, progress=progress) \
        if settings.folds else None
    if bar is not None:
        bar.close()
    summary = summarize(result, result.extra_benchmarks)
    print(text_report(result, summary, walk))
    if sessions is not None:
        from trading_pipeline.backtest.store import save

        save(sessions, result, summary)
        print(f"\nStored as run {result.run_key} in {config.database_url().split('://')[0]} "
              f"(tables backtest_runs, backtest_trades, backtest_equity, backtest_decisions).")
    print(f"{len(result.decisions):,} decisions in {result.core_loop_seconds:.1f} s "
          f"({len(result.decisions) / max(result.core_loop_seconds, 1e-9):,.0f}/s in the core loop, "
          f"{len(result.decisions) / max(result.core_loop_cpu_seconds, 1e-9):,.0f}/s of CPU time); "
          f"{time.perf_counter() - started:.1f} s in all.", file=sys.stderr)
    return 0


def _invalid_options(error: ValidationError) -> UserError:
    """The settings' validation errors in the command's words: each named by its option (--slippage-bps,
    not slippage_bps), and a fix that names them (a check across options names them in its message)."""
    options, problems = [], []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        option = f"--{field.replace('_', '-')}" if field else ""
        if option and option not in options:
            options.append(option)
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{option}: {message}" if option else message)
    which = ", ".join(options) if options else "the options it names"
    return UserError(f"the backtest options are invalid: {'; '.join(problems)}",
                     f"correct {which} (python -m trading_pipeline.backtest --help lists every option and its "
                     "default)")


def _sessions():
    from trading_pipeline import config
    from trading_pipeline.adapters.trading_db import session_factory

    return session_factory(config.database_url())


def _ibkr_source():
    """IBKR history through the local cache (a second backtest sends no history request)."""
    from trading_pipeline.backtest.data import HistoryCache
    from trading_pipeline.backtest.runner import history_cache_folder
    from trading_pipeline.graph.resources import resources_from_env

    source = resources_from_env()["market_data"].ibkr.market_data()
    return HistoryCache(source, history_cache_folder())


if __name__ == "__main__":
    sys.exit(main())
