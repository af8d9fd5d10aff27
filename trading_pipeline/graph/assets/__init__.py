"""The asset graph, one module per group of steps; each asset function reads like the step it is.

market_bars → indicator_frames (market.py) → chart_images (charts.py) → ai_analyses (analyses.py)
    symbol × timeframe partitions
→ trade_decisions (decisions.py) → orders (orders.py)
    symbol partitions; both timeframes fan in
"""

from trading_pipeline.core.strategies import StrategiesFile
from trading_pipeline.graph.assets.analyses import build_analysis_assets
from trading_pipeline.graph.assets.backtest import build_backtest_assets
from trading_pipeline.graph.assets.charts import build_chart_assets
from trading_pipeline.graph.assets.common import AS_OF_TAG, ChartImageRef, run_as_of
from trading_pipeline.graph.assets.decisions import build_decision_assets
from trading_pipeline.graph.assets.market import build_market_assets
from trading_pipeline.graph.assets.orders import build_order_assets
from trading_pipeline.graph.partitions import build_partitions

__all__ = ["AS_OF_TAG", "ChartImageRef", "build_assets", "run_as_of"]


def build_assets(strategies_file: StrategiesFile) -> list:
    symbols, symbol_timeframe = build_partitions(strategies_file)
    return [
        *build_market_assets(strategies_file, symbol_timeframe),
        *build_chart_assets(symbol_timeframe),
        *build_analysis_assets(symbol_timeframe),
        *build_decision_assets(strategies_file, symbols),
        *build_order_assets(strategies_file, symbols),
        *build_backtest_assets(strategies_file),
    ]
