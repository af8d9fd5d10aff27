"""The paper account marks every position to its latest closed price: equity, sizing and the
daily-loss breaker see unrealized losses; commissions come out of cash; marks come from the
market data."""

from datetime import UTC, datetime

import pandas as pd
import pytest

from trading_pipeline.adapters.broker import PaperBroker, previous_close_time
from trading_pipeline.adapters.market_data import SimulatedMarketData, marks_for
from trading_pipeline.adapters.trading_db import session_factory
from trading_pipeline.core import market_calendar
from trading_pipeline.core.analysis import OrderLeg
from trading_pipeline.core.risk import Mark
from trading_pipeline.core.strategies import TimeframeSettings
from trading_pipeline.errors import BarDataError

MONDAY_EVENING = datetime(2026, 8, 31, 21, 30, tzinfo=UTC)
TUESDAY_EVENING = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
WEDNESDAY_EVENING = datetime(2026, 9, 2, 21, 30, tzinfo=UTC)


def bars(rows: dict[str, tuple[float, float, float, float]]) -> dict[str, pd.DataFrame]:
    cal = market_calendar.calendar()
    index = pd.DatetimeIndex([cal.session_open(pd.Timestamp(day)) for day in rows], name="time")
    return {"SPY": pd.DataFrame(list(rows.values()), index=index, columns=["open", "high", "low", "close"])}


def order(coid, side, order_type, quantity, price=None):
    return [OrderLeg(client_order_id=coid, role="entry", side=side, order_type=order_type, quantity=quantity,
                     price=price or 0.0, tif="DAY")]


def bought_on_tuesday(database_url) -> PaperBroker:
    """100 SPY bought at 100 on Tuesday 2026-09-01 (IBKR fixed commission: $1.00)."""
    broker = PaperBroker(session_factory(database_url), 100_000.0)
    broker.place("SPY", order("buy", "BUY", "LMT", 100, 100.0), 100.0, placed_at=MONDAY_EVENING)
    broker.simulate_fills(bars({"2026-09-01": (100.5, 101.0, 99.5, 100.0)}))
    return broker


def test_a_losing_position_held_overnight_lowers_equity_and_todays_pnl(database_url):
    broker = bought_on_tuesday(database_url)
    account = broker.account({"SPY": Mark(70.0, previous_close=100.0)}, as_of=WEDNESDAY_EVENING)
    assert account.cash == 100_000 - 10_000 - 1.00
    assert account.positions["SPY"].market_price == 70.0
    assert account.equity == 97_000 - 1.00  # was 100,000: the position at cost
    assert account.daily_pnl == -3_000  # was 0: yesterday's buy is not today's P&L, its fall is
    assert account.gross_exposure == 7_000 and account.unmarked == ()
    # the evening of the buy: its P&L is from the fill, net of its commission
    assert broker.account({"SPY": Mark(100.0, 98.0)}, as_of=TUESDAY_EVENING).daily_pnl == -1.00


def test_a_position_without_a_mark_is_valued_at_cost_and_named(database_url):
    broker = bought_on_tuesday(database_url)
    account = broker.account({}, as_of=WEDNESDAY_EVENING)
    assert account.positions["SPY"].market_price == 100.0 and account.unmarked == ("SPY",)
    assert account.equity == 100_000 - 1.00 and account.daily_pnl == 0.0
    with pytest.raises(TypeError, match="Mark"):
        broker.account({"SPY": 70.0}, as_of=WEDNESDAY_EVENING)


def test_a_position_held_overnight_and_sold_today_counts_from_the_previous_close(database_url):
    broker = bought_on_tuesday(database_url)
    broker.place("SPY", order("sell", "SELL", "MKT", 100), 98.0, placed_at=TUESDAY_EVENING)
    broker.simulate_fills(bars({"2026-09-01": (100.5, 101.0, 99.5, 98.0), "2026-09-02": (95.0, 96.0, 93.0, 94.0)}))
    sale_commission = 1.00 + 0.27 + 0.02  # SEC 0.0000278 x 9,500 = 0.264 -> 0.27, TAF 0.0166 -> 0.02
    assert broker.executions("sell")[0].commission == sale_commission
    account = broker.account({"SPY": Mark(94.0, previous_close=98.0)}, as_of=WEDNESDAY_EVENING)
    assert account.positions == {} and account.cash == pytest.approx(100_000 - 500 - 1.00 - sale_commission)
    # the day lost 98 -> 95 on 100 shares, and the sale's commission (the 100 -> 98 was Tuesday's)
    assert account.daily_pnl == pytest.approx(-300 - sale_commission)


def test_the_days_pnl_is_measured_from_the_close_before_the_latest_closed_session():
    assert previous_close_time(WEDNESDAY_EVENING) == pd.Timestamp("2026-09-01T20:00:00Z")
    assert previous_close_time(datetime(2026, 9, 2, 17, 0, tzinfo=UTC)) == pd.Timestamp(
        "2026-08-31T20:00:00Z")  # mid-session: Tuesday is the latest closed session
    assert previous_close_time(datetime(2026, 9, 5, 12, 0, tzinfo=UTC)) == pd.Timestamp(
        "2026-09-03T20:00:00Z")  # Saturday: Friday's session, measured from Thursday's close


class PartlyMissing(SimulatedMarketData):
    def fetch(self, symbol, timeframe, history, as_of):
        if symbol == "NODATA":
            raise BarDataError("no market data for NODATA", "add it")
        return super().fetch(symbol, timeframe, history, as_of)


def test_marks_are_the_last_two_closed_daily_closes(caplog):
    source = PartlyMissing()
    marks = marks_for(source, ["SPY", "NODATA"], WEDNESDAY_EVENING)
    closes = source.fetch("SPY", "1d", TimeframeSettings(period="1m"), WEDNESDAY_EVENING)["close"]
    assert closes.index[-1] == pd.Timestamp("2026-09-02T13:30:00Z")  # Wednesday's bar, closed by the evening
    assert marks == {"SPY": Mark(float(closes.iloc[-1]), float(closes.iloc[-2]))}
    assert "NODATA" in caplog.text
