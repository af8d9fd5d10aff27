"""What a fill costs at IBKR Pro (US stocks): the one commission model of the paper broker and the
backtest. Pure: a fill's side, quantity and price in, dollars out.

- `ibkr_fixed` (IBKR's default plan): $0.005 per share, at least $1.00 and at most 1% of the
  trade's value per order (the maximum wins over the minimum: 1,000 shares at $0.25 cost $2.50).
  Exchange and clearing fees are included; on sales the regulatory fees are passed through.
- `ibkr_tiered`: the first monthly-volume tier only (up to 300,000 shares a month): $0.0035 per
  share, at least $0.35 and at most 1% of the trade's value, plus IBKR's clearing fee ($0.0002 per
  share) and the NYSE and FINRA pass-through fees (0.000175 and 0.000563 x the commission), plus the
  same regulatory fees on sales. The cheaper tiers above 300,000 shares a month are not modelled
  (that needs the month's running volume), nor are exchange fees and rebates (they depend on the
  venue and on whether the order adds or removes liquidity): for an account trading under 300,000
  shares a month this is IBKR's tiered rate less the exchange fees.
- `none`: free (a what-if, not a broker).

Regulatory fees on sales (both IBKR plans): SEC 0.0000278 x the value sold and FINRA's Trading
Activity Fee 0.000166 x the shares sold, at most $8.30 per trade; each is rounded up to the cent,
as they are charged. Commissions are rounded to the cent.
"""

from __future__ import annotations

import math

COMMISSION_MODELS = ("ibkr_fixed", "ibkr_tiered", "none")

FIXED_PER_SHARE, FIXED_MINIMUM = 0.005, 1.00
TIERED_PER_SHARE, TIERED_MINIMUM = 0.0035, 0.35
MAXIMUM_SHARE_OF_VALUE = 0.01
TIERED_CLEARING_PER_SHARE = 0.0002
TIERED_NYSE_PASS_THROUGH, TIERED_FINRA_PASS_THROUGH = 0.000175, 0.000563
SEC_FEE_RATE = 0.0000278
FINRA_TAF_PER_SHARE, FINRA_TAF_MAXIMUM = 0.000166, 8.30


def _up_to_cent(amount: float) -> float:
    return math.ceil(round(amount * 100, 6)) / 100  # round(…, 6) first: 0.29 * 100 is 28.999999…


def regulatory_fees(side: str, quantity: float, price: float) -> float:
    """SEC fee and FINRA TAF: charged on sales only."""
    if side != "SELL":
        return 0.0
    quantity = abs(quantity)
    sec = _up_to_cent(SEC_FEE_RATE * quantity * price)
    taf = _up_to_cent(min(FINRA_TAF_PER_SHARE * quantity, FINRA_TAF_MAXIMUM))
    return round(sec + taf, 2)


def commission(model: str, side: str, quantity: float, price: float) -> float:
    """What IBKR charges for one fill (one order) of `quantity` shares at `price`, in dollars,
    regulatory fees included. `model` is one of COMMISSION_MODELS."""
    quantity = abs(quantity)
    if model == "none" or quantity == 0:
        if model not in COMMISSION_MODELS:
            raise ValueError(f"unknown commission model {model!r}: use one of {', '.join(COMMISSION_MODELS)}")
        return 0.0
    value = quantity * price
    if model == "ibkr_fixed":
        base = min(max(FIXED_PER_SHARE * quantity, FIXED_MINIMUM), MAXIMUM_SHARE_OF_VALUE * value)
        return round(round(base, 2) + regulatory_fees(side, quantity, price), 2)
    if model == "ibkr_tiered":
        base = round(min(max(TIERED_PER_SHARE * quantity, TIERED_MINIMUM), MAXIMUM_SHARE_OF_VALUE * value), 2)
        pass_through = base * (TIERED_NYSE_PASS_THROUGH + TIERED_FINRA_PASS_THROUGH)
        clearing = TIERED_CLEARING_PER_SHARE * quantity
        return round(base + round(clearing + pass_through, 2) + regulatory_fees(side, quantity, price), 2)
    raise ValueError(f"unknown commission model {model!r}: use one of {', '.join(COMMISSION_MODELS)}")
