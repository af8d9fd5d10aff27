"""Walk-forward chooses each fold's grid point in-sample and scores it out-of-sample; the command
prints the report (with a walk-forward section) and stores the run."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from trading_pipeline.adapters.trading_db import session_factory
from trading_pipeline.backtest import runner
from trading_pipeline.backtest.__main__ import main
from trading_pipeline.backtest.store import BacktestRunRow
from trading_pipeline.backtest.walk_forward import score, split, walk_forward
from trading_pipeline.errors import UserError
from trading_pipeline_tests.backtest.conftest import STRATEGIES, settings


def test_each_fold_chooses_in_sample_and_is_scored_out_of_sample():
    wf_settings = settings(symbols=("SPY", "AAPL"), folds=2, grid={"min_r": (1.0, 1.6)}, grid_metric="total_return")
    loaded = runner.load(wf_settings, strategies_file=STRATEGIES)
    walk = walk_forward(wf_settings, loaded)
    windows = split(wf_settings.start, wf_settings.end, 2)
    assert [(f.in_sample, f.out_of_sample) for f in walk.folds] == windows
    assert windows[0][1] == windows[1][0]  # fold 1's out-of-sample part is fold 2's in-sample part
    for fold in walk.folds:
        assert [point for point, _ in fold.scores] == [{"min_r": 1.0}, {"min_r": 1.6}]
        assert fold.chosen == max(fold.scores, key=lambda item: item[1])[0]
        assert score(fold.in_sample_result, "total_return") == max(s for _, s in fold.scores)
        oos = fold.out_of_sample_result
        assert oos.equity.index[0].date() == fold.out_of_sample[0] and oos.equity.index[-1].date() == fold.out_of_sample[1]
        assert oos.strategy.risk.min_r == fold.chosen["min_r"]
    joined = walk.out_of_sample_equity
    assert len(joined) == sum(len(f.out_of_sample_result.equity) for f in walk.folds)
    assert joined.iloc[0] == wf_settings.initial_cash


def test_the_command_prints_the_report_and_stores_the_run(tmp_path, monkeypatch, capsys):
    strategies_file = tmp_path / "strategies.yaml"
    strategies_file.write_text("""\
strategies:
  - name: cli_test
    symbols: [SPY, AAPL]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
