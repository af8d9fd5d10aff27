"""Finding the pipeline's orders at IBKR (mixed into `IBKRBroker`): by cOID in the live orders, by
the IBKR order id saved for it (its own status, its executions), a bracket child through its parent,
the working orders as a list, and whether that list is complete right now.

IBKR's live orders are not always every working order: after hours the list can miss some (ibind
#43), it covers the current brokerage session and day only, and the first answer of a brokerage
session can be empty or incomplete (the client asks it twice: its pre-flight). An order's own status
answers 503 for an order that ended before this session. So an order absent from the list is known
not to be working only when the list was read during the exchange's regular session, in a
brokerage session whose pre-flight of the live orders is done (`order_list_completeness`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from threading import Lock

from trading_pipeline.adapters.broker import (
    FINAL_STATUSES,
    LIST_COMPLETE,
    BrokerOrder,
    OrderListCompleteness,
)
from trading_pipeline.adapters.ibkr.client import IBKRClient, parse_conid, parse_number
from trading_pipeline.adapters.ibkr.errors import IBKRMalformedAnswer, IBKRRequestError
from trading_pipeline.adapters.ibkr.parsing import order_state
from trading_pipeline.core import market_calendar


def _utcnow() -> datetime:  # one place to travel in time in tests
    return datetime.now(UTC)


_CHILD_KIND = {"-sl": ("STP", "STOP", "MKT", "MARKET"), "-tp": ("LMT", "LIMIT")}  # a stop made an exit is MKT
_SIBLING = {"-sl": "-tp", "-tp": "-sl"}


def _status_text(order: dict) -> str:
    """The order's status in IBKR's spelling (`status` in live orders, `order_status` in order
    status and placement answers), whatever the gateway's casing: 'filled' is Filled, final."""
    return order_state(order.get("status") or order.get("order_status"))


def _filled(order: dict, field: str, client_order_id: str) -> float:
    """How much of an order IBKR says filled (`filledQuantity` in live orders, `cum_fill` in order
    status), a number >= 0. Missing or unreadable raises IBKRMalformedAnswer: a fill count of 0
    by default would take a filled order for a working one and size its stop and exit from it."""
    number = parse_number(order.get(field))
    if number is None or number < 0:
        raise IBKRMalformedAnswer(
            f"IBKR's answer for order {order.get('orderId', order.get('order_id'))!r} ({client_order_id}) has no "
            f"usable {field} ({order.get(field)!r}), so what it filled is unknown",
            "check the order in Client Portal; the gateway's answer lacks IBKR's documented fill count. Nothing "
            "was recorded from it; run again once the gateway answers properly")
    return number


def _order_number(order: dict) -> int:
    """IBKR's order id (an int in live orders, a string in placement answers); 0 if unusable."""
    return parse_conid(order.get("orderId")) or 0


def _order_type(order: dict) -> str:
    return str(order.get("origOrderType") or order.get("orderType") or order.get("order_type") or "").upper()


def _execution_order_id(trade: dict) -> str:
    """The IBKR order id an execution belongs to (`order_id`, or `orderId` on some gateways)."""
    value = trade.get("order_id", trade.get("orderId"))
    return "" if value in (None, "") else str(value)

def _fill(trade: dict, client_order_id: str) -> tuple[float, float]:
    """(size, price) of an IBKR execution, both positive numbers: a missing, unparseable, zero or
    negative one must not be booked as a fill of 0 shares or at price 0."""
    values = []
    for field in ("size", "price"):
        number = parse_number(trade.get(field))
        if number is None or number <= 0:
            raise IBKRMalformedAnswer(
                f"IBKR execution {trade.get('execution_id')!r} of {client_order_id} has no usable {field} "
                f"({trade.get(field)!r}), so the fill cannot be recorded",
                "check the execution in Client Portal (Trades); the gateway's trades answer lacks IBKR's documented "
                "positive size and price. Nothing was recorded from it; run again once the gateway answers properly")
        values.append(number)
    return values[0], values[1]



