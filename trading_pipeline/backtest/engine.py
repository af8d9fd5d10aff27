"""The backtest loop: every session's bar goes through the paper fill rules, then every symbol is
decided at the session's close by the live pipeline's own functions.

Per session t (in time order):
1. bar t advances each symbol's working orders through `fills.bracket_on_bar` (entries placed at
   t-1's close fill at min(open, limit) for a buy or expire at t's close; stops and targets fill
   as the paper broker fills them, commissions from core/costs.py);
2. at t's close the account (cash, positions at their closes, today's P&L, working orders) is
   what a live run would read, and each symbol gets `decide(...)` on its daily analysis of the
   bars closed by then and the latest weekly analysis;
3. an actionable decision becomes `build_legs(...)`: a bracket whose DAY limit entry works in
   session t+1; a decision that closes a position turns the bracket's stop into a market order
   (the exit of issue 12's design), filled at t+1's open.

Indicators are computed once per series (`prepare`); the analyst reads bar `end - 1` and the bars
before it (`rules_analyst.analyze_at`), so nothing after the decision's time is ever read (the
tests corrupt every later bar and compare).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from trading_pipeline.backtest.settings import BacktestSettings
from trading_pipeline.core import fills, market_calendar, rules_analyst
from trading_pipeline.core.analysis import Action, TimeframeAnalysis, TradeDecision
from trading_pipeline.core.decisions import Consolidated, consolidate, decide
from trading_pipeline.core.indicators import IndicatorParams, compute_indicators
from trading_pipeline.core.orders import build_legs, exit_leg
from trading_pipeline.core.risk import AccountState, Position, WorkingEntry
from trading_pipeline.core.strategies import Strategy

ENTRY, STOP_LOSS, TAKE_PROFIT, EXIT = "entry", "stop_loss", "take_profit", "exit"
EXIT_REASONS = {STOP_LOSS: "stop", TAKE_PROFIT: "target", EXIT: "exit signal"}


_NEW_YORK = ZoneInfo("America/New_York")


def _new_york_date(moment: datetime) -> date:
    return moment.astimezone(_NEW_YORK).date()


# --- Series: indicators once, read at any position ------------------------------------------------

@dataclass(frozen=True)
class PreparedSeries:
    """One symbol × timeframe: bars and indicators over the whole window, and when each bar closed."""

    symbol: str
    timeframe: str
    frame: pd.DataFrame
    columns: rules_analyst.Columns
    starts: list[datetime]
    closes: list[datetime]
    closes_ns: np.ndarray

    def closed_by(self, moment_ns: int) -> int:
        """How many bars had closed by `moment_ns` (the analysis reads bars [0, that))."""
        return int(np.searchsorted(self.closes_ns, moment_ns, side="right"))

    def in_window(self, first: date, last: date) -> list[datetime]:
        """Starts of the bars whose New York date is in [first, last]."""
        days = self.frame.index.tz_convert(_NEW_YORK).tz_localize(None).normalize()
        inside = (days >= pd.Timestamp(first)) & (days <= pd.Timestamp(last))
        return [self.starts[i] for i in np.flatnonzero(inside)]


def prepare(symbol: str, timeframe: str, bars: pd.DataFrame, params: IndicatorParams | None = None) -> PreparedSeries:
    frame = compute_indicators(bars, params)
    closes = market_calendar.bar_close_times(frame.index, timeframe)
    return PreparedSeries(symbol, timeframe, frame, rules_analyst.Columns(frame),
                          list(frame.index.to_pydatetime()), list(pd.DatetimeIndex(closes).to_pydatetime()),
                          closes.dt.as_unit("ns").astype("int64").to_numpy())


class BacktestAnalyst(Protocol):
    """What the loop asks an analyst: one timeframe's analysis of a series' first `end` bars, and
    the consolidation `decide` runs (the live analysts' own, or a replay of their answers)."""

    name: str

    def analyze(self, series: PreparedSeries, end: int, as_of: datetime) -> TimeframeAnalysis: ...

    def consolidate(self, daily: TimeframeAnalysis, weekly: TimeframeAnalysis) -> Consolidated: ...


class RulesAnalyst:
    """The embedded rules analyst, reading the prepared series in place."""

    name = rules_analyst.ANALYST_NAME

    def analyze(self, series: PreparedSeries, end: int, as_of: datetime) -> TimeframeAnalysis:
        return rules_analyst.analyze_at(series.columns, end, symbol=series.symbol, timeframe=series.timeframe,
                                        as_of=as_of, data_through=series.starts[end - 1])

    def consolidate(self, daily: TimeframeAnalysis, weekly: TimeframeAnalysis) -> Consolidated:
        return consolidate(daily, weekly)

    def counters(self) -> dict[str, int]:
        return {}


# --- What a run records ---------------------------------------------------------------------------

@dataclass
class Trade:
    """One position from its entry fill to its exit fill (exit None: still open at the end)."""

    symbol: str
    direction: int  # +1 long, -1 short
    quantity: float
    decision_id: str
    planned_entry: float
    stop: float
    target: float
    entry_price: float
    entry_at: datetime
    entry_commission: float
    entry_session: int
    exit_price: float | None = None
    exit_at: datetime | None = None
    exit_commission: float = 0.0
    exit_reason: str | None = None
    exit_session: int | None = None

    @property
    def closed(self) -> bool:
        return self.exit_price is not None

    @property
    def commission(self) -> float:
        return self.entry_commission + self.exit_commission

    @property
    def pnl(self) -> float:
        """Net of both commissions."""
        return self.direction * self.quantity * (self.exit_price - self.entry_price) - self.commission

    @property
    def risk(self) -> float:
        """Dollars at risk as sized: quantity × |planned entry − stop| (1 R)."""
        return self.quantity * abs(self.planned_entry - self.stop)

    @property
    def r_multiple(self) -> float:
        return self.pnl / self.risk

    @property
    def planned_r(self) -> float:
        return abs(self.target - self.planned_entry) / abs(self.planned_entry - self.stop)

    @property
    def sessions_held(self) -> int:
        return self.exit_session - self.entry_session


@dataclass(frozen=True)
class Fill:
    at: datetime
    symbol: str
    side: str
    quantity: float
    price: float
    commission: float
    role: str
    order_key: str


@dataclass(frozen=True)
class DecisionRecord:
    """The parts of a decision the report and the database keep (the full TradeDecision of every
    session would be tens of megabytes)."""

    session: date
    decided_at: datetime
    symbol: str
    decision_id: str
    proposed: str
    action: str
    quantity: int
    entry: float | None
    stop: float | None
    target: float | None
    r_multiple: float | None
    failed_gates: tuple[str, ...]
    invalid_analysis: bool
    confirmation: str

    @classmethod
    def of(cls, decision: TradeDecision, session: date, invalid_analysis: bool) -> DecisionRecord:
        failed = tuple(c.rule for c in decision.checks if not c.passed) \
            if decision.proposed_action in (Action.BUY, Action.SELL) else ()
        return cls(session, decision.as_of, decision.symbol, decision.decision_id, decision.proposed_action.value,
                   decision.action.value, decision.quantity, decision.entry, decision.stop,
                   decision.targets[0] if decision.targets else None, decision.r_multiple, failed,
                   invalid_analysis, decision.confirmation)


@dataclass
class BacktestResult:
    settings: BacktestSettings
    strategy: Strategy
    symbols: list[str]
    equity: pd.Series  # by session close date: cash + positions at their closes
    cash: pd.Series
    gross_exposure: pd.Series
    closes: pd.DataFrame  # symbol closes by session (for the benchmark and per-symbol figures)
    trades: list[Trade]
    fills: list[Fill]
    decisions: list[DecisionRecord]
    entries_expired: int
    analyst: str
    analyst_counters: dict[str, int]
    data_digest: str
    code_version: str
    warnings: list[str] = field(default_factory=list)
    extra_benchmarks: dict[str, pd.Series] = field(default_factory=dict)  # closes of e.g. SPY
    core_loop_seconds: float = 0.0
    core_loop_cpu_seconds: float = 0.0  # this process's CPU time: the loop's cost on a busy machine
    analyses: int = 0

    @property
    def run_key(self) -> str:
        return run_key(self.settings, self.code_version, self.data_digest)

    def result_digest(self) -> str:
        """sha256 of what the run produced (decisions, fills, equity): equal for equal runs
        (times as ISO text: equal instants whatever their tzinfo object)."""
        digest = hashlib.sha256()
        for record in self.decisions:
            digest.update(repr((record.session, record.symbol, record.decision_id, record.action, record.quantity,
                                record.entry, record.stop, record.target, record.failed_gates)).encode())
        for fill in self.fills:
            digest.update(repr((fill.at.isoformat(), fill.symbol, fill.side, fill.quantity, fill.price, fill.commission,
                                fill.role)).encode())
        digest.update(np.ascontiguousarray(self.equity.to_numpy(np.float64)).tobytes())
        return digest.hexdigest()


def code_version() -> str:
    """sha256 of the code a result depends on: the pure core, this package and the prompts."""
    import trading_pipeline

    root = Path(trading_pipeline.__file__).resolve().parent
    digest = hashlib.sha256()
    for folder in ("core", "backtest", "prompts"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".md"):
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_key(settings: BacktestSettings, code: str, data: str) -> str:
    """The run's key: same settings, code and data => same key (and, the tests show, same result)."""
    text = json.dumps({"settings": settings.model_dump(mode="json"), "code": code, "data": data},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --- The account --------------------------------------------------------------------------------

class Ledger:
    """Cash and positions from the fills: cash moves by each fill's value and commission."""

    def __init__(self, cash: float):
        self.cash = cash
        self.quantities: dict[str, float] = {}
        self.costs: dict[str, float] = {}  # signed cost basis of the open quantity

    def apply(self, symbol: str, side: str, quantity: float, price: float, commission: float) -> None:
        signed = quantity if side == "BUY" else -quantity
        self.cash -= signed * price + commission
        held = self.quantities.get(symbol, 0.0)
        if held and (held > 0) != (signed > 0):  # reducing: the closed part leaves at its average
            closed = min(abs(signed), abs(held))
            average = self.costs[symbol] / held
            self.costs[symbol] = average * (held + (closed if held < 0 else -closed))
            remainder = abs(signed) - closed
            if remainder:  # flipped through zero: the rest opens at this price
                self.costs[symbol] = (remainder if signed > 0 else -remainder) * price
        else:
            self.costs[symbol] = self.costs.get(symbol, 0.0) + signed * price
        self.quantities[symbol] = held + signed
        if self.quantities[symbol] == 0:
            del self.quantities[symbol]
            self.costs.pop(symbol, None)

    def positions(self, marks: dict[str, float]) -> dict[str, Position]:
        return {symbol: Position(quantity, round(self.costs[symbol] / quantity, 4), marks[symbol])
                for symbol, quantity in self.quantities.items()}

    def equity(self, marks: dict[str, float]) -> float:
        return self.cash + sum(quantity * marks[symbol] for symbol, quantity in self.quantities.items())

    def gross_exposure(self, marks: dict[str, float]) -> float:
        return sum(abs(quantity * marks[symbol]) for symbol, quantity in self.quantities.items())


@dataclass
class _Working:
    """A symbol's working orders: the fill rules' bracket plus what the loop needs to book fills."""

    bracket: fills.Bracket
    roles: dict[str, str]
    decision: TradeDecision
    exit_requested: bool = False


# --- The loop -------------------------------------------------------------------------------------

class Backtest:
    def __init__(self, settings: BacktestSettings, strategy: Strategy, bars: dict[str, dict[str, pd.DataFrame]],
                 *, analyst: BacktestAnalyst | None = None, indicator_params: IndicatorParams | None = None,
                 data_digest: str = "", code: str | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 on_decision: Callable[[TradeDecision], None] | None = None):
        self.settings = settings
        self.on_decision = on_decision
        self.strategy = strategy
        self.symbols = list(bars)
        self.analyst = analyst or RulesAnalyst()
        self.params = indicator_params
        self.bars = bars
        self.data_digest = data_digest
        self.code = code or code_version()
        self.progress = progress

    def run(self) -> BacktestResult:
        import time

        settings, strategy = self.settings, self.strategy
        daily = {s: prepare(s, "1d", self.bars[s]["1d"], self.params) for s in self.symbols}
        weekly = {s: prepare(s, "1w", self.bars[s]["1w"], self.params) for s in self.symbols}
        # The window's sessions (bars before it are the warm-up; bars after it are never read).
        session_starts = sorted({t for s in self.symbols for t in daily[s].in_window(settings.start, settings.end)})
        # The weekly bars closed by each daily bar's close: the weekly analysis a decision reads.
        weeks_closed = {s: np.searchsorted(weekly[s].closes_ns, daily[s].closes_ns, side="right").tolist()
                        for s in self.symbols}
        positions = {s: {t: i for i, t in enumerate(daily[s].starts)} for s in self.symbols}
        arrays = {s: {c: daily[s].columns[c] for c in ("open", "high", "low", "close")} for s in self.symbols}

        ledger = Ledger(settings.initial_cash)
        working: dict[str, _Working] = {}
        open_trades: dict[str, Trade] = {}
        trades: list[Trade] = []
        fills_made: list[Fill] = []
        decisions: list[DecisionRecord] = []
        marks: dict[str, float] = {}
        if session_starts:  # a symbol without a bar on the first session is marked at its close before it
            for s in self.symbols:
                before = bisect.bisect_left(daily[s].starts, session_starts[0])
                if before:
                    marks[s] = float(arrays[s]["close"][before - 1])
        weekly_cache: dict[tuple[str, int], TimeframeAnalysis] = {}
        entries_expired = 0
        equity_points, cash_points, exposure_points, dates = [], [], [], []
        close_rows: list[list[float]] = []
        previous_equity = settings.initial_cash
        analyses = 0
        started, started_cpu = time.perf_counter(), time.process_time()

        for n, start in enumerate(session_starts):
            decided_at = None
            session_day = _new_york_date(start)
            # 1. The session's bar advances the working orders.
            for symbol in list(working):
                i = positions[symbol].get(start)
                if i is None:
                    continue
                series = daily[symbol]
                a = arrays[symbol]
                bar = fills.DailyBar(start, series.closes[i], float(a["open"][i]), float(a["high"][i]),
                                     float(a["low"][i]), float(a["close"][i]))
                work = working[symbol]
                outcome = fills.bracket_on_bar(work.bracket, bar, slippage_bps=settings.slippage_bps,
                                               commission_model=settings.commission)
                for leg_fill in outcome.fills:
                    role = work.roles[leg_fill.key]
                    if role == STOP_LOSS and work.exit_requested:
                        role = EXIT
                    side = self._side_of(work, leg_fill.key)
                    ledger.apply(symbol, side, leg_fill.quantity, leg_fill.price, leg_fill.commission)
                    fills_made.append(Fill(leg_fill.at, symbol, side, leg_fill.quantity, leg_fill.price,
                                           leg_fill.commission, role, leg_fill.key))
                    if role == ENTRY and not work.decision.closes_position:
                        d = work.decision
                        open_trades[symbol] = Trade(symbol, 1 if side == "BUY" else -1, leg_fill.quantity,
                                                    d.decision_id, d.entry, d.stop, d.targets[0], leg_fill.price,
                                                    leg_fill.at, leg_fill.commission, n)
                    elif symbol in open_trades:
                        trade = open_trades.pop(symbol)
                        trade.exit_price, trade.exit_at = leg_fill.price, leg_fill.at
                        trade.exit_commission, trade.exit_session = leg_fill.commission, n
                        trade.exit_reason = EXIT_REASONS.get(role, "exit signal")
                        trades.append(trade)
                for cancelled in outcome.cancelled:
                    if work.roles.get(cancelled.key) == ENTRY:
                        entries_expired += 1
                work.bracket = outcome.bracket
                if outcome.done:
                    del working[symbol]

            # 2. Marks at the close.
            row = []
            for symbol in self.symbols:
                i = positions[symbol].get(start)
                if i is not None:
                    marks[symbol] = float(arrays[symbol]["close"][i])
                    decided_at = daily[symbol].closes[i]
                row.append(marks.get(symbol, np.nan))
            close_rows.append(row)
            equity = ledger.equity(marks)

            # 3. Decisions at the close, in the strategy's symbol order.
            if decided_at is not None:
                market_open = market_calendar.is_open(decided_at)
                next_open = market_calendar.describe_next_open(decided_at)
                account_positions = ledger.positions(marks)
                working_entries = self._working_entries(working, marks)
                account = None
                for symbol in self.symbols:
                    i = positions[symbol].get(start)
                    if i is None:
                        continue
                    day_analysis = self.analyst.analyze(daily[symbol], i + 1, decided_at)
                    week_end = weeks_closed[symbol][i]
                    week_analysis = weekly_cache.get((symbol, week_end))
                    if week_analysis is None:
                        week_analysis = self.analyst.analyze(weekly[symbol], week_end,
                                                             weekly[symbol].closes[week_end - 1])
                        weekly_cache[(symbol, week_end)] = week_analysis
                        analyses += 1
                    analyses += 1
                    if account is None:  # what a live run reads now: the same until an order is placed
                        account = AccountState(equity=round(equity, 2), cash=round(ledger.cash, 2),
                                               positions=account_positions,
                                               daily_pnl=round(equity - previous_equity, 2),
                                               working_entries=dict(working_entries))
                    decision = decide(strategy, symbol, day_analysis, week_analysis, account,
                                      market_open=market_open, next_open=next_open,
                                      consolidator=self.analyst.consolidate, decided_at=decided_at)
                    decisions.append(DecisionRecord.of(decision, session_day,
                                                       not (day_analysis.valid and week_analysis.valid)))
                    if self.on_decision is not None:
                        self.on_decision(decision)
                    if decision.actionable:
                        entry = self._place(decision, working, decided_at, marks,
                                            ledger.quantities.get(symbol, 0.0))
                        if entry is not None:
                            working_entries[symbol] = entry
                            account = None

            dates.append(session_day)
            equity_points.append(equity)
            cash_points.append(ledger.cash)
            exposure_points.append(ledger.gross_exposure(marks))
            previous_equity = equity
            if self.progress is not None:
                self.progress(n + 1, len(session_starts))

        index = pd.DatetimeIndex(pd.to_datetime(dates), name="session")
        trades.extend(open_trades.values())  # still open at the end: reported apart
        return BacktestResult(
            settings=settings, strategy=strategy, symbols=self.symbols,
            equity=pd.Series(equity_points, index=index, name="equity"),
            cash=pd.Series(cash_points, index=index, name="cash"),
            gross_exposure=pd.Series(exposure_points, index=index, name="gross_exposure"),
            closes=pd.DataFrame(close_rows, index=index, columns=self.symbols),
            trades=trades, fills=fills_made, decisions=decisions, entries_expired=entries_expired,
            analyst=self.analyst.name,
            analyst_counters=dict(getattr(self.analyst, "counters", dict)()),
            data_digest=self.data_digest, code_version=self.code,
            core_loop_seconds=time.perf_counter() - started, core_loop_cpu_seconds=time.process_time() - started_cpu,
            analyses=analyses)

    @staticmethod
    def _side_of(work: _Working, key: str) -> str:
        legs = ([work.bracket.parent] if work.bracket.parent else []) + list(work.bracket.children)
        for leg in legs:
            if leg.key == key:
                return leg.side
        return work.decision.action.value if work.roles[key] == ENTRY else \
            ("SELL" if work.decision.action == Action.BUY else "BUY")

    @staticmethod
    def _working_entries(working: dict[str, _Working], marks: dict[str, float]) -> dict[str, WorkingEntry]:
        """Orders that open or close a position and may still fill, as the decision step reads them."""
        entries = {}
        for symbol, work in working.items():
            parent = work.bracket.parent
            if parent is not None:
                entries[symbol] = WorkingEntry(parent.key, parent.side, parent.quantity,
                                               parent.price if parent.price is not None else marks[symbol], "Submitted")
            elif work.exit_requested:
                stop = next(leg for leg in work.bracket.children if work.roles[leg.key] == STOP_LOSS)
                entries[symbol] = WorkingEntry(stop.key, stop.side, stop.quantity, marks[symbol], "Submitted")
        return entries

    def _place(self, decision: TradeDecision, working: dict[str, _Working], decided_at: datetime,
               marks: dict[str, float], held: float) -> WorkingEntry | None:
        """The decision's orders, as the orders step sends them (adapters/order_desk.py): a bracket
        for an opening trade; for one that closes a position, the bracket's working stop turned
        into a market order of at most the held quantity, else one standalone market exit."""
        symbol = decision.symbol
        if decision.closes_position:
            quantity = int(abs(held))
            work = working.get(symbol)
            stop = next((leg for leg in work.bracket.children if work.roles[leg.key] == STOP_LOSS), None) \
                if work is not None and work.bracket.parent is None else None
            if stop is not None:
                exit_quantity = min(stop.quantity, quantity)  # never more than is held
                children = tuple(fills.Leg(leg.key, leg.side, "MKT", exit_quantity, None, decided_at, None)
                                 if leg is stop else leg for leg in work.bracket.children)
                work.bracket = fills.Bracket(None, children)
                work.exit_requested = True
                return WorkingEntry(stop.key, stop.side, exit_quantity, marks[symbol], "Submitted")
            exit_order = exit_leg(decision, quantity)
            leg = fills.Leg(exit_order.client_order_id, exit_order.side, exit_order.order_type, exit_order.quantity,
                            None, decided_at, fills.expiry_of(exit_order.tif, decided_at))
            working[symbol] = _Working(fills.Bracket(leg, ()), {leg.key: EXIT}, decision)
            return WorkingEntry(leg.key, leg.side, leg.quantity, marks[symbol], "Submitted")
        legs = build_legs(decision, self.strategy.orders.tif)
        entry, *children = legs
        parent = fills.Leg(entry.client_order_id, entry.side, entry.order_type, entry.quantity, entry.price,
                           decided_at, fills.expiry_of(entry.tif, decided_at))
        child_legs = tuple(fills.Leg(c.client_order_id, c.side, c.order_type, c.quantity, c.price, None,
                                     fills.expiry_of(c.tif, decided_at)) for c in children)
        working[symbol] = _Working(fills.Bracket(parent, child_legs),
                                   {leg.client_order_id: leg.role for leg in legs}, decision)
        return WorkingEntry(entry.client_order_id, entry.side, entry.quantity, entry.price, "Submitted")

