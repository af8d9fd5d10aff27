"""Order building: a decision becomes broker order legs whose client ids derive from it."""

from __future__ import annotations

from trading_pipeline.core.analysis import Action, OrderLeg, TradeDecision

TICK = 0.01


def client_order_id(decision: TradeDecision) -> str:
    """IBKR's cOID for the entry leg (unique within 24 h at IBKR; ours is unique per decision)."""
    return f"tp-{decision.decision_id}"


def build_legs(decision: TradeDecision, tif: str, closes_position: bool = False) -> list[OrderLeg]:
    """A bracket (limit entry, stop-loss and take-profit children) for an opening trade, a single
    limit order for a trade that closes a position."""
    if not decision.actionable:
        raise ValueError(f"decision {decision.decision_id} is {decision.action.value} with quantity "
                         f"{decision.quantity}: nothing to build")
    side = decision.action.value
    exit_side = Action.SELL.value if decision.action == Action.BUY else Action.BUY.value
    parent = client_order_id(decision)
    entry = OrderLeg(client_order_id=parent, role="entry", side=side, order_type="LMT",
                     quantity=decision.quantity, price=round(decision.entry, 2), tif=tif)
    if closes_position:
        return [entry]
    return [
        entry,
        OrderLeg(client_order_id=f"{parent}-sl", role="stop_loss", side=exit_side, order_type="STP",
                 quantity=decision.quantity, price=round(decision.stop, 2), tif="GTC"),
        OrderLeg(client_order_id=f"{parent}-tp", role="take_profit", side=exit_side, order_type="LMT",
                 quantity=decision.quantity, price=round(decision.targets[0], 2), tif="GTC"),
    ]
