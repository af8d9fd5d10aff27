"""Order requests: placement (single or bracket) with the reply-question loop and its allow-list
policy, live orders, order status, executions, modify and cancel. Orders are sent once, never
retried; an answer that may hide an accepted order is IBKROrderStateUnknown, never a rejection."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from trading_pipeline.adapters.ibkr.errors import (
    IBKRAccountError,
    IBKRDuplicateOrder,
    IBKRError,
    IBKRMalformedAnswer,
    IBKROrderRejected,
    IBKROrderStateUnknown,
    IBKRRequestError,
    IBKRTimeout,
)
from trading_pipeline.adapters.ibkr.parsing import (
    NotJSON,
    describe_body,
    order_state,
    parse_conid,
    parse_flag,
    parse_number,
    parse_side,
)

log = logging.getLogger("trading_pipeline.adapters.ibkr.client")

FINAL_ORDER_STATES = {"Filled", "Cancelled", "Inactive"}
# An order's type as `order/status` spells it -> the code an order is placed with.
_STATUS_ORDER_TYPES = {"LIMIT": "LMT", "LMT": "LMT", "STOP": "STP", "STP": "STP", "MARKET": "MKT", "MKT": "MKT",
                       "STOP_LIMIT": "STOP_LIMIT", "STOP LIMIT": "STOP_LIMIT"}
LIVE_ORDERS_MAX = 1000  # the most orders `GET /iserver/account/orders` lists (IBKR's reference)
_DUPLICATE_RE = re.compile(r"Local order ID=(?P<coid>.+?) is already registered", re.IGNORECASE)


def status_order_type(status: dict) -> str | None:
    """The type of the order an `order/status` answer describes, as orders are placed (LMT, STP,
    MKT, STOP_LIMIT); None when it is missing or not one of those."""
    return _STATUS_ORDER_TYPES.get(str(status.get("order_type") or status.get("orderType") or "").upper())


class OrderRequests:
    """Order requests (mixed into IBKRClient)."""

    def place_orders(self, orders: list[dict]) -> list[dict]:
        """`POST /iserver/account/{acct}/orders` plus the reply loop; returns IBKR's accepted
        answer ([{'order_id', 'order_status', ...}]). Sent once, never retried. Raises
        IBKRDuplicateOrder, IBKROrderRejected (IBKR's text), IBKROrderStateUnknown (transport),
        IBKRLiveAccountRefused (live account without TRADING_ALLOW_LIVE=yes)."""
        info = self.check_may_trade()
        foreign = sorted({str(o["acctId"]) for o in orders if o.get("acctId") not in (None, "", info.account_id)})
        if foreign:
            raise IBKRAccountError(
                f"an order names account {', '.join(foreign)}, but the checked account is {info.account_id}; "
                "nothing was sent", "build orders for the account the client chose (IBKR_ACCOUNT_ID)")
        coid = next((o.get("cOID") for o in orders if o.get("cOID")), "")
        with self._gate.exclusive():  # nothing else may reach the gateway until the reply loop ends
            status, body = self._request("POST", f"/iserver/account/{info.account_id}/orders",
                                         json={"orders": orders}, order=True)
            try:
                return self._confirm_loop(status, body, coid, f"order {coid or '(no cOID)'}")
            finally:
                self._invalidate_order_caches()

    def _confirm_loop(self, status: int, body: Any, coid: str, what: str, modification: bool = False) -> list[dict]:
        """Judge each answer of a placement/modification and its replies. An answer that may hide an
        accepted order (5xx without IBKR's reason, a 2xx that is not JSON or has no order id) is
        IBKROrderStateUnknown, never a rejection: a rejection is final for the order desk, while
        an unknown state is reconciled by cOID before anything is sent again."""
        unknown_fix = ("do not re-send by hand: the next run looks the order up by its cOID at IBKR before sending "
                       "anything (or check the order list in Client Portal)")
        confirmed = 0
        while True:  # each answer is judged, the one after the last confirmation too
            for text in self._strings(body):  # ibind looks for this anywhere in the body; so do we
                duplicate = _DUPLICATE_RE.search(text)
                if duplicate:
                    raise IBKRDuplicateOrder(duplicate.group("coid").strip() or coid, " ".join(text.split())[:300])
            if isinstance(body, NotJSON) or (body is None and status < 400):
                if 400 <= status < 500:
                    raise IBKROrderRejected(f"IBKR refused {what} with HTTP {status} and {describe_body(body)}",
                                            "check the gateway log; nothing was accepted",
                                            ibkr_text=self._error_text(body))
                raise IBKROrderStateUnknown(
                    f"the gateway answered {what} with HTTP {status} and {describe_body(body)} instead of IBKR's "
                    "JSON answer: the order may or may not have been accepted; it was not sent again", unknown_fix)
            items = body if isinstance(body, list) else [body] if isinstance(body, dict) else []
            accepted = [i for i in items if isinstance(i, dict) and i.get("order_id") not in (None, "")]
            text = "" if accepted else (self._error_field(body)
                                        or next((self._error_field(i) for i in items if self._error_field(i)), ""))
            if text:
                raise IBKROrderRejected(
                    f"IBKR rejected {what} (HTTP {status}): {text}",
                    "read IBKR's reason; fix the order or the account's precautionary settings (Client Portal > "
                    "Settings > Order Presets), then run again", ibkr_text=text)
            if status >= 500:  # no error text: the gateway or IBKR's backend failed mid-way
                raise IBKROrderStateUnknown(
                    f"IBKR answered {status} without an explanation to {what}: it may or may not have been "
                    "accepted; it was not sent again", unknown_fix)
            if status >= 400:
                raise IBKROrderRejected(f"IBKR answered {status} to {what} with {describe_body(body)}",
                                        "check the gateway log; nothing was accepted", ibkr_text=describe_body(body))
            questions = [i for i in items if isinstance(i, dict) and i.get("id") not in (None, "")
                         and ("message" in i or "messageIds" in i)]
            if not questions:
                if not accepted:
                    raise IBKROrderStateUnknown(
                        f"IBKR's answer to {what} has neither an order id nor a question ({describe_body(body)})",
                        unknown_fix)
                return accepted
            ids: list[str] = []
            messages: list[str] = []
            for question in questions:  # IBKR asks one at a time; should several come, all must be allowed
                raw_ids = question.get("messageIds")
                raw_ids = raw_ids.split(",") if isinstance(raw_ids, str) else raw_ids if isinstance(raw_ids, list) else []
                ids.extend(str(i).strip() for i in raw_ids if str(i).strip())
                message = question.get("message")
                messages.append(" ".join(str(m) for m in message) if isinstance(message, list) else str(message or ""))
            ids = list(dict.fromkeys(ids))
            message = " ".join(" ".join(messages).split())
            reply_id = str(questions[0]["id"])
            allowed = self.switches().auto_confirm  # the deployment's list now, not when the client was made
            if ids and all(i in allowed for i in ids):
                if confirmed >= self.pacing.reply_rounds:  # declined, not left open for another request to void
                    self._decline(reply_id, ids)
                    raise IBKROrderRejected(
                        f"IBKR kept asking questions about {what} after {confirmed} confirmed replies (the next: "
                        f"{', '.join(ids)}); it was declined, so nothing was "
                        + ("changed" if modification else "placed"),
                        "place the order by hand in Client Portal and review its warnings")
                log.info("IBKR asked %s for %s; auto-confirmed (allow-list)", ",".join(ids), what)
                confirmed += 1
                status, body = self._request("POST", f"/iserver/reply/{reply_id}", json={"confirmed": True},
                                             order=True)
                continue
            self._decline(reply_id, ids)
            raise self._declined(what, tuple(ids), message, allowed, modification)

    def _decline(self, reply_id: str, ids: list[str]) -> None:
        """`POST /iserver/reply/{id}` with confirmed:false, straight away: IBKR throws the order away."""
        try:
            self._request("POST", f"/iserver/reply/{reply_id}", json={"confirmed": False}, order=True)
        except IBKRError as exc:
            log.warning("declining IBKR question %s failed (%s); the order is void anyway", ids, exc.problem)

    @staticmethod
    def _declined(what: str, ids: tuple[str, ...], message: str, allowed: tuple[str, ...],
                  modification: bool) -> IBKROrderRejected:
        """A question outside the allow-list was declined. Say what that means for this order (a
        placement's decision is final: the pipeline never sends it again; a modification leaves
        the order as it was) and what changes the next time."""
        asked = f"IBKR asked to confirm {what} with message {', '.join(ids) or '(no id)'}: {message!r}"
        now = f"IBKR_AUTO_CONFIRM is now {', '.join(allowed) or 'empty'}"
        if modification:
            return IBKROrderRejected(
                f"{asked}. That id is not in IBKR_AUTO_CONFIRM, so the change was declined: the order keeps "
                "working as it was",
                "review the order in Client Portal and change it by hand if it should change; if changes with "
                f"this warning are acceptable without a human, add the id to IBKR_AUTO_CONFIRM ({now}) and "
                "the next change asked for will be confirmed", ibkr_text=message, message_ids=ids)
        return IBKROrderRejected(
            f"{asked}. That id is not in IBKR_AUTO_CONFIRM, so the order was declined and nothing was placed. "
            "This decision stays rejected: the pipeline never sends the same decision twice",
            "to trade it anyway, review it and place it by hand in Client Portal. If orders with this warning "
            f"are acceptable without a human, add the id to IBKR_AUTO_CONFIRM ({now}): the next decision "
            "(not this one) will be sent with the warning confirmed", ibkr_text=message, message_ids=ids)

    def _invalidate_order_caches(self) -> None:
        with self._state:
            self._orders_cache = None
            self._trades_cache = None

    def live_orders(self, max_age: float = 0.0) -> list[dict]:
        """`GET /iserver/account/orders?accountId=...` (1 per 5 s). The first call of a brokerage
        session can come back empty or incomplete, so it is asked twice; later calls trust the
        answer. `max_age` reuses an answer that recent (none of our own order actions since)."""
        account = self.accounts().account_id
        with self._state:
            cached = self._orders_cache
            if cached and max_age > 0 and time.monotonic() - cached[0] <= max_age:
                return cached[1]
        orders: list[dict] = []
        for _ in range(3):
            status, body = self._request("GET", "/iserver/account/orders", params={"accountId": account},
                                         expect=(dict, list))
            body = self._check_error_body("live orders", status, body)
            listed = body.get("orders") if isinstance(body, dict) else body  # documented: {"orders": [...]}
            if listed is not None and not isinstance(listed, list):
                raise self._malformed("live orders: their 'orders'", status, listed, list)
            orders = [o for o in listed or () if isinstance(o, dict)]
            with self._state:  # the session this answer came from (a re-open during the call counts)
                first = self._live_orders_epoch != self._session_epoch
                self._live_orders_epoch = self._session_epoch
            incomplete = isinstance(body, dict) and parse_flag(body.get("snapshot")) is False
            if not (first or incomplete):
                break
        partial = ("IBKR's last live-orders answer still said snapshot=false (incomplete) after 3 asks" if incomplete
                   else f"IBKR's last live-orders answer holds {len(orders)} orders, its documented maximum of "
                        f"{LIVE_ORDERS_MAX}: more may be working" if len(orders) >= LIVE_ORDERS_MAX else "")
        with self._state:
            self._orders_cache = (time.monotonic(), orders)
            self._live_orders_partial = partial
        return orders

    def live_orders_partial(self) -> str:
        """Why the last live-orders answer may lack working orders (still flagged incomplete after
        the re-asks; as long as IBKR's documented maximum), or "" when nothing says so."""
        with self._state:
            return self._live_orders_partial

    def live_orders_preflight_done(self) -> bool:
        """Whether the live orders were read in the brokerage session in use, past its pre-flight
        (the session's first answer, which can be empty or incomplete, asked again): a session
        re-opened since then wants it again."""
        with self._state:
            return self._live_orders_epoch == self._session_epoch

    def order_status(self, order_id: int | str, retry_5xx: bool = True) -> dict:
        """`GET /iserver/account/order/status/{orderId}`. IBKR answers 503 for an order that ended
        before this session: with `retry_5xx=False` that answer is not asked again."""
        self.accounts()  # pre-flight
        status, body = self._request("GET", f"/iserver/account/order/status/{order_id}", expect=dict,
                                     retry_5xx=retry_5xx)
        return self._check_error_body(f"status of order {order_id}", status, body,
                                      fix="IBKR answers 503 for orders that ended before this session")

    def trades(self, days: int = 7, max_age: float = 0.0) -> list[dict]:
        """Executions of the last `days` (1-7) via `GET /iserver/account/trades` (1 per 5 s)."""
        days = max(1, min(int(days), 7))
        self.accounts()
        with self._state:
            cached = self._trades_cache
            if cached and max_age > 0 and cached[1] >= days and time.monotonic() - cached[0] <= max_age:
                return cached[2]
        status, body = self._request("GET", "/iserver/account/trades", params={"days": str(days)}, expect=list)
        rows = [row for row in self._check_error_body("trades", status, body) if isinstance(row, dict)]
        with self._state:
            self._trades_cache = (time.monotonic(), days, rows)
        return rows

    @staticmethod
    def order_fields_from_status(status: dict) -> dict:
        """The original order's fields, rebuilt from `order/status` (a modify must repeat them all).
        A field the modification would have to guess (side, total size, time in force, the price of
        a limit or stop) raises IBKRMalformedAnswer naming it: a GTC stop re-sent as DAY would lapse
        at the close, and `size` is what is left to fill, not the order's size."""
        order_type = status_order_type(status)
        if order_type is None:
            raise IBKRRequestError(f"cannot modify an order of type {status.get('order_type')!r}",
                                   "modify it in Client Portal")

        def unusable(field: str) -> IBKRMalformedAnswer:
            return IBKRMalformedAnswer(
                f"IBKR's status of order {status.get('order_id')!r} has no usable {field} ({status.get(field)!r}), "
                "which a modification must repeat; nothing was sent",
                "modify the order in Client Portal; the gateway's order status lacks IBKR's documented fields")

        side = parse_side(status.get("side"))
        if side is None:
            raise unusable("side")
        conid = parse_conid(status.get("conid"))
        if conid is None:
            raise IBKRMalformedAnswer(f"IBKR's status of the order has no usable conid ({status.get('conid')!r})",
                                      "modify the order in Client Portal, or pass its original fields")
        quantity = parse_number(status.get("total_size"))
        if quantity is None or quantity <= 0:
            raise unusable("total_size")
        tif = str(status.get("tif") or "").strip().upper()
        if not tif:
            raise unusable("tif")
        fields = {"conid": conid, "orderType": order_type, "side": side,
                  "quantity": int(quantity) if float(quantity).is_integer() else quantity, "tif": tif}
        price_field = "limit_price" if order_type in ("LMT", "STOP_LIMIT") else \
            "stop_price" if status.get("stop_price") not in (None, "") else "limit_price"
        if order_type != "MKT":
            price = parse_number(status.get(price_field))
            if price is None or price <= 0:
                raise unusable("stop_price" if order_type == "STP" and price_field == "limit_price" else price_field)
            fields["price"] = price
        if order_type == "STOP_LIMIT":
            aux = parse_number(status.get("stop_price"))
            if aux is None or aux <= 0:
                raise unusable("stop_price")
            fields["auxPrice"] = aux
        return fields

    def modify_order(self, order_id: int | str, original: dict | None = None, **changes) -> list[dict]:
        """`POST /iserver/account/{acct}/order/{orderId}`: one object repeating every original field
        with only `changes` different (a change to None leaves the field out: `orderType="MKT",
        price=None` turns a stop into a market order); the answer may ask questions (same policy as
        placing, with IBKR_AUTO_CONFIRM read now). A refusal raises IBKROrderRejected: the order
        stays as it was."""
        order_id = self._one_order_id(order_id, "modify")
        info = self.check_may_trade()
        fields = dict(original) if original else self.order_fields_from_status(self.order_status(order_id))
        fields.pop("cOID", None)
        fields["acctId"] = info.account_id  # every original field is repeated: placements name the account
        for key, value in changes.items():
            if value is None:
                fields.pop(key, None)
            else:
                fields[key] = value
        if fields.get("orderType") == "MKT":
            fields.pop("price", None)  # a market order has no price; an explicit one would be an instruction
            fields.pop("auxPrice", None)
        with self._gate.exclusive():
            status, body = self._request("POST", f"/iserver/account/{info.account_id}/order/{order_id}",
                                         json=fields, order=True)
            try:
                return self._confirm_loop(status, body, "", f"modification of order {order_id}", modification=True)
            finally:
                self._invalidate_order_caches()

    @staticmethod
    def _one_order_id(order_id: int | str, action: str) -> int:
        """The IBKR order id to put in a modify or cancel path: a positive whole number. IBKR reads
        order id -1 in `DELETE .../order/-1` as every open order, stops included."""
        number = parse_conid(order_id)
        if number is None:
            raise IBKRRequestError(
                f"{action} of order {order_id!r}: that is not an IBKR order id (a positive whole number), so "
                "nothing was sent (IBKR reads -1 as every open order)",
                "find the order by its cOID (the live orders or Client Portal) and use the orderId IBKR lists")
        return number

    def cancel_order(self, order_id: int | str, timeout: float | None = None) -> dict:
        """`DELETE /iserver/account/{acct}/order/{orderId}` (which only says 'Request was submitted'),
        then poll the order status until Cancelled (or another final state). Returns that status."""
        order_id = self._one_order_id(order_id, "cancel")
        account = self.accounts().account_id
        status, body = self._request("DELETE", f"/iserver/account/{account}/order/{order_id}", order=True)
        self._invalidate_order_caches()
        if status < 300 and (body is None or isinstance(body, NotJSON)):
            # the cancel may or may not have arrived: the order's own status tells (polled below)
            log.warning("IBKR answered the cancel of order %s with %s; polling its status", order_id,
                        describe_body(body))
        else:
            self._check_error_body(f"cancel of order {order_id}", status, body,
                                   fix="check the order id (an unknown id answers \"OrderID ... doesn't exist\")")
        deadline = time.monotonic() + (self.pacing.cancel_timeout if timeout is None else timeout)
        last = ""
        while True:
            current = self.order_status(order_id)
            last = order_state(current.get("order_status") or current.get("status"))
            if last in FINAL_ORDER_STATES:
                self._invalidate_order_caches()
                return current
            if time.monotonic() >= deadline:
                raise IBKRTimeout(f"order {order_id} was not cancelled in time (last status {last!r})",
                                  "check it in Client Portal; a cancel of a working order usually completes in "
                                  "seconds, a filled order cannot be cancelled")
            time.sleep(self.pacing.poll_interval)
