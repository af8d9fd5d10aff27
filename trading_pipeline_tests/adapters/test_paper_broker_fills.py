"""Honest paper fills: nothing fills at placement; entries fill on the daily bars of the sessions
they were live in (gaps at the open, a bar in progress at placement only at the limit), the stop
counts on the entry's fill bar, DAY entries expire at the close of their first session with their
children, GTC entries keep working, and the sync records what happened and why. The rules
themselves are tested in core/test_fills.py; these test the broker around them."""

from datetime import UTC, datetime

import pandas as pd
import pytest
from sqlalchemy import select

from trading_pipeline.adapters.broker import PaperBroker, as_utc
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.portfolio_sync import ORPHAN_GRACE, sync_portfolio, with_working_orders
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import (
    AccountSnapshotRow,
    OrderEventRow,
    OrderRow,
    PaperOrderRow,
    PositionSnapshotRow,
    session_factory,
)
from trading_pipeline.core import market_calendar
from trading_pipeline.core.analysis import Action, OrderLeg, TradeDecision
from trading_pipeline.core.fills import DailyBar, Leg, expiry_of, first_live_session, leg_fill
from trading_pipeline.core.orders import build_legs
from trading_pipeline.core.risk import AccountState, Mark, WorkingEntry

# 2026-09-01 is a Tuesday; 21:30 UTC is 17:30 in New York, after the close.
TUESDAY_AFTER_CLOSE = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
WEDNESDAY_MIDDAY = datetime(2026, 9, 2, 17, 0, tzinfo=UTC)  # 13:00 New York, session in progress


def decision(decision_id: str, as_of: datetime, action=Action.BUY, entry=100.0, stop=96.0, target=106.0):
    return TradeDecision(decision_id=decision_id, strategy="s", symbol="AAPL", as_of=as_of, data_through=as_of,
                         proposed_action=action, action=action, entry=entry, stop=stop, targets=[target],
                         r_multiple=1.5, profit_margin=0.06, confidence=0.7, quantity=50, rationale="test",
                         account_equity=100_000.0)


def daily_bars(rows: dict[str, tuple[float, float, float, float]]) -> dict[str, pd.DataFrame]:
    """AAPL's daily bars (open, high, low, close by session date), stamped with the session open as
    every source stamps them, in the shape the sync hands to `simulate_fills`."""
    cal = market_calendar.calendar()
    index = pd.DatetimeIndex([cal.session_open(pd.Timestamp(day)) for day in rows], name="time")
    frame = pd.DataFrame(list(rows.values()), index=index, columns=["open", "high", "low", "close"])
    frame["volume"] = 1_000_000.0
    return {"AAPL": frame}


def submit(sessions, the_decision, tif="DAY"):
    record_decision(sessions, the_decision)
    # Placed at the decision's time: these tests replay a paper deployment whose clock was then.
    return OrderDesk(sessions, PaperBroker(sessions, 100_000.0)).submit_once(
        the_decision, build_legs(the_decision, tif), reference_price=the_decision.entry, placed_at=the_decision.as_of)


def statuses(broker: PaperBroker, decision_id: str) -> dict[str, str]:
    coid = f"tp-{decision_id}"
    return {leg: broker.find_order(leg).status for leg in (coid, f"{coid}-sl", f"{coid}-tp")}


# --- pure rules --------------------------------------------------------------------------------

@pytest.mark.parametrize("placed_at, session", [
    ("2026-09-01T21:30:00Z", "2026-09-02"),  # Tuesday after the close: Wednesday
    ("2026-09-02T17:00:00Z", "2026-09-02"),  # during Wednesday's session: that session
    ("2026-09-02T12:00:00Z", "2026-09-02"),  # Wednesday before the open: that session
    ("2026-09-11T20:30:00Z", "2026-09-14"),  # Friday after the close: Monday
    ("2026-09-12T15:00:00Z", "2026-09-14"),  # Saturday: Monday
    ("2026-09-04T21:00:00Z", "2026-09-08"),  # Friday before Labor Day: Tuesday
    ("2026-11-25T22:00:00Z", "2026-11-27"),  # the evening before Thanksgiving: Friday (early close)
])
def test_first_live_session_skips_closed_days(placed_at, session):
    assert first_live_session(pd.Timestamp(placed_at)) == pd.Timestamp(session)


