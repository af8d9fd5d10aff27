"""The books by position: fills matched FIFO per symbol into trades, whatever order closed them."""

from datetime import UTC, datetime, timedelta

import pytest

from trading_pipeline.core.books import Fill, describe_duration, match_trades

T0 = datetime(2026, 9, 2, 13, 30, tzinfo=UTC)


def fill(n, side, quantity, price, decision, reason, hours=0.0, commission=0.0, symbol="AAPL"):
    return Fill(execution_id=f"e{n}", symbol=symbol, side=side, quantity=quantity, price=price,
                commission=commission, executed_at=T0 + timedelta(hours=hours), decision_id=decision, reason=reason)


def test_a_later_decisions_close_closes_the_trade_the_entry_opened():
    trades = match_trades([fill(1, "BUY", 50, 100.0, "d1", "entry"),
                           fill(2, "SELL", 50, 103.0, "d2", "exit", hours=24)], {"d1": 96.0, "d2": 106.0})
    (trade,) = trades  # one closed trade, not two open ones
    assert (trade.decision_id, trade.status, trade.exit, trade.realized_pnl, trade.exit_reasons) == (
        "d1", "closed", 103.0, 150.0, ["exit"])
    assert trade.r_multiple == pytest.approx(150.0 / (4.0 * 50))  # against d1's stop, not d2's
    assert trade.holding_time(T0 + timedelta(days=9)) == timedelta(hours=24)  # closed: entry to exit


def test_partial_take_profit_then_stop_is_one_trade_net_of_commissions():
    trades = match_trades([
        fill(1, "BUY", 30, 100.0, "d1", "entry", commission=1.5),
        fill(2, "BUY", 20, 100.0, "d1", "entry", hours=1, commission=1.0),  # the same entry, a second fill
        fill(3, "SELL", 20, 106.0, "d1", "take_profit", hours=24, commission=2.5),
        fill(4, "SELL", 30, 97.0, "d1", "stop_loss", hours=48, commission=5.0),
    ], {"d1": 96.0})
    (trade,) = trades
    assert trade.quantity == 50 and trade.entry == 100.0
    assert trade.exit == pytest.approx((20 * 106 + 30 * 97) / 50)
    assert trade.commission == pytest.approx(10.0)
    assert trade.realized_pnl == pytest.approx(20 * 6 - 30 * 3 - 10.0)  # 30 gross, 20 net
    assert trade.r_multiple == pytest.approx(20.0 / (4.0 * 50))
    assert trade.exit_reasons == ["take_profit", "stop_loss"] and trade.status == "closed"


def test_a_partly_closed_trade_realizes_only_its_closed_part():
    (trade,) = match_trades([fill(1, "BUY", 50, 100.0, "d1", "entry", commission=2.0),
                             fill(2, "SELL", 20, 106.0, "d1", "take_profit", hours=5, commission=1.0)], {"d1": 96.0})
    assert (trade.status, trade.closed_quantity, trade.open_quantity) == ("partly closed", 20, 30)
    assert trade.realized_pnl == pytest.approx(20 * 6 - 2.0 * 20 / 50 - 1.0)  # its share of the entry's commission
    assert trade.r_multiple is None  # R once the trade is closed
    assert trade.holding_time(T0 + timedelta(hours=7)) == timedelta(hours=7)  # still held: up to now


def test_fifo_across_decisions_and_symbols():
    trades = match_trades([
        fill(1, "BUY", 30, 100.0, "d1", "entry"),
        fill(2, "BUY", 10, 50.0, "m1", "entry", symbol="MSFT"),
        fill(3, "BUY", 20, 110.0, "d2", "entry", hours=24),
        fill(4, "SELL", 40, 120.0, "d3", "exit", hours=48),  # closes d1 first, then 10 of d2
    ], {"d1": 90.0, "d2": 100.0})
    by_decision = {t.decision_id: t for t in trades}
    assert [t.decision_id for t in trades] == ["d1", "m1", "d2"]
    assert by_decision["d1"].status == "closed" and by_decision["d1"].realized_pnl == pytest.approx(600.0)
    assert by_decision["d1"].r_multiple == pytest.approx(600.0 / (10.0 * 30))
    assert (by_decision["d2"].status, by_decision["d2"].closed_quantity) == ("partly closed", 10)
    assert by_decision["d2"].realized_pnl == pytest.approx(100.0)
    assert by_decision["m1"].status == "open" and by_decision["m1"].realized_pnl == 0.0


def test_a_fill_larger_than_the_position_closes_it_and_opens_the_rest_the_other_way():
    trades = match_trades([fill(1, "BUY", 10, 100.0, "d1", "entry"),
                           fill(2, "SELL", 15, 101.0, "d2", "exit", hours=1)], {"d1": 95.0, "d2": 104.0})
    first, second = trades
    assert (first.status, first.realized_pnl) == ("closed", 10.0)
    assert (second.decision_id, second.side, second.quantity, second.stop) == ("d2", "SELL", 5, 104.0)


def test_short_trade_and_stop_loss_r():
    (trade,) = match_trades([fill(1, "SELL", 10, 100.0, "s1", "entry"),
                             fill(2, "BUY", 10, 104.0, "s1", "stop_loss", hours=30)], {"s1": 104.0})
    assert (trade.realized_pnl, trade.r_multiple, trade.exit_reasons) == (-40.0, -1.0, ["stop_loss"])


@pytest.mark.parametrize("duration, text", [
    (timedelta(minutes=40), "40m"), (timedelta(hours=5, minutes=12), "5h 12m"), (timedelta(days=3, hours=4), "3d 4h")])
def test_holding_time_reads_at_a_glance(duration, text):
    assert describe_duration(duration) == text
