"""The order-lifecycle fault matrix (issue 12): the process is killed (os._exit, no clean-up) at each
point of an entry and of an exit, then the step runs again in a fresh process state and the
portfolio sync catches up. At every point: nothing is sent twice, and a position at the broker has
a working order that closes it (its stop, or the stop turned into a market exit).

    .venv/bin/python -m trading_pipeline_tests.fault_matrix      # prints the matrix

The paper broker keeps its broker-side state in the trading database, so it survives the kill
like a real broker's would. The tests run the same matrix (test_fault_matrix.py).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

POINTS = ("before the record", "after 'submitting'", "after the broker's ack", "after the fill")
KILLED = 86  # the exit status of a killed attempt
# 2026-09-01 is a Tuesday: decided after its close; the entry can fill on Wednesday's bar.
TUESDAY_EVENING = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
THURSDAY_EVENING = datetime(2026, 9, 3, 21, 30, tzinfo=UTC)
FRIDAY_EVENING = datetime(2026, 9, 4, 21, 30, tzinfo=UTC)  # after every bar below: the broker's state
BARS = {"2026-09-02": (97.0, 99.0, 96.5, 98.5),   # the entry (limit 100) fills at the open, 97
        "2026-09-03": (98.0, 99.0, 97.5, 98.2),   # the bracket keeps working
        "2026-09-04": (99.0, 99.5, 98.0, 98.8)}   # a market exit made on Thursday evening fills at this open


@dataclass(frozen=True)
class Cell:
    kind: str
    point: str
    killed: bool
    orders_at_broker: int
    position: float
    protected_after_kill: bool
    protected_after_rerun: bool
    sent_twice: bool
    rerun_status: str

    @property
    def ok(self) -> bool:
        return self.killed and not self.sent_twice and self.protected_after_kill and self.protected_after_rerun


def _bars(days) -> dict[str, pd.DataFrame]:
    from trading_pipeline.core import market_calendar

    cal = market_calendar.calendar()
    index = pd.DatetimeIndex([cal.session_open(pd.Timestamp(day)) for day in days], name="time")
    frame = pd.DataFrame([BARS[d] for d in days], index=index, columns=["open", "high", "low", "close"])
    frame["volume"] = 1_000_000.0
    return {"AAPL": frame}


def _decision(decision_id: str, as_of: datetime, action: str, closes: bool):
    from trading_pipeline.core.analysis import Action, TradeDecision

    act = Action(action)
    return TradeDecision(
        decision_id=decision_id, strategy="s", symbol="AAPL", as_of=as_of, data_through=as_of,
        proposed_action=act, action=act, entry=100.0 if not closes else 98.2,
        stop=None if closes else 96.0, targets=[] if closes else [106.0], r_multiple=None if closes else 1.5,
        profit_margin=None, confidence=0.7, quantity=50, rationale="fault matrix", closes_position=closes)


def _world(url: str, now: datetime):
    """The trading DB, the paper broker and the order desk, with the paper broker's clock at `now`."""
    from trading_pipeline.adapters.broker import PaperBroker
    from trading_pipeline.adapters.order_desk import OrderDesk
    from trading_pipeline.adapters.trading_db import session_factory

    sessions = session_factory(url)
    broker = PaperBroker(sessions, 100_000.0, clock=lambda: now)  # the simulated clock of a paper deployment
    return sessions, broker, OrderDesk(sessions, broker)


def _act(url: str, kind: str, now: datetime):
    """The orders step of the decision under test (entry: a bracket; exit: closing the long)."""
    from trading_pipeline.adapters.records import record_decision
    from trading_pipeline.core.orders import build_legs

    sessions, broker, desk = _world(url, now)
    if kind == "entry":
        decision = _decision("fm-entry", TUESDAY_EVENING, "BUY", closes=False)
        record_decision(sessions, decision)
        return desk.submit_once(decision, build_legs(decision, "DAY"), 100.0, placed_at=now)
    decision = _decision("fm-exit", THURSDAY_EVENING, "SELL", closes=True)
    record_decision(sessions, decision)
    return desk.exit_once(decision, placed_at=now)


def _sync(url: str, days, now: datetime) -> None:
    from trading_pipeline.adapters.portfolio_sync import sync_portfolio
    from trading_pipeline.core.risk import Mark

    sessions, broker, _ = _world(url, now)
    broker.simulate_fills(_bars(days))
    closes = [BARS[d][3] for d in days]
    sync_portfolio(sessions, broker, {"AAPL": Mark(closes[-1], closes[-2] if len(closes) > 1 else None)})


