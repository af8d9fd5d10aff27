"""Order safety through the graph (issue 12): the switches are the deployment's, a run's config cannot
turn them on; a decision is sent only while it is current; what was sent stays what the orders
asset shows, whatever the switches say later."""

from datetime import datetime, timedelta

import dagster as dg
import pytest
from sqlalchemy import func, select

from trading_pipeline.adapters.trading_db import PaperOrderRow, session_factory
from trading_pipeline.core.analysis import Action
from trading_pipeline.core.strategies import parse_strategies
from trading_pipeline.definitions import build_definitions
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.resources import resources_from_env

AS_OF = "2026-09-01T21:30:00+00:00"  # the simulated market (seed 0) gives SPY an accepted BUY here
STRATEGIES = parse_strategies("""\
strategies:
  - name: safety_test
    symbols: [SPY]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
    orders: {enabled: true}
""")


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    """A paper deployment whose clock is AS_OF; orders off unless a test turns them on."""
    for name in ("TRADING_ORDERS_ENABLED", "TRADING_KILL_SWITCH", "TRADING_BROKER", "TRADING_MARKET_DATA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRADING_AS_OF", AS_OF)
    monkeypatch.setenv("TRADING_DATA_DIR", str(tmp_path / "data"))
    defs = build_definitions(STRATEGIES, resources_from_env())
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        for timeframe in ("1d", "1w"):
            assert defs.resolve_job_def("analyze_timeframe").execute_in_process(
                partition_key=dg.MultiPartitionKey({"symbol": "SPY", "timeframe": timeframe}),
                instance=instance, tags={AS_OF_TAG: AS_OF}).success
        yield defs, instance, session_factory(f"sqlite:///{tmp_path / 'data' / 'trading.db'}")


def paper_orders(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(PaperOrderRow))


def test_a_run_config_cannot_turn_orders_on(deployment):
    defs, instance, sessions = deployment
    result = defs.resolve_job_def("decide_and_order").execute_in_process(
        partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF}, raise_on_error=False,
        run_config={"resources": {"broker": {"config": {"orders_enabled": True}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_failure)
    text = str(failure.event_specific_data.error) if failure.event_specific_data else failure.message
    assert "orders_enabled is a safety switch of the deployment (TRADING_ORDERS_ENABLED)" in (text + failure.message)
    assert paper_orders(sessions) == 0


def test_orders_follow_the_deployment_switch_read_when_sending(deployment, monkeypatch):
    defs, instance, sessions = deployment
    job = defs.resolve_job_def("decide_and_order")
    off = job.execute_in_process(partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF})
    assert off.output_for_node("trade_decisions").action == Action.BUY
    assert off.output_for_node("orders").status == "not_sent" and paper_orders(sessions) == 0
    monkeypatch.setenv("TRADING_ORDERS_ENABLED", "yes")  # the operator turns orders on; no reload needed
    on = job.execute_in_process(partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF})
    sent = on.output_for_node("orders")
    assert sent.status == "submitted" and paper_orders(sessions) == 3
    monkeypatch.setenv("TRADING_ORDERS_ENABLED", "no")  # off again: the asset still shows what was sent
    again = job.execute_in_process(partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF})
    shown = again.output_for_node("orders")
    assert shown.status == "already_sent" and shown.client_order_id == sent.client_order_id
    assert "sent earlier for this decision" in shown.reason and paper_orders(sessions) == 3


