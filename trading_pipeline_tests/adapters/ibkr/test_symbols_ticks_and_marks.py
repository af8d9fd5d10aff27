"""Positions under the strategy's symbol (issue 12 point 4: BRK.B is 'BRK B' at IBKR, matched by
conid), the contract's minimum tick (point 6) and the account valued at IBKR's own figures with
marks only as a fallback (points 5 and 9)."""

import logging

import pytest

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.ibkr.errors import IBKROrderRejected
from trading_pipeline.core.risk import Mark
from trading_pipeline_tests.adapters.ibkr.test_orders_and_portfolio import bracket


def test_a_brk_b_position_shows_under_the_strategys_symbol_with_its_conid(emulator, client):
    broker = IBKRBroker(client, symbols=["BRK.B", "MSFT"])
    emulator.set_price("BRK B", 400.0)
    broker.place("BRK.B", bracket(coid="bk-1", entry=400.5, stop=390.0, target=420.0, quantity=5), 400.5)
    asked = [r[4]["symbols"] for r in emulator.requests("GET", "/trsrv/stocks")]
    assert asked == ["BRK.B", "BRK B"]  # IBKR knows the class share only by its spaced ticker
    conid = client.resolve("BRK.B").conid
    state = broker.account({})
    assert "BRK B" not in state.positions
    held = state.positions["BRK.B"]
    assert (held.quantity, held.market_price, held.conid) == (5, 400.0, conid)
    assert [(e.symbol, e.quantity) for e in broker.executions("bk-1")] == [("BRK.B", 5)]
    # a position of no strategy symbol keeps IBKR's ticker (the portfolio sync flags it as drift)
    assert "BRK B" in IBKRBroker(client).account({}).positions
    assert all(p.conid for p in state.positions.values())


def test_min_tick_from_the_contract_rules_cached_per_conid(emulator, client, caplog):
    broker = IBKRBroker(client)
    assert broker.min_tick("TICK05") == 0.05
    assert broker.min_tick("MSFT") == 0.01
    assert broker.min_tick("TICK05") == 0.05
    rules = emulator.requests("GET", "/iserver/contract/*/info-and-rules")
    assert len(rules) == 2 and all(r[4] == {"isBuy": "true"} for r in rules)  # cached per conid
    emulator.inject("/iserver/contract/*/info-and-rules", method="GET",
                    transform=lambda body: {**body, "rules": {"orderTypes": ["limit"]}})
    with caplog.at_level(logging.WARNING):
        assert broker.min_tick("AAPL") == 0.01
    assert "no usable increment" in caplog.text
    emulator.inject("/iserver/contract/*/info-and-rules", method="GET", body={"error": "contract rules unavailable"})
    assert broker.min_tick("IBM") == 0.01
    assert broker.min_tick("AAPL") == 0.01 and len(emulator.requests("GET", "/iserver/contract/*")) == 5  # not cached


def test_a_price_off_the_contracts_tick_is_rejected_by_ibkr(emulator, client):
    broker = IBKRBroker(client)
    emulator.set_price("TICK05", 100.0)
    with pytest.raises(IBKROrderRejected) as raised:
        broker.place("TICK05", bracket(coid="tk-1", entry=99.0, stop=95.02, target=105.0), 99.0)
    assert "minimum price variation" in raised.value.ibkr_text and emulator.orders_with_coid("tk-1") == []
    assert len(broker.place("TICK05", bracket(coid="tk-2", entry=99.0, stop=95.05, target=105.0), 99.0)) == 3


def test_prices_on_a_sub_cent_tick_reach_ibkr_as_the_risk_gates_rounded_them(emulator_factory, client_factory):
    """A stock under $1 trades in 0.0001: the gates round entry 0.8546 and stop 0.8471 to that tick
    and find them 0.0075 apart. Rounded again to cents in the request, both became 0.85: a stop at
    the entry, which fires on the first tick down after the fill."""
    emulator = emulator_factory(tick_sizes={"PENNY": 0.0001})
    broker = IBKRBroker(client_factory(emulator))
    emulator.set_price("PENNY", 0.85)
    assert broker.min_tick("PENNY") == 0.0001
    broker.place("PENNY", bracket(coid="pn-1", entry=0.8546, stop=0.8471, target=0.8790), 0.85)
    (entry,) = emulator.orders_with_coid("pn-1")
    (stop,) = [o for o in emulator.children_of(entry.order_id) if o.order_type == "STP"]
    assert (entry.price, stop.price) == (0.8546, 0.8471)


def test_positions_are_valued_at_ibkrs_price_and_marks_only_fill_gaps(emulator_factory, client_factory):
    emulator = emulator_factory(positions=2)
    broker = IBKRBroker(client_factory(emulator))
    state = broker.account({"POS000": Mark(55.0, 54.0)})
    assert state.positions["POS000"].market_price == 51.0  # IBKR's mktPrice, not the mark
    emulator.inject("/portfolio/*/positions/0", method="GET",
                    transform=lambda rows: [{**r, "mktPrice": None} for r in rows])
    without_prices = broker.account({"POS000": Mark(55.0, 54.0)})
    assert without_prices.positions["POS000"].market_price == 55.0  # no IBKR price: the last close
    assert without_prices.positions["POS001"].market_price == pytest.approx(51.0)  # no mark either: cost
