"""The `backtest` asset: the live pipeline's core replayed over history for one strategy.

Partitioned by strategy; the launchpad's Config sets the window, analyst, costs and walk-forward.
It reads bars through the `market_data` resource (IBKR history through a local cache), writes the
run's trades, equity and decisions to the trading database and the equity chart to the chart
store, and shows the statistics, the chart's thumbnail and the per-gate rejections in metadata.
"""

from datetime import date

import dagster as dg
from pydantic import Field

from trading_pipeline.core.strategies import StrategiesFile
from trading_pipeline.errors import UserError
from trading_pipeline.graph.assets.common import fail, run_as_of, thumbnail_markdown
from trading_pipeline.graph.resources import (
    ChartRendererResource,
    ChartStoreResource,
    MarketDataResource,
    TradingDatabaseResource,
)


class BacktestConfig(dg.Config):
    start: str = Field("2020-01-01", description="First session (YYYY-MM-DD).")
    end: str = Field("2024-12-31", description="Last session (YYYY-MM-DD).")
    analyst: str = Field("rules", description="rules | llm_replay (cached model answers only, no network).")
    commission: str = Field("ibkr_fixed", description="ibkr_fixed | ibkr_tiered | none.")
    slippage_bps: float = Field(5.0, description="Basis points paid on stop and market fills.")
    initial_cash: float = 100_000.0
    benchmark: str = Field("equal_weight", description="equal_weight or a symbol such as SPY.")
    warmup_bars: int = Field(300, description="Bars of each timeframe before start (indicator warm-up).")
    folds: int = Field(0, description="Walk-forward folds (0: one plain run).")
    grid: dict[str, list[float]] = Field(default_factory=dict,
                                         description="Walk-forward grid, e.g. {min_r: [1.0, 1.5]}.")
    grid_metric: str = "sharpe"
    model: str | None = Field(None, description="llm_replay: the model whose cached answers are replayed.")
    model_cutoff: str | None = Field(None, description="llm_replay: the model's knowledge cutoff (YYYY-MM-DD).")
    anonymized_charts: bool = False


