"""The client against gateways that follow IBKR's documented behaviour with hostile answers: the
documented shape variants (conids and numbers as strings, dicts for lists, question answers as one
object, flags as strings), answers that are not the API's at all (HTML pages, empty bodies, plain
text, truncated JSON, wrong JSON shapes, redirects) and history data out of order, duplicated or
reaching past the request. Each must end in IBKR's meaning or a clear error naming the problem and
the fix: never a KeyError/TypeError deep inside, never a blind retry of an order."""

import copy
import itertools
from datetime import UTC, datetime

import pandas as pd
import pytest

from trading_pipeline.adapters.broker import DuplicateOrderError
from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.ibkr.errors import (
    IBKRAccessDenied,
    IBKRAccountError,
    IBKRLiveAccountRefused,
    IBKRMalformedAnswer,
    IBKRNotLoggedIn,
    IBKROrderRejected,
    IBKROrderStateUnknown,
    IBKRRequestError,
)
from trading_pipeline.adapters.ibkr.market_data import IBKRMarketData
from trading_pipeline.core.strategies import TimeframeSettings
from trading_pipeline.errors import BarDataError, UserError
from trading_pipeline_tests.adapters.ibkr.test_orders_and_portfolio import bracket

HISTORY = "/iserver/marketdata/history"
ORDERS_POST = "/iserver/account/*/orders"
HTML_PAGE = ("<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
             "<p>nginx</p></body></html>")
AS_OF = datetime(2024, 3, 5, 16, 0, tzinfo=UTC)  # during the 2024-03-05 session


# ------------------------------------------------------------------------- answers that are not the API's

BAD_BODIES = {
    "html": {"raw": HTML_PAGE},
    "empty": {"raw": b""},
    "plain text": {"raw": "Service Unavailable", "content_type": "text/plain"},
    "truncated json": {"raw": '{"accounts":["DU12', "content_type": "application/json"},
}
DESCRIBED = {"html": "an HTML page ('502 Bad Gateway')", "empty": "an empty body",
             "plain text": "plain text 'Service Unavailable'", "truncated json": "truncated or malformed JSON"}
# (path pattern, call, a JSON answer of the wrong shape, what IBKR documents)
ENDPOINTS = {
    "accounts": ("/iserver/accounts", lambda c: c.accounts(), ["DU1234567"], "a JSON object"),
    "contracts": ("/trsrv/stocks", lambda c: c.resolve("ZZZ"), [], "a JSON object"),
    "history": (HISTORY, lambda c: c.history(c.resolve("AAPL").conid, "1y", "1d"), [{"t": 1}], "a JSON object"),
    "positions": ("/portfolio/*/positions/0", lambda c: c.positions(fresh=False), {"0": {}}, "a JSON list"),
    "summary": ("/portfolio/*/summary", lambda c: c.summary(), [], "a JSON object"),
    "live orders": ("/iserver/account/orders", lambda c: c.live_orders(), "orders", "a JSON object or list"),
    "trades": ("/iserver/account/trades", lambda c: c.trades(days=1), {"trades": []}, "a JSON list"),
}
# every bad body on the accounts pre-flight, one (rotating) bad body and the wrong shape on every other endpoint
CASES = [("accounts", kind) for kind in BAD_BODIES] + [
    (endpoint, kind) for endpoint, kind in zip([e for e in ENDPOINTS if e != "accounts"],
                                               itertools.cycle(BAD_BODIES))] + [
    (endpoint, "wrong shape") for endpoint in ENDPOINTS]


@pytest.mark.parametrize(("endpoint", "kind"), CASES)
def test_a_read_answered_with_something_else_is_retried_then_named(emulator, client, endpoint, kind):
    path, call, wrong_shape, documented = ENDPOINTS[endpoint]
    if endpoint != "accounts":
        client.accounts()
        client.resolve("AAPL")
    fault = {"body": wrong_shape, "status": 200} if kind == "wrong shape" else BAD_BODIES[kind]
    emulator.inject(path, method="GET", count=10, **fault)
    before = emulator.count("GET", path)
    with pytest.raises(IBKRMalformedAnswer) as raised:
        call(client)
    assert emulator.count("GET", path) - before == 4  # asked again 3 times with backoff, then it stops
    error = raised.value
    assert isinstance(error, UserError) and "HTTP 200" in error.problem and f"where IBKR documents {documented}" \
        in error.problem
    assert (DESCRIBED[kind] if kind != "wrong shape" else "a JSON ") in error.problem
    assert "IBKR_GATEWAY_URL" in error.fix
    assert "<html" not in str(error).lower() and "nginx" not in str(error)  # described, never pasted


