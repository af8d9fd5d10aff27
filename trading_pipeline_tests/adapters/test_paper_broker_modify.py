"""Modifying paper orders in place: a stop turned into a market exit, a resized stop, refusals;
market orders; the paper broker's tick and cost settings."""

from datetime import UTC, datetime

import pandas as pd
import pytest
from sqlalchemy import select

from trading_pipeline import config
from trading_pipeline.adapters import broker as broker_module
from trading_pipeline.adapters.broker import PaperBroker
from trading_pipeline.adapters.trading_db import PaperOrderRow, session_factory
from trading_pipeline.core import market_calendar
from trading_pipeline.core.analysis import OrderLeg
from trading_pipeline.errors import ConfigError, OrderRejectedError

TUESDAY_EVENING = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
THURSDAY_MIDDAY = datetime(2026, 9, 3, 17, 0, tzinfo=UTC)
THURSDAY_EVENING = datetime(2026, 9, 3, 21, 0, tzinfo=UTC)
NEXT_WEEK = datetime(2026, 9, 8, 21, 0, tzinfo=UTC)


def bars(rows: dict[str, tuple[float, float, float, float]]) -> dict[str, pd.DataFrame]:
    cal = market_calendar.calendar()
    index = pd.DatetimeIndex([cal.session_open(pd.Timestamp(day)) for day in rows], name="time")
    return {"AAPL": pd.DataFrame(list(rows.values()), index=index, columns=["open", "high", "low", "close"])}


WEDNESDAY = {"2026-09-02": (100.5, 101.0, 99.0, 100.5)}  # fills the entry at its 100 limit, nothing else


def open_long(database_url, **costs) -> PaperBroker:
    broker = PaperBroker(session_factory(database_url), 100_000.0, **{"commission_model": "none", **costs})
    broker.place("AAPL", [
        OrderLeg(client_order_id="e", role="entry", side="BUY", order_type="LMT", quantity=50, price=100.0, tif="DAY"),
        OrderLeg(client_order_id="e-sl", role="stop_loss", side="SELL", order_type="STP", quantity=50, price=96.0,
                 tif="GTC"),
        OrderLeg(client_order_id="e-tp", role="take_profit", side="SELL", order_type="LMT", quantity=50,
                 price=110.0, tif="GTC"),
    ], 100.0, placed_at=TUESDAY_EVENING)
    assert broker.simulate_fills(bars(WEDNESDAY)) == ["e BUY 50 AAPL filled at 100.00 on the bar of 2026-09-02"]
    return broker


def test_a_stop_turned_into_a_market_order_during_the_session_fills_at_its_close(database_url, monkeypatch):
    broker = open_long(database_url)
    monkeypatch.setattr(broker_module, "_utcnow", lambda: THURSDAY_MIDDAY)
    changed = broker.modify("e-sl", order_type="MKT")
    assert (changed.client_order_id, changed.status) == ("e-sl", "Submitted")
    thursday = {**WEDNESDAY, "2026-09-03": (104.0, 106.0, 102.0, 103.0)}  # opened at 104 before the change
    assert broker.simulate_fills(bars(thursday)) == [
        "e-sl SELL 50 AAPL filled at 103.00 on the bar of 2026-09-03",
        "e-tp cancelled: one-cancels-other: e-sl filled"]
    (execution,) = broker.executions("e-sl")
    assert execution.executed_at == datetime(2026, 9, 3, 20, 0, tzinfo=UTC)
    assert "session's close" in broker.find_order("e-sl").detail
    assert broker.find_order("e-tp").status == "Cancelled"
    assert broker.account({}, as_of=NEXT_WEEK).positions == {}


def test_a_stop_turned_into_a_market_order_after_the_close_fills_at_the_next_open(database_url, monkeypatch):
    broker = open_long(database_url, slippage_bps=10)
    monkeypatch.setattr(broker_module, "_utcnow", lambda: THURSDAY_EVENING)
    broker.modify("e-sl", order_type="MKT")
    later = {**WEDNESDAY, "2026-09-03": (104.0, 106.0, 102.0, 103.0), "2026-09-04": (101.0, 102.0, 99.0, 99.5)}
    # 101.00 less 10 bps is 100.899: to the cent against the sell, 100.89
    assert broker.simulate_fills(bars(later))[0] == "e-sl SELL 50 AAPL filled at 100.89 on the bar of 2026-09-04"


def test_a_resized_stop_fills_its_new_quantity(database_url, monkeypatch):
    broker = open_long(database_url)
    monkeypatch.setattr(broker_module, "_utcnow", lambda: THURSDAY_EVENING)
    resized = broker.modify("e-sl", quantity=30, price=97.0)
    assert resized.status == "Submitted"
    broker.simulate_fills(bars({**WEDNESDAY, "2026-09-04": (98.0, 98.5, 95.0, 95.5)}))
    (execution,) = broker.executions("e-sl")
    assert (execution.quantity, execution.price) == (30, 97.0)
    assert broker.account({}, as_of=NEXT_WEEK).positions["AAPL"].quantity == 20