""")
    monkeypatch.setenv("TRADING_STRATEGIES_FILE", str(strategies_file))
    monkeypatch.setenv("TRADING_DATA_DIR", str(tmp_path / "data"))
    assert main(["--start", "2024-01-01", "--end", "2024-08-30", "--quiet", "--folds", "1",
                 "--grid", "min_r=1,1.5"]) == 0
    out = capsys.readouterr().out
    for heading in ("Backtest of strategy cli_test", "Sharpe", "Expectancy (R)", "R distribution", "Risk gate",
                    "Monthly", "Walk-forward (1 folds", "Stored as run"):
        assert heading in out
    sessions = session_factory(f"sqlite:///{tmp_path / 'data' / 'trading.db'}")
    with sessions() as session:
        assert session.scalars(select(BacktestRunRow.strategy)).all() == ["cli_test"]
    assert main(["--strategy", "nope", "--quiet", "--no-save"]) == 2
    assert "strategy 'nope' is not in the strategies file" in capsys.readouterr().err
    assert main(["--start", "2024-05-01", "--end", "2024-01-01", "--quiet", "--no-save"]) == 2
    assert "is before start" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    # Both were tracebacks (an argparse.ArgumentTypeError raised outside argparse; a bare ValueError).
    (["--folds", "2", "--grid", "min_r"], "write NAME=V1,V2"),
    (["--folds", "2", "--grid", "min_r=1,a"], "'a' is not a number"),
    # Values the strategies file would refuse: a pydantic traceback after the bars had loaded.
    (["--folds", "2", "--grid", "risk_per_trade=0.01,0.5"], "grid risk_per_trade=0.5: Input should be less than"),
    (["--folds", "2", "--grid", "max_open_positions=1.5"], "grid max_open_positions=1.5:"),
    (["--folds", "2", "--grid", "min_r=nan"], "grid min_r=nan:"),
    (["--folds", "2", "--grid", "supertrend_multiplier=-1"], "grid supertrend_multiplier=-1: must be a number > 0"),
    # inf passed gt=0 and died in position sizing: "OverflowError: cannot convert float infinity to integer".
    (["--initial-cash", "inf"], "--initial-cash: Input should be a finite number"),
    # Ran on a different simulated series than AAPL's (and read <csv-dir>/../x_1d.csv with --data csv);
    # an empty symbol died in the market simulator with a ValueError.
    (["--symbols", "aapl,../x"], "symbol 'aapl' is not an upper-case ticker"),
    (["--symbols", ","], "symbol '' is not an upper-case ticker"),
    (["--benchmark", "spy"], "benchmark 'spy' is neither equal_weight nor an upper-case ticker"),
])
def test_a_bad_option_is_refused_with_the_fix_and_no_traceback(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRADING_DATA_DIR", str(tmp_path))
    assert main([*argv, "--start", "2024-01-01", "--end", "2024-03-01", "--quiet", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Fix:" in err
    assert "Loading bars" not in err  # refused before any work


@pytest.mark.parametrize("argv, option", [(["--slippage-bps", "-5"], "--slippage-bps"), (["--folds", "-1"], "--folds"),
                                          (["--initial-cash", "-100"], "--initial-cash")])
def test_an_option_out_of_range_is_named_as_the_option_in_the_problem_and_the_fix(argv, option, tmp_path, monkeypatch,
                                                                                  capsys):
    # The fix read "correct the option(s) named", naming nothing, after a problem naming the settings field
    # (slippage_bps), not the option the user typed.
    monkeypatch.setenv("TRADING_DATA_DIR", str(tmp_path))
    assert main([*argv, "--start", "2024-01-01", "--end", "2024-03-01", "--quiet", "--no-save"]) == 2
    problem, fix = capsys.readouterr().err.strip().splitlines()
    assert f"{option}: Input should be greater than" in problem
    assert fix == f"Fix: correct {option} (python -m trading_pipeline.backtest --help lists every option and its default)"


@pytest.mark.parametrize("start, end", [("1990-01-01", "1990-06-01"), ("2040-06-01", "2040-12-31"),
                                        ("2026-01-01", "2099-12-31")])
def test_a_window_outside_the_exchange_calendar_is_refused_with_its_range(start, end, tmp_path, monkeypatch, capsys):
    # Each was an exchange_calendars DateOutOfBounds / MinuteOutOfBounds traceback.
    monkeypatch.setenv("TRADING_DATA_DIR", str(tmp_path))
    assert main(["--start", start, "--end", end, "--quiet", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert "outside the exchange calendar" in err and "Fix:" in err
    assert "Traceback" not in err


# A Wednesday, 11:00 in New York: the session of 2024-06-05 is in progress, 2024-06-04 is the last completed one.
DURING_A_SESSION = datetime(2024, 6, 5, 15, 0, tzinfo=UTC)


@pytest.mark.parametrize("data", ["simulated", "csv", "ibkr"])
def test_a_window_ending_after_the_last_completed_session_is_refused_for_every_source(data, tmp_path):
    ended = settings(data=data, csv_dir=str(tmp_path) if data == "csv" else None,
                     start=date(2024, 1, 2), end=date(2024, 6, 5))
    with pytest.raises(UserError) as info:
        runner.load(ended, strategies_file=STRATEGIES, source=NoBars(), now=DURING_A_SESSION)
    assert "ends 2024-06-05, after the last completed session 2024-06-04" in info.value.problem
    assert "2024-06-05 has not closed" in info.value.problem
    assert info.value.fix.startswith("set end to 2024-06-04 or earlier")


@pytest.mark.parametrize("end, now", [
    (date(2024, 6, 5), datetime(2024, 6, 5, 20, 0, tzinfo=UTC)),  # at the session's close (16:00 in New York)
    (date(2024, 6, 9), datetime(2024, 6, 8, 12, 0, tzinfo=UTC)),  # a Sunday end on Saturday: Friday has closed
    (date(2024, 7, 3), datetime(2024, 7, 3, 17, 0, tzinfo=UTC)),  # an early close (13:00 in New York)
])
def test_a_window_whose_sessions_have_all_closed_is_accepted(end, now):
    runner.check_window(settings(start=date(2024, 1, 2), end=end), now)


def test_the_command_refuses_an_end_in_the_future_before_loading_anything(tmp_path, monkeypatch, capsys):
    # It ran: the simulated market invented bars for sessions that had not happened, and the report showed them.
    monkeypatch.setenv("TRADING_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TRADING_AS_OF", DURING_A_SESSION.isoformat())  # the deployment's now
    assert main(["--start", "2024-03-01", "--end", "2024-12-31", "--quiet", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert "after the last completed session 2024-06-04" in err and "Fix: set end to 2024-06-04" in err
    assert "Loading bars" not in err and "Traceback" not in err


class NoBars:
    name = "no bars"

    def fetch(self, *args):
        raise AssertionError("the window is refused before any bar is asked for")


def test_the_example_report_of_the_docs_and_the_readme_is_what_make_backtest_prints(tmp_path, monkeypatch, capsys):
    """docs/backtesting.md says `make backtest` prints its example report (figures and result digest the
    same, the run key changing with the code), and the README quotes an excerpt of it."""
    repo = Path(__file__).resolve().parents[2]
    for name in ("TRADING_STRATEGIES_FILE", "TRADING_AS_OF", "TRADING_SIM_SEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRADING_DATA_DIR", str(tmp_path))
    assert main(["--quiet", "--no-save"]) == 0
    printed = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    page = (repo / "docs" / "backtesting.md").read_text().split("## Example report", 1)[1].split("```")[1]
    example = [line.rstrip() for line in page.strip("\n").splitlines()]
    assert [line for line in example if not line.startswith("run key ")] == \
           [line for line in printed[:len(example)] if not line.startswith("run key ")]
    digest = next(line for line in printed if line.startswith("run key ")).rsplit("result digest ", 1)[1]
    assert next(line for line in example if line.startswith("run key ")).endswith(f"result digest {digest}")
    readme = (repo / "README.md").read_text().split("## Backtesting", 1)[1].split("```")[1]
    # rows of three tables, aligned as one, and two figures explained in parentheses after their values
    words = {" ".join(line.split()) for line in printed}
    excerpt = [" ".join(re.sub(r"\s+\([^)]*\)$", "", line).split()) for line in readme.strip("\n").splitlines()]
    assert [line for line in excerpt if line not in words] == []
