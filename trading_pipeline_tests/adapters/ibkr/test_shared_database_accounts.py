"""Two IBKR accounts writing into one trading database: the standard journey is to trade the paper
account (DU…) for weeks, then log the gateway in to the live account (U…, TRADING_ALLOW_LIVE=yes)
with the same database. Both are the broker "ibkr"; each row names its account too
(`OrderRow.account`), and each account's order lifecycle reads only its own rows (`of_broker`): the
paper account's open orders are never asked of, cancelled at, or counted as protection or working
entries by the live one (nor the other way round), its fills are not the live books', and a
decision it was sent is not sent to the live account too. Rows written before the account column
(NULL) stay with whichever IBKR account runs, as before. Each account is its own emulator (its own
`/iserver/accounts` and `/portfolio/accounts` list, as a gateway logged in with that account's
username answers) over real HTTP, with one trading database and one state folder. The syncs'
position and account snapshots name the account too: one account's sync never stands in for the
other's (the orphan-stop timing, the "since the last sync" window)."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.portfolio_sync import ORPHAN_GRACE, sync_portfolio, with_working_orders
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import (
    AccountSnapshotRow,
    ExecutionRow,
    OrderRow,
    PositionSnapshotRow,
    of_broker,
    session_factory,
)
from trading_pipeline.core.analysis import Action
from trading_pipeline.core.orders import build_legs
from trading_pipeline_tests.adapters.ibkr.lifecycle_world import (
    QUICK,
    QUICK_PACING,
    World,
    entry_decision,
    exit_decision,
    limits_now,
)
from trading_pipeline_tests.adapters.ibkr.test_shared_database_brokers import Asked
from trading_pipeline_tests.adapters.sync_world import earlier

PAPER_ACCOUNT, LIVE_ACCOUNT = "DU1234567", "U7654321"


@pytest.fixture
def accounts(emulator_factory, client_factory, tmp_path, monkeypatch):
    """() -> (paper World, live World): the DU account's gateway and the U account's, both holding
    nothing, on one trading database and one saved cOID -> IBKR order id map (one IBKR_STATE_DIR)."""
    monkeypatch.setenv("TRADING_ALLOW_LIVE", "yes")  # the live account may be sent orders
    sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")

    def world(account: str, live: bool) -> World:
        emulator = emulator_factory(market_hours="open", positions=0, account_id=account, live=live, **QUICK)
        broker = IBKRBroker(client_factory(emulator, pacing=QUICK_PACING), order_cache_seconds=0,
                            id_map_path=tmp_path / "ibkr-order-ids.json", symbols=("AAPL", "MSFT"))
        return World(emulator, sessions, broker, OrderDesk(sessions, broker), None)

    return lambda: (world(PAPER_ACCOUNT, False), world(LIVE_ACCOUNT, True))


def rows_of(w: World, account: str | None) -> dict[str, tuple]:
    with w.sessions() as session:
        query = select(OrderRow).where(OrderRow.account.is_(None) if account is None else OrderRow.account == account)
        return {row.client_order_id: (row.status, row.quantity, row.filled_quantity, row.order_type,
                                      row.exit_decision_id) for row in session.scalars(query)}


def test_a_paper_accounts_stop_is_not_the_live_positions_protection_and_the_live_sync_leaves_it(accounts):
    paper, live = accounts()
    paper.emulator.set_price("AAPL", 100.0)
    paper.open_position(entry_decision("du-long"))  # 50 AAPL at DU, its stop and take-profit working there
    assert {row[0] for row in rows_of(paper, PAPER_ACCOUNT).values()} == {"Filled", "Submitted"}
    live.emulator.set_price("AAPL", 100.0)
    stop_id, take_profit_id = live.open_position(entry_decision("u-long"))
    live.broker.client.cancel_order(stop_id)  # the live bracket cancelled in TWS: the U position is unprotected
    live.broker.client.cancel_order(take_profit_id)
    before = rows_of(paper, PAPER_ACCOUNT)
    asked = Asked(live.broker)

    account = with_working_orders(live.broker.account({}), live.sessions, asked)
    assert "AAPL" not in account.working_protection  # the gates: the DU stop protects nothing at U

    for _ in range(2):
        report = sync_portfolio(live.sessions, asked, {})
    assert not set(asked.asked) & set(before), asked.asked  # the live account was never asked about a DU row
    assert rows_of(paper, PAPER_ACCOUNT) == before  # nor were they closed as 'ended outside the pipeline'
    assert len(report.unprotected) == 1 and "AAPL: the pipeline's position of 50 shares has NO working stop-loss" \
        in report.unprotected[0], report.drift
    assert [p["stop"] for p in report.positions if p["symbol"] == "AAPL"] == [None]
    assert not [line for line in report.drift if "imply" in line], report.drift  # U fills only: 50 = 50
    assert [t["decision_id"] for t in report.trades] == ["u-long"]  # the live books: no paper trade
    assert report.other_brokers == [(
        f"2 open order(s) of the ibkr broker (account {PAPER_ACCOUNT}) in this database are not this broker's "
        f"(ibkr, account {LIVE_ACCOUNT}): left as they are; they are checked when TRADING_BROKER=ibkr runs again "
        f"with the gateway logged in to account {PAPER_ACCOUNT}; use a separate TRADING_DATABASE_URL per broker "
        "and account to keep them apart")]

    # Back to the paper account: its sync manages its own rows only, and leaves the live ones
    live_rows = rows_of(live, LIVE_ACCOUNT)
    asked_paper = Asked(paper.broker)
    paper_report = sync_portfolio(paper.sessions, asked_paper, {})
    assert not set(asked_paper.asked) & set(live_rows), asked_paper.asked
    assert rows_of(live, LIVE_ACCOUNT) == live_rows
    assert paper_report.unprotected == [] and paper_report.drift == [], paper_report.drift
    assert [p["stop"] for p in paper_report.positions if p["symbol"] == "AAPL"] == [85.0]
    assert [t["decision_id"] for t in paper_report.trades] == ["du-long"]


def test_a_paper_accounts_working_entry_does_not_block_a_live_entry(accounts):
    paper, live = accounts()
    paper.emulator.set_price("MSFT", 101.0)  # the DU entry's 100 limit does not fill: it works
    decision = entry_decision("du-msft", symbol="MSFT")
    record_decision(paper.sessions, decision)
    assert paper.desk.submit_once(decision, build_legs(decision, "DAY"), 100.0).status == "submitted"
    before = rows_of(paper, PAPER_ACCOUNT)
    live.emulator.set_price("MSFT", 100.0)
    live_decision = entry_decision("u-msft", symbol="MSFT")
    record_decision(live.sessions, live_decision)
    limits = limits_now(live, live_decision)
    allowed, checks = limits()
    assert allowed >= 50 and all(c.passed for c in checks), [(c.rule, c.detail) for c in checks if not c.passed]
    sent = live.desk.submit_once(live_decision, build_legs(live_decision, "DAY"), 100.0, limits=limits)
    assert sent.status == "filled", sent.reason
    assert rows_of(paper, PAPER_ACCOUNT) == before  # the DU entry still works, untouched
    assert set(rows_of(live, LIVE_ACCOUNT)) == {"tp-u-msft", "tp-u-msft-sl", "tp-u-msft-tp"}


def test_a_decision_sent_to_the_paper_account_is_not_sent_to_the_live_account(accounts):
    """The DU account was sent the decision and the process died before it recorded the answer
    ('submitting'); then the gateway was logged in to the U account. U does not know the cOID:
    sending it there would be a second order, with real money, for one decision."""
    paper, live = accounts()
    paper.emulator.set_price("AAPL", 101.0)
    decision = entry_decision("sent-to-du")
    record_decision(paper.sessions, decision)
    assert paper.desk.submit_once(decision, build_legs(decision, "DAY"), 100.0).status == "submitted"
    with paper.sessions() as session:
        session.execute(update(OrderRow).where(OrderRow.decision_id == decision.decision_id)
                        .values(status="submitting"))
        session.commit()
    live.emulator.set_price("AAPL", 100.0)

    assert live.desk.recorded(decision) is None  # unknown yet: the orders step goes on to submit_once
    result = live.desk.submit_once(decision, build_legs(decision, "DAY"), 100.0)
    assert result.status == "already_sent" and result.broker == "ibkr", result.reason
    assert (f"was sent to the ibkr broker (account {PAPER_ACCOUNT}), not this one (the ibkr broker (account "
            f"{LIVE_ACCOUNT}))") in result.reason
    assert f"with the gateway logged in to account {PAPER_ACCOUNT}" in result.reason
    assert live.requests_sent() == (0, 0, 0)
    assert rows_of(live, LIVE_ACCOUNT) == {}
    exit_result = live.desk.exit_once(decision.model_copy(update={"action": Action.SELL, "closes_position": True}))
    assert exit_result.status == "already_sent" and live.requests_sent() == (0, 0, 0), exit_result.reason

    with paper.sessions() as session:  # the DU sync has found it since: the orders asset names that account
        session.execute(update(OrderRow).where(OrderRow.decision_id == decision.decision_id).values(status="Submitted"))
        session.commit()
    shown = live.desk.recorded(decision)
    assert f"at the ibkr broker (account {PAPER_ACCOUNT}), not this one" in shown.reason, shown.reason


def test_rows_written_before_the_account_column_stay_with_the_ibkr_account_that_runs(accounts):
    """A database upgraded from before revision 0008: the rows of its one IBKR account have no
    account (NULL). Whichever IBKR account runs keeps managing them, as before the upgrade: the
    stop protects the position, the books and drift count its fills, an exit converts the stop."""
    paper, _ = accounts()
    paper.emulator.set_price("AAPL", 100.0)
    stop_id, _ = paper.open_position(entry_decision("old-long"))
    with paper.sessions() as session:  # as the upgrade leaves them
        session.execute(update(OrderRow).values(account=None))
        session.execute(update(ExecutionRow).values(account=None))
        session.commit()
    assert set(rows_of(paper, None)) == {"tp-old-long", "tp-old-long-sl", "tp-old-long-tp"}

    account = with_working_orders(paper.broker.account({}), paper.sessions, paper.broker)
    assert account.working_protection["AAPL"].client_order_id == "tp-old-long-sl"
    report = sync_portfolio(paper.sessions, paper.broker, {})
    assert report.unprotected == [] and report.drift == [] and report.other_brokers == [], report.drift
    assert [t["decision_id"] for t in report.trades] == ["old-long"]

    record_decision(paper.sessions, exit_decision("old-exit", 50))
    result = paper.desk.exit_once(exit_decision("old-exit", 50))
    assert result.status == "submitted" and result.client_order_id == "tp-old-long-sl", result.reason
    assert paper.order(stop_id).order_type == "MKT"
    assert paper.position_path("AAPL") == [50, 0]


def test_what_was_sent_shows_while_the_gateway_cannot_say_its_account(accounts, emulator_factory, client_factory,
                                                                      tmp_path):
    """The orders asset shows what an earlier run sent whatever the switches say, with the gateway
    logged out too: the account (needed only for the 'not this one' note) is not a reason to fail."""
    paper, _ = accounts()
    paper.emulator.set_price("AAPL", 101.0)
    decision = entry_decision("sent-earlier")
    record_decision(paper.sessions, decision)
    assert paper.desk.submit_once(decision, build_legs(decision, "DAY"), 100.0).status == "submitted"
    logged_out = emulator_factory(market_hours="open", positions=0, auth_state="logged_out", **QUICK)
    broker = IBKRBroker(client_factory(logged_out, pacing=QUICK_PACING), order_cache_seconds=0,
                        id_map_path=tmp_path / "ibkr-order-ids.json", symbols=("AAPL",))

    shown = OrderDesk(paper.sessions, broker).recorded(decision)
    assert shown is not None and shown.status == "already_sent" and shown.client_order_id == "tp-sent-earlier"
    assert "sent earlier for this decision; now tp-sent-earlier Submitted" in shown.reason, shown.reason


def test_the_paper_accounts_sync_does_not_stand_in_for_the_live_accounts_first_sync_without_a_position(accounts):
    """The live position closed in TWS; the DU account's sync (no AAPL there) ran after the live
    sync that last saw it, ORPHAN_GRACE ago. The live stop is cancelled only once a live sync
    ORPHAN_GRACE after the first live sync finding no position finds none either: IBKR's positions
    lag its fills, and a stop cancelled on one empty answer leaves a held position unprotected.
    Before: the snapshots were the broker's, and the DU sync counted as that first sync."""
    paper, live = accounts()
    live.emulator.set_price("AAPL", 100.0)
    stop_id, take_profit_id = live.open_position(entry_decision("u-long"))
    assert sync_portfolio(live.sessions, live.broker, {}).drift == []  # the live sync sees the 50
    live.sell_by_hand(50)
    paper_report = sync_portfolio(paper.sessions, paper.broker, {})  # the DU account holds no AAPL
    assert paper_report.positions == [] and paper_report.drift == [], paper_report.drift
    earlier(live.sessions, ORPHAN_GRACE)

    first = sync_portfolio(live.sessions, live.broker, {})  # the live account's first answer without it
    assert (live.order(stop_id).status, live.order(take_profit_id).status) == ("Submitted", "Submitted")
    assert live.row("tp-u-long-sl").status == "Submitted"
    assert any(line.startswith("AAPL: the working stop-loss tp-u-long-sl (SELL 50) has no position at the broker")
               for line in first.drift), first.drift

    earlier(live.sessions, ORPHAN_GRACE)
    sync_portfolio(live.sessions, live.broker, {})  # the next live sync, ORPHAN_GRACE on: still none
    assert (live.order(stop_id).status, live.order(take_profit_id).status) == ("Cancelled", "Cancelled")
    assert "cancelled by the sync: no AAPL position at the broker" in live.last_event("tp-u-long-sl")


