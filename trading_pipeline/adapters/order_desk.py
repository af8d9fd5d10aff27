"""Exactly-once order submission and safe exits: one decision, one order at the broker, however
often it runs, and a position that is never left without an order protecting it.

Entries (`submit_once`) survive a retried step, a re-materialized partition and a crash at any point:
1. the database already knows the decision's client order id as sent -> report it, send nothing;
2. the broker already has that id (found by lookup, or answered "duplicate") -> record it, send nothing;
3. otherwise, under the account lock, check the account-wide limits again on a fresh account
   (other runs may have used the room since the decision), write the legs as "submitting", send
   once (never retried blindly), record the answer.
A "submitting" row left by a crash is reconciled with the broker (here, or by the portfolio sync).
A decision another broker or account was sent (its rows in the same trading database: the paper
broker's before TRADING_BROKER=ibkr, the IBKR paper account's (DU…) before the gateway was logged in
to the live one (U…)) is `already_sent` there: never sent to this broker too (`_sent_elsewhere`).
Every lookup of working orders reads this broker's and account's rows only (`of_broker`); every row
written names both (`OrderRow.broker`, `OrderRow.account`).

Exits (`exit_once`) never cancel protection first: the position's working stop-loss (else its
take-profit) on the exit's side is modified into a market order for min(stop size, held size). It
stays in its bracket's one-cancels-other group, so the sibling is cancelled when it fills and the
two can never both fill; if the broker refuses the change, the stop keeps working as it was. Only a
position with no working exit order of the pipeline on that side is closed by a standalone market
order of the held size, and never of more than the pipeline's own fills imply once its stop,
take-profit or exit filled on that side: the broker's positions can lag that fill, and a market
order of the old size would open the other side (`_standalone_exit_size`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from trading_pipeline.adapters.broker import FINAL_STATUSES, Broker, BrokerOrder, DuplicateOrderError, cancel_inactive
from trading_pipeline.adapters.portfolio_sync import DUPLICATE_ANSWER, UNCONFIRMED, own_fills, record_executions
from trading_pipeline.adapters.trading_db import OrderEventRow, OrderRow, account_lock, describe_broker, of_broker
from trading_pipeline.core.analysis import Action, OrderLeg, OrderRecord, RuleCheck, TradeDecision
from trading_pipeline.core.orders import client_order_id, exit_leg, resize_legs
from trading_pipeline.errors import ExitOrderStateError, OrderRejectedError, UserError

# Limits re-checked right before sending: (quantity allowed now, the checks with their numbers).
LimitCheck = Callable[[], tuple[int, list[RuleCheck]]]
EXIT_ORDER_TYPE = "MKT"  # an exit that exits after a gap: a limit at yesterday's close may never fill


class OrderDesk:
    def __init__(self, sessions: sessionmaker[Session], broker: Broker):
        self._sessions = sessions
        self._broker = broker

    # ------------------------------------------------------------------ recording
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
                        parent_client_order_id=None if leg.role in ("entry", "exit") else legs[0].client_order_id,
                        symbol=decision.symbol, role=leg.role, side=leg.side, order_type=leg.order_type,
                        quantity=leg.quantity, price=leg.price, tif=leg.tif, broker=self._broker.name,
                        account=self._broker.account_id, status=status)
                    session.add(row)
                    session.flush()  # the event below references this row
                row.status = status
                row.quantity = leg.quantity  # resized under the account lock before sending
                if answer:
                    row.broker_order_id = answer.broker_order_id
                    row.filled_quantity = answer.filled_quantity
                    row.average_fill_price = answer.average_fill_price
                session.add(OrderEventRow(client_order_id=leg.client_order_id, status=status, detail=detail))
            session.commit()
        if answers:
            record_executions(self._sessions, self._broker, client_order_ids=[leg.client_order_id for leg in legs])

    def _result(self, decision: TradeDecision, legs: list[OrderLeg], status: str, reason: str) -> OrderRecord:
        with self._sessions() as session:
            rows = {r.client_order_id: r for r in session.scalars(
                select(OrderRow).where(OrderRow.client_order_id.in_([leg.client_order_id for leg in legs])))}
        first = rows.get(legs[0].client_order_id)
        return OrderRecord(
            decision_id=decision.decision_id, symbol=decision.symbol, status=status, reason=reason,
            broker=self._broker.name, client_order_id=legs[0].client_order_id,
            broker_order_ids=[rows[leg.client_order_id].broker_order_id or "" for leg in legs
                              if leg.client_order_id in rows],
            legs=legs,
            filled_quantity=int(first.filled_quantity) if first else 0,
            average_fill_price=first.average_fill_price if first else None)

    def _not_sent(self, decision: TradeDecision, reason: str, legs: list[OrderLeg] | None = None) -> OrderRecord:
        return OrderRecord(decision_id=decision.decision_id, symbol=decision.symbol, status="not_sent",
                           reason=reason, broker=self._broker.name, legs=legs or [])

    def _last_detail(self, coid: str) -> str:
        with self._sessions() as session:
            return session.scalars(select(OrderEventRow.detail).where(
                OrderEventRow.client_order_id == coid).order_by(OrderEventRow.id.desc())).first() or ""

    def _sent_elsewhere(self, decision: TradeDecision) -> OrderRecord | None:
        """The decision's orders if another broker, or another account of this broker, was sent them
        (the trading database is shared: a user who ran on paper, then set TRADING_BROKER=ibkr; or
        who traded the IBKR paper account, DU…, then logged the gateway in to the live one, U…): the
        decision was sent, once, there. Sending it here too would be a second order for one
        decision, so nothing is sent and the record names the broker and account that have it (its
        rows are left as they are: that broker's sync, logged in to that account, keeps them)."""
        with self._sessions() as session:
            rows = session.scalars(select(OrderRow).where(
                (OrderRow.decision_id == decision.decision_id) | (OrderRow.exit_decision_id == decision.decision_id),
                ~of_broker(OrderRow, self._broker)).order_by(OrderRow.created_at)).all()
        if not rows:
            return None
        first = next((r for r in rows if r.role in ("entry", "exit")), rows[0])
        states = ", ".join(f"{r.client_order_id} {r.status}" for r in rows)
        there = describe_broker(first.broker, first.account)
        here = describe_broker(self._broker.name, self._broker.account_id)
        when = f"TRADING_BROKER={first.broker} runs again" + (
            f" with the gateway logged in to account {first.account}" if first.account else "")
        return OrderRecord(
            decision_id=decision.decision_id, symbol=decision.symbol, status="already_sent",
            reason=(f"decision {decision.decision_id} was sent to {there}, not this one ({here}): {states}; "
                    f"nothing sent here (one decision, one order). Its orders are checked when {when}; use a "
                    "separate TRADING_DATABASE_URL per broker and account to keep them apart"),
            broker=first.broker, client_order_id=first.client_order_id,
            broker_order_ids=[r.broker_order_id or "" for r in rows], legs=[self._as_leg(r) for r in rows],
            filled_quantity=int(first.filled_quantity or 0), average_fill_price=first.average_fill_price)

    def _known(self, decision: TradeDecision, legs: list[OrderLeg]) -> OrderRecord | None:
        """What an earlier attempt of this decision already did, or None (never sent, or 'submitting')."""
        coid = legs[0].client_order_id
        with self._sessions() as session:
            known = session.get(OrderRow, coid)
            known_status = known.status if known else None
        if known_status == "Rejected":
            return self._result(decision, legs, "rejected",
                                f"the broker rejected {coid} for this decision; it stays rejected and is not sent "
                                f"again ({self._last_detail(coid)}). The next decision for {decision.symbol} is "
                                "sent as usual")
        if known_status is not None and known_status != "submitting":
            return self._result(decision, legs, "already_sent",
                                f"decision {decision.decision_id} was already sent as {coid} "
                                f"(status {known_status}); nothing sent again")
        return None

    def _reconciled(self, decision: TradeDecision, legs: list[OrderLeg]) -> OrderRecord | None:
        """Unknown to us, or a crash left it 'submitting': the broker is asked before anything is sent.
        Legs an earlier attempt wrote keep the size it sent (the limits may have cut it)."""
        with self._sessions() as session:
            sent = {leg.client_order_id: row.quantity for leg in legs
                    if (row := session.get(OrderRow, leg.client_order_id)) is not None}
        legs = [leg.model_copy(update={"quantity": sent[leg.client_order_id]}) if leg.client_order_id in sent else leg
                for leg in legs]
        coid = legs[0].client_order_id
        existing = {leg.client_order_id: order for leg in legs
                    if (order := self._broker.find_order(leg.client_order_id)) is not None}
        if coid not in existing:
            return None
        self._record(decision, legs, existing, "unknown", "reconciled: the broker already had this order")
        return self._result(decision, legs, "already_sent",
                            f"the broker already had {coid}; recorded it and sent nothing again")

    def _send(self, decision: TradeDecision, legs: list[OrderLeg], reference_price: float,
              placed_at: datetime | None, note: str = "") -> OrderRecord:
        coid = legs[0].client_order_id
        self._record(decision, legs, {}, "submitting", "about to send")
        try:
            answers = self._broker.place(decision.symbol, legs, reference_price, placed_at=placed_at)
        except OrderRejectedError as rejection:
            self._record(decision, legs, {}, "Rejected", rejection.problem)
            return self._result(decision, legs, "rejected", str(rejection))
        except DuplicateOrderError:
            existing = {leg.client_order_id: order for leg in legs
                        if (order := self._broker.find_order(leg.client_order_id)) is not None}
            self._record(decision, legs, existing, "unknown", DUPLICATE_ANSWER)
            return self._result(decision, legs, "already_sent",
                                f"the broker answered that {coid} exists; reconciled, sent nothing again")
        self._record(decision, legs, {a.client_order_id: a for a in answers}, "unknown", "broker accepted")
        first = legs[0]
        broker_status = answers[0].status if answers else "unknown"
        price = "MKT" if first.price is None else f"@ {first.price:.2f} {first.order_type}"
        sent = f"sent {first.side} {first.quantity} {decision.symbol} {price} as {coid}{note}"
        if broker_status in FINAL_STATUSES and broker_status != "Filled":  # accepted, then refused at once
            held = f" ({cancel_inactive(self._broker, answers[0]).detail})" if broker_status == "Inactive" else ""
            return self._result(decision, legs, "rejected",
                                f"{sent}; the broker answered {broker_status} at once: it is not working (IBKR: "
                                "a venue or account rejection; its reason is on the order in Client Portal); "
                                f"nothing more is sent for this decision{held}")
        status = "filled" if broker_status == "Filled" else "submitted"
        return self._result(decision, legs, status, f"{sent}; broker status {broker_status}")

    def recorded(self, decision: TradeDecision) -> OrderRecord | None:
        """What the orders of this decision are now, as the trading database knows them (the sync
        keeps it in step with the broker), or None when nothing was sent for it ('submitting' rows
        left by a crash count as not known: the next attempt or the sync reconciles them)."""
        with self._sessions() as session:
            rows = session.scalars(select(OrderRow).where(
                (OrderRow.decision_id == decision.decision_id) | (OrderRow.exit_decision_id == decision.decision_id))
                .order_by(OrderRow.created_at)).all()
        first = next((r for r in rows if r.role in ("entry", "exit") and r.decision_id == decision.decision_id), None)
        # A stop counts as this decision's exit once its conversion is recorded: the intent alone (a
        # crash before or after the modify) is not "sent", or the orders step would never resume it.
        first = first or next((r for r in rows if r.exit_decision_id == decision.decision_id
                               and r.order_type == EXIT_ORDER_TYPE), None)
        if first is None or first.status == "submitting":
            return None
        legs = [self._as_leg(first)] + [self._as_leg(r) for r in rows if r is not first
                                        and r.parent_client_order_id == first.client_order_id]
        states = ", ".join(f"{r.client_order_id} {r.status}" + (f" (filled {r.filled_quantity:g}/{r.quantity})"
                                                                 if r.filled_quantity else "")
                           for r in [first, *[r for r in rows if r is not first
                                              and r.parent_client_order_id == first.client_order_id]])
        status = {"Rejected": "rejected", "Filled": "filled"}.get(first.status, "already_sent")
        detail = f": {self._last_detail(first.client_order_id)}" if status == "rejected" else ""
        if first.broker != self._broker.name or first.account is not None:
            try:  # the account is asked only of a row that names one (IBKR: the cached pre-flight)
                with self._sessions() as session:
                    mine = session.scalar(select(OrderRow.client_order_id).where(
                        OrderRow.client_order_id == first.client_order_id, of_broker(OrderRow, self._broker)))
            except UserError:  # the gateway cannot say its account now: the record is shown without the note
                mine = first.client_order_id
            if mine is None:
                detail += (f" (at {describe_broker(first.broker, first.account)}, not this one, "
                           f"{describe_broker(self._broker.name, self._broker.account_id)}: nothing is sent here "
                           "for this decision)")
        return OrderRecord(
            decision_id=decision.decision_id, symbol=decision.symbol, status=status,
            reason=f"sent earlier for this decision; now {states}{detail}", broker=first.broker,
            client_order_id=first.client_order_id,
            broker_order_ids=[r.broker_order_id or "" for r in rows], legs=legs,
            filled_quantity=int(first.filled_quantity or 0), average_fill_price=first.average_fill_price)

    # ------------------------------------------------------------------ entries
    def submit_once(self, decision: TradeDecision, legs: list[OrderLeg], reference_price: float, *,
                    placed_at: datetime | None = None, limits: LimitCheck | None = None) -> OrderRecord:
        """Send the decision's legs exactly once. `limits` re-checks the account-wide limits on a
        fresh account under the account lock (the size may only shrink); `placed_at` is the
        send time (the broker's own clock when None)."""
        coid = client_order_id(decision)
        assert legs and legs[0].client_order_id == coid, "the first leg must carry the decision's cOID"
        if (known := self._sent_elsewhere(decision) or self._known(decision, legs)) is not None:
            return known
        with account_lock(self._sessions):
            # Again under the lock: a run of the same decision may have sent it while this one waited,
            # and the broker's lookups may answer from a list read before that (IBKR's, cached 5 s).
            if (known := self._sent_elsewhere(decision) or self._known(decision, legs)) is not None:
                return known
            if (reconciled := self._reconciled(decision, legs)) is not None:
                return reconciled
            if limits is not None:
                allowed, checks = limits()
                if allowed < 1:
                    failed = "; ".join(f"{c.rule}: {c.detail}" for c in checks if not c.passed)
                    return self._not_sent(decision, f"the account's limits, checked again right before sending, "
                                                    f"leave no room for this order: {failed}", legs)
                if allowed < legs[0].quantity:
                    legs = resize_legs(legs, allowed)
            return self._send(decision, legs, reference_price, placed_at)

    # ------------------------------------------------------------------ exits
    def _protective_order(self, symbol: str, side: str) -> tuple[OrderRow | None, str | None]:
        """The pipeline's working exit child for `symbol` on the exit's `side` (stop-loss first, else
        take-profit), with its state asked of the broker first. One on the other side (the stop of a
        long flipped by hand into a short, until the sync cancels it) would add to the position.

        Else, as the second value, one whose state is unknown (written without the broker's word,
        its entry filled) and that the broker does not find: it may be working (IBKR's live orders
        can miss working orders after hours), and a standalone exit beside it would close the
        position twice if both fill. The sync confirms it or closes it."""
        with self._sessions() as session:
            rows = session.scalars(select(OrderRow).where(
                of_broker(OrderRow, self._broker), OrderRow.symbol == symbol,
                OrderRow.role.in_(("stop_loss", "take_profit")), OrderRow.side == side,
                OrderRow.status.not_in(FINAL_STATUSES))).all()
            entries_filled = {row.client_order_id: bool(parent is None or parent.filled_quantity)
                              for row in rows for parent in [session.get(OrderRow, row.parent_client_order_id)
                                                             if row.parent_client_order_id else None]}
        unconfirmed = None
        for role in ("stop_loss", "take_profit"):
            for row in rows:
                if row.role != role:
                    continue
                current = self._broker.find_order(row.client_order_id)
                if current is not None and current.status not in FINAL_STATUSES:
                    return row, None
                if current is None and row.status in UNCONFIRMED and entries_filled[row.client_order_id]:
                    unconfirmed = unconfirmed or f"{row.client_order_id} ({row.role} {row.side} {row.quantity}, {row.status})"
        return None, unconfirmed

    def _other_working_order(self, decision: TradeDecision) -> str | None:
        """Another decision's order that opens or closes the symbol's position (an entry, or a
        standalone exit) and may still fill, as the broker says; one the broker does not list
        while the pipeline wrote it without the broker's word may be in flight, and counts too."""
        with self._sessions() as session:
            rows = session.scalars(select(OrderRow).where(
                of_broker(OrderRow, self._broker), OrderRow.symbol == decision.symbol,
                OrderRow.role.in_(("entry", "exit")),
                OrderRow.decision_id != decision.decision_id, OrderRow.status.not_in(FINAL_STATUSES))).all()
        for row in rows:
            current = self._broker.find_order(row.client_order_id)
            if current is not None and current.status not in FINAL_STATUSES:
                return f"{row.client_order_id} ({row.role} {row.side} {row.quantity}, {current.status})"
            if current is None and row.status in ("submitting", "unknown"):
                return (f"{row.client_order_id} ({row.role} {row.side} {row.quantity}, {row.status}: not confirmed "
                        "by the broker yet; run sync_portfolio)")
        return None

    def _exit_in_progress(self, decision: TradeDecision) -> OrderRow | None:
        with self._sessions() as session:
            return session.scalars(select(OrderRow).where(
                of_broker(OrderRow, self._broker), OrderRow.exit_decision_id == decision.decision_id)).first()

    def exit_once(self, decision: TradeDecision, *, placed_at: datetime | None = None,
                  stopped: Callable[[], str | None] | None = None) -> OrderRecord:
        """Close (or reduce) the decision's position exactly once, never leaving it unprotected and
        never trading more than is held. `stopped` says, under the account lock right before
        anything is sent, why nothing may be sent now (a switch turned off meanwhile), or None."""
        standalone = [exit_leg(decision, decision.quantity)]
        if (known := self._sent_elsewhere(decision) or self._known(decision, standalone)) is not None:
            return known
        converted = self._exit_in_progress(decision)
        if converted is not None and converted.order_type == EXIT_ORDER_TYPE:
            return self._result(decision, [self._as_leg(converted)], "already_sent",
                                f"decision {decision.decision_id} already turned {converted.client_order_id} into "
                                f"its exit (status {converted.status}); nothing sent again")
        with account_lock(self._sessions):
            if (elsewhere := self._sent_elsewhere(decision)) is not None:
                return elsewhere
            if (reconciled := self._reconciled(decision, standalone)) is not None:
                return reconciled
            if stopped is not None and (why := stopped()) is not None:
                return self._not_sent(decision, why)
            held = self._broker.account({}).positions.get(decision.symbol)
            direction = 1 if decision.action == Action.SELL else -1  # SELL closes a long, BUY covers a short
            held_quantity = int(direction * held.quantity) if held else 0
            if held_quantity < 1:
                return self._not_sent(decision, f"the {decision.symbol} position is "
                                                f"{held.quantity if held else 0:g} now: nothing to close in this "
                                                "direction (an exit or stop filled meanwhile?); nothing sent")
            if (working := self._other_working_order(decision)) is not None:
                return self._not_sent(decision, f"order {working} for {decision.symbol} may still fill; the exit waits "
                                                "until it fills, expires or is cancelled (a second order could "
                                                "close the position twice and open the other side); nothing sent")
            protective, unconfirmed = (converted, None) if converted is not None else \
                self._protective_order(decision.symbol, standalone[0].side)
            if protective is None and unconfirmed is not None:
                return self._not_sent(decision, f"the {decision.symbol} position's order {unconfirmed} is not "
                                                "confirmed by the broker, which does not list it now (after hours "
                                                "IBKR's live orders can miss working orders): a market exit beside it "
                                                "could close the position twice and open the other side; nothing "
                                                "sent. Run sync_portfolio (it confirms the order or closes it) and the "
                                                "orders step again, or check the order in Client Portal")
            if protective is None:
                quantity, why = self._standalone_exit_size(decision, held_quantity)
                if quantity < 1:
                    return self._not_sent(decision, why)
                legs = [exit_leg(decision, quantity)]
                return self._send(decision, legs, decision.entry or 0.0, placed_at,
                                  note=f" (sized to the {quantity} both agree is held: {why})" if why else "")
            return self._convert_into_exit(decision, protective, held_quantity)

    def _standalone_exit_size(self, decision: TradeDecision, listed: int) -> tuple[int, str]:
        """The size of a standalone market exit, and why it is not the `listed` held quantity ("" when
        it is). The broker's positions can lag a fill by seconds: a stop that filled at a gap is no
        longer working (so there is nothing to convert) while the positions may still list what it
        sold, and a market order of that size would open the other side. So the pipeline's own
        orders for the symbol are brought up to date with the broker first (states, fill counts,
        executions); when its closing orders (stop-loss, take-profit, exit) filled on this exit's
        side and the position its fills imply (`own_fills`: since the entry that opened its latest
        position in the symbol) is smaller than the listed one, the two disagree, and
        the exit is the smaller of them: what both agree is held. Nothing is sent when that is
        nothing.

        Why the smaller of the two, rather than refusing whenever they disagree: the part both agree
        on is held under either reading (a list lagging the pipeline's fills, or shares bought
        outside it), and it is the pipeline's own position, possibly without a stop now: leaving it
        open is the greater risk. Only the disputed rest waits; sent, it could open the other side,
        while waiting costs seconds (the list catches up and the next exit decision reads what is
        held). Without a closing fill of the pipeline on this side no fill of its own can be missing
        from the list: a position opened by hand is closed at the listed size, as before. The price
        of the guard: shares bought by hand after the pipeline closed its own position in the symbol
        look like a lagging list and are not exited; the reason says to close them at the broker."""
        symbol, side = decision.symbol, "SELL" if decision.action == Action.SELL else "BUY"
        direction = 1 if side == "SELL" else -1  # what this exit closes is positive
        fills = own_fills(self._sessions, self._broker, symbol)
        own = direction * sum(fill.signed for fill in fills)
        closing = [fill for fill in fills if fill.role in ("stop_loss", "take_profit", "exit") and fill.side == side]
        if not closing or own >= listed:
            return listed, ""
        quantity = max(0, min(listed, int(own)))
        filled = ", ".join(f"{fill.client_order_id} ({fill.role.replace('_', '-')}) {fill.side} {fill.quantity:g}"
                           for fill in closing[-3:])
        why = (f"the broker lists {listed} {symbol} to close, but the pipeline's own orders imply {own:g}: "
               f"{filled} filled, which the broker's positions may not show yet (they can lag a fill by seconds)")
        if quantity >= 1:
            return quantity, why
        other = "short" if side == "SELL" else "long"
        return 0, (f"{why}; a market {side} of {listed} could then open a {other} position, so nothing was sent. "
                   "Once the broker's positions show the fill, the next exit decision reads what is held; if the "
                   f"{listed} {symbol} were {'bought' if side == 'SELL' else 'sold short'} outside the pipeline, "
                   "close them at the broker")

    def _convert_into_exit(self, decision: TradeDecision, row: OrderRow, held_quantity: int) -> OrderRecord:
        coid = row.client_order_id
        # What the order filled by now, as the broker says: the books lag (no sync since an election,
        # or a crash after an earlier conversion), and a total sized on them leaves shares unclosed
        # once the order completes and its sibling is cancelled: a position without protection.
        current = self._broker.find_order(coid)
        filled = current.filled_quantity if current is not None else (row.filled_quantity or 0)
        remaining = int(row.quantity - filled)
        quantity = min(remaining, held_quantity)  # never more than is held: no flip into the other side
        with self._sessions() as session:  # the intent first: a re-run finds it, repeats the modify
            stored = session.get(OrderRow, coid)
            stored.exit_decision_id = decision.decision_id
            session.add(OrderEventRow(client_order_id=coid, status=stored.status,
                                      detail=f"turning into a {EXIT_ORDER_TYPE} exit of {quantity} for decision "
                                             f"{decision.decision_id}"))
            session.commit()
        try:
            # The order's total size at the broker: what it already filled plus what is left to exit.
            total = int(quantity + filled)
            answer = self._broker.modify(coid, order_type=EXIT_ORDER_TYPE, price=None,
                                         quantity=total if quantity != remaining else None)
        except OrderRejectedError as refusal:
            with self._sessions() as session:
                stored = session.get(OrderRow, coid)
                stored.exit_decision_id = None
                session.add(OrderEventRow(client_order_id=coid, status=stored.status,
                                          detail=f"exit refused by the broker, the {row.role} keeps working as it "
                                                 f"was: {refusal.problem}"))
                session.commit()
            return self._result(decision, [self._as_leg(row)], "rejected",
                                f"the broker refused to turn {coid} into a market exit ({refusal.problem}); the "
                                f"{row.role} keeps protecting the position unchanged. Fix: {refusal.fix}")
        if answer is None:
            raise ExitOrderStateError(
                f"{coid}, the {row.role} of the {decision.symbol} position, is unknown to the broker: the exit was "
                "not sent (a standalone sale could close the position twice if the order still works)",
                "check the order at the broker, run sync_portfolio, then re-run the orders step")
        with self._sessions() as session:
            stored = session.get(OrderRow, coid)
            stored.order_type, stored.price, stored.quantity = EXIT_ORDER_TYPE, None, total
            stored.status, stored.filled_quantity = answer.status, answer.filled_quantity
            stored.broker_order_id = stored.broker_order_id or answer.broker_order_id
            session.add(OrderEventRow(client_order_id=coid, status=answer.status,
                                      detail=f"converted into a {EXIT_ORDER_TYPE} exit of {quantity} by decision "
                                             f"{decision.decision_id}"))
            session.commit()
            leg = self._as_leg(stored)
        record_executions(self._sessions, self._broker, client_order_ids=[coid])
        note = "" if quantity == held_quantity else f" (the position is {held_quantity}; the rest is not the pipeline's)"
        if quantity != remaining:
            note += self._resize_siblings(row, quantity)
        return self._result(decision, [leg], "submitted",
                            f"turned {coid} ({row.role}) into a {EXIT_ORDER_TYPE} exit: {row.side} {quantity} "
                            f"{decision.symbol}{note}; it stays one-cancels-other with its sibling; broker status "
                            f"{answer.status}")

    def _resize_siblings(self, row: OrderRow, quantity: int) -> str:
        """The exit was made smaller than its bracket: its one-cancels-other siblings are cut to the
        same size, or what is left of them once the exit fills works on with no position behind it
        (a take-profit that later sells short). Returns a note for the reason text."""
        if row.parent_client_order_id is None:
            return ""
        with self._sessions() as session:
            siblings = session.scalars(select(OrderRow).where(
                of_broker(OrderRow, self._broker), OrderRow.parent_client_order_id == row.parent_client_order_id,
                OrderRow.client_order_id != row.client_order_id,
                OrderRow.status.not_in(FINAL_STATUSES))).all()
        notes = []
        for sibling in siblings:
            if sibling.quantity - (sibling.filled_quantity or 0) <= quantity:
                continue
            total = int((sibling.filled_quantity or 0) + quantity)
            try:
                answer = self._broker.modify(sibling.client_order_id, quantity=total)
            except OrderRejectedError as refusal:
                answer, problem = None, refusal.problem
            else:
                problem = "the broker does not know it"
            with self._sessions() as session:
                stored = session.get(OrderRow, sibling.client_order_id)
                if answer is not None and answer.status in FINAL_STATUSES:  # done meanwhile: left as it is
                    stored.status = answer.status
                    detail = f"{answer.status} before it could be resized with its sibling {row.client_order_id}"
                elif answer is not None:
                    stored.quantity, stored.status = total, answer.status
                    detail = f"resized to {quantity} with its sibling {row.client_order_id}, made an exit of {quantity}"
                else:
                    detail = (f"NOT resized to {quantity} with its sibling {row.client_order_id} ({problem}): "
                              f"resize or cancel it at the broker before the exit fills")
                    notes.append(f"; {sibling.client_order_id} {detail}")
                session.add(OrderEventRow(client_order_id=sibling.client_order_id, status=stored.status,
                                          detail=detail))
                session.commit()
        return "".join(notes)

    @staticmethod
    def _as_leg(row: OrderRow) -> OrderLeg:
        return OrderLeg(client_order_id=row.client_order_id, role=row.role, side=row.side,
                        order_type=row.order_type, quantity=row.quantity, price=row.price, tif=row.tif)
