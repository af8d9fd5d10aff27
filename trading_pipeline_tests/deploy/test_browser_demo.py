"""A newcomer's first hour in the UI of a `make demo` run (issue 14's "Done when"): headless
Chromium opens the Dagster UI of the demo (SPY's BUY, sent and later filled), follows the chart
link of a chart_images materialization to the PNG on the chart server, and finds the decision
chart, the strategy and its limits on trade_decisions, the strategies asset in the Catalog and the
portfolio assets downstream of orders in the lineage. The page may only talk to 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import io
from urllib.parse import quote

import httpx
import pytest
from PIL import Image

from trading_pipeline_tests.deploy.demo_ui import chromium, demo_ui, loopback_page

VIEWPORT = {"width": 1600, "height": 1000}
CHART_SIZE = (960, 540)
UI_TIMEOUT_MS = 60_000
PORTFOLIO = ("positions", "executions", "account_summary")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    with demo_ui(tmp_path_factory.mktemp("demo-ui"), CHART_SIZE) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile"), VIEWPORT) as context:
        yield context


@pytest.fixture
def page(browser):
    page = loopback_page(browser)
    yield page
    page.close()
    assert page.blocked == [], f"the page asked for addresses other than loopback: {page.blocked}"


def explain(page, error: Exception) -> AssertionError:
    return AssertionError(f"{error}\npage {page.url} showed:\n{page.inner_text('body')[:2000]}")


def test_the_demo_replayed_a_trade_that_was_sent_and_filled(ui):
    assert "SPY: sent BUY" in ui.demo_output, ui.demo_output
    assert "filled @" in ui.demo_output, ui.demo_output


def test_a_click_on_the_chart_link_of_chart_images_opens_the_png(ui, page):
    partition = "SPY|1d"
    chart = ui.metadata("chart_images", partition)
    link = chart["chart"]
    assert link.startswith(f"{ui.chart_server_url}/charts/SPY/1d/"), link  # http, not file://

    page.goto(f"{ui.webserver_url}/assets/chart_images?view=events&partition={quote(partition)}",
              wait_until="domcontentloaded")
    anchor = page.locator(f'a[href="{link}"]').first
    try:
        anchor.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    except Exception as error:  # noqa: BLE001 - say what the page showed instead
        raise explain(page, error) from None
    # The link opens a new tab: catch the chart's response wherever it lands.
    with page.context.expect_event("response", predicate=lambda r: r.url == link, timeout=30_000) as caught:
        anchor.click()
    response = caught.value
    assert response.status == 200
    assert response.headers["content-type"] == "image/png"
    png = response.body()
    assert hashlib.sha256(png).hexdigest() == chart["sha256"]  # the very chart of that materialization
    assert Image.open(io.BytesIO(png)).size == CHART_SIZE
    for tab in page.context.pages:
        if tab is not page and tab.url == link:
            tab.close()


def test_trade_decisions_shows_the_decision_chart_and_the_strategy(ui, page):
    decision = ui.metadata("trade_decisions", "SPY")
    assert decision["action"] == "BUY"
    link = decision["decision_chart"]
    assert link.startswith(f"{ui.chart_server_url}/charts/SPY/decision/"), link
    fetched = httpx.get(link, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    thumbnail = decision["decision_thumbnail"]
    assert thumbnail.startswith("![")
    shown = base64.b64decode(thumbnail.split("base64,", 1)[1].rstrip(")"))
    assert Image.open(io.BytesIO(shown)).width >= 200
    assert decision["strategy"] == "demo_trend"
    assert "| risk per trade |" in decision["strategy_limits"], decision["strategy_limits"]

    # The partition's page shows its latest materialization (the events list starts with the sync's
    # observation, which redraws the chart with the fills).
    page.goto(f"{ui.webserver_url}/assets/trade_decisions?view=partitions&partition=SPY",
              wait_until="domcontentloaded")
    try:
        page.locator(f'a[href="{link}"]').first.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    except Exception as error:  # noqa: BLE001 - say what the page showed instead
        raise explain(page, error) from None
    text = page.inner_text("body")
    for label in ("decision_chart", "decision_thumbnail", "strategy", "strategy_limits", "demo_trend"):
        assert label in text, label


def test_the_catalog_lists_the_strategies_asset(ui, page):
    page.goto(f"{ui.webserver_url}/assets", wait_until="domcontentloaded")
    entry = page.locator('a[href$="/assets/strategies"]').first
    try:
        entry.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
        entry.click()
        page.wait_for_url("**/assets/strategies**", timeout=UI_TIMEOUT_MS)
        # its page: what it is, and trade_decisions downstream (decisions apply the strategies)
        page.wait_for_function("texts => texts.every(t => document.body.innerText.includes(t))",
                               arg=["The strategies file as loaded", "trade_decisions"], timeout=UI_TIMEOUT_MS)
    except Exception as error:  # noqa: BLE001 - say what the page showed instead
        raise explain(page, error) from None


LINEAGE_QUERY = """
query { assetNodes { assetKey { path } dependencyKeys { path } } }
"""


def test_the_lineage_runs_from_orders_to_the_portfolio(ui, page):
    upstream = {node["assetKey"]["path"][0]: {d["path"][0] for d in node["dependencyKeys"]}
                for node in ui.graphql(LINEAGE_QUERY)["assetNodes"]}
    for asset in PORTFOLIO:
        assert "orders" in upstream[asset], (asset, upstream[asset])
    assert "strategies" in upstream["trade_decisions"]

    # The orders asset's lineage tab draws bars → … → orders → portfolio.
    page.goto(f"{ui.webserver_url}/assets/orders?view=lineage&lineageScope=neighbors&lineageDepth=6",
              wait_until="domcontentloaded")
    names = ["market_bars", "chart_images", "trade_decisions", "orders", *PORTFOLIO]
    try:
        page.wait_for_function("names => names.every(n => document.body.innerText.includes(n))", arg=names,
                               timeout=UI_TIMEOUT_MS)
    except Exception as error:  # noqa: BLE001 - say what the page showed instead
        raise explain(page, error) from None
    # The fill is on the executions asset the lineage leads to.
    executions = ui.metadata("executions")
    assert "| SPY | BUY |" in executions["trades"], executions["trades"]