class OrderLookups:
    """The lookups of `IBKRBroker`: it provides the client, the cOID -> IBKR order id map
    (`order_id_for`, `_remember`, `_ids`, `_ids_lock`) and how long one live-orders answer serves."""

    client: IBKRClient
    order_cache_seconds: float
    _ids: dict[str, str]
    _ids_lock: Lock
    _status_failures: dict[str, str]  # cOID -> why its last order/status lookup failed (not IBKR's 503)

    def order_id_for(self, client_order_id: str) -> str | None: ...

    def _remember(self, pairs: dict[str, str]) -> None: ...

    def order_list_completeness(self, client_order_id: str | None = None) -> OrderListCompleteness:
        """Complete when the live orders this broker reads (an answer up to `order_cache_seconds`
        old) were read during the exchange's regular session (core/market_calendar), now and at the
        oldest answer it may reuse, and in a brokerage session whose pre-flight of the live orders
        the client has done (the first answer asked again), from an answer that is whole (not
        still flagged incomplete, not as long as IBKR's maximum); and, for `client_order_id`, when the
        last look at that order's own status did not fail (IBKR's 503, "ended before this
        session", is an answer; a 500, an error body, a malformed answer are not). Else why not,
        and when it will be."""
        if client_order_id is not None:
            with self._ids_lock:
                failed = self._status_failures.get(client_order_id)
            if failed is not None:
                return OrderListCompleteness(False, f"IBKR's status of this order could not be read ({failed}); "
                                                    "decided by a sync that reads it")
        now = _utcnow()
        session = market_calendar.opened_session(now)
        oldest = now - timedelta(seconds=max(self.order_cache_seconds, 0.0))
        if session is None or market_calendar.opened_session(oldest) != session:
            return OrderListCompleteness(False, (
                "outside the exchange's regular session IBKR's live orders can miss working orders; decided by "
                f"the first sync in the next regular session (it opens {market_calendar.describe_next_open(now)})"
                if session is None else
                "the regular session has just opened and the live orders read may be from before it; decided by "
                "the next sync"))
        if partial := self.client.live_orders_partial():
            return OrderListCompleteness(False, f"{partial}; decided by a sync that reads a whole list")
        if not self.client.live_orders_preflight_done():
            return OrderListCompleteness(False, "IBKR's live orders have not been read in this brokerage session "
                                                "yet (its first answer can be empty or incomplete); decided by the "
                                                "next sync")
        return LIST_COMPLETE

    @staticmethod
    def _as_broker_order(client_order_id: str, order: dict) -> BrokerOrder:
        average = parse_number(order.get("avgPrice"))
        return BrokerOrder(client_order_id, str(order.get("orderId")), _status_text(order),
                           _filled(order, "filledQuantity", client_order_id), average or None)

    def _split_child(self, client_order_id: str) -> tuple[str, str] | None:
        for suffix in _CHILD_KIND:
            if client_order_id.endswith(suffix) and len(client_order_id) > len(suffix):
                return client_order_id[: -len(suffix)], suffix
        return None

    def find_order(self, client_order_id: str) -> BrokerOrder | None:
        orders = self.client.live_orders(max_age=self.order_cache_seconds)
        found = self._match_live(client_order_id, orders)
        if found is not None:
            self._remember({client_order_id: str(found.get("orderId"))})
            return self._as_broker_order(client_order_id, found)
        return self._from_status(client_order_id) or self._from_executions(client_order_id)

    def _from_status(self, client_order_id: str) -> BrokerOrder | None:
        """An order the live list does not show, by its own status (`order/status/{id}`), when its
        IBKR order id is known; None when IBKR does not answer it (503: it ended before this
        session). After hours IBKR's live orders can miss working orders (ibind #43): taken for
        gone, a working stop would be passed over and an exit sent beside it, and the two would
        close the position twice (a short) if both fill at the next open."""
        order_id = self.order_id_for(client_order_id)
        if order_id is None:
            return None
        try:  # 503 (once: IBKR's answer for an order that ended before this session): the executions tell
            current = self.client.order_status(order_id, retry_5xx=False)
        except IBKRRequestError as error:
            # Only IBKR's 503 says the order ended; any other failure says nothing about it, and
            # `order_list_completeness` keeps the sync from taking the order for gone.
            with self._ids_lock:
                if error.status == 503 and not isinstance(error, IBKRMalformedAnswer):
                    self._status_failures.pop(client_order_id, None)
                else:
                    self._status_failures[client_order_id] = (
                        f"HTTP {error.status}: {error.problem}" if error.status else error.problem)[:300]
            return None
        with self._ids_lock:
            self._status_failures.pop(client_order_id, None)
        status = _status_text(current)
        if not status:
            return None
        return BrokerOrder(client_order_id, order_id, status, _filled(current, "cum_fill", client_order_id),
                           parse_number(current.get("average_price")) or None,
                           "not in IBKR's live orders; found by its order status")

    def _match_live(self, client_order_id: str, orders: list[dict]) -> dict | None:
        for order in orders:
            if order.get("order_ref") == client_order_id:
                return order
        known = self.order_id_for(client_order_id)
        if known is not None:
            for order in orders:
                if str(order.get("orderId")) == known:
                    return order
        child = self._split_child(client_order_id)
        if child is not None:
            parent_ref, suffix = child
            parent = next((o for o in orders if o.get("order_ref") == parent_ref), None)
            if parent is not None:
                return self._find_child(orders, parent, suffix)
        return None

    def open_orders(self) -> list[BrokerOrder]:
        """Working orders at IBKR (not Filled/Cancelled/Inactive); cOID "" for orders the pipeline
        did not send (e.g. placed by hand), so the portfolio sync can flag them as drift."""
        orders = self.client.live_orders(max_age=self.order_cache_seconds)
        with self._ids_lock:
            by_id = {order_id: coid for coid, order_id in self._ids.items()}
        result = []
        for order in orders:
            if _status_text(order) in FINAL_STATUSES:
                continue
            coid = order.get("order_ref") or by_id.get(str(order.get("orderId")), "")
            if not coid:
                for parent in orders:
                    if parent.get("order_ref"):
                        for suffix in _CHILD_KIND:
                            if self._find_child(orders, parent, suffix) is order:
                                coid = parent["order_ref"] + suffix
                if coid:  # learnt while listed: found again by id after IBKR stops listing it
                    self._remember({str(coid): str(order.get("orderId"))})
            result.append(self._as_broker_order(str(coid), order))
        return result

    @staticmethod
    def _find_child(orders: list[dict], parent: dict, suffix: str) -> dict | None:
        wanted = _CHILD_KIND[suffix]
        # parentId is the parent's IBKR order id; some gateways echo the cOID it was placed with
        parent_keys = {str(v) for v in (parent.get("orderId"), parent.get("order_ref")) if v not in (None, "")}
        typed = [o for o in orders if _order_type(o) in wanted and o is not parent]
        linked = [o for o in typed if str(o.get("parentId") or "") in parent_keys]
        if linked:
            return linked[0]
        if any("parentId" in o for o in orders):
            return None
        # Without a parentId field: the child is the same contract and size, opposite side,
        # submitted after the parent (IBKR numbers a request's orders in sequence).
        candidates = [o for o in typed
                      if parse_conid(o.get("conid")) == parse_conid(parent.get("conid"))
                      and o.get("side") != parent.get("side")
                      and parse_number(o.get("totalSize")) == parse_number(parent.get("totalSize"))
                      and _order_number(o) > _order_number(parent)]
        return min(candidates, key=_order_number) if candidates else None

    def _own_trades(self, client_order_id: str) -> list[dict]:
        """This order's executions of the last 7 days: by `order_ref` (the cOID; entries only) or by
        the IBKR order id saved for the cOID (bracket children carry no order_ref); an execution id
        listed twice counts once."""
        order_id = self.order_id_for(client_order_id)
        own, seen = [], set()
        for t in self.client.trades(days=7, max_age=self.order_cache_seconds):
            if t.get("order_ref") == client_order_id or (order_id is not None and _execution_order_id(t) == order_id):
                execution_id = str(t.get("execution_id") or "").strip()
                if execution_id and execution_id in seen:  # listed twice: one fill, counted once
                    continue
                seen.add(execution_id)
                own.append(t)
        return own

    def _from_executions(self, client_order_id: str) -> BrokerOrder | None:
        """An order IBKR no longer lists (it lists the current day only): filled if it has
        executions; a bracket child without any is cancelled when its sibling filled (one cancels
        the other); else unknown (None)."""
        order_id = self.order_id_for(client_order_id) or ""
        fills = self._own_trades(client_order_id)
        if fills:
            sizes_prices = [_fill(t, client_order_id) for t in fills]
            quantity = sum(size for size, _ in sizes_prices)
            notional = sum(size * price for size, price in sizes_prices)
            return BrokerOrder(client_order_id, order_id or _execution_order_id(fills[0]), "Filled", quantity,
                               notional / quantity if quantity else None,
                               "IBKR no longer lists the order (an earlier day); found by its executions")
        child = self._split_child(client_order_id)
        if child is None or not order_id:
            return None
        parent_ref, suffix = child
        sibling = parent_ref + _SIBLING[suffix]
        if self.order_id_for(sibling) and self._own_trades(sibling):
            return BrokerOrder(client_order_id, order_id, "Cancelled", 0.0, None,
                               f"one-cancels-other: {sibling} filled (IBKR no longer lists this order)")
        return None
