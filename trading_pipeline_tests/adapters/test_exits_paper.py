"""Exits on the paper broker (issue 12.2/12.3): an exit turns the position's stop into a market order
(never cancel-then-send), exits after a gap, is refused without losing the stop, never over-closes,
and closes a position with no pipeline stop with one market order of the held size."""

from datetime import UTC, datetime

import pandas as pd
import pytest
from sqlalchemy import select

from trading_pipeline.adapters import broker as broker_module
from trading_pipeline.adapters.broker import PaperBroker, PaperOrderRejected
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import OrderEventRow, OrderRow, PaperOrderRow, session_factory
from trading_pipeline.core import market_calendar
from trading_pipeline.core.analysis import Action, OrderLeg, TradeDecision
from trading_pipeline.core.orders import build_legs

TUESDAY_EVENING = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
THURSDAY_EVENING = datetime(2026, 9, 3, 21, 30, tzinfo=UTC)
LATER = datetime(2026, 9, 10, tzinfo=UTC)


def bars(rows: dict[str, tuple[float, float, float, float]]) -> dict[str, pd.DataFrame]:
    cal = market_calendar.calendar()
    index = pd.DatetimeIndex([cal.session_open(pd.Timestamp(day)) for day in rows], name="time")
    frame = pd.DataFrame(list(rows.values()), index=index, columns=["open", "high", "low", "close"])
    frame["volume"] = 1_000_000.0
    return {"AAPL": frame}


ENTRY_DAYS = {"2026-09-02": (97.0, 99.0, 96.5, 98.5), "2026-09-03": (98.0, 99.0, 97.5, 98.2)}


def decision(decision_id, as_of, action=Action.BUY, closes=False, quantity=50):
    return TradeDecision(decision_id=decision_id, strategy="s", symbol="AAPL", as_of=as_of, data_through=as_of,
                         proposed_action=action, action=action, entry=100.0 if not closes else 98.2,
                         stop=None if closes else 96.0, targets=[] if closes else [106.0], quantity=quantity,
                         rationale="test", closes_position=closes)


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A long of 50 AAPL bought Tuesday evening (limit 100), filled Wednesday at 97; stop 96 and
    target 106 working. The paper broker's clock is Thursday evening, when the exit is decided."""
    monkeypatch.setattr(broker_module, "_utcnow", lambda: THURSDAY_EVENING)
    sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
    broker = PaperBroker(sessions, 100_000.0)
    entry = decision("long", TUESDAY_EVENING)
    record_decision(sessions, entry)
    OrderDesk(sessions, broker).submit_once(entry, build_legs(entry, "DAY"), 100.0, placed_at=TUESDAY_EVENING)
    broker.simulate_fills(bars(ENTRY_DAYS))
    assert broker.account({}, as_of=THURSDAY_EVENING).positions["AAPL"].quantity == 50
    return sessions, broker


def exit_decision(sessions, decision_id="close", quantity=50):
    the_decision = decision(decision_id, THURSDAY_EVENING, action=Action.SELL, closes=True, quantity=quantity)
    record_decision(sessions, the_decision)
    return the_decision


def paper_order(sessions, coid) -> PaperOrderRow:
    with sessions() as session:
        return session.scalar(select(PaperOrderRow).where(PaperOrderRow.client_order_id == coid))


def test_an_exit_turns_the_stop_into_a_market_order_and_exits_after_a_gap(world):
    sessions, broker = world
    result = OrderDesk(sessions, broker).exit_once(exit_decision(sessions), placed_at=THURSDAY_EVENING)
    assert result.status == "submitted" and result.client_order_id == "tp-long-sl"
    assert "turned tp-long-sl (stop_loss) into a MKT exit: SELL 50 AAPL" in result.reason
    stop = paper_order(sessions, "tp-long-sl")
    assert (stop.order_type, stop.price, stop.status) == ("MKT", None, "Submitted")  # the same order, modified
    assert paper_order(sessions, "tp-long-tp").status == "Submitted"  # the target works until the exit fills
    assert paper_order(sessions, "tp-close") is None  # no second order was placed
    # Friday gaps far below the old stop (96) and below yesterday's close: the market exit fills at the open.
    broker.simulate_fills(bars({**ENTRY_DAYS, "2026-09-04": (90.0, 91.0, 88.0, 89.0)}))
    assert broker.account({}, as_of=LATER).positions == {}  # flat, not short
    (fill,) = broker.executions("tp-long-sl")
    assert fill.price == 90.0 and fill.quantity == 50
    assert paper_order(sessions, "tp-long-tp").status == "Cancelled"  # one-cancels-other
    with sessions() as session:
        assert session.get(OrderRow, "tp-long-sl").exit_decision_id == "close"
    again = OrderDesk(sessions, broker).exit_once(exit_decision(sessions), placed_at=THURSDAY_EVENING)
    assert again.status == "already_sent"  # exactly once


