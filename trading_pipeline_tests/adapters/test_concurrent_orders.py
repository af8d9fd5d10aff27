"""N decide runs at once against one account (issue 12.8): each sized its decision on the same empty
account, but the limit check and the placement are one atomic step across processes, so together
they never exceed max_open_positions or the gross-exposure cap, on SQLite and on PostgreSQL."""

import multiprocessing
import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from trading_pipeline.adapters.broker import PaperBroker
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.portfolio_sync import with_working_orders
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import OrderRow, PaperOrderRow, account_lock, session_factory
from trading_pipeline.core.analysis import Action, TradeDecision
from trading_pipeline.core.orders import build_legs, client_order_id
from trading_pipeline.core.risk import entry_limits
from trading_pipeline.core.strategies import RiskSettings
from trading_pipeline.errors import UserError

SYMBOLS = ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF"]
LIMITS = RiskSettings(max_open_positions=3, max_gross_exposure=0.30, max_position_share=0.10)
AS_OF = datetime(2026, 9, 1, 21, 30, tzinfo=UTC)


def decision(symbol: str) -> TradeDecision:
    # What each run decided on the same snapshot (an empty account): 100 shares at 100 = 10% each.
    return TradeDecision(decision_id=f"conc-{symbol}", strategy="s", symbol=symbol, as_of=AS_OF, data_through=AS_OF,
                         proposed_action=Action.BUY, action=Action.BUY, entry=100.0, stop=96.0, targets=[106.0],
                         r_multiple=1.5, profit_margin=0.06, confidence=0.7, quantity=100, rationale="test")


def decide_and_send(url: str, symbol: str, start) -> str:
    sessions = session_factory(url)
    broker = PaperBroker(sessions, 100_000.0)
    the_decision = decision(symbol)
    record_decision(sessions, the_decision)

    def limits_now():
        account = with_working_orders(broker.account({}), sessions, broker)
        return entry_limits(symbol, 100.0, 96.0, account, LIMITS, own_order=client_order_id(the_decision))

    start.wait()  # every process sends at the same moment
    return OrderDesk(sessions, broker).submit_once(the_decision, build_legs(the_decision, "DAY"), 100.0,
                                                   placed_at=AS_OF, limits=limits_now).status


def test_concurrent_runs_respect_the_account_limits(database_url):
    session_factory(database_url)  # the schema, once, before the processes race
    context = multiprocessing.get_context("spawn")  # fresh interpreters, like Dagster's run workers
    with context.Manager() as manager:
        start = manager.Barrier(len(SYMBOLS))
        with context.Pool(len(SYMBOLS)) as pool:
            statuses = pool.starmap(decide_and_send, [(database_url, symbol, start) for symbol in SYMBOLS])
    assert sorted(statuses) == ["not_sent"] * 3 + ["submitted"] * 3
    sessions = session_factory(database_url)
    with sessions() as session:
        placed = session.scalars(select(PaperOrderRow).where(PaperOrderRow.parent_broker_order_id.is_(None))).all()
        recorded = session.scalars(select(OrderRow).where(OrderRow.role == "entry")).all()
    assert len(placed) == 3 and len(recorded) == 3
    assert sum(row.quantity * row.price for row in placed) <= 0.30 * 100_000.0


def test_the_recheck_shrinks_an_order_to_the_room_left(database_url):
    sessions = session_factory(database_url)
    broker = PaperBroker(sessions, 100_000.0)
    first, second = decision("AAA"), decision("BBB").model_copy(update={"quantity": 250})
    for the_decision in (first, second):
        record_decision(sessions, the_decision)

    def limits_for(the_decision):
        def limits_now():
            account = with_working_orders(broker.account({}), sessions, broker)
            return entry_limits(the_decision.symbol, 100.0, 96.0, account,
                                LIMITS.model_copy(update={"max_position_share": 0.25}),
                                own_order=client_order_id(the_decision))
        return limits_now

    desk = OrderDesk(sessions, broker)
    assert desk.submit_once(first, build_legs(first, "DAY"), 100.0, placed_at=AS_OF,
                            limits=limits_for(first)).status == "submitted"
    # 30% × 100,000 − 10,000 working = 20,000 of room: 200 shares, not the 250 decided.
    result = desk.submit_once(second, build_legs(second, "DAY"), 100.0, placed_at=AS_OF, limits=limits_for(second))
    assert result.status == "submitted" and [leg.quantity for leg in result.legs] == [200, 200, 200]
    assert broker.find_order("tp-conc-BBB-sl") is not None
    with sessions() as session:
        assert {row.quantity for row in session.scalars(select(PaperOrderRow).where(
            PaperOrderRow.client_order_id.like("tp-conc-BBB%")))} == {200}