def build_backtest_assets(strategies_file: StrategiesFile) -> list:
    strategies = dg.StaticPartitionsDefinition([s.name for s in strategies_file.strategies])

    @dg.asset(
        partitions_def=strategies,
        group_name="backtest",
        check_specs=[dg.AssetCheckSpec("enough_trades", asset="backtest",
                                       description="Enough closed trades for the trade figures to mean something."),
                     dg.AssetCheckSpec("after_knowledge_cutoff", asset="backtest",
                                       description="llm_replay: the window starts after the model's knowledge cutoff.")],
        description="The strategy replayed over history through the live core (analyst, decide, order legs, "
                    "paper fill rules, IBKR commissions): statistics, equity chart, gate rejections.",
    )
    def backtest(context: dg.AssetExecutionContext, config: BacktestConfig, market_data: MarketDataResource,
                 trading_db: TradingDatabaseResource, chart_store: ChartStoreResource,
                 chart_renderer: ChartRendererResource) -> dg.MaterializeResult:
        from pydantic import ValidationError

        from trading_pipeline.backtest import replay, runner
        from trading_pipeline.backtest.data import HistoryCache
        from trading_pipeline.backtest.report import equity_figure, statistics_table, text_report, walk_forward_lines
        from trading_pipeline.backtest.settings import BacktestSettings
        from trading_pipeline.backtest.statistics import summarize
        from trading_pipeline.backtest.store import save
        from trading_pipeline.backtest.walk_forward import walk_forward

        try:
            settings = BacktestSettings(
                strategy=context.partition_key, start=date.fromisoformat(config.start),
                end=date.fromisoformat(config.end), analyst=config.analyst, commission=config.commission,
                slippage_bps=config.slippage_bps, initial_cash=config.initial_cash, benchmark=config.benchmark,
                data=market_data.mode, csv_dir=market_data.csv_dir, seed=market_data.seed,
                warmup_bars=config.warmup_bars, folds=config.folds,
                grid={k: tuple(v) for k, v in config.grid.items()}, grid_metric=config.grid_metric,
                model=config.model,
                model_cutoff=date.fromisoformat(config.model_cutoff) if config.model_cutoff else None,
                anonymized_charts=config.anonymized_charts)
        except (ValidationError, ValueError) as error:
            raise fail(UserError(f"the backtest config is invalid: {error}",
                                 "correct the named field in the launchpad's config")) from None
        sessions = trading_db.sessions()
        source = market_data.source()
        if market_data.mode == "ibkr":
            source = HistoryCache(source, runner.history_cache_folder())
        analyst_factory = replay.analyst_factory(settings, sessions) if settings.analyst == "llm_replay" else None
        try:
            # The run's point in time bounds the window: no session that has not closed by then.
            loaded = runner.load(settings, strategies_file=strategies_file, source=source, now=run_as_of(context))
        except UserError as error:
            raise fail(error) from None

        def progress(done: int, total: int) -> None:
            if done == total or done % 500 == 0:
                context.log.info(f"backtest {settings.strategy}: {done}/{total}")

        result = runner.run_backtest(settings, loaded=loaded, progress=progress,
                                     analyst=analyst_factory() if analyst_factory else None)
        walk = walk_forward(settings, loaded, analyst_factory=analyst_factory) if settings.folds else None
        summary = summarize(result, result.extra_benchmarks)
        png = chart_renderer.renderer().render_png(equity_figure(result, summary), 1200, 700)
        stored = chart_store.store().put_png(f"backtests/{settings.strategy}/{result.run_key}.png", png)
        save(sessions, result, summary, stored.uri)
        report = text_report(result, summary, walk)
        context.log.info(report)
        for warning in result.warnings:
            context.log.warning(warning)
        gates = summary["pipeline"]["gate_rejections"]
        cutoff = runner.knowledge_cutoff_warning(settings, replay.model_for(settings))
        checks = [
            dg.AssetCheckResult(check_name="enough_trades", passed=summary["trades"]["trades"] >= runner.MIN_TRADES,
                                severity=dg.AssetCheckSeverity.WARN,
                                metadata={"closed_trades": summary["trades"]["trades"]}),
            dg.AssetCheckResult(check_name="after_knowledge_cutoff", passed=cutoff is None,
                                severity=dg.AssetCheckSeverity.WARN,
                                metadata={"detail": cutoff or ("the rules analyst knows no history"
                                                               if settings.analyst == "rules" else
                                                               "the window starts after the model's cutoff")}),
        ]
        return dg.MaterializeResult(check_results=checks, metadata={
            "statistics": dg.MetadataValue.table(
                records=[dg.TableRecord(row) for row in statistics_table(summary)],
                schema=dg.TableSchema(columns=[dg.TableColumn("figure", "string"),
                                               dg.TableColumn("strategy", "string"),
                                               dg.TableColumn("benchmark", "string")])),
            "equity_chart": dg.MetadataValue.md(thumbnail_markdown(png)),
            "chart": dg.MetadataValue.url(stored.uri) if stored.uri.startswith(("http", "file"))
            else dg.MetadataValue.text(stored.uri),
            "gate_rejections": dg.MetadataValue.table(
                records=[dg.TableRecord({"gate": gate, "proposals_rejected": n}) for gate, n in gates.items()],
                schema=dg.TableSchema(columns=[dg.TableColumn("gate", "string"),
                                               dg.TableColumn("proposals_rejected", "int")])),
            "report": dg.MetadataValue.md(f"```\n{report}\n```"),
            "run_key": result.run_key,
            "result_digest": summary["result_digest"],
            "sharpe": summary["equity"]["sharpe"] if summary["equity"]["sharpe"] is not None else float("nan"),
            "total_return": summary["equity"]["total_return"],
            "trades": summary["trades"]["trades"],
            "expectancy_r": summary["trades"]["expectancy_r"] if summary["trades"]["expectancy_r"] is not None
            else float("nan"),
            "warnings": dg.MetadataValue.json(result.warnings),
            **({"walk_forward": dg.MetadataValue.md("```\n" + "\n".join(walk_forward_lines(walk)) + "\n```")}
               if walk is not None else {}),
        })

    return [backtest]
