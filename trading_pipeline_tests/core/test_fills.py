"""The paper fill rules (core/fills.py), the one implementation the paper broker and the backtest
share: a bracket against one daily bar, plain values in and out."""

from datetime import UTC, datetime

import pandas as pd
import pytest

from trading_pipeline.core.fills import (
    AT_CLOSE,
    Bracket,
    DailyBar,
    Leg,
    bracket_on_bar,
    daily_bars,
    expiry_of,
    leg_fill,
)

# Wednesday 2026-09-02's session (13:30-20:00 UTC) and Thursday's.
WED_OPEN, WED_CLOSE = pd.Timestamp("2026-09-02T13:30:00Z"), pd.Timestamp("2026-09-02T20:00:00Z")
THU_OPEN, THU_CLOSE = pd.Timestamp("2026-09-03T13:30:00Z"), pd.Timestamp("2026-09-03T20:00:00Z")
TUESDAY_EVENING = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)
WEDNESDAY_MIDDAY = datetime(2026, 9, 2, 17, 0, tzinfo=UTC)


def wed(o, h, low, c):
    return DailyBar(WED_OPEN, WED_CLOSE, o, h, low, c)


def thu(o, h, low, c):
    return DailyBar(THU_OPEN, THU_CLOSE, o, h, low, c)


def long_bracket(entry=100.0, stop=96.0, target=106.0, placed=TUESDAY_EVENING, quantity=50):
    """A BUY bracket placed Tuesday evening: a DAY limit entry, GTC stop and target children."""
    return Bracket(Leg("e", "BUY", "LMT", quantity, entry, placed, expiry_of("DAY", placed)),
                   (Leg("sl", "SELL", "STP", quantity, stop, None), Leg("tp", "SELL", "LMT", quantity, target, None)))


def run(bracket, *bars, slippage_bps=0.0, commission_model="none"):
    """Walk the bars as the paper broker and the backtest do; the fills and cancels in order."""
    fills, cancelled = [], []
    for bar in bars:
        outcome = bracket_on_bar(bracket, bar, slippage_bps=slippage_bps, commission_model=commission_model)
        fills += [(f.key, f.quantity, f.price, f.at) for f in outcome.fills]
        cancelled += [(c.key, c.reason) for c in outcome.cancelled]
        bracket = outcome.bracket
    return fills, cancelled, bracket


def test_entry_filled_at_the_open_then_the_same_bar_goes_through_the_stop_is_minus_one_r():
    """The issue's case: paper used to report the take-profit (+2.75R) on the next bar."""
    fills, cancelled, left = run(long_bracket(entry=100.0, stop=96.0, target=111.0),
                                 wed(99.0, 100.5, 95.0, 99.5), thu(100.0, 112.0, 99.0, 111.5))
    assert fills == [("e", 50, 99.0, WED_OPEN), ("sl", 50, 96.0, WED_OPEN)]
    assert cancelled == [("tp", "one-cancels-other: sl filled")] and left == Bracket(None, ())


def test_entry_filled_inside_the_bar_the_stop_counts_the_target_waits_for_the_next_bar():
    # Opens above the limit, comes down to it: the stop below counts (the price passed the limit first)
    fills, _, _ = run(long_bracket(), wed(101.0, 102.0, 95.0, 97.0))
    assert fills == [("e", 50, 100.0, WED_OPEN), ("sl", 50, 96.0, WED_OPEN)]
    # ...the high may have come before the fill: the target does not fill on that bar, but on the next
    outcome = bracket_on_bar(long_bracket(), wed(101.0, 107.0, 99.5, 101.0), slippage_bps=0, commission_model="none")
    assert [f.key for f in outcome.fills] == ["e"]
    assert dict(outcome.went_live) == {"sl": WED_OPEN, "tp": WED_CLOSE}
    fills, _, _ = run(outcome.bracket, thu(101.5, 106.5, 101.0, 106.0))
    assert fills == [("tp", 50, 106.0, THU_OPEN)]


def test_entry_filled_at_the_open_the_rest_of_the_bar_can_reach_the_target():
    fills, cancelled, _ = run(long_bracket(), wed(99.0, 107.0, 98.0, 106.5))
    assert fills == [("e", 50, 99.0, WED_OPEN), ("tp", 50, 106.0, WED_OPEN)]
    assert cancelled == [("sl", "one-cancels-other: tp filled")]