def test_a_refused_exit_leaves_the_stop_working_unchanged(world):
    sessions, broker = world

    class RefusingBroker(PaperBroker):
        def modify(self, *args, **kwargs):
            raise PaperOrderRejected("price deviation question declined (o163)", "answer it in Client Portal")

    result = OrderDesk(sessions, RefusingBroker(sessions, 100_000.0)).exit_once(
        exit_decision(sessions), placed_at=THURSDAY_EVENING)
    assert result.status == "rejected" and "keeps protecting the position unchanged" in result.reason
    stop = paper_order(sessions, "tp-long-sl")
    assert (stop.order_type, stop.price, stop.quantity, stop.status) == ("STP", 96.0, 50, "Submitted")
    with sessions() as session:
        row = session.get(OrderRow, "tp-long-sl")
        assert row.exit_decision_id is None and row.order_type == "STP"
        assert "exit refused by the broker" in session.scalars(select(OrderEventRow.detail).where(
            OrderEventRow.client_order_id == "tp-long-sl").order_by(OrderEventRow.id.desc())).first()
    # The stop still does its job: Friday falls through it.
    broker.simulate_fills(bars({**ENTRY_DAYS, "2026-09-04": (97.0, 97.5, 95.0, 95.5)}))
    assert broker.account({}, as_of=LATER).positions == {}


def test_an_exit_never_sells_more_than_is_held(world):
    sessions, broker = world
    # 20 of the 50 were sold by hand on Thursday: the stop still says 50.
    broker.place("AAPL", [OrderLeg(client_order_id="by-hand", role="entry", side="SELL", order_type="MKT",
                                   quantity=20, price=None, tif="DAY")], 98.0,
                 placed_at=datetime(2026, 9, 3, 12, 0, tzinfo=UTC))
    broker.simulate_fills(bars(ENTRY_DAYS))
    assert broker.account({}).positions["AAPL"].quantity == 30
    result = OrderDesk(sessions, broker).exit_once(exit_decision(sessions), placed_at=THURSDAY_EVENING)
    assert result.status == "submitted" and paper_order(sessions, "tp-long-sl").quantity == 30
    broker.simulate_fills(bars({**ENTRY_DAYS, "2026-09-04": (99.0, 99.5, 98.0, 98.8)}))
    assert broker.account({}, as_of=LATER).positions == {}  # flat: not short 20


def test_an_exit_smaller_than_the_bracket_resizes_the_take_profit_too(world):
    """20 of the 50 were sold by hand: the exit turns the stop into a market order for the 30 held.
    The take-profit still said 50: once the exit filled, 20 of it kept working with no position, and
    a later rise to the target sold them short. Its sibling is resized with the stop."""
    sessions, broker = world
    broker.place("AAPL", [OrderLeg(client_order_id="by-hand", role="entry", side="SELL", order_type="MKT",
                                   quantity=20, price=None, tif="DAY")], 98.0,
                 placed_at=THURSDAY_EVENING.replace(hour=12, minute=0))
    broker.simulate_fills(bars(ENTRY_DAYS))
    result = OrderDesk(sessions, broker).exit_once(exit_decision(sessions), placed_at=THURSDAY_EVENING)
    assert result.status == "submitted"
    assert paper_order(sessions, "tp-long-tp").quantity == 30  # never more than the position
    with sessions() as session:
        assert session.get(OrderRow, "tp-long-tp").quantity == 30
    exit_day = {**ENTRY_DAYS, "2026-09-04": (99.0, 99.5, 98.0, 98.8)}
    broker.simulate_fills(bars(exit_day))
    assert paper_order(sessions, "tp-long-tp").status == "Cancelled"
    broker.simulate_fills(bars({**exit_day, "2026-09-08": (105.0, 107.0, 104.0, 106.5)}))  # through the target
    assert broker.account({}, as_of=LATER).positions == {}  # flat, not short 20


def test_a_position_with_no_pipeline_stop_is_closed_by_one_market_order(tmp_path, monkeypatch):
    monkeypatch.setattr(broker_module, "_utcnow", lambda: THURSDAY_EVENING)
    sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
    broker = PaperBroker(sessions, 100_000.0)
    broker.place("AAPL", [OrderLeg(client_order_id="bought-by-hand", role="entry", side="BUY", order_type="LMT",
                                   quantity=40, price=100.0, tif="DAY")], 100.0, placed_at=TUESDAY_EVENING)
    broker.simulate_fills(bars(ENTRY_DAYS))
    result = OrderDesk(sessions, broker).exit_once(exit_decision(sessions, quantity=40), placed_at=THURSDAY_EVENING)
    assert result.status == "submitted" and [(leg.role, leg.order_type, leg.quantity) for leg in result.legs] == [
        ("exit", "MKT", 40)]
    broker.simulate_fills(bars({**ENTRY_DAYS, "2026-09-04": (99.0, 99.5, 98.0, 98.8)}))
    assert broker.account({}, as_of=LATER).positions == {}
    assert [f.price for f in broker.executions("tp-close")] == [99.0]


