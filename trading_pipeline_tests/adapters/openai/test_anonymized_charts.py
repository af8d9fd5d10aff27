"""OPENAI_ANONYMIZE_CHARTS: the model is shown no symbol, no date and no real price (chart and
numbers rebased so the last close is 100); the analyses and the decision proposal come back in
real prices, checked against the real bars."""

import base64
import hashlib
import io
import json

import pytest

from trading_pipeline.adapters.openai_analyst import OpenAIAnalyst
from trading_pipeline.core import chart_spec
from trading_pipeline.core.analysis import Action
from trading_pipeline.errors import ConfigError
from trading_pipeline_tests.adapters.openai.conftest import API_KEY, chart_for, rows
from trading_pipeline_tests.adapters.openai.local_server import context_of, good, image_parts


@pytest.fixture(scope="module")
def anonymized_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 36), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def real_texts(frame) -> set[str]:
    """How the real frame's symbol, dates and prices could be written in a request."""
    shown = frame.frame.tail(chart_spec.bars_shown(frame.timeframe))
    texts = {frame.symbol, frame.as_of.date().isoformat()} | {t.date().isoformat() for t in shown.index}
    last = shown.iloc[-1]
    for value in (last["close"], last["open"], last["high"], last["low"], last["sma_20"], last["sma_50"],
                  last["bb_upper"], last["supertrend"], shown["high"].tail(50).max(), shown["low"].tail(50).min()):
        texts |= {f"{value:.2f}", f"{value:.1f}", f"{float(f'{value:.6g}')}"}
    return texts


def test_the_model_sees_no_symbol_date_or_price_and_the_analysis_is_in_real_prices(openai_server, sessions, daily,
                                                                                  weekly, png, anonymized_png):
    figures = []
    analyst = OpenAIAnalyst.from_env(
        {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": openai_server.base_url, "OPENAI_ANONYMIZE_CHARTS": "yes"},
        sessions, run_id="run-1", render_png=lambda figure: figures.append(figure) or anonymized_png)
    openai_server.reset(default=good())
    day, week = analyst.analyze(daily, chart_for(png), png), analyst.analyze(weekly, chart_for(png), png)
    proposal = analyst.consolidate(day, week).proposal
    analyst.close()

    bodies = openai_server.bodies()
    assert len(bodies) == 3 and len(figures) == 2
    sent = json.dumps(bodies)
    leaked = sorted(text for text in real_texts(daily) | real_texts(weekly) if text in sent)
    assert leaked == []
    assert "ASSET" in sent and chart_spec.ANONYMOUS_LAST_START.date().isoformat() in sent
    for body in bodies[:2]:
        assert context_of(body)["last_close"] == 100.0
        [image] = image_parts(body)  # the anonymized chart, not the real one
        assert base64.b64decode(image["image_url"]["url"].removeprefix("data:image/png;base64,")) == anonymized_png
    title = figures[0].layout.title.text
    assert "ASSET" in title and "AAPL" not in title and "2001-01-01" in title and "<b>100.00</b>" in title
    assert rows(sessions)[0].image_sha256 == hashlib.sha256(anonymized_png).hexdigest()

    # good() answers in the units it was given (entry at the close 100, stop 2 ATR below): mapped back.
    for analysis, frame in ((day, daily), (week, weekly)):
        close, atr = frame.last_close, float(frame.frame["atr_14"].iloc[-1])
        assert analysis.valid and analysis.signal == Action.BUY, analysis.rationale
        assert analysis.entry == pytest.approx(close, abs=1e-3)
        assert analysis.stop == pytest.approx(close - 2 * atr, abs=close * 1e-4)
        assert analysis.targets == pytest.approx([close + 3 * atr, close + 5 * atr], abs=close * 1e-4)
        assert analysis.support == pytest.approx([frame.frame["low"].tail(50).min()], abs=close * 1e-4)
        assert (analysis.last_close, analysis.atr) == (close, pytest.approx(atr))
        assert "anonymized" in analysis.rationale
    assert proposal.action == Action.BUY
    assert (proposal.entry, proposal.stop) == (pytest.approx(day.entry, abs=1e-3), pytest.approx(day.stop, abs=1e-3))
    assert proposal.targets == pytest.approx(day.targets[:1], abs=1e-3)


def test_an_anonymized_cache_hit_draws_no_chart(make_analyst, openai_server, sessions, daily, png, anonymized_png):
    figures = []
    env = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": openai_server.base_url, "OPENAI_ANONYMIZE_CHARTS": "yes"}
    openai_server.reset(default=good())
    for run in ("run-1", "run-2"):
        analyst = OpenAIAnalyst.from_env(env, sessions, run_id=run,
                                         render_png=lambda figure: figures.append(figure) or anonymized_png)
        assert analyst.analyze(daily, chart_for(png), png).valid
        analyst.close()
    assert len(openai_server.requests) == 1 and len(figures) == 1


def test_a_wrong_anonymize_setting_names_the_fix():
    with pytest.raises(ConfigError, match="OPENAI_ANONYMIZE_CHARTS='maybe' is not yes or no"):
        OpenAIAnalyst.from_env({"OPENAI_API_KEY": "k", "OPENAI_ANONYMIZE_CHARTS": "maybe"}, None)
