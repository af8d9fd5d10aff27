"""The IBKR gateway emulator's endpoints: routing (auth states, pre-flights) and one handler per
emulated Client Portal endpoint, answering as the documented gateway does."""

from __future__ import annotations

import re
import time
import uuid
import zlib
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from trading_pipeline.adapters.ibkr import history as hist
from trading_pipeline_tests.emulators.ibkr_gateway_state import (
    MARKET_WARNING,
    PREFLIGHT_NEEDED,
    PREFLIGHT_NEEDED_ORDERS,
    PRICE_WARNING,
    STOP_WARNING,
    EmuOrder,
    _daily_bars,
    _error,
    _json,
    _period_start,
    _weekly_bars,
)

_TYPE_NAMES = {"LMT": ("Limit", "LIMIT"), "STP": ("Stop", "STOP"), "MKT": ("Market", "MARKET")}


class GatewayEndpoints:
    """Endpoint handlers (mixed into IBKREmulator; `self.state` and `self.config` are its own)."""

    def _dispatch_locked(self, method: str, path: str, query: dict, body):
        if path == "/iserver/marketdata/history" and query.get("conid", "").isdigit():
            conid = int(query["conid"])  # generate the bars outside the state lock (cached afterwards)
            _daily_bars(conid, self.config.seed)
            if query.get("bar") == "1w":
                _weekly_bars(conid, self.config.seed, self.config.weekly_anchor)
        with self.state.lock:
            return self._dispatch(method, path, query, body)

    def _dispatch(self, method: str, path: str, query: dict, body):
        s = self.state
        s.advance()
        if not path.startswith("/iserver/reply/") and s.pending:
            s.voided.update(s.pending)  # any other request voids a pending question (IBKR: reply straight away)
            s.pending.clear()
        if s.auth_state == "logged_out":
            return _json({"error": "not authenticated"}, 401) if path != "/tickle" else _json(None, 401)
        session_paths = ("/iserver/auth/status", "/iserver/auth/ssodh/init", "/tickle", "/logout",
                         "/sso/validate", "/iserver/reauthenticate")
        if path.startswith("/iserver") and path not in session_paths and s.auth_state != "authenticated":
            return _json({"error": "Bad Request: no bridge", "statusCode": 400}, 400)
        if s.auth_state == "expired" and path.startswith(("/portfolio", "/trsrv")):
            return _json({"error": "not authenticated"}, 401)
        order_path = any(method == m and re.fullmatch(p, path) for m, p in PREFLIGHT_NEEDED_ORDERS)
        if (path.startswith(PREFLIGHT_NEEDED) or order_path) and s.preflight_epoch != s.session_epoch:
            return _error("Please query /accounts first", 400)
        routes = [
            ("POST", r"/iserver/auth/status", self.auth_status),
            ("POST", r"/iserver/auth/ssodh/init", self.ssodh_init),
            ("POST", r"/iserver/reauthenticate", self.reauthenticate),
            ("GET|POST", r"/tickle", self.tickle),
            ("POST", r"/logout", self.logout),
            ("GET", r"/sso/validate", self.sso_validate),
            ("GET", r"/iserver/accounts", self.iserver_accounts),
            ("POST", r"/iserver/account", self.switch_account),
            ("GET", r"/trsrv/stocks", self.stocks),
            ("GET", r"/iserver/contract/(?P<conid>\d+)/info-and-rules", self.info_and_rules),
            ("GET", r"/iserver/marketdata/history", self.history),
            ("GET", r"/iserver/marketdata/snapshot", self.snapshot),
            ("POST", r"/iserver/marketdata/unsubscribe", self.unsubscribe),
            ("GET", r"/portfolio/accounts", self.portfolio_accounts),
            ("POST", r"/portfolio/(?P<acct>[^/]+)/positions/invalidate", self.invalidate),
            ("GET", r"/portfolio/(?P<acct>[^/]+)/positions/(?P<page>\d+)", self.positions),
            ("GET", r"/portfolio/(?P<acct>[^/]+)/summary", self.summary),
            ("GET", r"/portfolio/(?P<acct>[^/]+)/ledger", self.ledger),
            ("GET", r"/iserver/account/pnl/partitioned", self.pnl),
            ("POST", r"/iserver/account/(?P<acct>[^/]+)/orders", self.place),
            ("POST", r"/iserver/reply/(?P<reply>[^/]+)", self.reply),
            ("GET", r"/iserver/account/orders", self.live_orders),
            ("GET", r"/iserver/account/order/status/(?P<order>\d+)", self.order_status),
            ("POST", r"/iserver/account/(?P<acct>[^/]+)/order/(?P<order>-?\d+)", self.modify),
            ("DELETE", r"/iserver/account/(?P<acct>[^/]+)/order/(?P<order>-?\d+)", self.cancel),
            ("GET", r"/iserver/account/trades", self.trades),
        ]
        for methods, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and method in methods.split("|"):
                return handler(query=query, body=body, **match.groupdict())
        return _json({"error": f"emulator: {method} {path} is not emulated"}, 404)

    # session
    def _auth_body(self) -> dict:
        state = self.state.auth_state
        return {"authenticated": state == "authenticated", "competing": state == "competing",
                "connected": state in ("authenticated", "connected", "competing"), "message": "",
                "MAC": "02:00:00:00:00:01", "fail": "",
                "serverInfo": {"serverName": "Emulator1", "serverVersion": "Build 10.25.0m, emulator"},
                "hardware_info": "emulator|02:00:00:00:00:01"}

    def auth_status(self, **_):
        return _json(self._auth_body())

    def ssodh_init(self, body, **_):
        s = self.state
        if not (body or {}).get("publish"):
            return _error("publish must be true", 500)
        opens = s.auth_state == "connected" or (s.auth_state == "competing" and (body or {}).get("compete"))
        if opens and not self.config.init_fails:
            s.auth_state = "authenticated"
            s.new_session()
        return _json(self._auth_body())

    def reauthenticate(self, **_):
        if self.state.auth_state == "connected" and not self.config.init_fails:
            self.state.auth_state = "authenticated"
            self.state.new_session()
        return _json({"message": "triggered"})

    def tickle(self, **_):
        state = self.state.auth_state
        return _json({"session": uuid.uuid4().hex, "ssoExpires": 585695, "collission": state == "competing",
                      "userId": 99996016, "hmds": {"error": "no bridge"}, "iserver": {"authStatus": self._auth_body()}})

    def logout(self, **_):
        self.state.auth_state = "logged_out"
        return _json({"status": True})

    def sso_validate(self, **_):
        return _json({"USER_ID": 99996016, "USER_NAME": "emulator", "RESULT": True, "AUTH_TIME": int(time.time() * 1000),
                      "EXPIRES": 585695, "LOGIN_TYPE": 1 if self.config.live else 2, "IS_MASTER": False})

    def iserver_accounts(self, **_):
        s = self.state
        s.preflight_epoch = s.session_epoch
        accounts = s.accounts
        return _json({"accounts": accounts,
                      "acctProps": {a: {"hasChildAccounts": False, "supportsCashQty": True, "supportsFractions": True,
                                        "allowCustomerTime": False} for a in accounts},
                      "aliases": {a: a for a in accounts}, "selectedAccount": accounts[0],
                      "isPaper": not self.config.live, "isFT": False, "sessionId": uuid.uuid4().hex,
                      "serverInfo": {"serverName": "Emulator1", "serverVersion": "emulator"}})

    def switch_account(self, body, **_):
        account = (body or {}).get("acctId")
        if account not in self.state.accounts:
            return _error(f"account {account} not found", 400)
        return _json({"set": True, "acctId": account})

    # contracts
    def stocks(self, query, **_):
        symbols = [x for x in (query.get("symbols") or "").split(",") if x]
        return _json({symbol: self.state.instruments(symbol) for symbol in symbols})

    def info_and_rules(self, conid, **_):
        contract = self.state.contracts.get(int(conid))
        if contract is None:
            return _error(f"no contract for conid {conid}", 500)
        symbol, exchange, _, name = contract
        increment = self.state.tick_of(int(conid))
        digits = max(0, -int(np.floor(np.log10(increment) + 1e-9))) if increment < 1 else 0
        return _json({"con_id": int(conid), "symbol": symbol, "company_name": name, "instrument_type": "STK",
                      "exchange": "SMART", "listing_exchange": exchange, "currency": "USD", "local_symbol": symbol,
                      "r_t_h": True, "rules": {
                          "orderTypes": ["limit", "stop", "market", "stop_limit", "trailing_stop"],
                          "tifTypes": ["DAY/o,a", "GTC/o,a", "IOC/o,a"], "increment": increment,
                          "incrementDigits": digits, "incrementRules": [{"lowerEdge": 0.0, "increment": increment}],
                          "sizeIncrement": 1, "canTradeAcctIds": list(self.state.accounts), "defaultSize": 100}})

    # market data
    def history(self, query, **_):
        s = self.state
        try:
            conid = int(query.get("conid", ""))
        except ValueError:
            return _error("conid is required", 500)
        period, bar = query.get("period", "1w"), query.get("bar", "")
        try:
            hist.validate_history_request(period, bar)
        except Exception as exc:  # noqa: BLE001 - the emulator answers like the gateway
            return _error(f"Invalid period/bar: {getattr(exc, 'problem', exc)}", 500)
        if bar not in ("1d", "1w"):
            return _error(f"emulator: bar {bar} is not emulated (1d and 1w are)", 500)
        symbol, _, is_us, name = s.contracts.get(conid, (None, None, True, ""))
        if symbol is None:
            return _error("No data.")
        if symbol in self.config.nodata_symbols:
            return _error("No data.")
        daily = _daily_bars(conid, self.config.seed)
        bars = daily if bar == "1d" else _weekly_bars(conid, self.config.seed, self.config.weekly_anchor)
        now = pd.Timestamp.now(tz="UTC")
        anchor = now
        if query.get("startTime"):
            try:
                anchor = pd.Timestamp(datetime.strptime(query["startTime"], "%Y%m%d-%H:%M:%S"), tz="UTC")
            except ValueError:
                return _error("startTime must be YYYYMMDD-HH:mm:ss", 500)
        count, unit = hist.parse_period(period)
        begin = _period_start(anchor, count, unit, daily.index)
        window = bars.loc[(bars.index >= begin) & (bars.index < anchor) & (bars.index <= now)].tail(hist.MAX_POINTS)
        factor = 100.0 if is_us else 1.0
        volumes = (window["v"].to_numpy() / factor).round(2)
        stamps = window.index.as_unit("ms").asi8
        data = [{"o": o, "c": c, "h": h, "l": l, "v": v, "t": t} for o, c, h, l, v, t in zip(
            window["o"].tolist(), window["c"].tolist(), window["h"].tolist(), window["l"].tolist(),
            volumes.tolist(), stamps.tolist())]
        if not data:
            return _error("No data.")
        high_t = window["h"].idxmax()
        low_t = window["l"].idxmin()
        minutes = lambda t: int((t - window.index[0]).total_seconds() // 60)
        return _json({
            "serverId": str(zlib.crc32(f"{conid}{period}{bar}".encode()) % 100000), "symbol": symbol, "text": name,
            "priceFactor": 100, "chartAnnotations": "", "startTime": window.index[0].strftime("%Y%m%d-%H:%M:%S"),
            "high": f"{round(window['h'].max() * 100)}/{window.loc[high_t, 'v'] / factor:.2f}/{minutes(high_t)}",
            "low": f"{round(window['l'].min() * 100)}/{window.loc[low_t, 'v'] / factor:.2f}/{minutes(low_t)}",
            "timePeriod": period, "barLength": 86400 if bar == "1d" else 604800, "mdAvailability": "S",
            "mktDataDelay": 0, "outsideRth": query.get("outsideRth") == "true", "volumeFactor": 1,
            "priceDisplayRule": 1, "priceDisplayValue": "2", "negativeCapable": False, "messageVersion": 2,
            "data": data, "points": len(data) - 1, "travelTime": 7})

    def snapshot(self, query, **_):
        s = self.state
        conids = [int(c) for c in (query.get("conids") or "").split(",") if c.strip()]
        fields = [f for f in (query.get("fields") or "").split(",") if f]
        rows = []
        for conid in conids:
            if conid not in s.snapshot_warm:  # the first call only opens the stream
                s.snapshot_warm.add(conid)
                rows.append({"conid": conid, "conidEx": str(conid)})
                continue
            symbol = s.symbol_of(conid)
            last = s.price(conid)
            prior = float(_daily_bars(conid, self.config.seed)["c"].iloc[-2])
            values = {"31": (f"C{prior:.2f}" if symbol in self.config.prior_close_symbols else f"{last:.2f}"),
                      "55": symbol, "84": f"{last - 0.01:.2f}", "86": f"{last + 0.01:.2f}", "88": "1,300",
                      "85": "600", "7059": "100", "7762": "12345678", "87": "12.3M", "7295": f"{prior:.2f}",
                      "7741": f"{prior:.2f}", "6509": "RpB"}
            row = {"conid": conid, "conidEx": str(conid), "server_id": "q1", "_updated": int(time.time() * 1000),
                   "6119": "q1"}
            row.update({f: values[f] for f in fields if f in values})
            rows.append(row)
        return _json(rows)

    def unsubscribe(self, body, **_):
        conid = int((body or {}).get("conid", 0))
        if conid not in self.state.snapshot_warm:
            return _error("unknown", 500)
        self.state.snapshot_warm.discard(conid)
        return _json({"success": True})

    # portfolio
    def _portfolio_gate(self, acct: str):
        s = self.state
        if s.portfolio_epoch != s.session_epoch:
            return _error("Please query /portfolio/accounts first", 400)
        if acct not in s.accounts:
            return _error(f"account {acct} not found", 400)
        return None

    def portfolio_accounts(self, **_):
        s = self.state
        s.portfolio_epoch = s.session_epoch
        return _json([{"id": a, "accountId": a, "accountVan": a, "currency": "USD", "type": "DEMO",
                       "tradingType": "STKNOPT", "clearingStatus": "O", "faclient": False, "brokerageAccess": True,
                       "desc": a} for a in s.accounts])

    def invalidate(self, acct, **_):
        if (gate := self._portfolio_gate(acct)) is not None:
            return gate
        self.state.positions_cache = None
        return _json({"message": "success"})

    def positions(self, acct, page, **_):
        if (gate := self._portfolio_gate(acct)) is not None:
            return gate
        s = self.state
        if s.positions_cache is None:  # the gateway serves a cached copy until invalidated
            s.positions_cache = s.build_positions()
        rows = s.positions_cache if s.positions_lagging is None else s.positions_lagging
        page = int(page)
        return _json(rows[page * 100:(page + 1) * 100])

    def summary(self, acct, **_):
        if (gate := self._portfolio_gate(acct)) is not None:
            return gate
        s = self.state
        stamp = int(time.time() * 1000)

        def value(amount):
            return {"amount": amount, "currency": "USD", "isNull": False, "timestamp": stamp, "value": None,
                    "severity": 0}
        nl = s.net_liquidation()
        return _json({"netliquidation": value(nl), "totalcashvalue": value(round(s.cash, 2)),
                      "availablefunds": value(round(s.cash, 2)), "buyingpower": value(round(4 * s.cash, 2)),
                      "equitywithloanvalue": value(nl), "excessliquidity": value(round(s.cash, 2)),
                      "initmarginreq": value(0.0), "maintmarginreq": value(0.0),
                      "accountcode": {"amount": 0.0, "currency": None, "isNull": False, "timestamp": stamp,
                                      "value": acct, "severity": 0}})

    def ledger(self, acct, **_):
        if (gate := self._portfolio_gate(acct)) is not None:
            return gate
        s = self.state
        nl = s.net_liquidation()
        row = {"cashbalance": round(s.cash, 2), "settledcash": round(s.cash, 2), "netliquidationvalue": nl,
               "stockmarketvalue": round(nl - s.cash, 2), "unrealizedpnl": 0.0, "realizedpnl": s.realized_today,
               "acctcode": acct, "key": "LedgerList", "timestamp": int(time.time()), "exchangerate": 1}
        return _json({"BASE": {**row, "currency": "BASE"}, "USD": {**row, "currency": "USD", "endofbundle": 1}})

    def pnl(self, **_):
        s = self.state
        if not self.config.pnl_available:
            return _json({"upnl": {}})
        nl = s.net_liquidation()
        return _json({"upnl": {f"{s.config.account_id}.Core": {"rowType": 1, "dpl": s.today_pnl(), "nl": nl,
                                                               "upl": 0.0, "el": round(s.cash, 2), "mv": 0.0}}})

    # orders
    def _validate_orders(self, orders) -> str | None:
        if not isinstance(orders, list) or not orders:
            return "the body must be {\"orders\": [...]}"
        coids = {o.get("cOID") for o in orders if isinstance(o, dict) and o.get("cOID")}
        for order in orders:
            if not isinstance(order, dict):
                return "each order must be an object"
            for key in ("conid", "orderType", "side", "quantity", "tif"):
                if key not in order:
                    return f"missing required field {key}"
            if not isinstance(order["conid"], int):
                return "conid must be an integer"
            if order["orderType"] not in ("LMT", "MKT", "STP", "STOP_LIMIT", "MIDPRICE", "TRAIL", "TRAILLMT"):
                return f"invalid orderType {order['orderType']}"
            if order["side"] not in ("BUY", "SELL"):
                return f"invalid side {order['side']}"
            if order["orderType"] in ("LMT", "STP", "STOP_LIMIT") and "price" not in order:
                return "price is required for this order type"
            if not order["quantity"] or order["quantity"] <= 0:
                return "quantity must be positive"
            if order["tif"] not in ("DAY", "GTC", "IOC", "OPG", "PAX", "OVT", "OND"):
                return f"invalid tif {order['tif']}"
            if "parentId" in order:
                if order.get("cOID"):
                    return "a bracket child must not carry a cOID"
                if order["parentId"] not in coids:
                    return f"parentId {order['parentId']} matches no order of this request"
        return None

    def _off_tick(self, order: dict):
        """IBKR rejects (HTTP 200, an error object) a price that is not a multiple of the tick."""
        if "price" in order and self.state.off_tick(order["conid"], order["price"]):
            return _error(f"The price does not conform to the minimum price variation for this contract "
                          f"({self.state.tick_of(order['conid']):g}).")
        return None

    def place(self, acct, body, **_):
        s = self.state
        if acct not in s.accounts:
            return _error(f"account {acct} not found", 400)
        orders = (body or {}).get("orders") if isinstance(body, dict) else None
        problem = self._validate_orders(orders)
        if problem:
            return _error(problem, 500)  # bad request content gives 500
        for order in orders:
            if (refused := self._off_tick(order)) is not None:
                return refused
        cutoff = time.time() - 86_400
        for order in orders:
            coid = order.get("cOID")
            if coid and s.coids.get(coid, 0) > cutoff:
                return _error(f"Order couldn't be submitted: Local order ID={coid} is already registered.",
                              self.config.duplicate_status)
        questions = []
        if any(o["orderType"] == "STP" for o in orders):
            questions.append(("o10331", STOP_WARNING))
        if any(o["orderType"] == "MKT" for o in orders):
            questions.append(("o10151", MARKET_WARNING))
        for order in orders:
            if "parentId" not in order and order["orderType"] == "LMT":
                market = s.price(order["conid"])
                if abs(order["price"] - market) / market > 0.03:
                    questions.append(("o163", PRICE_WARNING.format(side=order["side"], qty=order["quantity"],
                                                                   sym=s.symbol_of(order["conid"]),
                                                                   price=order["price"])))
        questions.extend(self._added_questions("place"))
        return self._ask_or_accept({"kind": "place", "orders": orders, "questions": questions})

    def _added_questions(self, kind: str) -> list[tuple[str, str]]:
        """Questions a test added with `add_question(..., on=kind)`, asked after the built-in ones."""
        added = []
        for fault_question in [f for f in self.state.faults if f.method == f"QUESTION:{kind}" and f.count > 0]:
            fault_question.count -= 1
            added.append((fault_question.path, str(fault_question.body)))
        return added

    def _ask_or_accept(self, pending: dict):
        s = self.state
        if pending["questions"]:
            message_id, text = pending["questions"].pop(0)
            pending["asking"] = message_id
            reply_id = str(uuid.uuid4())
            s.pending[reply_id] = pending
            return _json([{"id": reply_id, "message": [text], "isSuppressed": False, "messageIds": [message_id]}])
        if pending["kind"] == "modify":
            order, fields = pending["order"], pending["fields"]
            order.order_type = fields["orderType"]
            order.price = float(fields.get("price", 0.0 if order.order_type == "MKT" else order.price))
            order.quantity = float(fields["quantity"])
            order.tif = fields["tif"]
            order.last_time = time.time()
            s.cut_to_filled(order)  # a quantity cut to what it filled completes the order
            s.advance()
            return _json([{"order_id": str(order.order_id), "order_status": order.status, "encrypt_message": "1"}])
        created, by_coid = [], {}
        for spec in pending["orders"]:
            parent = by_coid.get(spec.get("parentId")) if "parentId" in spec else None
            order = EmuOrder(s.next_order_id, spec["conid"], s.symbol_of(spec["conid"]), spec["side"],
                             spec["orderType"], float(spec["quantity"]), float(spec.get("price", 0.0)), spec["tif"],
                             spec.get("cOID"), parent.order_id if parent else None,
                             "PreSubmitted" if parent else "Submitted", time.time())
            order.account_sent = "acctId" in spec
            s.next_order_id += 1
            s.orders[order.order_id] = order
            if order.coid:
                s.coids[order.coid] = time.time()
                by_coid[order.coid] = order
            created.append(order)
        return _json([{"order_id": str(o.order_id), "order_status": o.status, "encrypt_message": "1"}
                      for o in created])

    def reply(self, reply, body, **_):
        s = self.state
        pending = s.pending.pop(reply, None)
        if pending is None:
            if reply in s.voided:
                return _error("reply id not found (the question was voided by another request)", 503)
            return _error("reply id not found", 400)
        s.answers.append((pending["kind"], pending["asking"], bool((body or {}).get("confirmed"))))
        if not (body or {}).get("confirmed"):
            return _json([{"message": "Order not confirmed; it was discarded"}])
        return self._ask_or_accept(pending)

    def _live_row(self, order: EmuOrder) -> dict:
        row = {"acct": self.config.account_id, "account": self.config.account_id, "conid": order.conid,
               "conidex": str(order.conid), "orderId": order.order_id, "ticker": order.symbol, "secType": "STK",
               "side": order.side, "orderType": _TYPE_NAMES[order.order_type][0],
               "origOrderType": _TYPE_NAMES[order.order_type][1], "price": f"{order.price:.2f}",
               "totalSize": order.quantity, "filledQuantity": order.filled,
               "remainingQuantity": order.quantity - order.filled, "status": order.status,
               "order_ccp_status": order.status, "timeInForce": order.tif, "listingExchange": "NASDAQ",
               "outsideRTH": False, "sizeAndFills": f"{order.filled:g}/{order.quantity:g}",
               "lastExecutionTime_r": int(order.last_time * 1000),
               "lastExecutionTime": datetime.fromtimestamp(order.last_time, UTC).strftime("%y%m%d%H%M%S")}
        if order.avg_price is not None:
            row["avgPrice"] = f"{order.avg_price:.2f}"
        if order.coid:
            row["order_ref"] = order.coid
        if self.config.live_orders_parent_id and order.parent_id is not None:
            parent = self.state.orders.get(order.parent_id)
            as_coid = self.config.parent_id_as_coid and parent is not None and parent.coid
            row["parentId"] = parent.coid if as_coid else order.parent_id
        return row

    def live_orders(self, query, **_):
        s = self.state
        if query.get("force") == "true":
            s.live_orders_epoch = -1
            return _json({"orders": [], "snapshot": True})
        if s.live_orders_epoch != s.session_epoch:  # the first answer of a session is empty
            s.live_orders_epoch = s.session_epoch
            return _json({"orders": [], "snapshot": True})
        if query.get("accountId") not in s.accounts:  # no accountId: a false empty list
            return _json({"orders": [], "snapshot": True})
        missed = self.config.after_hours_misses_working and not s.market_is_open()
        return _json({"orders": [self._live_row(o) for o in s.orders.values()
                                 if not (missed and o.status in ("Submitted", "PreSubmitted"))], "snapshot": True})

    def order_status(self, order, **_):
        s = self.state
        found = s.orders.get(int(order))
        if found is None:
            return _error(f"order {order} is not in this session", 503)
        if found.status == "PendingCancel":
            found.cancel_reads += 1
            if found.cancel_reads > self.config.cancel_polls:
                found.status = "Cancelled"
                for child in s.orders.values():
                    if child.parent_id == found.order_id and child.status not in ("Filled",):
                        child.status = "Cancelled"
        body = {"order_id": found.order_id, "conid": found.conid, "symbol": found.symbol,
                "side": "B" if found.side == "BUY" else "S",
                "order_type": _TYPE_NAMES[found.order_type][1],
                "total_size": f"{found.quantity:.1f}", "cum_fill": f"{found.filled:.1f}",
                "size": f"{found.quantity - found.filled:.1f}", "order_status": found.status,
                "order_ccp_status": "0", "order_status_description": f"Order {found.status}", "tif": found.tif,
                "order_time": datetime.fromtimestamp(found.created, UTC).strftime("%y%m%d%H%M%S"),
                "cannot_cancel_order": found.status in ("Filled", "Cancelled"),
                "order_not_editable": found.status in ("Filled", "Cancelled"), "listing_exchange": "NASDAQ",
                "account": self.config.account_id}
        if found.order_type != "MKT":
            body["limit_price" if found.order_type == "LMT" else "stop_price"] = f"{found.price:.2f}"
        if found.avg_price is not None:
            body["average_price"] = f"{found.avg_price:.2f}"
        return _json(body)

    def modify(self, acct, order, body, **_):
        s = self.state
        if acct not in s.accounts:
            return _error(f"account {acct} not found", 400)
        found = s.orders.get(int(order))
        if found is None:
            return _error(f"OrderID {order} doesn't exist")
        if not isinstance(body, dict) or "orders" in body:
            return _error("a modification is one order object, not wrapped in orders", 500)
        for key in ("conid", "orderType", "side", "quantity", "tif") + (("acctId",) if found.account_sent else ()):
            if key not in body:
                return _error(f"a modification must repeat every original field: {key} is missing", 500)
        if body["conid"] != found.conid or body["side"] != found.side:
            return _error("conid and side cannot change", 500)
        if body["orderType"] not in ("LMT", "STP", "MKT"):
            return _error(f"emulator: orderType {body['orderType']} is not emulated", 500)
        if body["orderType"] in ("LMT", "STP") and "price" not in body:
            return _error("price is required for this order type", 500)
        if not isinstance(body["quantity"], (int, float)) or body["quantity"] <= 0:
            return _error("quantity must be positive", 500)
        if found.status in ("Filled", "Cancelled"):
            return _error(f"order {order} is {found.status} and cannot be modified")
        if body["quantity"] < found.filled:
            return _error(f"the quantity cannot be below the {found.filled:g} already filled")
        if (refused := self._off_tick(body)) is not None:
            return refused
        questions = []
        if found.order_type == "LMT" and found.parent_id is None and "price" in body:
            market = s.price(found.conid)
            if abs(body["price"] - market) / market > 0.03:
                questions.append(("o163", PRICE_WARNING.format(side=found.side, qty=found.quantity,
                                                               sym=found.symbol, price=body["price"])))
        if body["orderType"] == "MKT":  # a stop made a market order is a market order: IBKR asks as on placing
            questions.append(("o10151", MARKET_WARNING))
        questions.extend(self._added_questions("modify"))
        return self._ask_or_accept({"kind": "modify", "order": found, "fields": body, "questions": questions})

    def cancel(self, acct, order, **_):
        s = self.state
        if int(order) == -1 and acct in s.accounts:  # IBKR: orderId -1 cancels every open order
            for working in s.orders.values():
                if working.status not in ("Filled", "Cancelled"):
                    working.status, working.cancel_reads = "PendingCancel", 0
            return _json({"msg": "Request was submitted", "order_id": -1, "account": acct})
        found = s.orders.get(int(order))
        if found is None or acct not in s.accounts:
            return _error(f"OrderID {order} doesn't exist")
        if found.status not in ("Filled", "Cancelled"):
            found.status, found.cancel_reads = "PendingCancel", 0
        return _json({"msg": "Request was submitted", "order_id": found.order_id, "conid": found.conid,
                      "account": acct})

    def trades(self, query, **_):
        days = max(1, min(int(query.get("days") or 1), 7))
        since = time.time() - days * 86_400
        return _json([{k: v for k, v in e.items() if not k.startswith("_")} for e in self.state.executions
                      if e["trade_time_r"] / 1000 >= since])