def test_a_passing_bad_answer_is_asked_again_with_backoff(emulator, client):
    emulator.inject("/iserver/accounts", method="GET", status=200, raw=HTML_PAGE, count=1)
    emulator.inject("/iserver/accounts", method="GET", status=500, raw=HTML_PAGE, count=1)
    assert client.accounts().account_id == "DU1234567"
    calls = emulator.requests("GET", "/iserver/accounts")
    assert [c[3] for c in calls] == [200, 500, 200]
    assert calls[1][0] - calls[0][0] >= 0.045 and calls[2][0] - calls[1][0] >= 0.045  # read_backoff 0.05 s


@pytest.mark.parametrize(("status", "fault", "error", "words"), [
    (401, {"raw": HTML_PAGE}, IBKRNotLoggedIn, "401"),
    (403, {"raw": "Access Denied", "content_type": "text/plain"}, IBKRAccessDenied, "403 Access Denied"),
    (500, {"raw": HTML_PAGE}, IBKRRequestError, "answered 500 with error \"an HTML page ('502 Bad Gateway')\""),
    (503, {"raw": b""}, IBKRRequestError, "answered 503"),
    (302, {"raw": b"", "headers": {"Location": "https://localhost:5000/sso/Login?forwardTo=22&RL=1"}},
     IBKRNotLoggedIn, "redirected (HTTP 302) to the login page /sso/Login"),
    (301, {"raw": b"", "headers": {"Location": "https://example.invalid/portal/index.html"}},
     IBKRRequestError, "redirected (HTTP 301) to /portal/index.html"),
])
def test_error_statuses_with_any_body_give_the_documented_meaning(emulator, client, status, fault, error, words):
    client.accounts()
    emulator.inject("/iserver/account/trades", method="GET", status=status, count=10, **fault)
    with pytest.raises(error) as raised:
        client.trades(days=1)
    assert words in raised.value.problem and raised.value.fix
    assert "<html" not in str(raised.value).lower() and "forwardTo" not in str(raised.value)
    retried = 4 if status >= 500 else 1  # 5xx reads are retried (backoff); 401/403/3xx are final
    assert emulator.count("GET", "/iserver/account/trades") == retried


def test_reads_recover_from_a_passing_503(emulator, client):
    client.accounts()
    emulator.inject("/iserver/account/trades", method="GET", status=503, count=2)
    assert client.trades(days=1) == []
    assert [c[3] for c in emulator.requests("GET", "/iserver/account/trades")] == [503, 503, 200]


def test_null_and_list_wrapped_error_fields(emulator, client):
    account = client.account_id
    emulator.inject(f"/portfolio/{account}/summary", method="GET", transform=lambda body: {**body, "error": None})
    assert client.summary()["netliquidation"]["amount"] > 0  # a null error next to the data is no error
    emulator.inject("/iserver/account/trades", method="GET", body=[{"error": "Service unavailable"}])
    with pytest.raises(IBKRRequestError) as raised:
        client.trades(days=1)
    assert raised.value.ibkr_text == "Service unavailable"


# ------------------------------------------------------------------------------- documented shape variants

def test_contract_lookup_with_string_conids_and_flags(emulator, client):
    def hostile(body):
        body = copy.deepcopy(body)
        for instruments in body.values():
            for instrument in instruments:
                for contract in instrument["contracts"]:
                    contract["conid"] = str(contract["conid"])  # a string, as secdef/search sends it
                    contract["isUS"] = "true" if contract["isUS"] else "false"
                instrument["contracts"].append({"exchange": "NASDAQ", "isUS": True})  # no conid: unusable
        return body

    emulator.inject("/trsrv/stocks", method="GET", transform=hostile)
    aapl = client.resolve("AAPL")
    assert (aapl.conid, aapl.exchange, aapl.is_us) == (emulator.state.conid_for("AAPL"), "NASDAQ", True)