def test_day_expires_at_its_first_session_close_gtc_never():
    assert expiry_of("DAY", pd.Timestamp("2026-09-11T20:30:00Z")) == pd.Timestamp("2026-09-14T20:00:00Z")
    assert expiry_of("DAY", pd.Timestamp("2026-11-25T22:00:00Z")) == pd.Timestamp("2026-11-27T18:00:00Z")
    assert expiry_of("GTC", pd.Timestamp("2026-09-11T20:30:00Z")) is None
    with pytest.raises(ValueError, match="OPG"):
        expiry_of("OPG", pd.Timestamp("2026-09-11T20:30:00Z"))


def test_an_entry_fills_by_when_the_bar_started():
    start, close = pd.Timestamp("2026-09-02T13:30:00Z"), pd.Timestamp("2026-09-02T20:00:00Z")
    bar = DailyBar(start, close, open=98.0, high=101.0, low=97.0, close=100.5)

    def fill(side, price, live_since):
        result = leg_fill(Leg("e", side, "LMT", 50, price, live_since), bar, slippage_bps=0.0, commission_model="none")
        return None if result is None else (result.price, result.at)

    # started after placement: the open is below the limit, so the buy fills at the open
    assert fill("BUY", 100.0, TUESDAY_AFTER_CLOSE) == (98.0, start)
    # in progress at placement: at the limit, stamped at placement
    assert fill("BUY", 100.0, WEDNESDAY_MIDDAY) == (100.0, WEDNESDAY_MIDDAY)
    # in progress, but the range never reached the limit
    assert fill("BUY", 96.5, WEDNESDAY_MIDDAY) is None
    # a sell limit mirrors it: gap up through the limit fills at the open
    assert fill("SELL", 97.5, TUESDAY_AFTER_CLOSE) == (98.0, start)
    # over before the order existed
    assert fill("BUY", 100.0, datetime(2026, 9, 2, 21, 0, tzinfo=UTC)) is None


# --- the paper broker and the sync ---------------------------------------------------------------

def test_place_never_fills_even_a_marketable_limit(database_url):
    sessions = session_factory(database_url)
    result = submit(sessions, decision("placed", TUESDAY_AFTER_CLOSE))
    broker = PaperBroker(sessions, 100_000.0)
    assert result.status == "submitted" and result.filled_quantity == 0 and result.average_fill_price is None
    assert statuses(broker, "placed") == {"tp-placed": "Submitted", "tp-placed-sl": "PreSubmitted",
                                          "tp-placed-tp": "PreSubmitted"}
    assert broker.executions("tp-placed") == [] and broker.account({}).positions == {}


def test_gap_down_open_fills_a_buy_limit_at_the_open_and_charges_the_commission(database_url):
    sessions = session_factory(database_url)
    submit(sessions, decision("gapdown", TUESDAY_AFTER_CLOSE))
    broker = PaperBroker(sessions, 100_000.0)  # IBKR Pro fixed by default
    bars = daily_bars({
        "2026-09-01": (99.0, 101.0, 98.0, 100.0),  # the decision's bar: closed before the order existed
        "2026-09-02": (97.0, 99.0, 96.5, 98.5),  # gaps down through the limit, stays above the stop
        "2026-09-03": (98.0, 99.5, 97.0, 99.0),
    })
    happened = broker.simulate_fills(bars)
    assert happened == ["tp-gapdown BUY 50 AAPL filled at 97.00 on the bar of 2026-09-02"]
    (fill,) = broker.executions("tp-gapdown")
    assert (fill.price, fill.executed_at, fill.commission) == (
        97.0, datetime(2026, 9, 2, 13, 30, tzinfo=UTC), 1.00)  # 50 shares: IBKR's $1.00 minimum
    assert statuses(broker, "gapdown") == {"tp-gapdown": "Filled", "tp-gapdown-sl": "Submitted",
                                           "tp-gapdown-tp": "Submitted"}
    account = broker.account({"AAPL": Mark(99.0)})
    assert account.cash == pytest.approx(100_000 - 50 * 97.0 - 1.00)
    assert account.positions["AAPL"].average_price == 97.0

    report = sync_portfolio(sessions, broker, {"AAPL": Mark(99.0)})
    assert report.new_executions == 1
    (trade,) = report.trades
    assert {key: trade[key] for key in ("decision_id", "symbol", "side", "quantity", "entry", "exit", "status",
                                        "realized_pnl", "r_multiple")} == {
        "decision_id": "gapdown", "symbol": "AAPL", "side": "BUY", "quantity": 50, "entry": 97.0, "exit": None,
        "status": "open", "realized_pnl": 0.0, "r_multiple": None}


