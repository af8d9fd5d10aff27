"""Positions that lag fills at IBKR and runs that race (the emulator over real HTTP): no stop
cancelled, no exit doubled and no second entry while IBKR's positions lag; concurrent entries
within one account's limits; a sync resizing a stop while an exit converts it. World and decisions:
lifecycle_world.py."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.portfolio_sync import ORPHAN_GRACE, sync_portfolio, with_working_orders
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import session_factory
from trading_pipeline.core.analysis import TradeDecision
from trading_pipeline.core.orders import build_legs, client_order_id
from trading_pipeline.core.risk import entry_limits
from trading_pipeline.core.strategies import RiskSettings
from trading_pipeline_tests.adapters.ibkr.lifecycle_world import (
    QUICK,
    QUICK_PACING,
    RACE_WINDOW,
    entry_decision,
    exit_decision,
    limits_now,
)
from trading_pipeline_tests.adapters.sync_world import earlier


def test_a_stop_is_kept_while_ibkrs_positions_do_not_list_a_position_just_opened(world):
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    sync_portfolio(w.sessions, w.broker, {})  # a sync before the entry: no position then
    earlier(w.sessions, ORPHAN_GRACE * 5)
    conid = w.broker.client.resolve("AAPL").conid
    w.emulator.inject("/portfolio/*/positions/0", method="GET", count=100,  # the fill is not in the positions yet
                      transform=lambda rows: [row for row in rows if row["conid"] != conid])
    stop_id, take_profit_id = w.open_position(entry_decision("lagging"))
    for _ in range(2):
        report = sync_portfolio(w.sessions, w.broker, {})
        assert (w.order(stop_id).status, w.order(take_profit_id).status) == ("Submitted", "Submitted")
    # The emulator's summary values the position its list lacks: the drift says both.
    assert any(line.startswith("AAPL: the working stop-loss tp-lagging-sl (SELL 50) has no position in the broker's "
                               "answer, but the broker lists no position at all") for line in report.drift)
    assert w.requests_sent() == (1, 0, 0)


def test_an_exit_after_a_gap_through_the_stop_never_sells_what_ibkrs_lagging_positions_still_list(world):
    """The stop filled at the open through a gap, and IBKR's positions still list the 50 it sold (for a
    few seconds, invalidated or not). There is no working stop left to turn into the exit, and a
    market sale of the 50 listed would have opened a short of 50."""
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    stop_id, take_profit_id = w.open_position(entry_decision("gapped"))
    w.emulator.lag_positions()
    w.emulator.set_price("AAPL", 80.0)  # through the stop at 85
    assert (w.order(stop_id).status, w.order(take_profit_id).status) == ("Filled", "Cancelled")
    assert w.held("AAPL") == 50

    result = w.exit(exit_decision("gapped-exit", 50))
    assert result.status == "not_sent", result.reason
    assert "the pipeline's own orders imply 0: tp-gapped-sl (stop-loss) SELL 50 filled" in result.reason
    assert "could then open a short position, so nothing was sent" in result.reason
    assert w.requests_sent() == (1, 0, 0) and w.emulator.orders_with_coid("tp-gapped-exit") == []
    assert w.row("tp-gapped-sl").status == "Filled"
    w.emulator.catch_up_positions()  # seconds later: the same decision finds nothing to close
    again = w.exit(exit_decision("gapped-exit", 50))
    assert again.status == "not_sent" and "nothing to close" in again.reason
    assert w.position_path("AAPL") == [50, 0]  # never short


def test_two_exits_decided_at_once_close_the_position_once_while_ibkrs_positions_lag(world):
    """Two runs decide at the same moment to exit AAPL (different decisions). The first turns the stop
    into a market order, which fills at once; when the second gets the account lock, the stop is no
    longer working and IBKR's positions still list the 50: its market sale of 50 would open a short."""
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    w.open_position(entry_decision("twice"))
    w.emulator.lag_positions()
    start = threading.Barrier(2)

    def run(decision: TradeDecision):
        process = w.restart()
        record_decision(process.sessions, decision)
        start.wait(30)
        return process.desk.exit_once(decision)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, [exit_decision("twice-exit-a", 50), exit_decision("twice-exit-b", 50)]))
    assert sorted(r.status for r in results) == ["not_sent", "submitted"], [(r.status, r.reason) for r in results]
    refused = next(r for r in results if r.status == "not_sent")
    assert "the pipeline's own orders imply 0: tp-twice-sl (stop-loss) SELL 50 filled" in refused.reason
    assert w.requests_sent() == (1, 1, 0)  # the bracket and the stop's conversion: no second sale
    assert w.position_path("AAPL") == [50, 0]


def test_two_runs_deciding_for_a_symbol_at_once_send_one_entry_while_ibkrs_positions_lag(world):
    """Two runs at the same moment with different decisions for AAPL (the daily run and one started
    by hand, say). The account lock makes them take turns; the first entry fills at once, and IBKR's
    positions do not list it yet when the second reads the account, nor is the filled entry working:
    the first bracket's stop-loss, working, is what keeps the second bracket from doubling the risk."""
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    w.emulator.lag_positions()
    start = threading.Barrier(2)

    def run(decision: TradeDecision):
        process = w.restart()  # its own client, broker and desk, on the same trading database
        record_decision(process.sessions, decision)
        start.wait(30)
        return process.desk.submit_once(decision, build_legs(decision, "DAY"), decision.entry,
                                        limits=limits_now(process, decision))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, [entry_decision("daily-run"), entry_decision("run-by-hand")]))
    sent = [r for r in results if r.status == "filled"]
    refused = [r for r in results if r.status == "not_sent"]
    assert len(sent) == 1 and len(refused) == 1, [(r.decision_id, r.status, r.reason) for r in results]
    assert "no_pyramiding" in refused[0].reason
    assert f"stop-loss {sent[0].client_order_id}-sl (SELL 50 @ 85.00, Submitted)" in refused[0].reason
    assert w.requests_sent()[0] == 1 and w.position_path("AAPL") == [50]
    assert w.held("AAPL") == 0  # still not listed