def test_modify_refuses_what_it_cannot_do_and_leaves_the_order_as_it_was(database_url):
    broker = open_long(database_url)
    assert broker.modify("no-such-order", order_type="MKT") is None
    filled = broker.find_order("e")
    assert broker.modify("e", price=90.0) == filled  # a final order is returned as it is
    with pytest.raises(OrderRejectedError, match="below"):
        broker.modify("e-sl", quantity=0)
    with pytest.raises(OrderRejectedError, match="no price"):
        broker.modify("e-sl", order_type="MKT", price=95.0)
    sessions = session_factory(database_url)
    with sessions() as session:  # a partly filled order (a real broker's partial fill)
        session.scalar(select(PaperOrderRow).where(PaperOrderRow.client_order_id == "e-tp")).filled_quantity = 20
        session.commit()
    with pytest.raises(OrderRejectedError, match="below the 20 already filled"):
        broker.modify("e-tp", quantity=10)
    with sessions() as session:
        row = session.scalar(select(PaperOrderRow).where(PaperOrderRow.client_order_id == "e-sl"))
        assert (row.order_type, row.price, row.quantity) == ("STP", 96.0, 50)


def test_a_standalone_market_exit_fills_at_the_next_open(database_url):
    broker = PaperBroker(session_factory(database_url), 100_000.0)
    answer, = broker.place("AAPL", [OrderLeg(client_order_id="x", role="exit", side="SELL", order_type="MKT",
                                             quantity=10, price=0.0, tif="DAY")], 100.0, placed_at=TUESDAY_EVENING)
    assert answer.status == "Submitted"
    assert broker.simulate_fills(bars(WEDNESDAY)) == ["x SELL 10 AAPL filled at 100.50 on the bar of 2026-09-02"]
    (execution,) = broker.executions("x")
    assert execution.commission == 1.00 + 0.03 + 0.01  # SEC 0.0275 -> 0.03, TAF 0.00166 -> 0.01


def test_min_tick_and_cost_settings():
    assert PaperBroker(None, 1.0).min_tick("BRK.B") == 0.01
    with pytest.raises(ConfigError, match="TRADING_PAPER_COMMISSION") as refused:
        PaperBroker(None, 1.0, commission_model="flat")
    assert "ibkr_fixed, ibkr_tiered, none" in refused.value.fix
    with pytest.raises(ConfigError, match="TRADING_PAPER_SLIPPAGE_BPS"):
        PaperBroker(None, 1.0, slippage_bps=-1)
    assert config.paper_costs({}) == ("ibkr_fixed", 0.0)
    assert config.paper_costs({"TRADING_PAPER_COMMISSION": " IBKR_Tiered ", "TRADING_PAPER_SLIPPAGE_BPS": "5"}) == (
        "ibkr_tiered", 5.0)
    for bad in ({"TRADING_PAPER_COMMISSION": "free"}, {"TRADING_PAPER_SLIPPAGE_BPS": "five"},
                {"TRADING_PAPER_SLIPPAGE_BPS": "-2"}, {"TRADING_PAPER_SLIPPAGE_BPS": "inf"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            config.paper_costs(bad)


def test_cancelling_an_unfilled_entry_cancels_its_waiting_children(database_url):
    broker = PaperBroker(session_factory(database_url), 100_000.0)
    broker.place("AAPL", [
        OrderLeg(client_order_id="c", role="entry", side="BUY", order_type="LMT", quantity=5, price=100.0, tif="GTC"),
        OrderLeg(client_order_id="c-sl", role="stop_loss", side="SELL", order_type="STP", quantity=5, price=96.0,
                 tif="GTC")], 100.0, placed_at=TUESDAY_EVENING)
    assert broker.cancel("c").status == "Cancelled"
    assert broker.find_order("c-sl").detail == "cancelled with its parent c: cancelled on request"
    assert broker.open_orders() == []


def test_modifications_are_stamped_by_the_brokers_clock(database_url):
    broker = open_long(database_url)
    simulated = PaperBroker(session_factory(database_url), 100_000.0, clock=lambda: THURSDAY_EVENING)
    simulated.modify("e-sl", order_type="MKT")
    later = {**WEDNESDAY, "2026-09-03": (104.0, 106.0, 102.0, 103.0), "2026-09-04": (101.0, 102.0, 99.0, 99.5)}
    assert broker.simulate_fills(bars(later))[0] == "e-sl SELL 50 AAPL filled at 101.00 on the bar of 2026-09-04"