def test_the_stop_counts_on_the_entry_fill_bar(database_url):
    """The entry filled at the open, so the rest of the bar came after it: the bar's low reached the
    stop, so the trade was stopped out that day (before, paper left the stop for the next bar)."""
    sessions = session_factory(database_url)
    submit(sessions, decision("samebar", TUESDAY_AFTER_CLOSE))
    broker = PaperBroker(sessions, 100_000.0, commission_model="none")
    bars = daily_bars({"2026-09-02": (97.0, 107.0, 95.5, 98.5),  # fills at 97, reaches the stop and the target
                       "2026-09-03": (98.0, 110.0, 97.0, 109.0)})
    assert broker.simulate_fills(bars) == [
        "tp-samebar BUY 50 AAPL filled at 97.00 on the bar of 2026-09-02",
        "tp-samebar-sl SELL 50 AAPL filled at 96.00 on the bar of 2026-09-02",
        "tp-samebar-tp cancelled: one-cancels-other: tp-samebar-sl filled"]
    report = sync_portfolio(sessions, broker, {"AAPL": Mark(109.0)})
    (trade,) = report.trades
    assert (trade["exit"], trade["status"], trade["realized_pnl"], trade["r_multiple"]) == (96.0, "closed", -50.0, -1.0)


def test_slippage_on_stop_fills_only(database_url):
    sessions = session_factory(database_url)
    submit(sessions, decision("slip", TUESDAY_AFTER_CLOSE))
    broker = PaperBroker(sessions, 100_000.0, commission_model="none", slippage_bps=10)
    broker.simulate_fills(daily_bars({"2026-09-02": (100.5, 101.0, 99.0, 100.5),  # the limit: no slippage
                                      "2026-09-03": (99.0, 99.5, 95.0, 96.0)}))  # the stop: 10 bp worse
    assert broker.find_order("tp-slip").average_fill_price == 100.0
    assert broker.find_order("tp-slip-sl").average_fill_price == round(96.0 * (1 - 0.001), 2)


def test_gap_up_that_never_comes_back_expires_the_day_entry_with_its_children(database_url):
    sessions = session_factory(database_url)
    submit(sessions, decision("gapup", TUESDAY_AFTER_CLOSE))
    broker = PaperBroker(sessions, 100_000.0)
    through_tuesday = daily_bars({"2026-09-01": (99.0, 101.0, 98.0, 100.0)})
    assert broker.simulate_fills(through_tuesday) == []  # Wednesday has not traded yet: still working
    assert statuses(broker, "gapup")["tp-gapup"] == "Submitted"

    bars = daily_bars({
        "2026-09-01": (99.0, 101.0, 98.0, 100.0),
        "2026-09-02": (103.0, 105.0, 101.5, 104.0),  # gapped up, never back to 100
        "2026-09-03": (101.0, 102.0, 99.0, 100.5),  # back below 100, but the DAY order is gone
    })
    reason = "DAY order expired unfilled at the close of 2026-09-02"
    assert broker.simulate_fills(bars) == [f"tp-gapup cancelled: {reason}",
                                           f"tp-gapup-sl cancelled: cancelled with its parent tp-gapup: {reason}",
                                           f"tp-gapup-tp cancelled: cancelled with its parent tp-gapup: {reason}"]
    assert set(statuses(broker, "gapup").values()) == {"Cancelled"}
    assert broker.executions("tp-gapup") == [] and broker.open_orders() == []
    assert broker.find_order("tp-gapup").detail == reason
    assert broker.find_order("tp-gapup-sl").detail == f"cancelled with its parent tp-gapup: {reason}"

    report = sync_portfolio(sessions, broker, {"AAPL": Mark(100.5)})
    assert f"tp-gapup: Submitted → Cancelled (filled 0/50): {reason}" in report.status_changes
    assert report.trades == [] and report.account.positions == {} and report.drift == []
    with sessions() as session:
        assert session.get(OrderRow, "tp-gapup-tp").status == "Cancelled"
        details = session.scalars(select(OrderEventRow.detail).where(
            OrderEventRow.client_order_id == "tp-gapup").order_by(OrderEventRow.id)).all()
    assert details[-1] == f"sync: {reason}"