def test_concurrent_entries_never_exceed_max_open_positions_at_ibkr(emulator_factory, client_factory, tmp_path):
    """Five runs decide at once on the same empty account; the account lock (a file lock beside the
    SQLite trading DB, across threads and processes) makes 'read the account, check, place' atomic.
    To make the race certain rather than likely, each run, having read the account, waits (up to
    RACE_WINDOW seconds) until every run has read it: without the lock all five read an empty account
    and all five place; with it the first waits alone, and each later run reads what the earlier placed."""
    emulator = emulator_factory(market_hours="open", positions=0, **QUICK)
    symbols = ("AAA", "BBB", "CCC", "DDD", "EEE")
    for symbol in symbols:
        emulator.set_price(symbol, 100.0)
    url = f"sqlite:///{tmp_path / 'trading.db'}"
    session_factory(url)  # the schema, once, before the runs race
    limits = RiskSettings(max_open_positions=3, max_gross_exposure=1.0, max_position_share=0.10)
    start, all_have_read = threading.Barrier(len(symbols)), threading.Barrier(len(symbols))

    def decide_and_send(index_and_symbol):
        index, symbol = index_and_symbol
        sessions = session_factory(url)
        broker = IBKRBroker(client_factory(emulator, pacing=QUICK_PACING), symbols=symbols, id_map_path=tmp_path / "ids.json")
        # Some entries fill at once (limit at the market), others keep working below it: both count.
        entry = 100.0 if index % 2 == 0 else 99.0
        decision = entry_decision(f"conc-{symbol}", symbol=symbol, entry=entry, stop=entry - 4, target=entry + 6,
                                  quantity=100)
        record_decision(sessions, decision)

        def limits_now():
            account = with_working_orders(broker.account({}), sessions, broker)
            try:
                all_have_read.wait(timeout=RACE_WINDOW)
            except threading.BrokenBarrierError:  # the others wait for the lock: this run is alone
                pass
            return entry_limits(symbol, entry, entry - 4, account, limits, own_order=client_order_id(decision))

        start.wait(timeout=30)
        return OrderDesk(sessions, broker).submit_once(decision, build_legs(decision, "DAY"), entry,
                                                       limits=limits_now)

    with ThreadPoolExecutor(len(symbols)) as pool:
        results = list(pool.map(decide_and_send, enumerate(symbols)))
    sent = [r for r in results if r.status in ("filled", "submitted")]
    refused = [r for r in results if r.status == "not_sent"]
    assert len(sent) == 3 and len(refused) == 2, [(r.symbol, r.status, r.reason) for r in results]
    assert all("max_open_positions" in r.reason for r in refused)
    with emulator.state.lock:
        entries = [o for o in emulator.state.orders.values() if o.coid and o.coid.startswith("tp-conc-")]
        brackets = [o for o in emulator.state.orders.values() if o.parent_id in {e.order_id for e in entries}]
    assert len(entries) == 3 and len(brackets) == 6
    assert sorted(e.symbol for e in entries) == sorted(r.symbol for r in sent)


# ---------------------------------------------------------------------------------------------- 10
def test_a_sync_resizing_the_stop_while_an_exit_converts_it_never_turns_the_exit_back_into_a_stop(world):
    """The sync (its own process, no orders step's lock) resizes a stop to the position while an orders
    step turns that stop into the market exit. An IBKR modify repeats every field of the order as read
    just before: a sync that read the stop (STP 85) before the exit's change and sent its resize after
    it put STP 85 back, and the exit, recorded as sent, never happened. The sync's resize takes the
    account lock the desk's exit holds, so one of the two read-modify-writes runs after the other."""
    w = world()
    w.emulator.set_price("AAPL", 100.0)
    stop_id, _ = w.open_position(entry_decision("rmw"))
    w.sell_by_hand(20)
    w.emulator.set_market_open(False)  # the exit waits for the open: what IBKR holds in between is checked
    assert w.held("AAPL") == 30 and w.order(stop_id).quantity == 50

    sync_process, orders_process = w.restart(), w.restart()
    read_fields = sync_process.broker.client.order_fields_from_status
    exits = {}

    def exit_runs_between_the_syncs_read_and_its_resize(status):
        fields = read_fields(status)  # the sync has read the stop's fields (STP 85, 50)
        if not exits:
            runner = threading.Thread(target=lambda: exits.update(result=orders_process.exit(
                exit_decision("rmw-exit", 50))))
            exits["thread"] = runner
            runner.start()
            runner.join(3.0)  # it finishes now unless something (the account lock) holds it back
        return fields

    sync_process.broker.client.order_fields_from_status = exit_runs_between_the_syncs_read_and_its_resize
    sync_portfolio(sync_process.sessions, sync_process.broker, {})
    exits["thread"].join(60)
    assert exits["result"].status == "submitted", exits["result"].reason
    stop = w.order(stop_id)
    assert (stop.order_type, stop.quantity) == ("MKT", 30), stop  # the exit, of what is held
    assert (w.row("tp-rmw-sl").order_type, w.row("tp-rmw-sl").quantity) == ("MKT", 30)
    w.emulator.set_price("AAPL", 90.0)  # the next session opens above the old stop: the exit fills
    w.emulator.set_market_open(True)
    assert w.position_path("AAPL") == [50, 30, 0]  # flat, never short
