"""The adapter against answers as the real Client Portal gateway, IBeam and third-party mocks send
them, where our emulator is more convenient (shared/reference/ibkr-client-portal-api.md; where the
reference is silent, both forms are accepted): status values in other casings or spellings, sides
as B/S or words, numbers and ids as strings, summary values with IBKR's `isNull`, fields missing.
A value read wrongly must never pass for another (a filled order for a working one, a missing
price for 0, a GTC stop for a DAY one): an unreadable field on an order path fails closed naming
the field and the gateway's answer."""

from datetime import UTC, datetime

import pytest

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.ibkr.errors import IBKRMalformedAnswer, IBKRRequestError
from trading_pipeline.adapters.ibkr.execution import OrderRequests
from trading_pipeline.adapters.ibkr.parsing import order_state, parse_number, parse_side
from trading_pipeline.core.risk import Mark
from trading_pipeline_tests.adapters.ibkr.test_orders_and_portfolio import bracket

LIVE_ORDERS = "/iserver/account/orders"
ORDER_STATUS = "/iserver/account/order/status/*"


@pytest.fixture
def broker(client) -> IBKRBroker:
    return IBKRBroker(client)


# ----------------------------------------------------------------------------------- order states

@pytest.mark.parametrize(("sent", "read"), [
    ("Filled", "Filled"), ("filled", "Filled"), ("FILLED", "Filled"), (" Filled ", "Filled"),
    ("PreSubmitted", "PreSubmitted"), ("presubmitted", "PreSubmitted"), ("pre_submitted", "PreSubmitted"),
    ("PendingSubmit", "PendingSubmit"), ("pending_submit", "PendingSubmit"),
    ("PendingCancel", "PendingCancel"), ("pending_cancel", "PendingCancel"),
    ("Cancelled", "Cancelled"), ("cancelled", "Cancelled"), ("Canceled", "Cancelled"),
    ("ApiCancelled", "Cancelled"), ("PreCancelled", "PreCancelled"), ("inactive", "Inactive"),
    ("submitted", "Submitted"), ("warn_state", "WarnState"), ("ApiPending", "ApiPending"),
    ("SomethingNew", "SomethingNew"), ("", ""), (None, ""),
])
def test_order_states_in_any_casing_read_as_ibkrs(sent, read):
    assert order_state(sent) == read


def test_lower_case_states_in_the_live_orders_are_final_where_ibkr_means_final(emulator, client, broker):
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="rg-case", entry=100.5), 100.5)  # the entry fills at once
    emulator.inject(LIVE_ORDERS, method="GET", count=20,
                    transform=lambda body: {**body, "orders": [{**o, "status": o["status"].lower()}
                                                                for o in body["orders"]]})
    later = IBKRBroker(client)
    assert later.find_order("rg-case").status == "Filled"  # not a working order called 'filled'
    assert later.find_order("rg-case-sl").status == "Submitted"
    assert {o.client_order_id for o in later.open_orders()} == {"rg-case-sl", "rg-case-tp"}


def test_a_cancel_is_done_when_ibkr_says_cancelled_in_another_casing(emulator, client, broker):
    emulator.set_price("MSFT", 100.0)
    placed = broker.place("MSFT", bracket(coid="rg-cxl", entry=98.5, stop=95.0, target=105.0), 98.5)
    emulator.inject(ORDER_STATUS, method="GET", count=50,
                    transform=lambda body: {**body, "order_status": {"Cancelled": "ApiCancelled"}.get(
                        body["order_status"], body["order_status"].lower())})
    cancelled = broker.cancel("rg-cxl-tp")  # polled through 'pendingcancel' to 'ApiCancelled'
    assert (cancelled.client_order_id, cancelled.status) == ("rg-cxl-tp", "Cancelled")
    final = client.cancel_order(placed[0].broker_order_id, timeout=2.0)  # not polled until the timeout
    assert final["order_status"] == "ApiCancelled"


# ------------------------------------------------------------------------------- fills and sides