def test_placed_mid_session_fills_only_at_the_limit_on_that_bar(database_url):
    sessions = session_factory(database_url)
    submit(sessions, decision("midday", WEDNESDAY_MIDDAY))
    submit(sessions, decision("middaymiss", WEDNESDAY_MIDDAY, entry=96.5, stop=93.0, target=102.0))
    broker = PaperBroker(sessions, 100_000.0)
    bars = daily_bars({"2026-09-02": (98.0, 101.0, 97.0, 100.5)})  # opened below both limits before 13:00
    happened = broker.simulate_fills(bars)
    (fill,) = broker.executions("tp-midday")
    assert (fill.price, fill.executed_at) == (100.0, WEDNESDAY_MIDDAY)  # not the 98.00 open
    # 96.50 was never traded that day; the DAY order's only session was Wednesday's
    assert statuses(broker, "middaymiss")["tp-middaymiss"] == "Cancelled"
    assert "tp-middaymiss cancelled: DAY order expired unfilled at the close of 2026-09-02" in happened


def test_gtc_entry_keeps_working_across_sessions(database_url):
    sessions = session_factory(database_url)
    submit(sessions, decision("gtc", TUESDAY_AFTER_CLOSE), tif="GTC")
    broker = PaperBroker(sessions, 100_000.0)
    sessions_bars = {
        "2026-09-02": (102.0, 103.0, 101.0, 102.5),
        "2026-09-03": (102.5, 103.5, 100.5, 101.0),
        "2026-09-04": (99.5, 100.8, 99.0, 100.2),  # gaps below the limit after the weekend's news
        "2026-09-08": (100.2, 101.0, 99.8, 100.6),
    }
    days = list(sessions_bars)
    for seen in (1, 2):  # syncs after Wednesday's and Thursday's closes: nothing reached 100
        assert broker.simulate_fills(daily_bars({d: sessions_bars[d] for d in days[:seen]})) == []
        assert statuses(broker, "gtc")["tp-gtc"] == "Submitted"
    assert broker.simulate_fills(daily_bars(sessions_bars)) == [
        "tp-gtc BUY 50 AAPL filled at 99.50 on the bar of 2026-09-04"]
    assert statuses(broker, "gtc") == {"tp-gtc": "Filled", "tp-gtc-sl": "Submitted", "tp-gtc-tp": "Submitted"}


def test_placed_after_friday_close_first_works_on_monday(database_url):
    sessions = session_factory(database_url)
    friday_evening = datetime(2026, 9, 11, 20, 30, tzinfo=UTC)  # 16:30 New York
    submit(sessions, decision("weekend", friday_evening))
    submit(sessions, decision("weekendmiss", friday_evening, entry=95.0, stop=91.0, target=101.0))
    broker = PaperBroker(sessions, 100_000.0)
    bars = daily_bars({
        "2026-09-11": (101.0, 102.0, 94.0, 100.0),  # Friday traded through both limits, before the order
        "2026-09-14": (100.5, 101.0, 99.0, 100.8),
        "2026-09-15": (99.0, 99.5, 94.5, 95.0),
    })
    happened = broker.simulate_fills(bars)
    assert happened[0] == "tp-weekend BUY 50 AAPL filled at 100.00 on the bar of 2026-09-14"
    assert "tp-weekendmiss cancelled: DAY order expired unfilled at the close of 2026-09-14" in happened
    assert broker.executions("tp-weekendmiss") == []


def test_placed_before_a_holiday_first_works_on_the_next_session(database_url):
    sessions = session_factory(database_url)
    friday_before_labor_day = datetime(2026, 9, 4, 21, 0, tzinfo=UTC)
    submit(sessions, decision("holiday", friday_before_labor_day))
    broker = PaperBroker(sessions, 100_000.0)
    bars = daily_bars({"2026-09-04": (100.0, 101.0, 99.0, 100.0), "2026-09-08": (100.4, 101.0, 99.7, 100.9)})
    assert broker.simulate_fills(bars) == ["tp-holiday BUY 50 AAPL filled at 100.00 on the bar of 2026-09-08"]


