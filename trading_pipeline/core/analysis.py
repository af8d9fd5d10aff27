"""What analysts return and what the pipeline decides: validated pydantic models.

Both analysts (the embedded rule-based one and the OpenAI one) return `TimeframeAnalysis`, so
nothing downstream depends on which one ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

# The data_through of an analysis made from no bars at all: older than any bar, so never "fresh".
NO_DATA = datetime(1970, 1, 1, tzinfo=UTC)


class Action(str, Enum):
    BUY = "BUY"
    SELL = "SELL"
    HOLD = "HOLD"
    NO_TRADE = "NO_TRADE"  # fail-closed outcome: invalid analysis or a risk gate said no


class Trend(str, Enum):
    UP = "up"
    DOWN = "down"
    SIDEWAYS = "sideways"


# IndicatorVote and RuleCheck are plain frozen dataclasses, not models: every decision makes a dozen
# (a backtest, millions; RuleCheck keeps a __dict__ so that its text can be written when read). Pydantic still validates them field by field when an analysis or a
# decision is read back from JSON, and passes our own instances through when one is built.
@dataclass(frozen=True, slots=True)
class IndicatorVote:
    """One input of the 3-of-4 rule, with the numbers it was read from."""

    name: str
    bullish: bool
    detail: str


class ChartSource(BaseModel):
    """The chart an analysis or decision was made from (for lineage in the UI)."""

    model_config = ConfigDict(frozen=True)
    uri: str
    sha256: str


class TimeframeAnalysis(BaseModel):
    model_config = ConfigDict(frozen=True)

    symbol: str
    timeframe: str
    as_of: datetime
    data_through: datetime = Field(description="Start of the last bar the analysis saw.")
    analyst: str = Field(description="Which analyst produced it, e.g. 'rules' or 'openai:gpt-4.1'.")
    prompt_version: str | None = None
    vision: bool | None = Field(None, description="Did the analyst see the chart image? None: not a model.")
    chart: ChartSource | None = None

    valid: bool = True
    invalid_reason: str | None = None

    signal: Action
    trend: Trend
    confidence: float = Field(ge=0, le=1)
    entry: float | None = None
    stop: float | None = None
    targets: list[float] = Field(default_factory=list)
    support: list[float] = Field(default_factory=list)
    resistance: list[float] = Field(default_factory=list)
    votes: list[IndicatorVote] = Field(default_factory=list)
    rationale: str

    # Numeric context from the bars, so downstream checks need not reload them.
    last_close: float
    atr: float
    recent_high: float
    recent_low: float

    @classmethod
    def invalid(cls, *, reason: str, **context) -> TimeframeAnalysis:
        """Fail closed: an unusable analysis is a NO_TRADE that says why."""
        return cls(
            valid=False,
            invalid_reason=reason,
            signal=Action.NO_TRADE,
            trend=Trend.SIDEWAYS,
            confidence=0.0,
            rationale=f"analysis unusable: {reason}",
            **context,
        )


_new_object = object.__new__


# `RuleCheck.explained` makes a check whose detail is written on first read, by a function (the
# gate's f-string): a decision runs a dozen gates and a backtest reads the text of none that pass,
# while the decision shown, stored and serialized carries every text. Read, compared, hashed,
# copied, pickled or serialized, such a check is the one made with the text. (The docstring is the
# JSON schema's description: unchanged.)
@dataclass(frozen=True)
class RuleCheck:
    """One deterministic gate and its numbers."""

    rule: str
    passed: bool
    detail: str

    @classmethod
    def explained(cls, rule: str, passed: bool, explain: Callable[[], str]) -> RuleCheck:
        """The check whose `detail` is `explain()`, called on first read (it must read only values
        that no longer change: the gate's numbers)."""
        check = _new_object(cls)
        fields = check.__dict__  # filled in place: the frozen __setattr__ is for after construction
        fields["rule"] = rule
        fields["passed"] = passed
        fields["_explain"] = explain
        return check

    def __getattr__(self, name: str) -> str:  # only called for what is not set: an unwritten detail
        explain = self.__dict__.get("_explain") if name == "detail" else None
        if explain is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        detail = self.__dict__["detail"] = explain()
        self.__dict__.pop("_explain", None)
        return detail

    def __reduce__(self):  # pickled with its text, never with the function writing it
        return type(self), (self.rule, self.passed, self.detail)

    def __setstate__(self, state) -> None:
        # A pickle of the former slots dataclass: [rule, passed, detail].
        fields = dict(zip(("rule", "passed", "detail"), state, strict=True)) if isinstance(state, (list, tuple)) \
            else state
        object.__setattr__(self, "__dict__", dict(fields))


class TradeDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    decision_id: str = Field(description="Stable id derived from what the decision was made from.")
    strategy: str
    symbol: str
    as_of: datetime
    data_through: datetime
    proposed_action: Action = Field(description="What the analyses proposed, before the risk gates.")
    action: Action = Field(description="What the pipeline decided after the risk gates.")
    entry: float | None = None
    stop: float | None = None
    targets: list[float] = Field(default_factory=list)
    r_multiple: float | None = None
    profit_margin: float | None = None
    confidence: float = 0.0
    quantity: int = 0
    account_equity: float | None = Field(None, description="Equity the size was computed from.")
    closes_position: bool = Field(False, description="The order closes an open position (no bracket).")
    confirmation: str = Field("", description="How the weekly analysis relates to the daily one.")
    rationale: str
    checks: list[RuleCheck] = Field(default_factory=list)
    charts: dict[str, ChartSource] = Field(default_factory=dict)
    analysts: dict[str, str] = Field(default_factory=dict)

    @property
    def actionable(self) -> bool:
        return self.action in (Action.BUY, Action.SELL) and self.quantity > 0

    @property
    def rejections(self) -> list[RuleCheck]:
        return [check for check in self.checks if not check.passed]


class OrderLeg(BaseModel):
    model_config = ConfigDict(frozen=True)
    client_order_id: str
    role: str  # "entry", "stop_loss", "take_profit", "exit"
    side: str  # BUY / SELL
    order_type: str  # LMT / STP / MKT
    quantity: int
    price: float | None  # none for a market order
    tif: str


class OrderRecord(BaseModel):
    """What the orders asset did for one decision: sent, already sent, or why nothing was sent."""

    model_config = ConfigDict(frozen=True)
    decision_id: str
    symbol: str
    status: str  # "not_sent", "submitted", "filled", "already_sent", "rejected"
    reason: str
    broker: str
    client_order_id: str | None = None
    broker_order_ids: list[str] = Field(default_factory=list)
    legs: list[OrderLeg] = Field(default_factory=list)
    filled_quantity: int = 0
    average_fill_price: float | None = None