@pytest.mark.parametrize(("sent", "read"), [("B", "BUY"), ("b", "BUY"), ("BUY", "BUY"), ("Buy", "BUY"),
                                            ("BOT", "BUY"), ("S", "SELL"), ("s", "SELL"), ("sell", "SELL"),
                                            ("SLD", "SELL"), ("", None), (None, None), ("X", None), (1, None)])
def test_sides_as_letters_or_words(sent, read):
    assert parse_side(sent) == read


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_a_number(value):
    assert parse_number(value) is None  # "filledQuantity": true is not 1 share


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("side", "b", "BUY"), ("side", "BUY", "BUY"), ("size", "10.0", 10.0), ("commission", "1.01", 1.01),
    ("commission", "", 0.0), ("trade_time_r", "1702317649000", datetime(2023, 12, 11, 18, 0, 49, tzinfo=UTC)),
    ("trade_time_r", 1.702317649e18, datetime(2023, 12, 11, 18, 0, 49, tzinfo=UTC)),
])
def test_executions_as_the_real_gateway_sends_them(emulator, client, tmp_path, field, value, expected):
    emulator.set_price("MSFT", 100.0)
    IBKRBroker(client, id_map_path=tmp_path / "ids.json").place("MSFT", bracket(coid="rg-exec", entry=100.5), 100.5)
    real = {"side": "b", "size": "10.0", "commission": "1.01", "trade_time": "20231211-18:00:49",
            "trade_time_r": 1702317649000, "execution_id": "0000e0d5.6576fd38.01.01"}
    emulator.inject("/iserver/account/trades", method="GET", count=10,
                    transform=lambda rows: [{**r, **real, field: value} if r.get("order_ref") == "rg-exec" else r
                                            for r in rows])
    [execution] = IBKRBroker(client, id_map_path=tmp_path / "ids.json").executions("rg-exec")
    read = {"side": execution.side, "size": execution.quantity, "commission": execution.commission,
            "trade_time_r": execution.executed_at}[field]
    assert read == expected


@pytest.mark.parametrize("value", [None, "", "X", "BOTH"])
def test_an_execution_without_a_usable_side_is_not_recorded(emulator, client, value):
    emulator.set_price("MSFT", 100.0)
    broker = IBKRBroker(client)
    broker.place("MSFT", bracket(coid="rg-side", entry=100.5), 100.5)
    emulator.inject("/iserver/account/trades", method="GET", count=10,
                    transform=lambda rows: [{**r, "side": value} if r.get("order_ref") == "rg-side" else r
                                            for r in rows])
    with pytest.raises(IBKRMalformedAnswer) as raised:
        IBKRBroker(client).executions("rg-side")
    assert f"no usable side ({value!r})" in raised.value.problem and raised.value.fix


@pytest.mark.parametrize("value", [None, "", "n/a"])
def test_a_live_order_without_a_readable_fill_count_is_not_taken_for_unfilled(emulator, client, value):
    emulator.set_price("MSFT", 100.0)
    IBKRBroker(client).place("MSFT", bracket(coid="rg-fillq", entry=100.5), 100.5)

    def hostile(body):
        return {**body, "orders": [{k: v for k, v in {**o, "filledQuantity": value}.items()
                                    if not (k == "filledQuantity" and value is None)} for o in body["orders"]]}

    emulator.inject(LIVE_ORDERS, method="GET", count=20, transform=hostile)
    with pytest.raises(IBKRMalformedAnswer) as raised:
        IBKRBroker(client).find_order("rg-fillq")
    assert f"no usable filledQuantity ({value!r})" in raised.value.problem and "rg-fillq" in raised.value.problem


def test_a_modification_keeps_what_the_order_filled_when_its_status_has_no_fill_count(emulator, client, broker):
    emulator.set_price("MSFT", 100.0)
    broker.place("MSFT", bracket(coid="rg-part", entry=98.5, stop=95.0, target=105.0), 98.5)
    entry = emulator.orders_with_coid("rg-part")[0]
    emulator.fill_partially(entry.order_id, 4, 98.5)
    emulator.inject(ORDER_STATUS, method="GET", count=50,
                    transform=lambda body: {k: v for k, v in body.items() if k != "cum_fill"})
    modified = broker.modify("rg-part", price=98.75)
    assert modified.filled_quantity == 4  # not 0: the live orders said 4 filled


