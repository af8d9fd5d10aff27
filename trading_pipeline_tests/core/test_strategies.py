import re
import time

import pytest

from trading_pipeline.core.strategies import DEFAULT_STRATEGIES_FILE, load_strategies, parse_strategies
from trading_pipeline.errors import StrategiesFileError

VALID = """\
strategies:
  - name: s1
    symbols: [AAPL, BRK.B]
    timeframes:
      1d: {period: 2y}
      1w: {period: 6y}
"""


def test_demo_file_has_at_least_five_symbols_and_orders_need_opt_in():
    demo = load_strategies(DEFAULT_STRATEGIES_FILE)
    assert len(demo.symbols()) >= 5
    strategy = demo.strategies[0]
    assert set(strategy.timeframes) == {"1d", "1w"}
    assert strategy.risk.min_r == 1.0 and strategy.risk.min_profit_margin == 0.05


def test_valid_file_and_defaults():
    parsed = parse_strategies(VALID)
    strategy = parsed.strategy_for("BRK.B")
    assert strategy.name == "s1"
    assert strategy.orders.enabled is False  # orders are off unless the file says so
    assert strategy.risk.allow_short is False
    assert strategy.timeframes["1w"].calendar_days() == 6 * 366


@pytest.mark.parametrize(
    "text, line, words",
    [
        (VALID.replace("AAPL", "aapl"), 3, "upper-case ticker"),
        (VALID.replace("period: 6y", "period: 6q"), 6, "period '6q'"),
        (VALID.replace("period: 2y", "period: 16y"), 5, "1-15y"),
        (VALID + "    risk: {min_r: 0}\n", 7, "greater than 0"),
        # A misspelt key said only "Extra inputs are not permitted": now the key it resembles, and the block's keys.
        (VALID + "    risk: {min_rr: 2}\n", 7,
         "risk.min_rr: unknown key 'min_rr': did you mean 'min_r'? (this block's keys: min_r, min_profit_margin,"),
        (VALID + "    orders: {enabeld: true}\n", 7, "unknown key 'enabeld': did you mean 'enabled'?"),
        (VALID.replace("symbols:", "symbol:"), 3, "unknown key 'symbol': did you mean 'symbols'?"),
        (VALID.replace("{period: 2y}", "{period: 2y, perod: 3}"), 5, "unknown key 'perod': did you mean 'period'?"),
        # .inf passed gt=0: a strategy that can never trade, with no word about why.
        (VALID + "    risk: {min_r: .inf}\n", 7, "finite number"),
        (VALID.replace("      1w: {period: 6y}\n", ""), 4, "exactly 1d, 1w"),
        (VALID.replace("AAPL", "ON"), 3, "quote it"),
        (VALID.replace("period: 6y", "period: 2y"), 4, "1w period 2y gives about 104 bars; SMA 200 needs 200"),
        # A number alone said only "Input should be a valid string".
        (VALID.replace("period: 6y", "period: 6"), 6, "period 6 is a number without its unit: write it like '6y'"),
        (VALID.replace("period: 6y", 'period: "6y\\n"'), 6, "is not like '2y'"),
    ],
)
def test_bad_file_names_line_and_fix(text, line, words):
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies(text, source="my.yaml")
    message = str(info.value)
    assert f"my.yaml:{line}:" in message
    assert words in message
    assert "Fix:" in message


def test_every_bad_symbol_is_named_with_how_to_write_it():
    # Only the first was named ('spy'), and BRK/B, upper-case already, would have been told it was not.
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies(VALID.replace("[AAPL, BRK.B]", "[AAPL, spy, BRK/B]"), source="my.yaml")
    message = str(info.value)
    assert "my.yaml:3: strategies.0.symbols: symbol 'spy' is not an upper-case ticker like 'AAPL' or 'BRK.B': write " \
           "'SPY'; symbol 'BRK/B' is not an upper-case ticker like 'AAPL' or 'BRK.B' (a letter, then up to 11 " \
           "letters, digits or dots; a share class as BRK.B, not BRK/B)" in message


def test_the_error_the_strategies_page_shows_is_the_one_the_file_gets():
    page = (DEFAULT_STRATEGIES_FILE.parents[2] / "docs" / "strategies.md").read_text()
    shown = re.search(r"`(strategies\.yaml:3: strategies\.0\.symbols: [^`]+)`", page).group(1)
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies(VALID.replace("AAPL", "aapl"), source="strategies.yaml")
    assert info.value.problem.splitlines()[1].strip() == shown
    typo = re.search(r"`(strategies\.0\.risk\.min_rr: [^`]+?) \(this block's keys: …\)`", page).group(1)
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies(VALID + "    risk: {min_rr: 2}\n", source="strategies.yaml")
    assert f"strategies.yaml:7: {typo} (this block's keys: min_r, " in info.value.problem