def test_a_contract_listed_twice_is_one_contract_not_an_ambiguity(emulator, client):
    def twice(body):
        body = copy.deepcopy(body)
        for instruments in body.values():
            instruments.append({**instruments[0], "name": instruments[0]["name"] + " (again)"})
        return body

    emulator.inject("/trsrv/stocks", method="GET", transform=twice)
    assert client.resolve("AAPL").conid == emulator.state.conid_for("AAPL")


@pytest.mark.parametrize(("is_paper", "may_trade"), [("true", True), ("false", False), ("maybe", False),
                                                     (None, True), (0, False)])
def test_the_paper_flag_is_read_strictly(emulator, client, is_paper, may_trade):
    def hostile(body):
        body = {**body, "accounts": body["accounts"][0]}  # one account, not wrapped in a list
        if is_paper is None:
            body.pop("isPaper")
        else:
            body["isPaper"] = is_paper
        return body

    emulator.inject("/iserver/accounts", method="GET", transform=hostile)
    if may_trade:
        assert client.check_may_trade().account_id == "DU1234567"
    else:
        with pytest.raises(IBKRLiveAccountRefused) as raised:  # a DU id alone is not enough
            client.check_may_trade()
        assert "TRADING_ALLOW_LIVE=yes" in raised.value.fix


def test_auth_flags_as_strings_are_not_taken_for_true(emulator, client):
    emulator.inject("/iserver/auth/status", method="POST",
                    transform=lambda body: {**body, "authenticated": "false", "connected": "true"})
    client.accounts()
    assert emulator.count("POST", "/iserver/auth/ssodh/init") == 1  # "false" read as false: the session opened


def test_the_account_id_must_be_one_the_gateway_lists(emulator, client_factory):
    with pytest.raises(IBKRAccountError) as raised:
        client_factory(emulator, account_id="DU7777777").accounts()
    assert raised.value.problem == ("IBKR_ACCOUNT_ID=DU7777777 is not an account of this login "
                                    "(accounts: DU1234567)")
    assert "set IBKR_ACCOUNT_ID to one of those accounts" in raised.value.fix
    assert client_factory(emulator, account_id=" du1234567 ").account_id == "DU1234567"  # the gateway's spelling


def test_snapshot_with_string_conids_prefixes_and_empty_values(emulator, client):
    aapl = client.resolve("AAPL")
    emulator.set_price("AAPL", 187.25)

    def hostile(rows):
        changed = []
        for row in rows:
            row = {**row, "conid": str(row["conid"])}
            if "31" in row:
                row.update({"31": "H" + row["31"], "84": "", "88": "1,300"})
                row.pop("86")
            changed.append(row)
        return changed

    emulator.inject("/iserver/marketdata/snapshot", method="GET", transform=hostile, count=10)
    quote = client.snapshot([aapl])[aapl.conid]
    assert (quote.last, quote.halted, quote.last_is_prior_close) == (187.25, True, False)
    assert (quote.bid, quote.ask, quote.bid_size) == (None, None, 130_000)


def test_positions_with_string_numbers_and_a_row_without_a_position(emulator_factory, client_factory):
    emulator = emulator_factory(positions=2)
    broker = IBKRBroker(client_factory(emulator))
    clean = broker.account({})
    emulator.inject("/portfolio/*/positions/0", method="GET",
                    transform=lambda rows: [{k: (str(v) if isinstance(v, (int, float)) else v) for k, v in r.items()}
                                            for r in rows])
    assert broker.account({}) == clean
    emulator.inject("/portfolio/*/positions/0", method="GET",
                    transform=lambda rows: [{k: v for k, v in r.items() if k != "position"} for r in rows])
    with pytest.raises(IBKRMalformedAnswer) as raised:  # never taken for "no position"
        broker.account({})
    assert "POS000 has no usable position" in raised.value.problem


@pytest.mark.parametrize(("path", "transform", "error", "words"), [
    ("/portfolio/*/positions/0", lambda rows: [{**r, "position": "NaN"} for r in rows], IBKRMalformedAnswer,
     "POS000 has no usable position ('NaN')"),
    ("/portfolio/*/positions/0", lambda rows: [{**r, "position": "1e999"} for r in rows], IBKRMalformedAnswer,
     "POS000 has no usable position ('1e999')"),
    ("/portfolio/*/summary", lambda body: {**body, "netliquidation": {**body["netliquidation"], "amount": "Infinity"}},
     IBKRRequestError, "lacks a usable netliquidation"),
], ids=["position-nan", "position-overflow", "equity-infinity"])
def test_account_numbers_that_are_not_finite_are_refused(emulator_factory, client_factory, path, transform, error,
                                                         words):
    emulator = emulator_factory(positions=2)
    broker = IBKRBroker(client_factory(emulator))
    emulator.inject(path, method="GET", transform=transform)
    with pytest.raises(error) as raised:  # never a NaN position or P&L that every risk comparison lets through
        broker.account({})
    assert words in raised.value.problem and raised.value.fix