def working_exits(stop=96.0, target=106.0, quantity=50, stop_quantity=None, live=TUESDAY_EVENING):
    """The children of a long filled earlier: working since Tuesday."""
    return Bracket(None, (Leg("sl", "SELL", "STP", stop_quantity or quantity, stop, live),
                          Leg("tp", "SELL", "LMT", quantity, target, live)))


@pytest.mark.parametrize("bar, expected", [
    (wed(100.0, 107.0, 95.0, 101.0), ("sl", 96.0)),  # both touched inside the bar: the stop
    (wed(94.0, 107.0, 93.0, 101.0), ("sl", 94.0)),  # gapped through the stop: at the open, worse
    (wed(108.0, 109.0, 95.0, 96.5), ("tp", 108.0)),  # gapped through the target: at the open, better (the open is first)
    (wed(101.0, 106.0, 97.0, 105.0), ("tp", 106.0)),
    (wed(101.0, 105.9, 96.1, 105.0), None),
])
def test_stop_and_target_on_one_bar(bar, expected):
    fills, _, _ = run(working_exits(), bar)
    assert [(key, price) for key, _, price, _ in fills] == ([expected] if expected else [])


def test_slippage_applies_to_stop_and_market_fills_not_limits():
    fills, _, _ = run(working_exits(), wed(94.0, 95.0, 93.0, 94.5), slippage_bps=50)
    assert fills[0][2] == round(94.0 * 0.995, 2)  # a sell gets less
    fills, _, _ = run(working_exits(), wed(108.0, 109.0, 107.0, 108.0), slippage_bps=50)
    assert fills[0][2] == 108.0
    buy = Bracket(Leg("cover", "BUY", "MKT", 10, None, TUESDAY_EVENING))
    fills, _, _ = run(buy, wed(50.0, 51.0, 49.0, 50.5), slippage_bps=20)
    assert fills == [("cover", 10, round(50.0 * 1.002, 2), WED_OPEN)]  # a buy pays more


@pytest.mark.parametrize("side, stop, bar, expected", [
    # 5 bps of $9.00 is 0.45 cent: rounded to the nearest cent it vanished, the fill was the stop itself
    ("SELL", 9.00, wed(9.10, 9.20, 8.95, 9.05), 8.99),
    ("BUY", 9.00, wed(8.90, 9.05, 8.85, 8.95), 9.01),
    # 101.00 x 0.9995 = 100.9495: the nearest cent (100.95) paid 5 of the 5.05 cents
    ("SELL", 101.0, wed(101.5, 102.0, 100.0, 100.5), 100.94),
])
def test_slippage_is_rounded_to_the_cent_against_the_order_never_away(side, stop, bar, expected):
    """A slipped price is rounded to the cent in the adverse direction: at least `slippage_bps`
    is paid (rounding to the nearest cent dropped it below $10 at 5 bps, and trimmed it above)."""
    fill = leg_fill(Leg("sl", side, "STP", 100, stop, TUESDAY_EVENING), bar, slippage_bps=5, commission_model="none")
    assert fill.price == pytest.approx(expected, abs=1e-9)
    paid = (stop - fill.price) if side == "SELL" else (fill.price - stop)
    assert paid >= stop * 5 / 10_000 - 1e-9


def test_a_market_order_fills_at_the_first_price_after_it_went_live():
    before_the_open = Leg("x", "SELL", "MKT", 50, None, TUESDAY_EVENING)
    assert run(Bracket(before_the_open), wed(99.0, 100.0, 90.0, 91.0))[0] == [("x", 50, 99.0, WED_OPEN)]
    during = Leg("x", "SELL", "MKT", 50, None, WEDNESDAY_MIDDAY)
    fill = leg_fill(during, wed(99.0, 100.0, 90.0, 91.0), slippage_bps=0, commission_model="none")
    assert (fill.price, fill.at, fill.when) == (91.0, WED_CLOSE, AT_CLOSE)  # never the open it did not see
    assert "session's close" in fill.detail
    after_the_close = Leg("x", "SELL", "MKT", 50, None, datetime(2026, 9, 2, 20, 30, tzinfo=UTC))
    fills, _, _ = run(Bracket(after_the_close), wed(99.0, 100.0, 90.0, 91.0), thu(93.0, 94.0, 92.0, 93.5))
    assert fills == [("x", 50, 93.0, THU_OPEN)]