def test_symbol_in_two_strategies_is_rejected_with_both_lines():
    text = VALID + """\
  - name: s2
    symbols: [MSFT, AAPL]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
"""
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies(text, source="f.yaml")
    assert "f.yaml:8: symbol AAPL is in strategy 's2' and already in 's1' (line 3)" in str(info.value)


def test_yaml_syntax_error_names_line():
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies("strategies:\n  - name: [unclosed\n", source="x.yaml")
    assert "x.yaml:" in str(info.value) and "not valid YAML" in str(info.value)


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(StrategiesFileError) as info:
        load_strategies(tmp_path / "nope.yaml")
    assert "does not exist" in str(info.value) and "TRADING_STRATEGIES_FILE" in str(info.value)


def test_unknown_symbol_lookup_is_a_clear_error():
    with pytest.raises(StrategiesFileError, match="not in any strategy"):
        parse_strategies(VALID).strategy_for("TSLA")


@pytest.mark.parametrize(
    "text, line, key",
    [
        # A second `risk:` would silently replace the first (here: 1% -> 5% risk per trade).
        (VALID + "    risk: {risk_per_trade: 0.01}\n    risk: {risk_per_trade: 0.05}\n", 8, "risk"),
        (VALID + "    risk: {min_r: 2, min_r: 0.1}\n", 7, "min_r"),
        # A second top-level `strategies:` would silently drop every strategy above it.
        (VALID + "strategies:\n  - name: s2\n    symbols: [MSFT]\n"
                 "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n", 7, "strategies"),
    ],
)
def test_a_key_written_twice_is_rejected_not_silently_overridden(text, line, key):
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies(text, source="my.yaml")
    message = str(info.value)
    assert f"my.yaml:{line}:" in message
    assert f"{key!r} is written twice" in message
    assert "Fix:" in message


def test_a_symbol_with_a_trailing_newline_is_not_a_ticker():
    # "AAPL\n" passed the ticker pattern ($ matches before a final newline) and then stopped the
    # code location with Dagster's "invalid substrings in a partition key" traceback.
    text = VALID.replace("[AAPL, BRK.B]", '["AAPL\\n", BRK.B]')
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies(text, source="my.yaml")
    assert "my.yaml:3:" in str(info.value) and "upper-case ticker" in str(info.value)


def test_an_anchor_that_contains_itself_is_refused_not_a_recursion_error():
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies("strategies: &loop\n  - *loop\n", source="my.yaml")
    assert "my.yaml:1:" in str(info.value) and "contains itself" in str(info.value)


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """The classic nested-alias bomb: 9 lines, each repeating the previous one 10 times (10**9 values)."""
    lines = ['lol0: &lol0 "lol"']
    for level in range(1, levels):
        lines.append(f"lol{level}: &lol{level} [" + ", ".join([f"*lol{level - 1}"] * width) + "]")
    lines.append(f"strategies: *lol{levels - 1}")
    return "\n".join(lines) + "\n"


def test_a_nested_alias_bomb_is_refused_fast_with_the_line_of_the_alias():
    started = time.perf_counter()
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies(billion_laughs(), source="bomb.yaml")
    assert time.perf_counter() - started < 1.0
    message = str(info.value)
    # lol1-lol3 repeat 1,230 values; lol4 (line 5) repeats lol3's 1,111 ten times and crosses 10,000.
    assert "bomb.yaml:5:" in message and "aliases (*) repeat more than 10,000 values" in message
    assert "Fix:" in message and "write the values out" in message


def test_the_alias_that_crosses_the_bound_is_named_in_a_block_list():
    big = "big: &big [" + ", ".join(["AAPL"] * 2_000) + "]\n"
    text = big + "strategies:\n" + "".join(["  - *big\n"] * 4) + "  - *big\n  - *big\n"
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies(text, source="my.yaml")
    # Each *big repeats 2,001 values: the sixth, on line 7, makes 12,006.
    assert "my.yaml:7:" in str(info.value)


def test_an_anchor_shared_by_strategies_and_a_merge_key_still_load():
    text = """\
strategies:
  - name: s1
    symbols: [AAPL]
    timeframes: &frames
      1d: {period: 2y}
      1w: {period: 6y}
    risk: &careful {min_r: 2.0, risk_per_trade: 0.005}
  - name: s2
    symbols: [MSFT]
    timeframes: *frames
    risk: {<<: *careful, min_r: 3.0}
"""
    parsed = parse_strategies(text)
    assert [s.risk.min_r for s in parsed.strategies] == [2.0, 3.0]
    assert parsed.strategies[1].risk.risk_per_trade == 0.005


def test_lists_nested_thousands_deep_are_refused_not_a_recursion_error():
    with pytest.raises(StrategiesFileError) as info:
        parse_strategies("strategies: " + "[" * 5_000 + "]" * 5_000, source="deep.yaml")
    assert "deep.yaml: lists or blocks are nested too deeply" in str(info.value)
