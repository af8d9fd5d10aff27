"""Portfolio sync: bring the trading database up to date with the broker.

Advances recorded orders to the broker's state (a 'submitting' or 'unknown' row left by a crash
included: found by its cOID, or closed once it clearly never reached the broker), records
executions (partial fills and commissions included; in the symbols it trades, those of orders it
did not send too, so that a position closed by hand in TWS is closed in its books, 'manual'),
keeps each position's protective orders sized to it, snapshots positions and the account (valued at the marks), keeps the books by
position (core/books.py: FIFO trades with net P&L and realized R), and flags drift: orders or
positions at the broker that the pipeline does not know about or that disagree with what its
executions imply, and a pipeline position without a working stop-loss. A stop-loss or take-profit
still working once its position is gone (ORPHAN_GRACE) is cancelled.

The modules: `order_states` (orders brought to the broker's state; what may still fill),
`executions` (fills recorded with their commission; the positions they imply), `books` (trades by
position), `protection` (stops sized to positions; orphans cancelled) and `sync` (one pass).
"""

from trading_pipeline.adapters.portfolio_sync.executions import (
    OwnFill,
    implied_positions,
    own_fills,
    record_executions,
    record_outside_executions,
    symbols_in_play,
)
from trading_pipeline.adapters.portfolio_sync.order_states import (
    DUPLICATE_ANSWER,
    NEVER_REACHED,
    PROTECTIVE_ROLES,
    SUBMITTING_GRACE,
    UNCONFIRMED,
    with_working_orders,
    working_symbols,
)
from trading_pipeline.adapters.portfolio_sync.protection import ORPHAN_GRACE, positions_contradicted
from trading_pipeline.adapters.portfolio_sync.sync import SyncReport, sync_portfolio

__all__ = [
    "DUPLICATE_ANSWER", "NEVER_REACHED", "ORPHAN_GRACE", "PROTECTIVE_ROLES", "SUBMITTING_GRACE", "UNCONFIRMED",
    "OwnFill", "SyncReport",
    "implied_positions", "own_fills", "positions_contradicted", "record_executions",
    "record_outside_executions", "symbols_in_play",
    "sync_portfolio", "with_working_orders", "working_symbols",
]
