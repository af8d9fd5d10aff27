"""One IBKR account at the emulator, the trading database and the order desk of one process (`World`),
with the decisions the lifecycle tests send: what test_exits_and_lifecycle.py,
test_lagging_positions_and_races.py and test_unlisted_orders.py share (the `world` fixture)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from sqlalchemy import select

from trading_pipeline.adapters.ibkr.broker import IBKRBroker
from trading_pipeline.adapters.order_desk import OrderDesk
from trading_pipeline.adapters.portfolio_sync import with_working_orders
from trading_pipeline.adapters.records import record_decision
from trading_pipeline.adapters.trading_db import OrderEventRow, OrderRow, session_factory
from trading_pipeline.core.analysis import Action, TradeDecision
from trading_pipeline.core.orders import build_legs, client_order_id
from trading_pipeline.core.risk import entry_limits
from trading_pipeline.core.strategies import RiskSettings
from trading_pipeline_tests.adapters.ibkr.conftest import FAST

AS_OF = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)
ORDERS_POST = "/iserver/account/*/orders"
MODIFY_POST = "/iserver/account/*/order/*"
RACE_WINDOW = 2.0  # seconds the concurrent runs wait for each other between reading the account and placing
WITHOUT_MARKET_ORDERS = "o10331,o10152,o403,p12"  # the default allow-list minus o10151
# Pacing is not under test here (test_session/test_market_data are): the client sends 10 requests
# per 0.25 s (the emulator allows 50/s) and spaces the 1-per-5-s endpoints (live orders, trades)
# 0.05 s, so the many order lookups of a lifecycle stay quick. Same structure, shorter waits.
QUICK = {"slow_interval": 0.05, "tickle_interval": 0.05, "requests_per_second": 50}
QUICK_PACING = dataclasses.replace(FAST, slow_endpoint_interval=0.05, tickle_interval=0.05, window_seconds=0.25)


def entry_decision(decision_id: str, symbol: str = "AAPL", entry: float = 100.0, stop: float = 85.0,
                   target: float = 120.0, quantity: int = 50) -> TradeDecision:
    return TradeDecision(decision_id=decision_id, strategy="s", symbol=symbol, as_of=AS_OF, data_through=AS_OF,
                         proposed_action=Action.BUY, action=Action.BUY, entry=entry, stop=stop, targets=[target],
                         r_multiple=round((target - entry) / (entry - stop), 3),
                         profit_margin=round((target - entry) / entry, 4), confidence=0.7, quantity=quantity,
                         rationale="test entry", account_equity=100_000.0)


def exit_decision(decision_id: str, quantity: int, symbol: str = "AAPL", reference: float = 100.0) -> TradeDecision:
    """What the risk engine makes of a SELL against a long: closes_position, sized by the position."""
    return TradeDecision(decision_id=decision_id, strategy="s", symbol=symbol, as_of=AS_OF, data_through=AS_OF,
                         proposed_action=Action.SELL, action=Action.SELL, entry=reference, quantity=quantity,
                         confidence=0.7, closes_position=True, rationale="the strategy exits")


@dataclasses.dataclass
class World:
    """One IBKR account at the emulator, the trading database and the order desk of one process."""

    emulator: object
    sessions: object
    broker: IBKRBroker
    desk: OrderDesk
    restart: object  # () -> World: a new process (new client and broker, nothing cached) on the same files

    def open_position(self, decision: TradeDecision) -> tuple[int, int]:
        """Send the decision's bracket (its entry fills at once) -> the IBKR ids of its stop and take-profit."""
        record_decision(self.sessions, decision)
        sent = self.desk.submit_once(decision, build_legs(decision, "DAY"), decision.entry)
        assert sent.status == "filled", sent.reason
        coid = client_order_id(decision)
        return int(self.broker.order_id_for(f"{coid}-sl")), int(self.broker.order_id_for(f"{coid}-tp"))

    def exit(self, decision: TradeDecision):
        record_decision(self.sessions, decision)
        return self.desk.exit_once(decision)

    def sell_by_hand(self, quantity: int, symbol: str = "AAPL", price: float = 100.0, side: str = "SELL") -> int:
        """A sale (or with side BUY, a purchase) made in TWS, filled at once: not through the pipeline's
        broker, so it has no cOID and its execution no order_ref, as at IBKR. Its IBKR order id."""
        return self.emulator.trade_by_hand(symbol, side, quantity, price)

    def close_by_hand_before_an_unseen_rollover(self, stop_id: int, take_profit_id: int) -> None:
        """The 50 sold in TWS and the bracket's stop and take-profit cancelled there, then a day
        rollover no sync saw: IBKR lists none of them any more and they have no execution."""
        self.sell_by_hand(50)
        self.broker.client.cancel_order(stop_id)
        self.broker.client.cancel_order(take_profit_id)
        self.emulator.new_day()

    def order(self, order_id: int):
        """The emulator's own copy of an order (what IBKR has, not what the client was told)."""
        with self.emulator.state.lock:
            return dataclasses.replace(self.emulator.state.orders[order_id])

    def held(self, symbol: str) -> float:
        position = self.broker.account({}).positions.get(symbol)
        return position.quantity if position else 0.0

    def position_path(self, ibkr_symbol: str) -> list[float]:
        """The position after each execution at the emulator, in order: [50, 0] = one buy, one exit."""
        with self.emulator.state.lock:
            executions = list(self.emulator.state.executions)
        path, held = [], 0.0
        for execution in executions:
            if execution["symbol"] == ibkr_symbol:
                held += execution["size"] if execution["side"] == "B" else -execution["size"]
                path.append(held)
        return path

    def requests_sent(self) -> tuple[int, int, int]:
        """(placements, modifications, cancels) the emulator received."""
        return (self.emulator.count("POST", ORDERS_POST), self.emulator.count("POST", MODIFY_POST),
                self.emulator.count("DELETE", MODIFY_POST))

    def row(self, coid: str) -> OrderRow:
        with self.sessions() as session:
            return session.get(OrderRow, coid)

    def last_event(self, coid: str) -> str:
        with self.sessions() as session:
            return session.scalars(select(OrderEventRow.detail).where(OrderEventRow.client_order_id == coid)
                                   .order_by(OrderEventRow.id.desc())).first()