class CachedLookups(PaperBroker):
    """A broker whose lookups answer from a list read a few seconds ago, as IBKR's (one live-orders
    answer per 5 s serves a process's lookups). `placing`/`go` hold the first placement open."""

    def __init__(self, sessions, placed: list, placing=None, go=None):
        super().__init__(sessions, 100_000.0)
        self._listed = None
        self._placed, self._placing, self._go = placed, placing, go

    def find_order(self, client_order_id):
        if self._listed is None:
            self._listed = {order.client_order_id: order for order in self.open_orders()}
        return self._listed.get(client_order_id)

    def place(self, symbol, legs, reference_price, placed_at=None):
        self._placed.append(legs[0].client_order_id)
        if self._placing is not None:
            self._placing.set()
            assert self._go.wait(10)
        return super().place(symbol, legs, reference_price, placed_at=placed_at)


def test_a_second_run_of_the_same_decision_waiting_on_the_lock_sends_nothing(tmp_path):
    """Two runs of one decision at once: the second finds the first's row 'submitting' and waits for
    the account lock. Once it has it, the database says the order was sent; its broker lookups may
    still answer from a list read before the first run placed (IBKR's cached live orders). It must
    send nothing: before, it wrote the rows back to 'submitting', placed the order a second time
    (saved only by the broker refusing the duplicate cOID) and left them 'unknown'."""
    url = f"sqlite:///{tmp_path / 'trading.db'}"
    sessions = session_factory(url)
    the_decision = decision("AAA")
    record_decision(sessions, the_decision)
    placed: list[str] = []
    placing, go = threading.Event(), threading.Event()
    first = CachedLookups(sessions, placed, placing, go)
    second = CachedLookups(session_factory(url), placed)
    assert second.find_order(client_order_id(the_decision)) is None  # its list is read before the first places
    results = {}

    def run(name, broker):
        results[name] = OrderDesk(broker._sessions, broker).submit_once(
            the_decision, build_legs(the_decision, "DAY"), 100.0, placed_at=AS_OF)

    one = threading.Thread(target=run, args=("first", first))
    one.start()
    assert placing.wait(10)  # the first run is sending, its rows 'submitting', the lock held
    two = threading.Thread(target=run, args=("second", second))
    two.start()
    time.sleep(0.5)  # the second run has read the 'submitting' row and waits for the lock
    go.set()
    one.join(10)
    two.join(10)
    assert results["first"].status == "submitted"
    assert results["second"].status == "already_sent", results["second"].reason
    assert placed == [client_order_id(the_decision)]  # sent once, never offered to the broker again
    with sessions() as session:
        assert session.get(OrderRow, client_order_id(the_decision)).status == "Submitted"


def test_an_account_lock_never_freed_is_an_error_naming_what_holds_it_and_what_to_do(database_url):
    """The lock stays taken (a sync waiting on a cancel at the broker, a stuck run): the orders step
    waiting for it failed with a bare TimeoutError, which said neither why nor what to do."""
    sessions = session_factory(database_url)
    taken, release = threading.Event(), threading.Event()

    def hold():
        with account_lock(sessions):
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(10)
        with pytest.raises(UserError) as error, account_lock(sessions, timeout=0.3):
            pass
    finally:
        release.set()
        holder.join()
    assert "nothing was sent or changed" in error.value.problem
    assert "terminate" in error.value.fix and "run the step again" in error.value.fix