def test_bracket_stop_first_on_an_ambiguous_bar_and_realized_r(database_url):
    sessions = session_factory(database_url)
    submit(sessions, decision("bracket", TUESDAY_AFTER_CLOSE))
    broker = PaperBroker(sessions, 100_000.0)
    bars = daily_bars({
        "2026-09-02": (100.5, 101.0, 99.0, 100.5),  # fills the entry at 100
        "2026-09-03": (101.0, 107.0, 95.0, 101.0),  # reaches the target and the stop: stop first
    })
    assert broker.simulate_fills(bars) == [
        "tp-bracket BUY 50 AAPL filled at 100.00 on the bar of 2026-09-02",
        "tp-bracket-sl SELL 50 AAPL filled at 96.00 on the bar of 2026-09-03",
        "tp-bracket-tp cancelled: one-cancels-other: tp-bracket-sl filled"]
    assert broker.find_order("tp-bracket-tp").detail == "one-cancels-other: tp-bracket-sl filled"
    report = sync_portfolio(sessions, broker, {"AAPL": Mark(101.0)})
    (trade,) = report.trades
    # Realized P&L and R are net of the commissions (2.15 in all, below): -202.15 and -1.01 R.
    assert (trade["entry"], trade["exit"], trade["status"], trade["realized_pnl"], trade["r_multiple"]) == (
        100.0, 96.0, "closed", -202.15, -1.01)
    # commissions: the buy $1.00 (minimum); the sale $1.00 + SEC fee $0.14 + FINRA TAF $0.01
    assert [e.commission for e in broker.executions("tp-bracket") + broker.executions("tp-bracket-sl")] == [1.0, 1.15]
    assert report.account.cash == pytest.approx(100_000 - 200 - 2.15)


def test_order_is_not_advanced_when_the_bars_start_after_it_went_live(database_url):
    sessions = session_factory(database_url)
    submit(sessions, decision("old", TUESDAY_AFTER_CLOSE))
    broker = PaperBroker(sessions, 100_000.0)
    late_bars = daily_bars({"2026-09-10": (101.0, 102.0, 99.0, 100.0)})  # Wednesday 09-02 is missing
    assert broker.simulate_fills(late_bars) == [
        "tp-old not advanced: the AAPL daily bars start on 2026-09-10, after the session it went live in"]
    assert statuses(broker, "old")["tp-old"] == "Submitted"  # neither guessed filled nor guessed expired


def test_a_time_in_force_the_paper_broker_cannot_simulate_is_rejected(database_url):
    sessions = session_factory(database_url)
    the_decision = decision("opg", TUESDAY_AFTER_CLOSE)
    record_decision(sessions, the_decision)
    result = OrderDesk(sessions, PaperBroker(sessions, 100_000.0)).submit_once(
        the_decision, build_legs(the_decision, "OPG"), reference_price=100.0)
    assert result.status == "rejected" and "OPG" in result.reason
    assert PaperBroker(sessions, 100_000.0).find_order("tp-opg") is None


def test_sync_fetches_bars_back_to_the_oldest_working_order(database_url):
    from trading_pipeline.graph.portfolio import fill_history

    as_of = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)
    assert fill_history(as_of, None) == "3m"  # nothing working: the marks' history
    assert fill_history(as_of, TUESDAY_AFTER_CLOSE) == "3m"  # 80 days ago: within the marks' 3 months
    assert fill_history(as_of, datetime(2026, 3, 2, 21, 0, tzinfo=UTC)) == "270d"  # 263 days + a week
    assert fill_history(as_of, datetime(2020, 1, 2, tzinfo=UTC)) == "1000d"  # IBKR's most in days

    sessions = session_factory(database_url)
    broker = PaperBroker(sessions, 100_000.0)
    assert broker.working_since() is None
    submit(sessions, decision("older", TUESDAY_AFTER_CLOSE))
    submit(sessions, decision("newer", WEDNESDAY_MIDDAY))
    assert broker.working_since() == TUESDAY_AFTER_CLOSE