# -------------------------------------------------------------------- a modify repeats the order

STATUS = {"order_id": 1210386759, "conid": 756733, "symbol": "SPY", "side": "S", "order_type": "STOP",
          "stop_price": "450.00", "total_size": "10.0", "cum_fill": "0.0", "size": "10.0",
          "order_status": "PreSubmitted", "tif": "GTC"}


def test_a_modify_repeats_the_orders_fields_as_the_real_status_gives_them():
    assert OrderRequests.order_fields_from_status({**STATUS, "side": "s", "conid": "756733"}) == {
        "conid": 756733, "orderType": "STP", "side": "SELL", "quantity": 10, "tif": "GTC", "price": 450.0}


@pytest.mark.parametrize(("field", "value"), [("tif", None), ("tif", ""), ("side", None), ("side", "?"),
                                            ("total_size", None), ("total_size", "abc"), ("total_size", "0"),
                                            ("stop_price", None)])
def test_a_modify_never_guesses_a_field_the_status_lacks(field, value):
    status = {k: v for k, v in {**STATUS, field: value}.items() if v is not None}
    with pytest.raises(IBKRMalformedAnswer) as raised:  # a GTC stop re-sent as DAY would lapse tonight
        OrderRequests.order_fields_from_status(status)
    assert field in raised.value.problem and repr(value if value is not None else None) in raised.value.problem


# ------------------------------------------------------------------------------ account and P&L

@pytest.mark.parametrize(("shape", "equity"), [
    (lambda v: v, 50_000.0 + 10 * 51 + 11 * 52),
    (lambda v: v["amount"], 50_000.0 + 10 * 51 + 11 * 52),
    (lambda v: str(v["amount"]), 50_000.0 + 10 * 51 + 11 * 52),
    (lambda v: {**v, "amount": None, "value": f"{v['amount']:,.2f}"}, 50_000.0 + 10 * 51 + 11 * 52),
])
def test_summary_values_as_objects_or_plain_numbers(emulator_factory, client_factory, shape, equity):
    emulator = emulator_factory(positions=2, cash=50_000.0)
    emulator.inject("/portfolio/*/summary", method="GET",
                    transform=lambda body: {k: shape(v) if k in ("netliquidation", "totalcashvalue") else v
                                            for k, v in body.items()})
    assert IBKRBroker(client_factory(emulator)).account({}).equity == pytest.approx(equity, abs=0.01)


def test_a_summary_value_ibkr_marks_null_is_not_an_amount(emulator_factory, client_factory):
    emulator = emulator_factory(positions=2, cash=50_000.0)
    emulator.inject("/portfolio/*/summary", method="GET",
                    transform=lambda body: {**body, "netliquidation": {**body["netliquidation"], "amount": 0.0,
                                                                        "isNull": True}})
    with pytest.raises(IBKRRequestError) as raised:  # never an equity of 0
        IBKRBroker(client_factory(emulator)).account({})
    assert "netliquidation" in raised.value.problem


def test_realized_pnl_missing_from_the_ledger_is_not_a_day_without_losses(emulator_factory, client_factory):
    emulator = emulator_factory(positions=0, pnl_available=False)
    emulator.inject("/portfolio/*/ledger", method="GET",
                    transform=lambda body: {k: ({kk: vv for kk, vv in v.items() if kk != "realizedpnl"}
                                                if isinstance(v, dict) else v) for k, v in body.items()})
    account = IBKRBroker(client_factory(emulator)).account({})  # unknown: the daily-loss gate refuses entries
    assert account.daily_pnl is None and "realizedpnl=None" in account.daily_pnl_unknown


