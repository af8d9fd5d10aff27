"""A person's view of the deployment: headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; no browser download) opens the webserver's asset graph and a chart materialization.
The screenshots are kept; their pages are checked to show the asset names and the thumbnail.

The page may only talk to 127.0.0.1: every other request is aborted (and counted; demo_ui.chromium).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

from trading_pipeline_tests.deploy.conftest import SYMBOL
from trading_pipeline_tests.deploy.demo_ui import chromium, loopback_page
from trading_pipeline_tests.deploy.test_stack import CHAIN, latest

VIEWPORT = {"width": 1600, "height": 1000}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile"), VIEWPORT) as context:
        yield context


@pytest.fixture
def page(browser):
    page = loopback_page(browser)
    yield page
    page.close()


def screenshot(page, directory: Path, name: str) -> Image.Image:
    path = directory / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 20_000, f"{path} is suspiciously small"
    image = Image.open(path).convert("RGB")
    assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
    # Not blank: many colours, and dark text on the light page.
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, f"{path}: only {len(colours or [])} colours"
    darkest = min(sum(rgb) for _, rgb in colours)
    assert darkest < 200, f"{path}: no dark pixels (no text?)"
    print(f"screenshot: {path}")
    return image


def wait_or_explain(page, directory: Path, name: str, wait) -> None:
    """Run `wait`; on a time-out keep a screenshot and say what the page showed."""
    try:
        wait()
    except Exception as error:  # noqa: BLE001 - any failure to appear gets the explanation
        path = directory / f"{name}-timed-out.png"
        page.screenshot(path=str(path))
        shown = page.inner_text("body")[:2000]
        raise AssertionError(f"{name}: {error}\npage {page.url} showed (screenshot {path}):\n{shown}") from None


def test_asset_graph_shows_every_asset(deployment, materialized, page, tmp_path_factory):
    shots = tmp_path_factory.mktemp("screenshots", numbered=False)
    # The trading group's lineage graph (the global graph starts with the groups folded).
    page.goto(f"{deployment.webserver_url}/locations/__repository__@trading_pipeline/asset-groups/trading",
              wait_until="domcontentloaded")
    # The graph's nodes are HTML: wait until every asset's name is rendered.
    wait_or_explain(page, shots, "asset-graph", lambda: page.wait_for_function(
        "names => names.every(n => document.body.innerText.includes(n))", arg=CHAIN, timeout=60_000))
    page.wait_for_load_state("networkidle")
    screenshot(page, shots, "asset-graph")
    text = page.inner_text("body")
    for name in CHAIN:
        assert name in text
        # Each name is drawn inside the visible part of the page, not just present in the DOM.
        box = page.get_by_text(name, exact=True).first.bounding_box()
        assert box is not None and 0 <= box["x"] < VIEWPORT["width"] and 0 <= box["y"] < VIEWPORT["height"], (name, box)
    assert "Join the Dagster community" not in text  # deploy/dagster.yaml turns the pop-up off
    assert page.blocked == [], page.blocked


def test_chart_materialization_shows_its_thumbnail(deployment, materialized, page, tmp_path_factory):
    partition = f"{SYMBOL}|1d"
    event = latest(deployment, "chart_images", [partition])[partition]
    expected = base64.b64decode(event["metadata"]["thumbnail"].split(",", 1)[1].rstrip(")"))
    shots = tmp_path_factory.getbasetemp() / "screenshots"
    shots.mkdir(exist_ok=True)

    page.goto(f"{deployment.webserver_url}/assets/chart_images?view=events&partition={quote(partition)}",
              wait_until="domcontentloaded")
    # The thumbnail is Markdown metadata: the events page offers it behind "Show Markdown".
    show = page.get_by_text("[Show Markdown]").first
    wait_or_explain(page, shots, "chart-event", lambda: show.wait_for(state="visible", timeout=60_000))
    show.click()
    thumbnail = page.locator('img[src^="data:image/png;base64,"]').first
    wait_or_explain(page, shots, "chart-thumbnail", lambda: thumbnail.wait_for(state="visible", timeout=60_000))
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle(),
                           timeout=30_000)
    thumbnail.scroll_into_view_if_needed()
    screenshot(page, shots, "chart-thumbnail")

    src = thumbnail.get_attribute("src")
    shown = base64.b64decode(src.split(",", 1)[1])
    assert shown == expected  # the very PNG stored in the materialization's metadata
    natural = page.evaluate("img => [img.naturalWidth, img.naturalHeight]", thumbnail.element_handle())
    assert list(Image.open(io.BytesIO(shown)).size) == natural and natural[0] >= 200
    box = thumbnail.bounding_box()
    assert box is not None and box["width"] > 100 and box["height"] > 50  # drawn, not a broken icon
    assert page.blocked == [], page.blocked
