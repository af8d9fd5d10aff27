"""Exactly-once order submission: one decision, one order at the broker, however often it runs.

The sequence survives a retried step, a re-materialized partition and a crash at any point:
1. the database already knows the decision's client order id as sent -> report it, send nothing;
2. the broker already has that id (found by lookup, or answered "duplicate") -> record it, send nothing;
3. otherwise write the legs as "submitting", send once (never retried blindly), record the answer.
A "submitting" row left by a crash is reconciled with the broker before anything is sent.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.broker import FINAL_STATUSES, Broker, BrokerOrder, DuplicateOrderError
from trading_pipeline.adapters.trading_db import ExecutionRow, OrderEventRow, OrderRow
from trading_pipeline.core.analysis import Action, OrderLeg, OrderRecord, TradeDecision
from trading_pipeline.core.orders import client_order_id
from trading_pipeline.errors import ExitOrderStateError, OrderRejectedError, UserError


class OrderDesk:
    def __init__(self, sessions: sessionmaker[Session], broker: Broker):
        self._sessions = sessions
        self._broker = broker

    def _record(self, decision: TradeDecision, legs: list[OrderLeg], answers: dict[str, BrokerOrder],
                status_if_unknown: str, detail: str) -> None:
        with self._sessions() as session:
            for leg in legs:
                row = session.get(OrderRow, leg.client_order_id)
                answer = answers.get(leg.client_order_id)
                status = answer.status if answer else status_if_unknown
                if row is None:
                    row = OrderRow(
                        client_order_id=leg.client_order_id, decision_id=decision.decision_id,
                        parent_client_order_id=None if leg.role == "entry" else legs[0].client_order_id,
                        symbol=decision.symbol, role=leg.role, side=leg.side, order_type=leg.order_type,
                        quantity=leg.quantity, price=leg.price, tif=leg.tif, broker=self._broker.name,
                        status=status)
                    session.add(row)
                    session.flush()  # the event below references this row
                row.status = status
                if answer:
                    row.broker_order_id = answer.broker_order_id
                    row.filled_quantity = answer.filled_quantity
                    row.average_fill_price = answer.average_fill_price
                session.add(OrderEventRow(client_order_id=leg.client_order_id, status=status, detail=detail))
            session.commit()
        if answers:
            self._record_executions(decision.symbol, legs)

    def _record_executions(self, symbol: str, legs: list[OrderLeg]) -> None:
        with self._sessions() as session:
            for leg in legs:
                for execution in self._broker.executions(leg.client_order_id):
                    if session.get(ExecutionRow, execution.execution_id) is None:
                        session.add(ExecutionRow(
                            execution_id=execution.execution_id, client_order_id=leg.client_order_id,
                            symbol=symbol, side=execution.side, quantity=execution.quantity,
                            price=execution.price, broker=self._broker.name,
                            executed_at=execution.executed_at))
            session.commit()

    def _result(self, decision: TradeDecision, legs: list[OrderLeg], status: str, reason: str) -> OrderRecord:
        with self._sessions() as session:
            rows = {r.client_order_id: r for r in session.scalars(
                select(OrderRow).where(OrderRow.decision_id == decision.decision_id))}
        entry = rows.get(legs[0].client_order_id)
        return OrderRecord(
            decision_id=decision.decision_id, symbol=decision.symbol, status=status, reason=reason,
            broker=self._broker.name, client_order_id=legs[0].client_order_id,
            broker_order_ids=[rows[leg.client_order_id].broker_order_id or "" for leg in legs
                              if leg.client_order_id in rows],
            legs=legs,
            filled_quantity=int(entry.filled_quantity) if entry else 0,
            average_fill_price=entry.average_fill_price if entry else None)

    def _ever_sent(self, coid: str) -> bool:
        """Did an earlier attempt send this order (recorded as sent, or known to the broker)?"""
        with self._sessions() as session:
            known = session.get(OrderRow, coid)
            if known is not None and known.status != "submitting":
                return True
        return self._broker.find_order(coid) is not None

    def cancel_exits(self, symbol: str, reason: str) -> list[str]:
        """Cancel the pipeline's working stop-loss and take-profit orders for `symbol`: a position
        being closed must not keep exits that would trade it again (a stop left working after the
        close would open a short). Raises ExitOrderStateError when one cannot be confirmed gone."""
        with self._sessions() as session:
            coids = session.scalars(select(OrderRow.client_order_id).where(
                OrderRow.symbol == symbol, OrderRow.role.in_(("stop_loss", "take_profit")),
                OrderRow.status.not_in(FINAL_STATUSES))).all()
        done = []
        for coid in coids:
            try:
                answer = self._broker.cancel(coid)
            except UserError as error:
                raise ExitOrderStateError(
                    f"could not cancel {coid}, an exit order of the {symbol} position being closed "
                    f"({error.problem}); nothing was sent", error.fix) from None
            if answer is None or answer.status not in FINAL_STATUSES:
                state = "unknown to the broker" if answer is None else f"still {answer.status}"
                raise ExitOrderStateError(
                    f"{coid}, an exit order of the {symbol} position being closed, is {state}: closing now "
                    "could trade the position twice, so nothing was sent",
                    "check the order at the broker (cancel it by hand if it still works), run sync_portfolio, "
                    "then re-run the orders step")
            with self._sessions() as session:
                row = session.get(OrderRow, coid)
                row.status, row.filled_quantity = answer.status, answer.filled_quantity
                session.add(OrderEventRow(client_order_id=coid, status=answer.status, detail=reason))
                session.commit()
            done.append(f"{coid} {answer.status}")
        return done

    def close_once(self, decision: TradeDecision, legs: list[OrderLeg], reference_price: float) -> OrderRecord:
        """Close a position exactly once: first its working exits are cancelled and the position is
        read again (it may have been closed by one of them meanwhile); then the closing order."""
        coid = legs[0].client_order_id
        if not self._ever_sent(coid):
            cancelled = self.cancel_exits(decision.symbol, f"cancelled: decision {decision.decision_id} closes "
                                                           f"the {decision.symbol} position")
            held = self._broker.account({}).positions.get(decision.symbol)
            held_quantity = held.quantity if held else 0.0
            direction = 1 if decision.action == Action.SELL else -1  # SELL closes a long, BUY covers a short
            if direction * held_quantity < decision.quantity:
                return OrderRecord(
                    decision_id=decision.decision_id, symbol=decision.symbol, status="not_sent",
                    broker=self._broker.name, legs=legs,
                    reason=f"the {decision.symbol} position is {held_quantity:g} now, not the {decision.quantity} "
                           f"this decision closes (an exit filled meanwhile?); nothing sent"
                           + (f" (cancelled: {', '.join(cancelled)})" if cancelled else ""))
        return self.submit_once(decision, legs, reference_price)

    def submit_once(self, decision: TradeDecision, legs: list[OrderLeg], reference_price: float) -> OrderRecord:
        coid = client_order_id(decision)
        assert legs and legs[0].client_order_id == coid, "the entry leg must carry the decision's cOID"
        with self._sessions() as session:
            known = session.get(OrderRow, coid)
            known_status = known.status if known else None
        if known_status == "Rejected":
            with self._sessions() as session:
                detail = session.scalars(select(OrderEventRow.detail).where(
                    OrderEventRow.client_order_id == coid).order_by(OrderEventRow.id.desc())).first()
            return self._result(decision, legs, "rejected",
                                f"the broker rejected {coid} earlier; not sent again ({detail})")
        if known_status is not None and known_status != "submitting":
            return self._result(decision, legs, "already_sent",
                                f"decision {decision.decision_id} was already sent as {coid} "
                                f"(status {known_status}); nothing sent again")

        # Unknown to us, or a crash left it "submitting": ask the broker before sending anything.
        existing = {leg.client_order_id: order for leg in legs
                    if (order := self._broker.find_order(leg.client_order_id)) is not None}
        if coid in existing:
            self._record(decision, legs, existing, "unknown", "reconciled: the broker already had this order")
            return self._result(decision, legs, "already_sent",
                                f"the broker already had {coid}; recorded it and sent nothing again")

        self._record(decision, legs, {}, "submitting", "about to send")
        try:
            answers = self._broker.place(decision.symbol, legs, reference_price, placed_at=decision.as_of)
        except OrderRejectedError as rejection:
            self._record(decision, legs, {}, "Rejected", rejection.problem)
            return self._result(decision, legs, "rejected", str(rejection))
        except DuplicateOrderError:
            existing = {leg.client_order_id: order for leg in legs
                        if (order := self._broker.find_order(leg.client_order_id)) is not None}
            self._record(decision, legs, existing, "unknown", "broker answered duplicate cOID; reconciled")
            return self._result(decision, legs, "already_sent",
                                f"the broker answered that {coid} exists; reconciled, sent nothing again")
        self._record(decision, legs, {a.client_order_id: a for a in answers}, "unknown", "broker accepted")
        entry = answers[0]
        status = "filled" if entry.status == "Filled" else "submitted"
        return self._result(decision, legs, status,
                            f"sent {legs[0].side} {legs[0].quantity} {decision.symbol} @ {legs[0].price:.2f} "
                            f"LMT as {coid}; broker status {entry.status}")
