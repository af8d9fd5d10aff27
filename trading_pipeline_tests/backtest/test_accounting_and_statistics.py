"""The account adds up to the cent, every fill pays what core/costs.py says, the statistics are
empyrical's own, and two runs of the same settings, code and data are the same run."""

from __future__ import annotations

import dataclasses
from zoneinfo import ZoneInfo

import empyrical
import pytest

from trading_pipeline.backtest.report import fmt, text_report
from trading_pipeline.backtest.statistics import summarize
from trading_pipeline.core import costs
from trading_pipeline_tests.backtest.conftest import run

NEW_YORK = ZoneInfo("America/New_York")


def test_equity_is_cash_plus_positions_at_their_closes_to_the_cent(simulated):
    base_settings, _, result = simulated
    assert result.fills and any(f.commission > 0 for f in result.fills)
    cash = base_settings.initial_cash
    held: dict[str, float] = {}
    fills = sorted(result.fills, key=lambda f: f.at)
    position = 0
    for session, equity in result.equity.items():
        closes = result.closes.loc[session]
        # Fills of this session happened before its close.
        while position < len(fills) and fills[position].at.astimezone(NEW_YORK).date() <= session.date():
            fill = fills[position]
            signed = fill.quantity if fill.side == "BUY" else -fill.quantity
            cash -= signed * fill.price + fill.commission
            held[fill.symbol] = held.get(fill.symbol, 0.0) + signed
            position += 1
        marked = cash + sum(quantity * closes[symbol] for symbol, quantity in held.items())
        assert equity == pytest.approx(marked, abs=0.005)
        assert result.cash[session] == pytest.approx(cash, abs=0.005)
    assert position == len(fills)


def test_every_fill_pays_the_ibkr_commission_and_trades_carry_it(simulated):
    base_settings, _, result = simulated
    for fill in result.fills:
        assert fill.commission == costs.commission(base_settings.commission, fill.side, fill.quantity, fill.price)
    summary = summarize(result)
    assert summary["trades"]["commissions"] == pytest.approx(sum(f.commission for f in result.fills), abs=1e-6)


def test_statistics_are_empyricals(simulated):
    _, _, result = simulated
    summary = summarize(result)
    returns = result.equity.pct_change().dropna()
    figures = summary["equity"]
    assert figures["sharpe"] == pytest.approx(empyrical.sharpe_ratio(returns), abs=1e-9)
    assert figures["sortino"] == pytest.approx(empyrical.sortino_ratio(returns), abs=1e-9)
    assert figures["cagr"] == pytest.approx(empyrical.annual_return(returns), abs=1e-9)
    assert figures["volatility"] == pytest.approx(empyrical.annual_volatility(returns), abs=1e-9)
    assert figures["max_drawdown"] == pytest.approx(empyrical.max_drawdown(returns), abs=1e-9)
    assert figures["calmar"] == pytest.approx(empyrical.calmar_ratio(returns), abs=1e-9)
    assert figures["total_return"] == pytest.approx(result.equity.iloc[-1] / result.equity.iloc[0] - 1, abs=1e-9)


def test_trade_statistics_in_r(simulated):
    _, _, result = simulated
    trades = summarize(result)["trades"]
    closed = [t for t in result.trades if t.closed]
    r = [t.pnl / (t.quantity * abs(t.planned_entry - t.stop)) for t in closed]
    assert trades["trades"] == len(closed) > 5
    assert trades["expectancy_r"] == pytest.approx(sum(r) / len(r))
    mean = sum(r) / len(r)
    std = (sum((x - mean) ** 2 for x in r) / (len(r) - 1)) ** 0.5
    assert trades["sqn"] == pytest.approx(len(r) ** 0.5 * mean / std)
    assert sum(trades["r_distribution"].values()) == len(closed)
    assert sum(trades["exits"].values()) == len(closed)
    for trade in closed:  # a target is a gain, a stop a loss (an entry filled below its limit gains more R)
        assert (trade.r_multiple > 0) == (trade.exit_reason == "target") or trade.exit_reason == "exit signal"


def test_gate_rejections_are_counted_per_gate(simulated):
    _, _, result = simulated
    pipeline = summarize(result)["pipeline"]
    rejected = [d for d in result.decisions if d.proposed in ("BUY", "SELL") and d.action == "NO_TRADE"]
    assert pipeline["proposals_rejected"] == len(rejected) > 0
    assert sum(pipeline["gate_rejections"].values()) == sum(len(d.failed_gates) for d in rejected)


def test_two_runs_give_the_same_result_hash(simulated):
    base_settings, loaded, first = simulated
    second = run(base_settings, loaded)
    assert second.run_key == first.run_key
    assert second.result_digest() == first.result_digest()
    other = run(base_settings.model_copy(update={"slippage_bps": 20.0}), loaded)
    assert other.run_key != first.run_key and other.result_digest() != first.result_digest()


def test_a_window_without_trades_reports_no_nan_and_explains_each_n_a(simulated):
    """No trade in the window: flat equity, no trade figures. The report prints no nan or inf, and
    says why a figure is n/a (the walk-forward's undefined scores, -inf, print n/a too)."""
    _, _, result = simulated
    flat = dataclasses.replace(result, trades=[], fills=[], equity=result.equity * 0 + result.settings.initial_cash,
                               gross_exposure=result.gross_exposure * 0)
    text = text_report(flat, summarize(flat, flat.extra_benchmarks))
    assert " n/a" in text
    assert not {"nan", "nan%", "$nan", "inf", "-inf", "inf%", "-inf%"} & set(text.lower().split())
    assert "n/a: the figure is not defined for this run" in text
    assert fmt(float("-inf"), "num") == fmt(float("inf"), "num") == fmt(float("nan"), "num") == "n/a"
    # a run where every figure is defined carries no such note
    assert "n/a:" not in text_report(result, summarize(result, result.extra_benchmarks))


def test_a_benchmark_missing_the_first_session_starts_from_its_last_close_not_a_later_one(simulated):
    """SPY (a strategy symbol and the SPY benchmark) has no bar on the window's first session (a
    halt, a hole in the data): buy-and-hold is valued at its last close before it, as a position
    would be marked, not at a later close taken from the future (which dropped the move between)."""
    base_settings, (strategy, bars, extra), result = simulated
    first = result.equity.index[0]
    daily = bars["SPY"]["1d"]
    days = daily.index.tz_convert(NEW_YORK).normalize().tz_localize(None)
    before = float(daily["close"][days < first].iloc[-1])
    holed = {**bars, "SPY": {**bars["SPY"], "1d": daily[days != first]}}
    holed_extra = {**extra, "SPY": extra["SPY"].drop(first)}
    result = run(base_settings, (strategy, holed, holed_extra))
    summary = summarize(result, result.extra_benchmarks)
    last = float(extra["SPY"].loc[result.equity.index[-1]])
    assert summary["benchmarks"]["SPY"]["total_return"] == pytest.approx(last / before - 1, abs=1e-12)
    spy_row = next(row for row in summary["symbols"] if row["symbol"] == "SPY")
    assert spy_row["buy_and_hold"] == pytest.approx(last / before - 1, abs=1e-12)
    closes = result.closes.iloc[-1] / result.closes.iloc[0]
    assert closes["SPY"] == pytest.approx(last / before, abs=1e-12)
    assert summary["benchmarks"]["equal_weight"]["total_return"] == pytest.approx(closes.mean() - 1, abs=1e-12)
