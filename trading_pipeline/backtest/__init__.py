"""Backtest: the live pipeline's pure core replayed over years of history, in one process.

Bars up to each session's close -> indicators (computed once per series, read causally) -> the
analyst -> `decide` (core/decisions.py: consolidation and risk gates) -> `build_legs` -> the paper
fill rules (core/fills.py) with IBKR commissions (core/costs.py). Nothing here decides, sizes,
fills or charges by itself: it only feeds those functions the state a live run would have had.

Modules: settings (what a run is), data (bars from the simulated market, CSV or IBKR, with a
local cache of IBKR history), engine (the loop and the account), statistics, report, walk_forward,
replay (the `llm_replay` analyst), store (the trading-database tables), and the command
`python -m trading_pipeline.backtest`.
"""
