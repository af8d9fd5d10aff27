"""The `ibkr` broker: the pipeline's Broker protocol on the Client Portal gateway.

- `place` sends the legs as ONE request: the entry with its cOID, and (for a bracket) the
  stop-loss and take-profit children carrying `parentId` = the entry's cOID and, as IBKR's spec
  says for bracket children, no cOID of their own; or one standalone exit (a MKT order, no
  price) with its cOID. Sent once, never retried; a duplicate cOID
  answer raises DuplicateOrderError; questions follow the client's allow-list policy. The
  acknowledgement's orders are paired with the legs by position, checked against each order's
  status (side and type).
- `find_order(cOID)` reads the live orders (the empty first answer of a session is re-asked),
  then, for an order whose IBKR order id it saved, that order's own status (after hours IBKR's
  live list can miss working orders), then the last 7 days of executions (an order that filled on
  an earlier day is no longer listed, and its status answers 503). A child leg's cOID is `<entry cOID>-sl` / `<entry cOID>-tp` (core/orders.build_legs);
  IBKR knows children only through their parent (`parentId`: the parent's order id, or on some
  gateways its cOID), so they are found via the parent order while listed, and after a day
  rollover (IBKR lists the current day only) by their saved IBKR order ids in the executions'
  `order_id`/`orderId`. A child that IBKR no longer lists, has no execution, and whose sibling
  filled was cancelled by the bracket's one-cancels-other group. (The lookups are in
  order_lookup.py.)
- `order_list_completeness()`: whether an order `find_order` does not find is not working at IBKR:
  only for live orders read during the exchange's regular session, past the brokerage session's
  pre-flight (order_lookup.py).
- `modify(cOID, order_type=, price=, quantity=)`: the order changed in place (the modify endpoint
  repeats every original field); a bracket child stays in its one-cancels-other group.
- `min_tick(symbol)`: IBKR's `rules.increment` for the resolved contract (0.01 when unknown).
- `executions(cOID)`: IBKR tags an execution with `order_ref` = the cOID (the entry only) and,
  per its newer trades doc, `order_id`. Children are matched by their IBKR order id, which this
  broker learns when placing or looking them up and keeps in a small JSON map (`id_map_path`),
  so a restarted process still attributes a stop-loss fill to its leg.
- `outside_executions(symbols, own cOIDs)`: the executions in the trades list of those symbols that
  are none of the pipeline's orders (no order_ref of its, no IBKR order id saved for its cOIDs): a
  trade made by hand in TWS, reported with cOID "" for the portfolio sync to book as 'manual'.
- `open_orders()`: working orders at IBKR, with the pipeline's cOIDs where known ("" otherwise).
- `account(marks)`: summary + every positions page (cache invalidated first) + IBKR's daily P&L,
  valued at IBKR's own prices (a mark only where IBKR has none). Positions are keyed by the
  strategy's symbol: the position's conid is matched to the contract each of `symbols` resolves
  to (IBKR's ticker for BRK.B is 'BRK B'); a position of no strategy symbol keeps IBKR's ticker.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from pathlib import Path

from trading_pipeline.adapters.broker import FINAL_STATUSES, BrokerExecution, BrokerOrder, DuplicateOrderError
from trading_pipeline.adapters.ibkr.client import IBKRClient, parse_conid, parse_number
from trading_pipeline.adapters.ibkr.errors import (
    IBKRContractError,
    IBKRDuplicateOrder,
    IBKRError,
    IBKRMalformedAnswer,
    IBKRRequestError,
)
from trading_pipeline.adapters.ibkr.execution import status_order_type
from trading_pipeline.adapters.ibkr.order_lookup import OrderLookups, _execution_order_id, _fill, _filled, _status_text
from trading_pipeline.adapters.ibkr.parsing import order_state, parse_flag, parse_side
from trading_pipeline.core.analysis import OrderLeg
from trading_pipeline.core.risk import AccountState, Mark, Position

log = logging.getLogger(__name__)

CHILD_SUFFIX = {"stop_loss": "-sl", "take_profit": "-tp"}  # as core/orders.build_legs names them


def _price(price: float) -> float:
    """A price as sent: already on the contract's tick (the risk engine rounded it to IBKR's
    increment, 0.0001 under $1), so only binary noise is taken off. Rounding to cents here would
    move a sub-cent stop onto its entry, past the gates that checked their distance."""
    return round(float(price), 8)


def _commission(trade: dict, client_order_id: str) -> float:
    """What IBKR charged for an execution (`commission`, a string such as "1.01"); 0 while IBKR has
    not reported it (absent or empty), never a guess from text that is not a number."""
    value = trade.get("commission")
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0.0
    number = parse_number(value)
    if number is None:
        raise IBKRMalformedAnswer(
            f"IBKR execution {trade.get('execution_id')!r} of {client_order_id} has no usable commission "
            f"({value!r}), so the fill's cost cannot be recorded",
            "check the execution in Client Portal (Trades); IBKR documents commission as a number")
    return number



class IBKRBroker(OrderLookups):
    name = "ibkr"

    def __init__(self, client: IBKRClient, order_cache_seconds: float | None = None,
                 id_map_path: str | os.PathLike | None = None, symbols: Iterable[str] = ()):
        self.client = client
        # The strategies' symbols: positions and executions are reported under these, by conid.
        self.symbols = tuple(dict.fromkeys(s.strip() for s in symbols if s.strip()))
        # One live-orders answer serves the lookups of one reconciliation (IBKR allows 1 call per 5 s).
        self.order_cache_seconds = (client.pacing.slow_endpoint_interval if order_cache_seconds is None
                                    else order_cache_seconds)
        self.id_map_path = Path(id_map_path) if id_map_path else None
        self._ids_lock = threading.Lock()
        self._ids: dict[str, str] = self._load_ids()
        self._status_failures: dict[str, str] = {}

    @property
    def account_id(self) -> str:
        """The account this broker trades (DU… paper or U… live): the pre-flight's choice
        (`/iserver/accounts`, IBKR_ACCOUNT_ID), cached by the client for the brokerage session, so
        reading it costs no request once an order was looked up, placed or checked."""
        return self.client.account_id

    # ------------------------------------------------------------------ cOID -> IBKR order id
    def _load_ids(self) -> dict[str, str]:
        if self.id_map_path is None:
            return {}
        try:
            return {str(k): str(v) for k, v in json.loads(self.id_map_path.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError):
            return {}

    def _remember(self, pairs: dict[str, str]) -> None:
        pairs = {c: i for c, i in pairs.items() if c and i and i != "None"}
        with self._ids_lock:
            if all(self._ids.get(c) == i for c, i in pairs.items()):
                return
            if self.id_map_path is not None:
                self._ids.update(self._load_ids())  # another process may have added some
            self._ids.update(pairs)
            if self.id_map_path is not None:
                self.id_map_path.parent.mkdir(parents=True, exist_ok=True)
                handle, temporary = tempfile.mkstemp(dir=self.id_map_path.parent, suffix=".tmp")
                with os.fdopen(handle, "w", encoding="utf-8") as stream:
                    json.dump(self._ids, stream, sort_keys=True)
                os.replace(temporary, self.id_map_path)

    def order_id_for(self, client_order_id: str) -> str | None:
        with self._ids_lock:
            return self._ids.get(client_order_id)

    # ------------------------------------------------------------------ placing
    @staticmethod
    def _check_legs(legs: list[OrderLeg]) -> None:
        if not legs or legs[0].role not in ("entry", "exit"):
            raise ValueError("the first leg must be the entry (or a standalone exit)")
        if legs[0].role == "exit" and len(legs) > 1:
            raise ValueError("a standalone exit is one order, without children")
        parent = legs[0].client_order_id
        for leg in legs[1:]:
            suffix = CHILD_SUFFIX.get(leg.role)
            if suffix is None or leg.client_order_id != parent + suffix:
                raise ValueError(f"child leg {leg.client_order_id!r} ({leg.role}) must be named "
                                 f"{parent}-sl (stop_loss) or {parent}-tp (take_profit)")

    def order_payload(self, conid: int, legs: list[OrderLeg], account_id: str) -> list[dict]:
        parent = legs[0].client_order_id
        orders = []
        for leg in legs:
            order = {"acctId": account_id, "conid": int(conid), "orderType": leg.order_type,
                     "side": leg.side, "quantity": int(leg.quantity), "tif": leg.tif}
            if leg.order_type != "MKT" and leg.price is not None:  # a market order carries no price
                order["price"] = _price(leg.price)
            if leg.role in ("entry", "exit"):
                order["cOID"] = parent
            else:
                order["parentId"] = parent  # bracket child: no cOID of its own (IBKR's rule)
            orders.append(order)
        return orders

    def place(self, symbol: str, legs: list[OrderLeg], reference_price: float,
              placed_at: datetime | None = None) -> list[BrokerOrder]:
        """Send `legs` as one single or bracket order. `reference_price` and `placed_at` are not
        sent: IBKR prices and stamps the order itself (and asks, o163, when the limit is far from
        the market)."""
        self._check_legs(legs)
        contract = self.client.resolve(symbol)
        info = self.client.check_may_trade()
        payload = self.order_payload(contract.conid, legs, info.account_id)
        try:
            answers = self.client.place_orders(payload)
        except IBKRDuplicateOrder as duplicate:
            raise DuplicateOrderError(duplicate.client_order_id) from duplicate
        statuses = self._statuses(answers)
        by_coid = self._checked_pairs(legs, self._pair_answers(legs, answers), answers, statuses)
        self._remember({coid: str(answer.get("order_id")) for coid, answer in by_coid.items()})
        result = []
        for leg in legs:
            answer = by_coid.get(leg.client_order_id)
            if answer is None:
                continue
            order_id = str(answer.get("order_id"))
            status = order_state(answer.get("order_status")) or "Submitted"
            filled, average = 0.0, None
            current = statuses.get(order_id)
            try:
                if current is not None:
                    filled = _filled(current, "cum_fill", leg.client_order_id)
                    status = order_state(current.get("order_status")) or status
                    average = parse_number(current.get("average_price"))
            except IBKRError as error:
                log.warning("status of new order %s unreadable: %s", order_id, error.problem)
            result.append(BrokerOrder(leg.client_order_id, order_id, status, filled, average))
        return result

    def _statuses(self, answers: list[dict]) -> dict[str, dict]:
        """IBKR order id -> its `order/status`, for each order of an acknowledgement (those whose
        status cannot be read are left out)."""
        statuses = {}
        for answer in answers:
            order_id = str(answer.get("order_id"))
            try:
                statuses[order_id] = self.client.order_status(order_id)
            except IBKRError as error:
                log.warning("status of new order %s unavailable: %s", order_id, error.problem)
        return statuses

    @staticmethod
    def _checked_pairs(legs: list[OrderLeg], pairs: dict[str, dict], answers: list[dict],
                       statuses: dict[str, dict]) -> dict[str, dict]:
        """`pairs` (legs -> answers, by position) checked against what each answered order is, by its
        status: its side and type. The legs of a bracket differ in one or the other (entry, stop,
        take-profit), while the order of IBKR's answers is unconfirmed and, without local_order_id,
        names no leg. When one pair does not fit, every leg takes the one answer that fits it; a leg
        without one is left unpaired (a child is learnt from the live orders later, never guessed),
        and without its entry no child is paired."""

        def fits(leg: OrderLeg, answer: dict) -> bool | None:
            status = statuses.get(str(answer.get("order_id"))) or {}
            side, order_type = parse_side(status.get("side")), status_order_type(status)
            if side is None or order_type is None:
                return None  # no status, or one that does not say: a pair is not judged on it
            return side == leg.side and order_type == leg.order_type

        if all(fits(leg, pairs[leg.client_order_id]) is not False for leg in legs if leg.client_order_id in pairs):
            return pairs
        checked = {}
        for leg in legs:
            fitting = [answer for answer in answers if fits(leg, answer)]
            if len(fitting) == 1:
                checked[leg.client_order_id] = fitting[0]
        log.warning("IBKR acknowledged %s's orders out of the request's order; paired by each order's side and "
                    "type: %s", legs[0].client_order_id, ", ".join(sorted(checked)) or "none")
        return checked if legs[0].client_order_id in checked else {}

    @staticmethod
    def _pair_answers(legs: list[OrderLeg], answers: list[dict]) -> dict[str, dict]:
        """IBKR's acknowledgement -> the legs it answers. One answer per leg in the request's order
        (IBKR's bracket acknowledgement shape is unconfirmed), and only the first is certain when the
        count differs. An answer's `local_order_id` echoes the cOID (only the entry or exit has
        one): when it names another position than the first, the order of the answers is not the
        request's, so only the named leg is paired. The children are then learnt from the live
        orders (by parentId), never guessed: a wrong id would later modify or cancel the wrong leg."""
        parent = legs[0].client_order_id
        if any(str(a.get("local_order_id") or "").strip() for a in answers):
            named = next((a for a in answers if str(a.get("local_order_id") or "").strip() == parent), None)
            if named is not answers[0]:
                log.warning("IBKR acknowledged %s out of the request's order (local_order_id); only the order "
                            "naming it is paired", parent)
                return {parent: named} if named is not None else {}
        if len(answers) == len(legs):
            return {leg.client_order_id: answer for leg, answer in zip(legs, answers)}
        log.warning("IBKR acknowledged %d order(s) for %d leg(s) of %s", len(answers), len(legs), parent)
        return {parent: answers[0]}

    def min_tick(self, symbol: str) -> float:
        return self.client.min_tick(self.client.resolve(symbol).conid)

    def symbols_by_conid(self, symbols: Iterable[str] | None = None) -> dict[int, str]:
        """conid -> the strategy symbol whose contract it is, of this broker's symbols (or of `symbols`),
        resolved once per process, cached by the client. A symbol IBKR cannot resolve is left out
        (its orders fail where they are placed)."""
        symbols = self.symbols if symbols is None else tuple(dict.fromkeys(symbols))
        if not symbols:
            return {}
        try:
            contracts = self.client.resolve_many(symbols)
            return {contracts[s.upper()].conid: s for s in symbols}
        except IBKRContractError:
            mapping = {}
            for symbol in symbols:
                try:
                    mapping[self.client.resolve(symbol).conid] = symbol
                except IBKRContractError as error:
                    log.warning("strategy symbol %s has no IBKR contract: %s", symbol, error.problem)
            return mapping

    def cancel(self, client_order_id: str) -> BrokerOrder | None:
        """Cancel the working order with this cOID (polled until IBKR reports it final). An Inactive
        order is cancelled too: IBKR's Inactive is a rejection *or an order held*, which may become
        active again, and the pipeline counts it as done."""
        found = self.find_order(client_order_id)
        if found is None or (found.status in FINAL_STATUSES and found.status != "Inactive"):
            return found
        final = self.client.cancel_order(found.broker_order_id)
        return BrokerOrder(client_order_id, found.broker_order_id, _status_text(final) or "Cancelled",
                           parse_number(final.get("cum_fill")) or found.filled_quantity,
                           parse_number(final.get("average_price")) or found.average_fill_price,
                           "cancelled on request")

    def modify(self, client_order_id: str, *, order_type: str | None = None, price: float | None = None,
               quantity: int | None = None) -> BrokerOrder | None:
        """Change the working order with this cOID in place (`POST .../order/{orderId}`, every
        original field repeated). order_type "MKT" with no price makes a stop a market order; a
        bracket child keeps its one-cancels-other group. None when IBKR does not know the cOID; a
        final order (filled, cancelled) is returned unchanged, without a request (an Inactive one,
        held or rejected, is sent the change: cut to what it filled, it is done);
        IBKROrderRejected (an OrderRejectedError) when IBKR refuses or a question is declined: the
        order then stays as it was."""
        found = self.find_order(client_order_id)
        if found is None or (found.status in FINAL_STATUSES and found.status != "Inactive"):
            return found  # unknown, or already final (filled, cancelled): nothing to change
        changes: dict = {}
        if order_type is not None:
            changes["orderType"] = order_type.upper()
        if price is not None:
            changes["price"] = _price(price)
        if quantity is not None:
            if int(quantity) <= 0:
                raise ValueError(f"a modified quantity must be positive, not {quantity!r}")
            changes["quantity"] = int(quantity)
        if not changes:
            return found
        answers = self.client.modify_order(found.broker_order_id, **changes)
        status = (order_state(answers[0].get("order_status")) or found.status) if answers else found.status
        filled, average = found.filled_quantity, found.average_fill_price
        try:  # what it filled stays the live orders' count unless the status gives one
            current = self.client.order_status(found.broker_order_id)
            filled = _filled(current, "cum_fill", client_order_id)
            status = order_state(current.get("order_status")) or status
            average = parse_number(current.get("average_price"))
        except IBKRError as error:
            log.warning("status of modified order %s unavailable: %s", found.broker_order_id, error.problem)
        return BrokerOrder(client_order_id, found.broker_order_id, status, filled, average,
                           "modified: " + ", ".join(f"{k} {v}" for k, v in changes.items()))

    def executions(self, client_order_id: str) -> list[BrokerExecution]:
        by_conid = self.symbols_by_conid()
        return [self._as_execution(trade, client_order_id,
                                   by_conid.get(parse_conid(trade.get("conid")), str(trade.get("symbol"))))
                for trade in self._own_trades(client_order_id)]

    def outside_executions(self, symbols: Collection[str],
                           own_client_order_ids: Collection[str]) -> list[BrokerExecution]:
        """The executions of `symbols` in IBKR's trades list (the last 7 days) that belong to none of
        the pipeline's orders (`own_client_order_ids`): trades made by hand in TWS or by another
        program. An execution is the pipeline's when its `order_ref` is one of those cOIDs or its
        IBKR order id is one this broker saved for one of them (bracket children carry no
        order_ref). Reported with client_order_id "" (no order of the pipeline's). A trade belongs
        to a strategy symbol by its conid (IBKR's ticker for BRK.B is 'BRK B'); a trade of another
        contract under the same ticker (an option, another listing) is not the symbol's, and without
        a resolved contract only a stock trade under the symbol's own ticker is. The symbols are
        resolved here (cached per process), not only this broker's own. A row under one of the
        symbols' tickers with no usable conid raises IBKRMalformedAnswer: which contract it traded
        is unknown, and it is neither guessed nor dropped without a word."""
        wanted = set(symbols)
        own = set(own_client_order_ids)
        if not wanted:
            return []
        with self._ids_lock:
            own_order_ids = {order_id for coid, order_id in self._ids.items() if coid in own}
        trades = [trade for trade in self.client.trades(days=7, max_age=self.order_cache_seconds)
                  if str(trade.get("order_ref") or "").strip() not in own
                  and _execution_order_id(trade) not in own_order_ids]
        # The symbols asked about whose tickers these trades name are resolved too (once per process):
        # a symbol the pipeline once traded and holds nothing in now is not among this broker's (the
        # sync makes it for the symbols in play), and its ticker alone does not tell an option from it.
        tickers = {str(trade.get("symbol") or "").strip().upper() for trade in trades}
        named = sorted(s for s in wanted if s.upper() in tickers or s.upper().replace(".", " ") in tickers)
        by_conid = self.symbols_by_conid((*self.symbols, *named))
        resolved = set(by_conid.values())
        result, seen = [], set()
        for trade in trades:
            conid = parse_conid(trade.get("conid"))
            symbol = by_conid.get(conid)
            ticker = str(trade.get("symbol") or "").strip()
            if conid is None and ticker in wanted:  # the stock or an option on it: unknown, not guessed
                raise IBKRMalformedAnswer(
                    f"IBKR execution {trade.get('execution_id')!r} of a {ticker} order not the pipeline's has no "
                    f"usable conid ({trade.get('conid')!r}), so which contract it traded is unknown",
                    "check the execution in Client Portal (Trades); IBKR documents conid in the trades list. "
                    "Nothing was recorded from it; run again once the gateway answers properly")
            if symbol is None:
                stock = str(trade.get("sec_type") or "STK").upper() == "STK"
                symbol = ticker if stock and ticker not in resolved else None
            if symbol not in wanted:
                continue
            execution = self._as_execution(trade, "", symbol)
            if execution.execution_id in seen:  # listed twice: one fill, counted once
                continue
            seen.add(execution.execution_id)
            result.append(execution)
        return result

    def _as_execution(self, trade: dict, client_order_id: str, symbol: str) -> BrokerExecution:
        """One row of IBKR's trades list as an execution of `client_order_id` ("" for an order not
        the pipeline's); a row without a usable side, id, size, price or time raises
        IBKRMalformedAnswer (nothing is recorded from it)."""
        of = client_order_id or f"a {symbol} order not the pipeline's"
        side = parse_side(trade.get("side"))
        if side is None:  # a side read wrongly books the fill the wrong way round
            raise IBKRMalformedAnswer(
                f"IBKR execution {trade.get('execution_id')!r} of {of} has no usable side "
                f"({trade.get('side')!r}), so the fill cannot be recorded",
                "check the execution in Client Portal (Trades); IBKR documents side as B or S")
        execution_id = str(trade.get("execution_id") or "").strip()
        if not execution_id:
            raise IBKRMalformedAnswer(
                f"an IBKR execution of {of} has no execution_id, so it cannot be recorded once",
                "check the executions in Client Portal; the gateway's trades answer lacks IBKR's documented "
                "execution_id")
        size, price = _fill(trade, of)
        return BrokerExecution(execution_id, client_order_id, symbol, side, size, price,
                               self._executed_at(trade), _commission(trade, of))

    @staticmethod
    def _executed_at(trade: dict) -> datetime:
        """`trade_time_r` (epoch ms), else `trade_time` (UTC 'YYYYMMDD-HH:mm:ss')."""
        millis = parse_number(trade.get("trade_time_r"))
        if millis is not None and 1e11 < millis < 1e14:  # epoch ms (1973-5138); else trade_time
            return datetime.fromtimestamp(millis / 1000, tz=UTC)
        try:
            return datetime.strptime(str(trade.get("trade_time")), "%Y%m%d-%H:%M:%S").replace(tzinfo=UTC)
        except ValueError:
            raise IBKRMalformedAnswer(
                f"IBKR execution {trade.get('execution_id')!r} has no usable time (trade_time_r="
                f"{trade.get('trade_time_r')!r}, trade_time={trade.get('trade_time')!r})",
                "check the execution in Client Portal; IBKR documents trade_time_r in epoch ms") from None

    # ------------------------------------------------------------------ account
    def account(self, marks: dict[str, Mark], as_of: datetime | None = None) -> AccountState:
        """Equity and cash from the summary, every position (fresh) at IBKR's market price (a mark
        only where IBKR has none), and today's P&L (`_daily_pnl`: unknown, not an error, when IBKR
        cannot say it). Positions are keyed by the strategy's
        symbol (matched by conid), else IBKR's ticker. IBKR knows only the present: `as_of` is
        not used."""
        summary = self.client.summary()
        by_conid = self.symbols_by_conid()
        positions: dict[str, Position] = {}
        for row in self.client.positions(fresh=True):
            conid = parse_conid(row.get("conid"))
            symbol = by_conid.get(conid) or str(row.get("ticker") or row.get("contractDesc") or row.get("conid"))
            quantity = parse_number(row.get("position"))
            if quantity is None:  # a position of unknown size must not pass for none (risk limits read it)
                raise IBKRMalformedAnswer(
                    f"IBKR's position row for {symbol} has no usable position ({row.get('position')!r})",
                    "check the position in Client Portal; the gateway's positions answer lacks IBKR's documented "
                    "numeric position field")
            if quantity == 0:
                continue
            average = parse_number(row.get("avgPrice")) or parse_number(row.get("avgCost"))
            if average is None or average <= 0:  # a cost of 0 would value the position (and its P&L) at 0
                raise IBKRMalformedAnswer(
                    f"IBKR's position row for {symbol} has no usable avgPrice or avgCost "
                    f"({row.get('avgPrice')!r}, {row.get('avgCost')!r})",
                    "check the position in Client Portal; the gateway's positions answer lacks IBKR's documented "
                    "average cost")
            if str(row.get("assetClass") or "STK").upper() == "STK":
                price = parse_number(row.get("mktPrice"))
                if not price or price <= 0:  # IBKR has no price (no market data): the last close, else cost
                    mark = marks.get(symbol)
                    price = mark.price if mark is not None else average
            else:  # options/futures: value them as IBKR does (market value includes the multiplier)
                value = parse_number(row.get("mktValue"))
                if value is None:
                    raise IBKRMalformedAnswer(
                        f"IBKR's position row for {symbol} has no usable mktValue ({row.get('mktValue')!r})",
                        "check the position in Client Portal; a non-stock position is valued at IBKR's mktValue")
                price = value / quantity
            if symbol in positions:  # the same symbol twice (e.g. two listings): merge
                held = positions[symbol]
                total = held.quantity + quantity
                average = (held.average_price * held.quantity + average * quantity) / total if total else 0.0
                quantity = total
                conid = held.conid
            positions[symbol] = Position(quantity, round(average, 4), price, conid)
        daily_pnl, daily_pnl_unknown = self._daily_pnl(bool(positions))

        def amount(key: str) -> float | None:
            """IBKR's {"amount", "value", "isNull", ...} (or a plain number): isNull means no amount
            (its 0.0 is a placeholder); the amount, else the value when only that is filled."""
            value = summary.get(key)
            if not isinstance(value, dict):
                return parse_number(value)
            if parse_flag(value.get("isNull")) is True:
                return None
            number = parse_number(value.get("amount"))
            return number if number is not None else parse_number(value.get("value"))

        equity = amount("netliquidation")
        cash = amount("totalcashvalue")
        if equity is None or cash is None:
            raise IBKRRequestError("IBKR's account summary lacks a usable netliquidation or totalcashvalue "
                                   f"({summary.get('netliquidation')!r}, {summary.get('totalcashvalue')!r})",
                                   "run again; if it persists, check the account summary in Client Portal")
        return AccountState(equity=round(equity, 2), cash=round(cash, 2), positions=positions,
                            daily_pnl=None if daily_pnl is None else round(daily_pnl, 2),
                            daily_pnl_unknown=daily_pnl_unknown)

    def _daily_pnl(self, holding: bool) -> tuple[float | None, str]:
        """Today's P&L, from IBKR's partitioned P&L; with no P&L row and no position open, the
        ledger's realized P&L. When IBKR gives neither: (None, the problem and its fix), never 0 and
        never an error: only the daily-loss gate needs it (it then refuses entries), while exits and
        the sync's protection read this same account."""
        try:
            daily = self.client.pnl()
        except IBKRError as error:  # a 404 (a gateway without the endpoint), an error answer
            return None, f"{error.problem}. Fix: {error.fix}"
        if daily is not None and (dpl := parse_number(daily.get("dpl"))) is not None:
            return dpl, ""
        retry = ("Fix: run again in a few seconds (IBKR's P&L feed starts on first use); if it persists, check "
                 "the account in Client Portal")
        if holding:
            missing = "has no row" if daily is None else f"gives dpl={daily.get('dpl')!r}, not a number"
            return None, (f"IBKR returned no daily P&L for the account (iserver/account/pnl/partitioned {missing}) "
                          f"while positions are open. {retry}")
        try:
            base = self.client.ledger().get("BASE")
        except IBKRError as error:
            return None, (f"IBKR returned no daily P&L row (iserver/account/pnl/partitioned) and the ledger could "
                          f"not be read: {error.problem}. Fix: {error.fix}")
        base = base if isinstance(base, dict) else {}
        if (realized := parse_number(base.get("realizedpnl"))) is None:
            return None, ("IBKR returned no daily P&L for the account (iserver/account/pnl/partitioned has no row, "
                          f"and the ledger's BASE gives realizedpnl={base.get('realizedpnl')!r}). {retry}")
        return realized, ""
