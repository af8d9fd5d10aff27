"""README.md and docs/: every link to another page (and to a heading in it) leads somewhere, and
the README's first screen carries what a newcomer needs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_every_page_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            destination = (page.parent / path).resolve() if path else page
            if not destination.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name


def test_readme_first_screen():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 120  # the reference lives in docs/
    for needed in ("make demo", "make dev", "docs/images/lineage.png", "docs/images/decision-chart.png",
                   "docs/images/fill.png"):
        assert needed in readme, needed
    tour = readme.split("## A five-minute tour of the UI", 1)[1].split("\n## ", 1)[0]
    # the left menu of the Dagster 1.13 UI (dagster-webserver's navigation labels)
    menus = ("Lineage", "Catalog", "Runs", "Jobs", "Automation", "Deployment", "Overview")
    for menu in menus:
        assert f"**{menu}**" in tour, menu
    # ... as the installed dagster-webserver's left navigation names them
    import dagster_webserver

    bundle = Path(dagster_webserver.__file__).parent / "webapp" / "build"
    scripts = "".join(path.read_text(errors="replace") for path in bundle.rglob("*.js")
                      if "label:\"Catalog\"" in path.read_text(errors="replace"))
    for menu in menus:
        assert f'label:"{menu}",href:"/' in scripts, menu