@pytest.mark.parametrize("drop", [("avgPrice", "avgCost"), ("avgPrice", "avgCost", "mktPrice")])
def test_a_position_without_a_cost_is_not_valued_at_0(emulator_factory, client_factory, drop):
    emulator = emulator_factory(positions=2)
    emulator.inject("/portfolio/*/positions/0", method="GET",
                    transform=lambda rows: [{k: ("" if k in drop else v) for k, v in r.items()} for r in rows])
    with pytest.raises(IBKRMalformedAnswer) as raised:
        IBKRBroker(client_factory(emulator)).account({})
    assert "POS000 has no usable avgPrice or avgCost ('', '')" in raised.value.problem


def test_positions_with_float_strings_and_string_conids(emulator_factory, client_factory):
    emulator = emulator_factory(positions=2)
    emulator.inject("/portfolio/*/positions/0", method="GET",
                    transform=lambda rows: [{**r, "position": f"{float(r['position']):.1f}", "conid": str(r["conid"]),
                                             "mktPrice": "", "extraField": {"nested": 1}} for r in rows])
    state = IBKRBroker(client_factory(emulator)).account({"POS000": Mark(55.0)})
    assert state.positions["POS000"].quantity == 10 and state.positions["POS000"].market_price == 55.0
    assert state.positions["POS001"].market_price == 51.0  # no price at IBKR, no mark: its cost, never 0


# ------------------------------------------------------------------- executions of trades by hand

def _hand_sale_and_an_option_on_the_ticker(emulator, option_fields: dict) -> int:
    """A sale of AAPL made in TWS, and in the trades list beside it an execution of another AAPL
    contract (an option, another listing) under the same ticker. The stock sale's IBKR order id."""
    emulator.set_price("AAPL", 100.0)
    hand = emulator.trade_by_hand("AAPL", "SELL", 20, 104.0)

    def with_option(rows):
        sale = next(r for r in rows if str(r.get("order_id")) == str(hand))
        option = {k: v for k, v in sale.items() if k != "sec_type"}
        return [*rows, {**option, "execution_id": "0000e0d5.0pt10n00.01.01", "conid": 987654321, "size": 1.0,
                        "price": "3.10", **option_fields}]
    emulator.inject("/iserver/account/trades", method="GET", count=10, transform=with_option)
    return hand


@pytest.mark.parametrize("option_fields", [{}, {"sec_type": "STK", "listing_exchange": "IBIS"}])
def test_a_trade_by_hand_in_another_contract_under_the_ticker_is_never_the_symbols(emulator, client, option_fields):
    """The broker is made for the symbols in play (the sync's), so a symbol the pipeline once traded
    but holds nothing in now is not among them: its contract is resolved for the trades by hand all
    the same, and an execution of another conid under its ticker (an option whose row lacks sec_type,
    a listing on another exchange) is not booked as shares of it. Before: without a resolved contract
    any row under the ticker not marked otherwise than STK was: 1 share at 3.10 in the books."""
    _hand_sale_and_an_option_on_the_ticker(emulator, option_fields)
    outside = IBKRBroker(client, order_cache_seconds=0).outside_executions(["AAPL"], set())
    assert [(e.symbol, e.side, e.quantity, e.price) for e in outside] == [("AAPL", "SELL", 20.0, 104.0)]


@pytest.mark.parametrize("conid", [None, "", "n/a"])
def test_a_trade_by_hand_with_no_usable_conid_is_not_silently_dropped(emulator, client, conid):
    """A sale by hand in AAPL whose row has no usable conid: which contract it traded is unknown, so
    nothing is recorded from it, and the reason is said (the sync reports it as drift). Before: it
    was dropped without a word (AAPL resolved: a row under its ticker without its conid is another
    contract), leaving only a drift line about the executions' position and no reason."""
    hand = emulator.trade_by_hand("AAPL", "SELL", 20, 104.0)
    emulator.inject("/iserver/account/trades", method="GET", count=10, transform=lambda rows: [
        {**r, "conid": conid} if str(r.get("order_id")) == str(hand) else r for r in rows])
    with pytest.raises(IBKRMalformedAnswer) as raised:
        IBKRBroker(client, order_cache_seconds=0, symbols=("AAPL",)).outside_executions(["AAPL"], set())
    assert f"no usable conid ({conid!r})" in raised.value.problem and raised.value.fix