def test_a_daily_pnl_that_is_not_finite_is_unknown_never_a_number(emulator_factory, client_factory):
    """A NaN P&L passes every comparison of the daily-loss gate: it is unknown (entries refused), and
    the account is still read for the exits and stops that need it."""
    emulator = emulator_factory(positions=2)
    emulator.inject("/iserver/account/pnl/partitioned", method="GET", transform=lambda body: {
        "upnl": {key: {**row, "dpl": "NaN"} for key, row in body["upnl"].items()}})
    account = IBKRBroker(client_factory(emulator)).account({})
    assert account.daily_pnl is None and "gives dpl='NaN', not a number" in account.daily_pnl_unknown


def test_live_orders_as_a_bare_list_with_string_ids(emulator, client, client_factory):
    emulator.set_price("MSFT", 100.0)
    IBKRBroker(client).place("MSFT", bracket(coid="hg-live", entry=98.0), 98.0)

    def hostile(body):
        return [{**o, "orderId": str(o["orderId"]), "conid": str(o["conid"]),
                 **({"parentId": str(o["parentId"])} if "parentId" in o else {})} for o in body["orders"]]

    emulator.inject("/iserver/account/orders", method="GET", transform=hostile, count=10)
    restarted = IBKRBroker(client_factory(emulator))
    parent = emulator.orders_with_coid("hg-live")[0]
    children = {c.order_type: str(c.order_id) for c in emulator.children_of(parent.order_id)}
    assert restarted.find_order("hg-live").broker_order_id == str(parent.order_id)
    assert restarted.find_order("hg-live-sl").broker_order_id == children["STP"]
    assert restarted.find_order("hg-live-tp").broker_order_id == children["LMT"]


