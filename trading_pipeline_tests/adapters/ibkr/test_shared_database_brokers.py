"""The paper broker and IBKR writing into one trading database (the default SQLite file: a user
runs on paper for weeks, then sets TRADING_BROKER=ibkr with the same database). Each broker's
order lifecycle reads only its own rows (`of_broker`): another broker's open orders are never
asked of, cancelled at, converted at or counted for this one, its fills are not this account's,
and a decision it was sent is not sent here again. IBKR is the emulator over real HTTP; the paper
broker keeps its state in the same database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from sqlalchemy import func, select, update

from trading_pipeline.adapters.broker import PaperBroker
from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.portfolio_sync import sync_portfolio, with_working_orders
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import OrderEventRow, OrderRow, session_factory
from trading_pipeline.core import market_calendar
from trading_pipeline.core.analysis import Action, TradeDecision
from trading_pipeline.core.orders import build_legs, client_order_id
from trading_pipeline_tests.adapters.ibkr.lifecycle_world import (
    QUICK,
    QUICK_PACING,
    World,
    entry_decision,
    exit_decision,
    limits_now,
)

TUESDAY_EVENING = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
LATER = datetime(2026, 9, 10, tzinfo=UTC)
ENTRY_DAYS = {"2026-09-02": (97.0, 99.0, 96.5, 98.5), "2026-09-03": (98.0, 99.0, 97.5, 98.2)}
THROUGH_THE_STOP = {"2026-09-04": (95.0, 95.5, 94.0, 94.5)}


def bars(symbol: str, rows: dict[str, tuple[float, float, float, float]]) -> dict[str, pd.DataFrame]:
    cal = market_calendar.calendar()
    index = pd.DatetimeIndex([cal.session_open(pd.Timestamp(day)) for day in rows], name="time")
    frame = pd.DataFrame(list(rows.values()), index=index, columns=["open", "high", "low", "close"])
    frame["volume"] = 1_000_000.0
    return {symbol: frame}


def paper_decision(decision_id: str, symbol: str = "AAPL") -> TradeDecision:
    """A paper entry: 50 at a 100 limit, stop 96, target 106 (fills at 97 on ENTRY_DAYS)."""
    return TradeDecision(decision_id=decision_id, strategy="s", symbol=symbol, as_of=TUESDAY_EVENING,
                         data_through=TUESDAY_EVENING, proposed_action=Action.BUY, action=Action.BUY, entry=100.0,
                         stop=96.0, targets=[106.0], quantity=50, rationale="paper entry")


@pytest.fixture
def world(emulator_factory, client_factory, tmp_path):
    """make(symbols=...) -> World: one IBKR account at the emulator holding nothing, on the trading
    database the paper broker writes to as well (test_exits_and_lifecycle's world)."""

    def make(symbols: tuple[str, ...] = ("AAPL",)) -> World:
        emulator = emulator_factory(market_hours="open", positions=0, **QUICK)
        sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
        broker = IBKRBroker(client_factory(emulator, pacing=QUICK_PACING), order_cache_seconds=0,
                            id_map_path=tmp_path / "ibkr-order-ids.json", symbols=symbols)
        return World(emulator, sessions, broker, OrderDesk(sessions, broker), None)

    return make


class Asked:
    """A broker that writes down every cOID it is asked about, changes or cancels."""

    def __init__(self, broker):
        self._broker, self.asked = broker, []

    def __getattr__(self, name):
        attribute = getattr(self._broker, name)
        if name not in ("find_order", "executions", "cancel", "modify"):
            return attribute

        def asked(client_order_id, *args, **kwargs):
            self.asked.append(client_order_id)
            return attribute(client_order_id, *args, **kwargs)
        return asked


def paper_of(w: World) -> PaperBroker:
    return PaperBroker(w.sessions, 100_000.0, clock=lambda: LATER)


def paper_sends(w: World, paper: PaperBroker, decision: TradeDecision) -> None:
    record_decision(w.sessions, decision)
    sent = OrderDesk(w.sessions, paper).submit_once(decision, build_legs(decision, "DAY"), 100.0,
                                                    placed_at=TUESDAY_EVENING)
    assert sent.status == "submitted", sent.reason


def paper_position(w: World, decision_id: str = "paper-long", closed_by_its_stop: bool = False) -> PaperBroker:
    """50 AAPL held at the paper broker, its stop (96) and take-profit (106) working; or, with
    `closed_by_its_stop`, that trade closed by its stop (a closing fill of the pipeline's)."""
    paper = paper_of(w)
    paper_sends(w, paper, paper_decision(decision_id))
    paper.simulate_fills(bars("AAPL", {**ENTRY_DAYS, **(THROUGH_THE_STOP if closed_by_its_stop else {})}))
    report = sync_portfolio(w.sessions, paper, {})
    assert f"{client_order_id(paper_decision(decision_id))}: Submitted → Filled" in " ".join(report.status_changes)
    return paper


def rows_of(w: World, broker: str) -> dict[str, tuple]:
    with w.sessions() as session:
        return {row.client_order_id: (row.status, row.quantity, row.filled_quantity, row.order_type,
                                      row.exit_decision_id)
                for row in session.scalars(select(OrderRow).where(OrderRow.broker == broker))}


def events_of(w: World, coids) -> int:
    with w.sessions() as session:
        return session.scalar(select(func.count()).where(OrderEventRow.client_order_id.in_(list(coids))))


def test_a_paper_positions_stop_is_not_the_protection_of_an_unprotected_ibkr_position(world):
    w = world()
    paper_position(w)  # the paper AAPL stop works
    w.emulator.set_price("AAPL", 100.0)
    stop_id, take_profit_id = w.open_position(entry_decision("ibkr-long"))
    w.broker.client.cancel_order(stop_id)  # the IBKR position's bracket cancelled in TWS: unprotected
    w.broker.client.cancel_order(take_profit_id)

    account = with_working_orders(w.broker.account({}), w.sessions, w.broker)
    assert "AAPL" not in account.working_protection  # the gates: the paper stop protects nothing at IBKR

    report = sync_portfolio(w.sessions, w.broker, {})
    assert len(report.unprotected) == 1 and "AAPL: the pipeline's position of 50 shares has NO working stop-loss" \
        in report.unprotected[0], report.drift
    assert [p["stop"] for p in report.positions if p["symbol"] == "AAPL"] == [None]  # not the paper stop's 96
    assert not [line for line in report.drift if "imply" in line], report.drift  # IBKR fills only: 50 = 50
    assert [t["decision_id"] for t in report.trades] == ["ibkr-long"]  # the IBKR books: no paper trade


def test_a_paper_working_entry_does_not_block_an_ibkr_entry_on_that_symbol(world):
    w = world(symbols=("AAPL", "MSFT"))
    paper = paper_of(w)
    paper_sends(w, paper, paper_decision("paper-msft", "MSFT"))  # working at the paper broker, unfilled
    before = rows_of(w, "paper")
    w.emulator.set_price("MSFT", 100.0)
    decision = entry_decision("ibkr-msft", symbol="MSFT")
    record_decision(w.sessions, decision)
    limits = limits_now(w, decision)
    allowed, checks = limits()
    assert allowed >= 50 and all(c.passed for c in checks), [(c.rule, c.detail) for c in checks if not c.passed]
    sent = w.desk.submit_once(decision, build_legs(decision, "DAY"), decision.entry, limits=limits)
    assert sent.status == "filled", sent.reason
    assert rows_of(w, "paper") == before  # the paper entry is the paper broker's business, untouched


def test_the_ibkr_sync_never_asks_ibkr_about_paper_rows_leaves_them_as_they_are_and_reports_them(world):
    w = world(symbols=("AAPL", "MSFT"))
    paper = paper_position(w)  # AAPL stop and take-profit working at the paper broker (no AAPL at IBKR)
    paper_sends(w, paper, paper_decision("paper-msft", "MSFT"))  # a paper DAY entry, weeks old
    with w.sessions() as session:
        session.execute(update(OrderRow).where(OrderRow.decision_id == "paper-msft")
                        .values(created_at=datetime.now(UTC) - timedelta(days=20)))
        session.commit()
    before = rows_of(w, "paper")
    paper_events = events_of(w, before)
    asked = Asked(w.broker)

    for _ in range(2):  # the second sync comes after an orphan's grace would have started
        report = sync_portfolio(w.sessions, asked, {})
    assert not set(asked.asked) & set(before), asked.asked  # IBKR was never asked about a paper row
    assert rows_of(w, "paper") == before and events_of(w, before) == paper_events  # nor were they closed
    assert report.other_brokers == [(
        "5 open order(s) of the paper broker in this database are not this broker's (ibkr, account DU1234567): "
        "left as they are; they are checked when TRADING_BROKER=paper runs again; use a separate "
        "TRADING_DATABASE_URL per broker and account to keep them apart")]
    assert not [line for line in report.drift + report.status_changes if "paper" in line], report.drift
    assert report.trades == []  # the paper fills are not the IBKR account's trades


def test_an_exit_at_ibkr_sizes_only_from_ibkr_fills(world):
    """The paper trade in AAPL was closed by its stop (a closing fill of the pipeline's on the sell
    side); at IBKR the user holds 40 bought by hand. Mixed in, the paper fills say the pipeline holds
    0 and the IBKR exit would send nothing."""
    w = world()
    paper_position(w, closed_by_its_stop=True)
    w.emulator.set_price("AAPL", 100.0)
    w.sell_by_hand(40, side="BUY")
    before = rows_of(w, "paper")
    asked = Asked(w.broker)

    result = OrderDesk(w.sessions, asked).exit_once(exit_decision("ibkr-exit", 40))
    assert result.status in ("submitted", "filled") and result.client_order_id == "tp-ibkr-exit", result.reason
    assert w.position_path("AAPL") == [40, 0]
    assert not set(asked.asked) & set(before), asked.asked
    assert rows_of(w, "paper") == before


def test_an_exit_at_ibkr_converts_its_own_stop_never_the_paper_one(world):
    w = world()
    paper_position(w)  # the paper AAPL stop (a SELL) works
    w.emulator.set_price("AAPL", 100.0)
    stop_id, _ = w.open_position(entry_decision("ibkr-long"))
    before = rows_of(w, "paper")
    asked = Asked(w.broker)

    result = OrderDesk(w.sessions, asked).exit_once(exit_decision("ibkr-exit", 50))
    assert result.status == "submitted" and result.client_order_id == "tp-ibkr-long-sl", result.reason
    assert w.order(stop_id).order_type == "MKT"
    assert not set(asked.asked) & set(before), asked.asked  # the paper stop was not looked for at IBKR
    assert rows_of(w, "paper") == before


def test_switching_back_to_paper_finds_its_rows_intact_and_manages_them(world):
    w = world()
    paper = paper_position(w)
    w.emulator.set_price("AAPL", 100.0)
    w.open_position(entry_decision("ibkr-long"))
    for _ in range(2):
        ibkr_report = sync_portfolio(w.sessions, w.broker, {})
    assert ibkr_report.drift == [], ibkr_report.drift

    # TRADING_BROKER=paper again: the paper stop fills; its sync closes the paper trade, and only it
    paper.simulate_fills(bars("AAPL", {**ENTRY_DAYS, **THROUGH_THE_STOP}))
    report = sync_portfolio(w.sessions, paper, {})
    assert rows_of(w, "paper")["tp-paper-long-sl"][:3] == ("Filled", 50, 50)
    assert rows_of(w, "paper")["tp-paper-long-tp"][0] == "Cancelled"
    assert [(t["decision_id"], t["status"], t["exit_reason"]) for t in report.trades] == [
        ("paper-long", "closed", "stop_loss")]
    assert report.drift == [], report.drift  # no IBKR fill in its drift check, no IBKR stop taken for an orphan
    assert report.other_brokers == [(
        "2 open order(s) of the ibkr broker (account DU1234567) in this database are not this broker's (paper): "
        "left as they are; they are checked when TRADING_BROKER=ibkr runs again with the gateway logged in to "
        "account DU1234567; use a separate TRADING_DATABASE_URL per broker and account to keep them apart")]
    assert {coid: state[0] for coid, state in rows_of(w, "ibkr").items()} == {
        "tp-ibkr-long": "Filled", "tp-ibkr-long-sl": "Submitted", "tp-ibkr-long-tp": "Submitted"}


def test_a_decision_sent_to_the_paper_broker_is_not_sent_to_ibkr_as_well(world):
    """The paper broker was sent the decision and the process died before it recorded the answer
    ('submitting'); then TRADING_BROKER=ibkr. IBKR does not know the cOID: sending it there would be a
    second order for one decision. It is `already_sent`, naming the paper broker."""
    w = world()
    paper = paper_of(w)
    decision = paper_decision("sent-to-paper")
    paper_sends(w, paper, decision)
    with w.sessions() as session:
        session.execute(update(OrderRow).where(OrderRow.decision_id == decision.decision_id)
                        .values(status="submitting"))
        session.commit()
    w.emulator.set_price("AAPL", 100.0)

    assert w.desk.recorded(decision) is None  # unknown yet: the orders step goes on to submit_once
    result = w.desk.submit_once(decision, build_legs(decision, "DAY"), 100.0)
    assert result.status == "already_sent" and result.broker == "paper", result.reason
    assert "was sent to the paper broker, not this one (the ibkr broker (account DU1234567))" in result.reason
    assert w.requests_sent() == (0, 0, 0)
    assert set(rows_of(w, "paper")) == {"tp-sent-to-paper", "tp-sent-to-paper-sl", "tp-sent-to-paper-tp"}
    assert rows_of(w, "ibkr") == {}

    with w.sessions() as session:  # the paper broker's sync has found it since: the orders asset names that broker
        session.execute(update(OrderRow).where(OrderRow.decision_id == decision.decision_id).values(status="Submitted"))
        session.commit()
    shown = w.desk.recorded(decision)
    assert shown.broker == "paper" and "at the paper broker, not this one, the ibkr broker (account DU1234567)" in shown.reason, shown.reason
    exit_result = w.desk.exit_once(decision.model_copy(update={"action": Action.SELL, "closes_position": True}))
    assert exit_result.status == "already_sent" and w.requests_sent() == (0, 0, 0), exit_result.reason