def world_maker(emulator_factory, client_factory, tmp_path):
    """make(market_hours=..., symbols=...) -> World (the `world` fixture of conftest.py). No
    synthetic positions: the account holds only what the test trades, so the sync's drift check and
    the limits see exactly that."""

    def make(market_hours: str = "open", symbols: tuple[str, ...] = ("AAPL",)) -> World:
        emulator = emulator_factory(market_hours=market_hours, positions=0, **QUICK)
        sessions = session_factory(f"sqlite:///{tmp_path / 'trading.db'}")
        ids = tmp_path / "ibkr-order-ids.json"  # the broker's saved cOID -> IBKR order id map

        def process() -> World:
            broker = IBKRBroker(client_factory(emulator, pacing=QUICK_PACING), order_cache_seconds=0,
                                id_map_path=ids, symbols=symbols)
            return World(emulator, sessions, broker, OrderDesk(sessions, broker), process)

        return process()

    return make


def limits_now(process, decision: TradeDecision, risk: RiskSettings | None = None):
    """The limit check the orders step runs for `decision` under the account lock (`limits=` of
    `submit_once`), for a process (`World`, or anything with its `broker` and `sessions`): the
    account as the entry gates read it, working orders included, the decision's own order not
    counted against it. Call it for the (quantity allowed, checks) now."""
    def check():
        account = with_working_orders(process.broker.account({}), process.sessions, process.broker)
        return entry_limits(decision.symbol, decision.entry, decision.stop, account, risk or RiskSettings(),
                            own_order=client_order_id(decision))
    return check
