"""Make the README's screenshots again from a fresh `make demo` run (SPY's BUY, sent and filled):

    PYTHONPATH=$PWD .venv/bin/python -m trading_pipeline_tests.deploy.screenshots

writes docs/images/lineage.png (the orders asset's lineage, market_bars → orders → portfolio),
docs/images/decision-chart.png (the SPY BUY's decision chart from the chart store) and
docs/images/fill.png (the executions asset page with the trade's fill). Everything runs on
loopback in a temporary folder (demo_ui); each PNG is cropped/resized to stay small.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import httpx
from PIL import Image

from trading_pipeline_tests.deploy.conftest import REPO
from trading_pipeline_tests.deploy.demo_ui import chromium, demo_ui, loopback_page

OUT = REPO / "docs/images"
VIEWPORT = {"width": 1600, "height": 1000}
CHART_SIZE = (1600, 900)  # the decision chart as rendered; saved at MAX_WIDTH
MAX_WIDTH = 1200
MAX_BYTES = 400_000
TIMEOUT_MS = 60_000


def save(image: Image.Image, path: Path) -> None:
    image = image.convert("RGB")
    if image.width > MAX_WIDTH:
        image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)), Image.LANCZOS)
    # A palette keeps UI screenshots and charts (few flat colours) small without visible loss.
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size} bytes, more than {MAX_BYTES}: crop or shrink it")
    print(f"{path.relative_to(REPO)}: {image.width}x{image.height}, {size // 1000} KB")


def wait_for_texts(page, texts: list[str]) -> None:
    page.wait_for_function("texts => texts.every(t => document.body.innerText.includes(t))", arg=texts,
                           timeout=TIMEOUT_MS)


def lineage(page, ui) -> Image.Image:
    page.goto(f"{ui.webserver_url}/assets/orders?view=lineage&lineageScope=neighbors&lineageDepth=6",
              wait_until="domcontentloaded")
    wait_for_texts(page, ["market_bars", "orders", "positions", "executions", "account_summary", "strategies"])
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)  # the graph's layout settles after the data arrives
    shot = Image.open(io.BytesIO(page.screenshot()))
    # The graph pane only: right of the navigation, below the tabs, above the zoom buttons' row.
    return shot.crop((270, 330, 1550, 900))


def decision_chart(ui) -> Image.Image:
    link = ui.metadata("trade_decisions", "SPY")["decision_chart"]
    response = httpx.get(link, timeout=30)
    response.raise_for_status()
    assert response.headers["content-type"] == "image/png", response.headers
    return Image.open(io.BytesIO(response.content))


def fill(page, ui) -> Image.Image:
    page.set_viewport_size({"width": 2000, "height": 1100})  # the trades table without a cut
    page.goto(f"{ui.webserver_url}/assets/executions", wait_until="domcontentloaded")
    wait_for_texts(page, ["trades", "order_status_changes", "take_profit"])
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(500)
    shot = Image.open(io.BytesIO(page.screenshot()))
    # The main column (breadcrumb to the metadata's end), not the navigation nor the side panel.
    left = page_box(page, "Assets")["x"] - 16
    right = page_box(page, "Definition")["x"] - 40
    bottom = page_box(page, "Upstream assets")["y"] - 64  # above the Lineage heading
    page.set_viewport_size(VIEWPORT)
    return shot.crop((round(left), 0, round(right), round(bottom)))


def page_box(page, text: str) -> dict:
    box = page.get_by_text(text, exact=True).first.bounding_box()
    assert box is not None, f"{text!r} is not drawn on {page.url}"
    return box


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder of the PNGs (default {OUT})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with (tempfile.TemporaryDirectory(prefix="tp-screenshots-") as tmp, demo_ui(Path(tmp), CHART_SIZE) as ui,
          chromium(Path(tmp) / "profile", VIEWPORT) as context):
        page = loopback_page(context)
        save(lineage(page, ui), args.out / "lineage.png")
        save(decision_chart(ui), args.out / "decision-chart.png")
        save(fill(page, ui), args.out / "fill.png")
        if page.blocked:
            print(f"warning: requests to other hosts were blocked: {page.blocked}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
