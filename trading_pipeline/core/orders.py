"""Order building: a decision becomes broker order legs whose client ids derive from it."""

from __future__ import annotations

from trading_pipeline.core.analysis import Action, OrderLeg, TradeDecision


def client_order_id(decision: TradeDecision) -> str:
    """IBKR's cOID for the entry leg (unique within 24 h at IBKR; ours is unique per decision)."""
    return f"tp-{decision.decision_id}"


def build_legs(decision: TradeDecision, tif: str) -> list[OrderLeg]:
    """A bracket for an opening trade: the limit entry, and the stop-loss and take-profit children
    (GTC, one-cancels-other at the broker) that protect it from its first fill."""
    if not decision.actionable or decision.closes_position:
        raise ValueError(f"decision {decision.decision_id} is {decision.action.value} with quantity "
                         f"{decision.quantity}{' closing a position' if decision.closes_position else ''}: "
                         "no bracket to build")
    side = decision.action.value
    exit_side = Action.SELL.value if decision.action == Action.BUY else Action.BUY.value
    parent = client_order_id(decision)
    return [
        OrderLeg(client_order_id=parent, role="entry", side=side, order_type="LMT",
                 quantity=decision.quantity, price=decision.entry, tif=tif),
        OrderLeg(client_order_id=f"{parent}-sl", role="stop_loss", side=exit_side, order_type="STP",
                 quantity=decision.quantity, price=decision.stop, tif="GTC"),
        OrderLeg(client_order_id=f"{parent}-tp", role="take_profit", side=exit_side, order_type="LMT",
                 quantity=decision.quantity, price=decision.targets[0], tif="GTC"),
    ]


def exit_leg(decision: TradeDecision, quantity: int) -> OrderLeg:
    """A standalone market exit, for a position with no working stop of the pipeline to turn into one."""
    return OrderLeg(client_order_id=client_order_id(decision), role="exit", side=decision.action.value,
                    order_type="MKT", quantity=quantity, price=None, tif="DAY")


def resize_legs(legs: list[OrderLeg], quantity: int) -> list[OrderLeg]:
    """The same legs for a smaller size (the limits checked again before sending left less room)."""
    return [leg.model_copy(update={"quantity": quantity}) for leg in legs]