def test_a_stop_turned_into_a_market_order_stays_one_cancels_other_with_the_target():
    exits = Bracket(None, (Leg("sl", "SELL", "MKT", 50, None, WEDNESDAY_MIDDAY),
                           Leg("tp", "SELL", "LMT", 50, 106.0, TUESDAY_EVENING)))
    fills, cancelled, left = run(exits, wed(101.0, 103.0, 99.0, 102.0))
    assert fills == [("sl", 50, 102.0, WED_CLOSE)]
    assert cancelled == [("tp", "one-cancels-other: sl filled")] and left == Bracket(None, ())
    # the target reached inside the session, before the close the market order gets: the target first
    fills, cancelled, _ = run(exits, wed(101.0, 107.0, 99.0, 102.0))
    assert fills == [("tp", 50, 106.0, WED_OPEN)] and cancelled == [("sl", "one-cancels-other: tp filled")]


def test_a_fill_reduces_its_siblings_by_its_quantity():
    # a take-profit for 30 of the 50 held gaps through at the open; the stop keeps 20, then fills them
    exits = Bracket(None, (Leg("sl", "SELL", "STP", 50, 96.0, TUESDAY_EVENING),
                           Leg("tp", "SELL", "LMT", 30, 106.0, TUESDAY_EVENING)))
    outcome = bracket_on_bar(exits, wed(107.0, 108.0, 100.0, 101.0), slippage_bps=0, commission_model="none")
    assert [(f.key, f.quantity) for f in outcome.fills] == [("tp", 30)]
    assert outcome.reduced == (("sl", 20),) and outcome.bracket.children[0].quantity == 20
    fills, cancelled, _ = run(exits, wed(107.0, 108.0, 95.0, 96.0))
    assert [(key, quantity, price) for key, quantity, price, _ in fills] == [("tp", 30, 107.0), ("sl", 20, 96.0)]
    assert cancelled == []


def test_a_day_entry_expires_with_its_children_a_gtc_one_keeps_working():
    bracket = long_bracket()
    fills, cancelled, left = run(bracket, wed(103.0, 105.0, 101.0, 104.0), thu(99.0, 100.0, 98.0, 99.5))
    reason = "DAY order expired unfilled at the close of 2026-09-02"
    assert fills == [] and left == Bracket(None, ())
    assert cancelled == [("e", reason), ("sl", f"cancelled with its parent e: {reason}"),
                         ("tp", f"cancelled with its parent e: {reason}")]
    gtc = Bracket(Leg("e", "BUY", "LMT", 50, 100.0, TUESDAY_EVENING, None), bracket.children)
    fills, cancelled, _ = run(gtc, wed(103.0, 105.0, 101.0, 104.0), thu(99.0, 100.0, 98.0, 99.5))
    assert fills == [("e", 50, 99.0, THU_OPEN)] and cancelled == []


def test_nothing_fills_from_a_bar_that_ended_before_the_order_existed():
    placed = datetime(2026, 9, 2, 21, 0, tzinfo=UTC)
    fills, cancelled, left = run(long_bracket(placed=placed), wed(90.0, 110.0, 80.0, 95.0))
    assert fills == [] and cancelled == [] and left == long_bracket(placed=placed)


def test_placed_during_the_session_fills_only_at_its_price_and_its_stop_counts():
    fills, _, _ = run(long_bracket(placed=WEDNESDAY_MIDDAY), wed(98.0, 101.0, 95.5, 100.5))
    assert fills == [("e", 50, 100.0, WEDNESDAY_MIDDAY), ("sl", 50, 96.0, WEDNESDAY_MIDDAY)]


def test_each_fill_carries_its_commission():
    outcome = bracket_on_bar(working_exits(quantity=100), wed(94.0, 95.0, 93.0, 94.5), slippage_bps=0,
                             commission_model="ibkr_fixed")
    (fill,) = outcome.fills
    assert (fill.price, fill.commission) == (94.0, 1.00 + 0.27 + 0.02)  # $1 minimum, SEC and TAF on the sale


def test_daily_bars_from_a_frame_carry_each_session_close():
    frame = pd.DataFrame({"open": [1.0, 2.0], "high": [1.5, 2.5], "low": [0.5, 1.5], "close": [1.2, 2.2]},
                         index=pd.DatetimeIndex([pd.Timestamp("2026-11-25T14:30:00Z"),
                                                 pd.Timestamp("2026-11-27T14:30:00Z")]))
    bars = daily_bars(frame)
    assert [bar.end for bar in bars] == [pd.Timestamp("2026-11-25T21:00:00Z"),
                                         pd.Timestamp("2026-11-27T18:00:00Z")]  # the day after Thanksgiving closes early
    assert (bars[1].open, bars[1].high, bars[1].low, bars[1].close) == (2.0, 2.5, 1.5, 2.2)