def test_order_answers_as_one_object_with_string_ids(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    emulator.inject(ORDERS_POST, method="POST", transform=lambda answer: answer[0])  # {..} instead of [{..}]
    single = broker.place("MSFT", bracket(coid="hg-dict", entry=99.5)[:1], 99.5)
    assert [(o.client_order_id, o.broker_order_id) for o in single] == [
        ("hg-dict", str(emulator.orders_with_coid("hg-dict")[0].order_id))]

    def question_as_object(answer):  # the question as one object, its ids as a string, its message as text
        question = answer[0]
        return {**question, "messageIds": ",".join(question["messageIds"]), "message": question["message"][0]}

    emulator.inject(ORDERS_POST, method="POST", transform=question_as_object)
    placed = broker.place("MSFT", bracket(coid="hg-question", entry=99.5), 99.5)
    assert len(placed) == 3 and emulator.count("POST", "/iserver/reply/*") == 1  # o10331 auto-confirmed


@pytest.mark.parametrize(("field", "value"), [("price", None), ("price", ""), ("price", "NaN"), ("price", "0"),
                                            ("size", None), ("size", "abc"), ("size", -10)])
def test_an_execution_without_a_usable_size_or_price_is_not_recorded_as_zero(emulator, client, client_factory,
                                                                             tmp_path, field, value):
    ids = tmp_path / "order-ids.json"
    emulator.set_price("MSFT", 100.0)
    IBKRBroker(client, id_map_path=ids).place("MSFT", bracket(coid="hg-fill", entry=100.5), 100.5)
    emulator.new_day()  # the filled entry leaves the live list: it is found by its executions
    emulator.inject("/iserver/account/trades", method="GET", count=10,
                    transform=lambda rows: [{**r, field: value} if r.get("order_ref") == "hg-fill" else r
                                            for r in rows])
    later = IBKRBroker(client_factory(emulator), id_map_path=ids)
    for read in (later.executions, later.find_order):  # a fill at price 0 or of 0 shares would be booked
        with pytest.raises(IBKRMalformedAnswer) as raised:
            read("hg-fill")
        assert f"no usable {field} ({value!r})" in raised.value.problem and "Client Portal" in raised.value.fix


@pytest.fixture
def broker(client) -> IBKRBroker:
    return IBKRBroker(client)


# ------------------------------------------------------------------------------------------- order safety

def test_every_question_in_one_answer_must_be_allowed(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    extra = {"id": "second-question", "message": ["This order exceeds your unusual-activity threshold."],
             "isSuppressed": False, "messageIds": ["o999"]}
    emulator.inject(ORDERS_POST, method="POST", transform=lambda answer: [*answer, extra])
    with pytest.raises(IBKROrderRejected) as raised:
        broker.place("MSFT", bracket(coid="hg-two", entry=99.5), 99.5)
    assert raised.value.message_ids == ("o10331", "o999")
    reply = emulator.requests("POST", "/iserver/reply/*")
    assert len(reply) == 1 and reply[0][2] != "/iserver/reply/second-question"
    assert emulator.orders_with_coid("hg-two") == []  # declined: nothing placed


@pytest.mark.parametrize("fault", [
    {"status": 200, "raw": HTML_PAGE, "process": True},
    {"status": 200, "raw": '[{"order_id":"12', "content_type": "application/json", "process": True},
    {"status": 200, "raw": b"", "process": True},
    {"status": 502, "raw": HTML_PAGE},
], ids=["html-after-accepting", "truncated-after-accepting", "empty-after-accepting", "502-html"])
def test_an_order_answer_that_may_hide_an_accepted_order_is_unknown_and_never_resent(emulator, client,
                                                                                      client_factory, fault):
    emulator.set_price("MSFT", 100.0)
    emulator.inject(ORDERS_POST, method="POST", **fault)
    with pytest.raises(IBKROrderStateUnknown) as raised:
        IBKRBroker(client).place("MSFT", bracket(coid="hg-unknown", entry=99.5)[:1], 99.5)
    assert "may or may not have been accepted" in raised.value.problem and "cOID" in raised.value.fix
    assert "<html" not in str(raised.value).lower()
    assert emulator.count("POST", ORDERS_POST) == 1  # never sent again
    found = IBKRBroker(client_factory(emulator)).find_order("hg-unknown")  # what the next run reconciles with
    assert (found is not None) == fault.get("process", False)


def test_an_html_4xx_to_an_order_is_a_refusal(emulator, broker):
    emulator.set_price("MSFT", 100.0)
    emulator.inject(ORDERS_POST, method="POST", status=400, raw=HTML_PAGE)
    with pytest.raises(IBKROrderRejected) as raised:
        broker.place("MSFT", bracket(coid="hg-400", entry=99.5)[:1], 99.5)
    assert "HTTP 400 and an HTML page" in raised.value.problem
    assert emulator.orders_with_coid("hg-400") == [] and emulator.count("POST", ORDERS_POST) == 1


@pytest.mark.parametrize("fault", [
    {"status": 500, "raw": "Order couldn't be submitted: Local order ID=hg-dup is already registered.",
     "content_type": "text/plain"},
    {"status": 200, "body": [{"message": ["Order couldn't be submitted: Local order ID=hg-dup is already registered."]}]},
], ids=["plain-text-500", "in-a-message-field"])
def test_a_duplicate_coid_answer_is_recognized_wherever_ibkr_puts_it(emulator, broker, fault):
    emulator.set_price("MSFT", 100.0)
    emulator.inject(ORDERS_POST, method="POST", **fault)
    with pytest.raises(DuplicateOrderError) as raised:
        broker.place("MSFT", bracket(coid="hg-dup", entry=99.5)[:1], 99.5)
    assert str(raised.value) == "hg-dup" and emulator.count("POST", ORDERS_POST) == 1


def test_orders_naming_another_account_are_not_sent(emulator, client):
    conid = client.resolve("MSFT").conid
    with pytest.raises(IBKRAccountError) as raised:
        client.place_orders([{"acctId": "U7654321", "conid": conid, "orderType": "LMT", "price": 99.0,
                              "side": "BUY", "quantity": 1, "tif": "DAY", "cOID": "hg-acct"}])
    assert "U7654321" in raised.value.problem and "DU1234567" in raised.value.problem
    assert emulator.count("POST", ORDERS_POST) == 0


# -------------------------------------------------------------------------------------------------- history

def test_history_out_of_order_duplicated_stringly_and_past_the_request(emulator, client_factory):
    settings = TimeframeSettings(period="1y")
    clean = IBKRMarketData(client_factory(emulator)).fetch("AAPL", "1d", settings, AS_OF)
    late = [pd.Timestamp("2024-03-05 14:30", tz="UTC"), pd.Timestamp("2024-03-06 14:30", tz="UTC"),
            pd.Timestamp("2030-01-02 14:30", tz="UTC")]  # this session (not closed at as_of), after, far after

    def hostile(body):
        data = body["data"]
        extra = [{**data[-1], "t": int(t.timestamp() * 1000), "c": 1.0} for t in late]
        shuffled = data[1::2] + data[::2] + data[:5] + extra  # out of order, five bars twice
        as_strings = [{k: (f"{v:,}" if k == "v" else str(v)) for k, v in bar.items()} for bar in shuffled]
        return {**body, "data": as_strings, "points": 3, "startTime": "19700101-00:00:00", "travelTime": "x",
                "newField": {"nested": [1, 2]}}

    emulator.inject(HISTORY, method="GET", transform=hostile)
    hostile_frame = IBKRMarketData(client_factory(emulator)).fetch("AAPL", "1d", settings, AS_OF)
    pd.testing.assert_frame_equal(hostile_frame, clean)
    assert hostile_frame.index[-1] == pd.Timestamp("2024-03-04 14:30", tz="UTC")


def _hourly(body):  # what a gateway that ignores bar=1d sends: each session's bars by the hour
    hours = [{**b, "t": b["t"] + h * 3_600_000, "o": b["o"] + h, "h": b["h"] + h, "l": b["l"] + h, "c": b["c"] + h}
             for b in body["data"] for h in range(7)]
    return {**body, "data": hours, "barLength": 3600}


def _same_time_other_prices(body):
    data = body["data"]
    return {**body, "data": [*data[:-3], {**data[-3], "c": data[-3]["c"] + 5, "h": data[-3]["h"] + 5}, *data[-3:]]}


@pytest.mark.parametrize(("transform", "words"), [
    (_hourly, "IBKR's history holds 7 different 1d bars for the bar starting 2023-03-0"),
    (_same_time_other_prices, "IBKR's history holds 2 different 1d bars for the bar starting 2024-03-01T14:30:00"),
], ids=["hourly-bars-for-1d", "one-time-two-prices"])
def test_history_with_several_bars_for_one_session_is_refused(emulator, client, transform, words):
    emulator.inject(HISTORY, method="GET", transform=transform)
    with pytest.raises(BarDataError) as raised:  # keeping one of them (the last hour) made a wrong daily bar
        IBKRMarketData(client).fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert words in raised.value.problem and "not one bar per session" in raised.value.problem
    assert "IBKR_GATEWAY_URL" in raised.value.fix


@pytest.mark.parametrize(("transform", "words"), [
    (lambda body: {k: v for k, v in body.items() if k != "data"}, "returned no 1d bars for AAPL"),
    (lambda body: {**body, "data": {"0": body["data"][0]}}, "its 'data'"),
    (lambda body: {**body, "data": [{**b, "t": b["t"] // 1000} for b in body["data"]]},
     "not an epoch time in milliseconds"),
    (lambda body: {**body, "data": [{k: v for k, v in b.items() if k != "c"} for b in body["data"]]},
     "has no usable 'c'"),
], ids=["no-data", "data-not-a-list", "t-in-seconds", "bar-without-close"])
def test_history_without_usable_bars_is_a_clear_error(emulator, client, transform, words):
    emulator.inject(HISTORY, method="GET", transform=transform)
    with pytest.raises(BarDataError) as raised:
        IBKRMarketData(client).fetch("AAPL", "1d", TimeframeSettings(period="1y"), AS_OF)
    assert words in raised.value.problem and raised.value.fix


def test_too_many_history_charts_answer_backs_off_like_a_429(emulator, client):
    conid = client.resolve("AAPL").conid
    emulator.inject(HISTORY, method="GET", body={"error": "Too many history charts requests, please try again later."})
    assert client.history(conid, "1y", "1d")["data"]
    calls = emulator.requests("GET", HISTORY)
    assert len(calls) == 2 and calls[1][0] - calls[0][0] >= 0.19  # rate_limit_backoff (0.2 s in these tests)
