"""IBKR Pro commissions (core/costs.py), against IBKR's published examples."""

import pytest

from trading_pipeline.core.costs import commission, regulatory_fees


@pytest.mark.parametrize("quantity, price, expected", [
    (100, 25.0, 1.00),  # IBKR's examples: 0.50 raised to the $1.00 minimum
    (1_000, 25.0, 5.00),  # $0.005 x 1,000
    (1_000, 0.25, 2.50),  # capped at 1% of the $250 traded, below the minimum
    (10_000, 50.0, 50.00),
])
def test_fixed_commission_on_a_buy(quantity, price, expected):
    assert commission("ibkr_fixed", "BUY", quantity, price) == expected


def test_sales_pay_the_sec_fee_and_finra_taf():
    # 100 @ 100: SEC 0.0000278 x 10,000 = 0.278 -> 0.28; TAF 0.000166 x 100 = 0.0166 -> 0.02
    assert regulatory_fees("SELL", 100, 100.0) == 0.30
    assert commission("ibkr_fixed", "SELL", 100, 100.0) == 1.30
    assert regulatory_fees("BUY", 100, 100.0) == 0.0
    # the TAF stops at $8.30 a trade: 60,000 shares would be 9.96
    assert regulatory_fees("SELL", 60_000, 1.0) == round(0.0000278 * 60_000 + 0.0005, 2) + 8.30


def test_tiered_first_tier_with_clearing_and_pass_through():
    # 1,000 @ 25: 3.50 + clearing 0.20 + pass-through 3.50 x 0.000738 = 0.0026 -> 3.70
    assert commission("ibkr_tiered", "BUY", 1_000, 25.0) == 3.70
    assert commission("ibkr_tiered", "BUY", 10, 25.0) == 0.35  # the $0.35 minimum (clearing 0.002)
    assert commission("ibkr_tiered", "SELL", 1_000, 25.0) == 3.70 + 0.70 + 0.17  # SEC 0.695 -> 0.70, TAF 0.166 -> 0.17


def test_tiered_finra_pass_through_is_ibkrs_0_000563_of_the_commission():
    # reference/backtesting.md (IBKR's tiered page): FINRA pass-through 0.000563 x the commission.
    # 9,700 @ 50: 33.95 + clearing 1.94 + pass-through 33.95 x (0.000175 + 0.000563) = 0.02506 -> 1.97
    # (with 0.00056 the pass-through was 0.02495 and the fees rounded to 1.96)
    assert commission("ibkr_tiered", "BUY", 9_700, 50.0) == 35.92


def test_none_is_free_and_an_unknown_model_is_refused():
    assert commission("none", "SELL", 1_000, 25.0) == 0.0
    with pytest.raises(ValueError, match="ibkr_fixed"):
        commission("ibkr_flat", "BUY", 100, 25.0)
    with pytest.raises(ValueError, match="ibkr_fixed"):
        commission("ibkr_flat", "BUY", 0, 25.0)