def test_the_live_sync_reports_its_orders_since_its_own_last_sync_and_records_its_own_account(accounts):
    """A live entry placed by the orders step after the live account's last sync, then a DU sync:
    the next live sync still shows what that entry became on the `orders` asset (its window starts at
    the live account's last sync, not the DU one's), and the account and positions it records are
    the live account's, named so; the DU account's stay the DU account's."""
    paper, live = accounts()
    paper.emulator.set_price("AAPL", 100.0)
    paper.open_position(entry_decision("du-long"))  # DU holds 50 AAPL, U nothing
    live.emulator.set_price("MSFT", 101.0)  # the U entry's 100 limit does not fill: it works
    sync_portfolio(live.sessions, live.broker, {})  # the live account's last sync
    decision = entry_decision("u-msft", symbol="MSFT")
    record_decision(live.sessions, decision)
    assert live.desk.submit_once(decision, build_legs(decision, "DAY"), 100.0).status == "submitted"
    sync_portfolio(paper.sessions, paper.broker, {})  # the DU sync, after the U entry was placed

    report = sync_portfolio(live.sessions, live.broker, {})
    assert [o["decision_id"] for o in report.orders] == ["u-msft"], report.orders
    assert any(line.startswith("tp-u-msft: ") for line in report.orders[0]["changes"]), report.orders
    assert report.account.open_positions == 0 and report.positions == []  # the account_summary: U's

    with live.sessions() as session:
        def recorded(broker):
            return ([(s.account, s.open_positions, s.equity) for s in session.scalars(
                        select(AccountSnapshotRow).where(of_broker(AccountSnapshotRow, broker))
                        .order_by(AccountSnapshotRow.id))],
                    [(s.account, s.symbol, s.quantity) for s in session.scalars(
                        select(PositionSnapshotRow).where(of_broker(PositionSnapshotRow, broker))
                        .order_by(PositionSnapshotRow.id))])

        live_accounts, live_positions = recorded(live.broker)
        paper_accounts, paper_positions = recorded(paper.broker)
    assert [a[:2] for a in live_accounts] == [(LIVE_ACCOUNT, 0), (LIVE_ACCOUNT, 0)]
    assert live_accounts[-1][2] == report.account.equity and live_positions == []
    assert [a[:2] for a in paper_accounts] == [(PAPER_ACCOUNT, 1)]
    assert paper_positions == [(PAPER_ACCOUNT, "AAPL", 50.0)]