def test_an_entry_that_filled_before_the_positions_list_it_keeps_a_second_decision_from_entering(deployment,
                                                                                                  monkeypatch):
    """Another decision's bracket for SPY (an earlier run's) filled; the paper broker's order states say
    so, but its positions (made from its fills) do not list it yet, as IBKR's can lag a fill by
    seconds. This run's decision was made before that (orders off then); its orders step re-checks
    the limits under the account lock and finds SPY held by the earlier bracket's working stop-loss,
    and so does the next decision step."""
    from trading_pipeline.adapters.broker import PaperBroker
    from trading_pipeline.adapters.order_desk import OrderDesk
    from trading_pipeline.adapters.records import record_decision
    from trading_pipeline.core.orders import build_legs

    defs, instance, sessions = deployment
    job = defs.resolve_job_def("decide_and_order")
    decided = job.execute_in_process(partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF})
    decision = decided.output_for_node("trade_decisions")
    assert decision.action == Action.BUY and decided.output_for_node("orders").status == "not_sent"

    other = decision.model_copy(update={"decision_id": "earlier"})
    record_decision(sessions, other)
    assert OrderDesk(sessions, PaperBroker(sessions, 100_000.0)).submit_once(
        other, build_legs(other, "DAY"), other.entry, placed_at=datetime.fromisoformat(AS_OF)).status == "submitted"
    with sessions() as session:  # filled at the broker, not yet in its positions
        for row in session.scalars(select(PaperOrderRow)):
            if row.client_order_id == "tp-earlier":
                row.status, row.filled_quantity, row.average_fill_price = "Filled", row.quantity, row.price
            else:
                row.status = "Submitted"  # the stop-loss and take-profit work once their entry filled
        session.commit()

    monkeypatch.setenv("TRADING_ORDERS_ENABLED", "yes")
    only_orders = dg.materialize([*defs.assets], selection=["orders"], partition_key="SPY", instance=instance,
                                 resources=defs.resources, tags={AS_OF_TAG: AS_OF})
    order = only_orders.output_for_node("orders")
    assert order.status == "not_sent" and "no_pyramiding" in order.reason, order.reason
    assert f"stop-loss tp-earlier-sl (SELL {other.quantity} @ {other.stop:.2f}, Submitted) for SPY" in order.reason
    assert paper_orders(sessions) == 3  # the earlier bracket only

    again = job.execute_in_process(partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF})
    redecided = again.output_for_node("trade_decisions")
    assert redecided.action == Action.NO_TRADE and "tp-earlier-sl" in redecided.rationale
    assert again.output_for_node("orders").status == "not_sent" and paper_orders(sessions) == 3


def test_a_two_week_old_decision_is_not_sent(deployment, monkeypatch):
    defs, instance, sessions = deployment
    decided = defs.resolve_job_def("decide_and_order").execute_in_process(
        partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF})
    assert decided.output_for_node("trade_decisions").action == Action.BUY  # orders were off then
    two_weeks_later = (datetime.fromisoformat(AS_OF) + timedelta(days=14)).isoformat()
    monkeypatch.setenv("TRADING_ORDERS_ENABLED", "yes")
    for clock in (two_weeks_later, None):  # the deployment's simulated clock, then the real one
        if clock:
            monkeypatch.setenv("TRADING_AS_OF", clock)
        else:
            monkeypatch.delenv("TRADING_AS_OF")
        only_orders = dg.materialize([*defs.assets], selection=["orders"], partition_key="SPY", instance=instance,
                                     resources=defs.resources, tags={AS_OF_TAG: two_weeks_later})
        order = only_orders.output_for_node("orders")
        assert order.status == "not_sent" and "decision not current" in order.reason
        assert "session(s) closed since" in order.reason
    assert paper_orders(sessions) == 0


@pytest.mark.parametrize("switch, value, words", [
    ("TRADING_ORDERS_ENABLED", "no", "TRADING_ORDERS_ENABLED was turned off before the entry was sent"),
    ("TRADING_KILL_SWITCH", "yes", "kill switch engaged before the entry was sent"),
    # The deployment's clock passes the next session's close while the run waits: the decision is history.
    ("TRADING_AS_OF", "2026-09-02T20:30:00+00:00", "decision not current when it was about to be sent"),
])
def test_a_switch_turned_off_while_the_order_waits_for_the_account_lock_stops_it(deployment, monkeypatch, switch,
                                                                                  value, words):
    """The switches are read when the order step starts and again under the account lock, right
    before sending: an operator who turns orders off (or the kill switch on) while another run holds
    the lock stops this entry too; so does the next session's close (the decision is no longer
    current at the time it would be sent)."""
    import contextlib
    import threading

    from trading_pipeline.adapters import order_desk
    from trading_pipeline.adapters.trading_db import account_lock

    defs, instance, sessions = deployment
    monkeypatch.setenv("TRADING_ORDERS_ENABLED", "yes")
    held, release, waiting = threading.Event(), threading.Event(), threading.Event()

    @contextlib.contextmanager
    def lock_noting_the_wait(*args, **kwargs):
        waiting.set()  # the order step has read the switches and now waits for the lock
        with account_lock(*args, **kwargs):
            yield

    monkeypatch.setattr(order_desk, "account_lock", lock_noting_the_wait)

    def another_run_holding_the_lock():
        with account_lock(sessions):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=another_run_holding_the_lock)
    holder.start()
    assert held.wait(30)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=defs.resolve_job_def("decide_and_order")
                                                            .execute_in_process(partition_key="SPY", instance=instance,
                                                                                tags={AS_OF_TAG: AS_OF})))
    runner.start()
    assert waiting.wait(120)  # the run read the switches (on), decided, and waits for the lock
    monkeypatch.setenv(switch, value)
    release.set()
    holder.join(30)
    runner.join(120)
    order = outcome["result"].output_for_node("orders")
    assert order.status == "not_sent" and words in order.reason
    assert paper_orders(sessions) == 0