def test_a_working_entry_counts_until_it_fills_or_expires(database_url):
    """What the risk gates see (working_entries): the entry sent on Tuesday evening may still fill
    until the broker says it is done; a later decision must not send a second one meanwhile."""
    sessions = session_factory(database_url)
    submit(sessions, decision("working", TUESDAY_AFTER_CLOSE))
    broker = PaperBroker(sessions, 100_000.0)
    assert with_working_orders(AccountState(0.0, 0.0), sessions, broker).working_entries == {
        "AAPL": WorkingEntry("tp-working", "BUY", 50, 100.0, "Submitted")}
    broker.simulate_fills(daily_bars({"2026-09-02": (103.0, 105.0, 101.5, 104.0)}))  # expired unfilled
    assert with_working_orders(AccountState(0.0, 0.0), sessions, broker).working_entries == {}  # the state is asked of the broker, not taken as recorded
    with sessions() as session:
        assert session.get(OrderRow, "tp-working").status == "Cancelled"


def test_an_entry_in_unknown_state_counts_as_working(database_url):
    sessions = session_factory(database_url)
    the_decision = decision("unknown", TUESDAY_AFTER_CLOSE)
    record_decision(sessions, the_decision)
    legs = build_legs(the_decision, "DAY")

    class CrashingBroker(PaperBroker):
        def place(self, *args, **kwargs):
            raise ConnectionError("the process died between send and record")

    with pytest.raises(ConnectionError):
        OrderDesk(sessions, CrashingBroker(sessions, 100_000.0)).submit_once(the_decision, legs, 100.0)
    working = with_working_orders(AccountState(0.0, 0.0), sessions, PaperBroker(sessions, 100_000.0)).working_entries
    assert working["AAPL"].status == "submitting"  # reconciled by re-running its orders step, not doubled


# --- closing a position: its exits go first -----------------------------------------------------

THURSDAY_AFTER_CLOSE = datetime(2026, 9, 3, 21, 30, tzinfo=UTC)


def open_long(sessions, decision_id="long"):
    """A bracket sent Tuesday evening, its entry filled on Wednesday at 97 (stop 96, target 106)."""
    submit(sessions, decision(decision_id, TUESDAY_AFTER_CLOSE))
    broker = PaperBroker(sessions, 100_000.0)
    broker.simulate_fills(daily_bars({"2026-09-02": (97.0, 99.0, 96.5, 98.5)}))
    sync_portfolio(sessions, broker, {"AAPL": Mark(98.5)})
    return broker


def sell_by_hand(broker, coid, quantity, day):
    """A sale placed at the broker by hand (not by the pipeline), filled on `day`'s bar."""
    broker.place("AAPL", [OrderLeg(client_order_id=coid, role="entry", side="SELL", order_type="LMT",
                                   quantity=quantity, price=98.0, tif="DAY")], 98.0,
                 placed_at=datetime(2026, 9, 2, 21, 30, tzinfo=UTC))
    bars = {"2026-09-02": (97.0, 99.0, 96.5, 98.5), "2026-09-03": (98.0, 99.5, 97.5, 99.0)}
    broker.simulate_fills(daily_bars({d: bars[d] for d in bars if d <= day}))


def test_a_stop_larger_than_the_position_is_resized_by_the_sync(database_url):
    sessions = session_factory(database_url)
    broker = open_long(sessions, "covered")
    assert sync_portfolio(sessions, broker, {"AAPL": Mark(98.5)}).drift == []  # 50 held, stop for 50
    sell_by_hand(broker, "manual-1", 20, "2026-09-03")
    assert broker.account({}).positions["AAPL"].quantity == 30
    report = sync_portfolio(sessions, broker, {"AAPL": Mark(99.0)})
    # The stop would sell 50 of the 30 held (a short of 20): the sync resizes it, and says so.
    assert any(line.startswith("tp-covered-sl: resized from 50 to 30 shares") for line in report.status_changes)
    assert broker.find_order("tp-covered-sl") is not None
    with sessions() as session:
        stop = session.scalar(select(PaperOrderRow).where(PaperOrderRow.client_order_id == "tp-covered-sl"))
        assert stop.quantity == 30
    assert "AAPL: broker holds 30, the pipeline's executions imply 50" in report.drift  # the sale by hand