def test_a_second_exit_while_the_first_market_exit_works_sends_nothing(tmp_path, monkeypatch):
    """A position with no pipeline stop is closed by a standalone market order, which works until
    the next open. Another exit decision for the symbol before it fills sent a second market order
    of the held size: both filled, and the long of 40 became a short of 40."""
    monkeypatch.setattr(broker_module, "_utcnow", lambda: THURSDAY_EVENING)
    sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
    broker = PaperBroker(sessions, 100_000.0)
    broker.place("AAPL", [OrderLeg(client_order_id="bought-by-hand", role="entry", side="BUY", order_type="LMT",
                                   quantity=40, price=100.0, tif="DAY")], 100.0, placed_at=TUESDAY_EVENING)
    broker.simulate_fills(bars(ENTRY_DAYS))
    first = OrderDesk(sessions, broker).exit_once(exit_decision(sessions, "close-a", quantity=40),
                                                  placed_at=THURSDAY_EVENING)
    assert first.status == "submitted"
    second = OrderDesk(sessions, broker).exit_once(exit_decision(sessions, "close-b", quantity=40),
                                                   placed_at=THURSDAY_EVENING)
    assert second.status == "not_sent" and "tp-close-a" in second.reason and "may still fill" in second.reason
    assert paper_order(sessions, "tp-close-b") is None
    broker.simulate_fills(bars({**ENTRY_DAYS, "2026-09-04": (99.0, 99.5, 98.0, 98.8)}))
    assert broker.account({}, as_of=LATER).positions == {}  # flat, not short 40


def test_an_exit_for_a_position_already_flat_sends_nothing(world, monkeypatch):
    sessions, broker = world
    broker.simulate_fills(bars({**ENTRY_DAYS, "2026-09-04": (97.0, 97.5, 95.0, 95.5)}))  # the stop fired
    friday_evening = datetime(2026, 9, 4, 21, 30, tzinfo=UTC)
    monkeypatch.setattr(broker_module, "_utcnow", lambda: friday_evening)
    result = OrderDesk(sessions, broker).exit_once(exit_decision(sessions), placed_at=friday_evening)
    assert result.status == "not_sent" and "nothing to close" in result.reason
    assert paper_order(sessions, "tp-close") is None and paper_order(sessions, "tp-long-sl").status == "Filled"


def test_an_exit_stopped_under_the_account_lock_sends_nothing_and_keeps_the_stop(world):
    """The orders switch turned off while the exit waited for the account lock: nothing is sent, the
    stop keeps working as it was, and the reason says why."""
    sessions, broker = world
    result = OrderDesk(sessions, broker).exit_once(
        exit_decision(sessions), placed_at=THURSDAY_EVENING,
        stopped=lambda: "TRADING_ORDERS_ENABLED was turned off before the exit was sent; nothing sent")
    assert result.status == "not_sent" and "TRADING_ORDERS_ENABLED was turned off" in result.reason
    stop = paper_order(sessions, "tp-long-sl")
    assert (stop.order_type, stop.price, stop.status) == ("STP", 96.0, "Submitted")  # untouched
    assert paper_order(sessions, "tp-close") is None
    later = OrderDesk(sessions, broker).exit_once(exit_decision(sessions), placed_at=THURSDAY_EVENING)
    assert later.status == "submitted"  # turned on again, the same decision's exit goes out


def test_an_exit_of_a_position_flipped_by_hand_never_turns_the_old_sides_stop_into_it(world):
    """The long of 50 was flipped by hand (100 sold): short 50, while the long's stop (a SELL) still
    works until a sync cancels it (ORPHAN_GRACE). A BUY decision closes the short. Turned into the
    exit, that SELL stop became a market SELL of 50: short 100. The exit closes with an order on its
    own side only: here none is working, so one standalone market BUY of the 50 held."""
    sessions, broker = world
    broker.place("AAPL", [OrderLeg(client_order_id="flipped-by-hand", role="entry", side="SELL", order_type="MKT",
                                   quantity=100, price=None, tif="DAY")], 98.0,
                 placed_at=THURSDAY_EVENING.replace(hour=12, minute=0))
    broker.simulate_fills(bars(ENTRY_DAYS))
    assert broker.account({}).positions["AAPL"].quantity == -50
    cover = decision("cover", THURSDAY_EVENING, action=Action.BUY, closes=True, quantity=50)
    record_decision(sessions, cover)
    result = OrderDesk(sessions, broker).exit_once(cover, placed_at=THURSDAY_EVENING)
    assert result.status == "submitted", result.reason
    assert [(leg.role, leg.side, leg.order_type, leg.quantity) for leg in result.legs] == [("exit", "BUY", "MKT", 50)]
    stop = paper_order(sessions, "tp-long-sl")
    assert (stop.order_type, stop.side, stop.quantity) == ("STP", "SELL", 50)  # not made into the exit
    broker.simulate_fills(bars({**ENTRY_DAYS, "2026-09-04": (99.0, 99.5, 98.0, 98.8)}))
    assert broker.account({}, as_of=LATER).positions == {}  # flat, not short 100