def _attempt_and_die(url: str, kind: str, point: str, now: str) -> None:
    """One attempt of the orders step, killed at `point` (runs in its own process)."""
    from trading_pipeline.adapters.broker import PaperBroker
    from trading_pipeline.adapters.order_desk import OrderDesk

    moment = datetime.fromisoformat(now)
    die = lambda *_, **__: os._exit(KILLED)
    if point == POINTS[0]:
        OrderDesk._record = die if kind == "entry" else OrderDesk._record
        OrderDesk._convert_into_exit = die if kind == "exit" else OrderDesk._convert_into_exit
    elif point == POINTS[1]:
        setattr(PaperBroker, "place" if kind == "entry" else "modify", die)
    elif point == POINTS[2]:
        method = "place" if kind == "entry" else "modify"
        real = getattr(PaperBroker, method)

        def acknowledged_then_killed(self, *args, **kwargs):
            real(self, *args, **kwargs)
            os._exit(KILLED)
        setattr(PaperBroker, method, acknowledged_then_killed)
    _act(url, kind, moment)
    if point == POINTS[3]:  # the order went out and was recorded; it fills; the process dies before the sync
        _, broker, _ = _world(url, moment)
        broker.simulate_fills(_bars(list(BARS)[:1] if kind == "entry" else list(BARS)))
        os._exit(KILLED)
    os._exit(0)


def _protected(url: str) -> tuple[float, bool]:
    """The broker's AAPL position and whether a working order of the pipeline closes all of it."""
    from sqlalchemy import select

    from trading_pipeline.adapters.broker import FINAL_STATUSES, PaperBroker
    from trading_pipeline.adapters.trading_db import PaperOrderRow, session_factory

    sessions = session_factory(url)
    held = PaperBroker(sessions, 100_000.0).account({}, as_of=FRIDAY_EVENING).positions.get("AAPL")
    quantity = held.quantity if held else 0.0
    if quantity == 0:
        return 0.0, True
    with sessions() as session:
        closing = session.scalars(select(PaperOrderRow).where(
            PaperOrderRow.symbol == "AAPL", PaperOrderRow.status.not_in(FINAL_STATUSES),
            PaperOrderRow.side == ("SELL" if quantity > 0 else "BUY"),
            PaperOrderRow.order_type.in_(("STP", "MKT")))).all()
        covered = sum(row.quantity - row.filled_quantity for row in closing)
    return quantity, covered >= abs(quantity)


def _orders_sent(url: str, kind: str) -> tuple[int, bool]:
    """Orders the broker got for the decision under test; sent twice = more than one of them, or a
    standalone exit beside a stop turned into the exit, or the position flipped short."""
    from sqlalchemy import select

    from trading_pipeline.adapters.broker import PaperBroker
    from trading_pipeline.adapters.trading_db import PaperOrderRow, session_factory

    sessions = session_factory(url)
    with sessions() as session:
        coids = set(session.scalars(select(PaperOrderRow.client_order_id)))
        mkt = session.scalars(select(PaperOrderRow).where(PaperOrderRow.order_type == "MKT")).all()
    held = PaperBroker(sessions, 100_000.0).account({}, as_of=FRIDAY_EVENING).positions.get("AAPL")
    if kind == "entry":
        sent = {c for c in coids if c.startswith("tp-fm-entry")}
        return len(sent), len(sent) not in (0, 3)
    standalone = "tp-fm-exit" in coids
    return len(mkt) + int(standalone and not mkt), (len(mkt) > 1) or (held is not None and held.quantity < 0)


def run_cell(kind: str, point: str, workdir: Path) -> Cell:
    url = f"sqlite:///{workdir / f'{kind}-{POINTS.index(point)}.db'}"
    if kind == "exit":  # a long bought Tuesday evening, filled Wednesday at 97, its stop and target working
        _act(url, "entry", TUESDAY_EVENING)
        _sync(url, list(BARS)[:2], THURSDAY_EVENING)
    now = TUESDAY_EVENING if kind == "entry" else THURSDAY_EVENING
    process = multiprocessing.get_context("spawn").Process(target=_attempt_and_die,
                                                           args=(url, kind, point, now.isoformat()))
    process.start()
    process.join(120)
    killed = process.exitcode == KILLED
    _, protected_after_kill = _protected(url)
    rerun = _act(url, kind, now)  # the orders step runs again (a retry, a re-materialization)
    _sync(url, list(BARS), FRIDAY_EVENING)
    again = _act(url, kind, now)  # and once more after the sync: still nothing new
    position, protected_after_rerun = _protected(url)
    count, twice = _orders_sent(url, kind)
    return Cell(kind, point, killed, count, position, protected_after_kill, protected_after_rerun,
                twice or again.status not in ("already_sent", "filled", "not_sent"), rerun.status)


def run_matrix(workdir: Path) -> list[Cell]:
    return [run_cell(kind, point, workdir) for kind in ("entry", "exit") for point in POINTS]


def format_matrix(cells: list[Cell]) -> str:
    header = ["order", "killed", "run again", "orders at broker", "position after", "protected after kill",
              "protected after", "sent twice", "ok"]
    rows = [[c.kind, c.point, c.rerun_status, str(c.orders_at_broker), f"{c.position:g}",
             "yes" if c.protected_after_kill else "NO", "yes" if c.protected_after_rerun else "NO",
             "YES" if c.sent_twice else "no", "ok" if c.ok else "FAIL"] for c in cells]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cells = run_matrix(Path(tmp))
    print(format_matrix(cells))
    return 0 if all(c.ok for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