def test_a_stop_with_no_position_left_is_flagged_then_cancelled(database_url):
    sessions = session_factory(database_url)
    broker = open_long(sessions, "flat")
    sell_by_hand(broker, "manual-2", 50, "2026-09-03")
    drift = sync_portfolio(sessions, broker, {"AAPL": Mark(99.0)}).drift
    # the stop, and its take-profit, which would sell short once the price reaches it
    for leg in ("tp-flat-sl", "tp-flat-tp"):
        assert any(line.startswith(f"AAPL: the working {'stop-loss' if leg.endswith('sl') else 'take-profit'} "
                                   f"{leg} (SELL 50) has no position at the broker: a sync 2 minutes or more after")
                   for line in drift)
    with sessions() as session:  # the syncs so far were ORPHAN_GRACE ago (so was the bracket, and its fill)
        for row in [*session.scalars(select(AccountSnapshotRow)), *session.scalars(select(PositionSnapshotRow))]:
            row.taken_at = as_utc(row.taken_at) - ORPHAN_GRACE
        for event in session.scalars(select(OrderEventRow)):
            event.at = as_utc(event.at) - ORPHAN_GRACE
        for order in session.scalars(select(OrderRow)):
            order.created_at = as_utc(order.created_at) - ORPHAN_GRACE
        session.commit()
    # a later sync finds no position either: the position is really gone
    report = sync_portfolio(sessions, broker, {"AAPL": Mark(99.0)})
    assert {broker.find_order(leg).status for leg in ("tp-flat-sl", "tp-flat-tp")} == {"Cancelled"}
    assert sum(line.startswith(("tp-flat-sl: Submitted → Cancelled", "tp-flat-tp: Submitted → Cancelled"))
               for line in report.status_changes) == 2
    assert report.drift == ["AAPL: broker holds 0, the pipeline's executions imply 50"]  # the sale by hand


def test_the_paper_account_at_a_point_in_time_leaves_out_later_fills(database_url):
    sessions = session_factory(database_url)
    broker = open_long(sessions, "replay")  # filled at 97 on Wednesday 2026-09-02 (13:30 UTC)
    now = broker.account({"AAPL": Mark(98.5)})
    assert now.positions["AAPL"].quantity == 50 and now.cash == pytest.approx(100_000 - 50 * 97.0 - 1.0)
    before = broker.account({"AAPL": Mark(98.5)}, as_of=TUESDAY_AFTER_CLOSE)  # a replay of Tuesday evening
    assert before.positions == {} and before.cash == 100_000.0 and before.equity == 100_000.0
    that_day = broker.account({"AAPL": Mark(98.5)}, as_of=WEDNESDAY_MIDDAY)
    assert that_day.positions["AAPL"].quantity == 50
    assert that_day.daily_pnl == pytest.approx(50 * (98.5 - 97.0) - 1.0)  # opened that day: its P&L is that day's


def test_walking_the_same_bars_again_changes_nothing(database_url):
    """Each sync walks every bar since the oldest working order: the bar an entry filled on inside
    the session is walked again later, and its high must not fill the target then (the target
    works from the next bar, as the first walk decided)."""
    sessions = session_factory(database_url)
    submit(sessions, decision("again", TUESDAY_AFTER_CLOSE))
    broker = PaperBroker(sessions, 100_000.0)
    fill_bar = {"2026-09-02": (101.0, 107.0, 99.5, 101.0)}  # opens above 100, comes down to it; high above 106
    assert broker.simulate_fills(daily_bars(fill_bar)) == [
        "tp-again BUY 50 AAPL filled at 100.00 on the bar of 2026-09-02"]
    assert broker.simulate_fills(daily_bars(fill_bar)) == []
    later = {**fill_bar, "2026-09-03": (101.0, 102.0, 100.5, 101.5), "2026-09-04": (104.0, 106.5, 103.0, 106.0)}
    assert broker.simulate_fills(daily_bars(later)) == [
        "tp-again-tp SELL 50 AAPL filled at 106.00 on the bar of 2026-09-04",
        "tp-again-sl cancelled: one-cancels-other: tp-again-tp filled"]
    assert broker.simulate_fills(daily_bars(later)) == []
