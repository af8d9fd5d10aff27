"""A check whose text is written on first read is the check made with the text, however it is read."""

import copy
import dataclasses
import pickle

from trading_pipeline.core.analysis import RuleCheck, TradeDecision

# RuleCheck("min_r", False, "R 1.2 vs 2.0") pickled by the former slots dataclass (an IO manager's
# output from before the change must still load).
FORMER_PICKLE = (b"\x80\x04\x95P\x00\x00\x00\x00\x00\x00\x00\x8c\x1etrading_pipeline.core.analysis\x94\x8c\tRuleCheck"
                 b"\x94\x93\x94)\x81\x94]\x94(\x8c\x05min_r\x94\x89\x8c\x0cR 1.2 vs 2.0\x94eb.")


def explained(text: str = "R 1.2 vs 2.0") -> RuleCheck:
    return RuleCheck.explained("min_r", False, lambda: text)


def test_written_once_on_first_read():
    calls = []
    check = RuleCheck.explained("min_r", True, lambda: calls.append(1) or "text")
    assert calls == []
    assert check.detail == "text" and check.detail == "text"
    assert calls == [1]


def test_reads_compares_and_copies_as_the_check_made_with_the_text():
    eager = RuleCheck("min_r", False, "R 1.2 vs 2.0")
    assert explained() == eager and hash(explained()) == hash(eager)
    assert repr(explained()) == repr(eager)
    assert dataclasses.asdict(explained()) == dataclasses.asdict(eager)
    assert copy.deepcopy(explained()) == eager and copy.copy(explained()) == eager
    assert pickle.loads(pickle.dumps(explained())) == eager
    assert pickle.loads(FORMER_PICKLE) == eager


def test_serialized_as_the_check_made_with_the_text():
    def decision(check: RuleCheck) -> TradeDecision:
        from datetime import UTC, datetime

        moment = datetime(2024, 1, 2, 21, tzinfo=UTC)
        return TradeDecision(decision_id="d", strategy="s", symbol="X", as_of=moment, data_through=moment,
                             proposed_action="BUY", action="NO_TRADE", rationale="r", checks=[check])

    eager = decision(RuleCheck("min_r", False, "R 1.2 vs 2.0"))
    assert decision(explained()).model_dump_json() == eager.model_dump_json()
    assert decision(explained()).model_dump() == eager.model_dump()
    assert decision(explained()) == eager
    assert TradeDecision.model_validate_json(decision(explained()).model_dump_json()) == eager
    assert pickle.loads(pickle.dumps(decision(explained()))) == eager


def test_frozen():
    import pytest

    with pytest.raises(dataclasses.FrozenInstanceError):
        explained().detail = "other"
