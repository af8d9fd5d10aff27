"""README.md and docs/: every link to another page (and to a heading in it) leads somewhere, and
the README's first screen carries what a newcomer needs. Then the docs against the code: every
environment variable the code reads is in a variable table and every one listed is read, with the
defaults .env.example holds; the strategies example shows every setting's default; the order
lifecycle's gates table names every gate a decision or an order can report; every command,
make target and flag the docs give exists; every job, schedule, sensor, check, asset and pool is
named, with the pools' limits and which schedules and sensors run from the start; --help is whole."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
    # ... with the keyboard shortcuts the tour gives ("**Lineage** (⌥L)")
    shortcuts = re.findall(r"\*\*(\w+)\*\* \((⌥\w)\)", tour)
    assert len(shortcuts) >= len(menus) - 1
    for menu, shortcut in shortcuts:
        assert re.search(rf'label:"{menu}",shortcut:{{filter:[^}}]*?label:"{shortcut}"', scripts), (menu, shortcut)


# --- the docs against the code ------------------------------------------------------------------------

PACKAGE = REPO / "trading_pipeline"
# The pages holding the variable tables: modes-and-variables.md and the mode pages it links.
VARIABLE_PAGES = [REPO / "docs" / name for name in ("modes-and-variables.md", "ibkr.md", "openai.md")]
VARIABLE_NAME = re.compile(r"(?:TRADING|OPENAI|IBKR|AWS|DAGSTER|BROWSER)_[A-Z0-9_]*[A-Z0-9]")
VARIABLE_TABLE_HEADER = "| variable | default | meaning |"


def variables_named_in_code() -> set[str]:
    """Every environment variable the package reads or sets: string constants shaped like one
    (TRADING_…, OPENAI_…, IBKR_…, …) and any constant key of an environ/getenv read."""
    import ast

    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and VARIABLE_NAME.fullmatch(node.value):
                names.add(node.value)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("get", "getenv", "setdefault") and node.args
                    and "environ" in ast.unparse(node.func.value) + node.func.attr
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names.add(node.args[0].value)
    return names


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row in `text` (separator rows left out)."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not re.fullmatch(r"\|[-| ]+\|", line.strip())]


def variable_rows(page: Path) -> list[tuple[list[str], str]]:
    """(names, default cell) of each row of the page's `| variable | default | meaning |` tables."""
    found, in_table = [], False
    for line in FENCE.sub("", page.read_text()).splitlines():
        if line.strip() == VARIABLE_TABLE_HEADER:
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not re.fullmatch(r"\|[-| ]+\|", line.strip()):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            found.append((re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]), cells[1]))
    return found


def test_every_variable_the_code_reads_is_in_a_variable_table():
    documented = {name for page in VARIABLE_PAGES for row in table_rows(FENCE.sub("", page.read_text())) for cell in row
                  for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)}
    assert sorted(variables_named_in_code() - documented) == []


def test_every_variable_the_code_reads_is_in_the_env_example():
    """As docs/modes-and-variables.md says: all of them, but the two that are Dagster's."""
    from trading_pipeline_tests.deploy.test_env_example import documented

    assert sorted(variables_named_in_code() - set(documented())) == ["DAGSTER_EVENT_BATCH_SIZE", "DAGSTER_HOME"]


def test_every_variable_in_a_variable_table_is_read_by_the_code():
    read = variables_named_in_code()
    listed = {name for page in VARIABLE_PAGES for names, _ in variable_rows(page) for name in names}
    assert len(listed) > 50  # the tables were found
    assert sorted(listed - read) == []


def test_the_defaults_in_the_variable_tables_are_the_env_examples():
    """.env.example's values are the code's defaults (test_env_example.py); a table's default,
    written as one `value` per variable, must be the same."""
    from trading_pipeline_tests.deploy.test_env_example import documented

    example = documented()
    compared, wrong = 0, []
    for page in VARIABLE_PAGES:
        for names, cell in variable_rows(page):
            defaults = [d.strip() for d in cell.split(",")] if len(names) > 1 else [cell]
            if len(defaults) != len(names):
                continue  # one default for several variables ("unset", "built-in table")
            for name, default in zip(names, defaults):
                value = re.fullmatch(r"`([^`]*)`", default)
                if value and example.get(name):
                    compared += 1
                    if value[1] != example[name]:
                        wrong.append(f"{page.name}: {name} `{value[1]}`, .env.example {example[name]}")
    assert wrong == []
    assert compared > 25


def test_the_strategies_page_shows_every_setting_with_its_default():
    from trading_pipeline.core.strategies import OrderSettings, RiskSettings, parse_strategies

    example = re.search(r"```yaml\n(.*?)```", (REPO / "docs" / "strategies.md").read_text(), re.DOTALL)[1]
    strategy = parse_strategies(example, "docs/strategies.md").strategies[0]
    assert strategy.risk == RiskSettings() and strategy.orders == OrderSettings()
    for name in [*RiskSettings.model_fields, *OrderSettings.model_fields]:
        assert re.search(rf"^\s+{name}:", example, re.MULTILINE), name


def test_the_backtest_page_names_every_launchpad_setting():
    from trading_pipeline.graph.assets.backtest import BacktestConfig

    text = (REPO / "docs" / "backtesting.md").read_text()
    launchpad = text.split("Its launchpad config takes", 1)[1].split("\n\n", 1)[0]
    assert sorted(name for name in BacktestConfig.model_fields if f"`{name}`" not in launchpad) == []


def gate_names_in_code() -> set[str]:
    """Every rule a decision or an order can name (the `risk_gates` table, rationales, reasons): the
    constant first argument (or `rule=`) of `check(...)` and `RuleCheck(...)` calls in the package."""
    import ast

    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                    in ("check", "RuleCheck")):
                continue
            rule = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "rule"), None)
            if isinstance(rule, ast.Constant) and isinstance(rule.value, str):
                names.add(rule.value)
    return names


def test_every_gate_is_in_the_order_lifecycle_gates_table():
    """docs/order-lifecycle.md's "Which gates apply" names every gate as the UI shows it, and no
    other: a gate renamed or added in the code must be renamed or added there."""
    section = (REPO / "docs" / "order-lifecycle.md").read_text().split("## Which gates apply", 1)[1].split("\n## ", 1)[0]
    rows = table_rows(section)[1:]
    named = {name for row in rows for name in re.findall(r"`([a-z_]+)`", row[0])}  # `orders.enabled` is a setting
    in_code = gate_names_in_code()
    assert len(in_code) > 15  # the calls were found
    assert sorted(in_code - named - {"actionable", "stop_default"}) == []  # those two are in the text below it
    assert sorted(named - in_code) == []
    assert {"actionable", "stop_default"} <= set(re.findall(r"`([a-z_]+)`", section))


def code_in(page: Path) -> list[str]:
    """What the page tells a user to type: fenced blocks' lines and inline code spans."""
    text = page.read_text()
    fenced = [line for block in FENCE.findall(text) for line in block.splitlines()[1:-1]]
    return fenced + re.findall(r"`([^`\n]+)`", FENCE.sub("", text))


def test_every_command_in_the_docs_exists_with_its_flags():
    import importlib.util

    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    # Flags given to a command: the module (or script) whose parser must know them.
    flag_owners = {"trading_pipeline.backtest": PACKAGE / "backtest" / "__main__.py",
                   "BACKTEST_ARGS": PACKAGE / "backtest" / "__main__.py", "DEMO_ARGS": PACKAGE / "demo.py"}
    problems, checked = [], 0
    for page in PAGES:
        for code in code_in(page):
            for target in re.findall(r"(?:^|[\s(])make ([a-z][a-z-]*)", code):
                checked += 1
                if target not in targets:
                    problems.append(f"{page.name}: make {target} (no such target)")
            for module in re.findall(r"python3? -m ([\w.]+)", code):
                checked += 1
                if module != "pytest" and importlib.util.find_spec(module) is None:
                    problems.append(f"{page.name}: python -m {module} (no such module)")
            for owner, source in [*flag_owners.items(),
                                  *((m, REPO / m) for m in re.findall(r"bench/\w+\.py", code))]:
                if owner not in code:
                    continue
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", code.split(owner, 1)[1]):
                    checked += 1
                    if flag != "--help" and f'"{flag}"' not in source.read_text():
                        problems.append(f"{page.name}: {owner} {flag} (no such option)")
    assert problems == []
    assert checked > 40


def test_every_job_schedule_sensor_check_and_pool_is_documented(tmp_path, monkeypatch):
    from trading_pipeline.core.strategies import load_strategies
    from trading_pipeline.definitions import build_definitions
    from trading_pipeline.graph.pools import POOL_LIMITS
    from trading_pipeline.graph.resources import resources_from_env

    monkeypatch.setenv("TRADING_DATA_DIR", str(tmp_path))
    defs = build_definitions(load_strategies(), resources_from_env({"TRADING_DATA_DIR": str(tmp_path)}))
    repository = defs.get_repository_def()
    docs = "\n".join(page.read_text() for page in PAGES)
    names = ([job.name for job in repository.get_all_jobs() if not job.name.startswith("__")]
             + [s.name for s in repository.schedule_defs] + [s.name for s in repository.sensor_defs]
             + [key.name for key in repository.asset_graph.asset_check_keys] + list(POOL_LIMITS)
             + [key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()])
    assert [name for name in names if f"`{name}`" not in docs] == []
    # The checks' table: every check, on its asset, blocking as the code says.
    checks = (REPO / "docs" / "how-it-works.md").read_text().split("### Asset checks", 1)[1].split("\n#", 1)[0]
    documented_checks = {(row[0].strip("`"), row[1].strip("`"), row[2]) for row in table_rows(checks)[1:]}
    graph = repository.asset_graph
    assert documented_checks == {(key.name, key.asset_key.to_user_string(),
                                  "yes" if graph.get_check_spec(key).blocking else "no")
                                 for key in graph.asset_check_keys}
    # Every pool's limit is stated ("`llm` 4"), and every limit stated is the one graph/pools.py sets.
    stated = re.findall(rf"`({'|'.join(POOL_LIMITS)})` (\d+)", docs)
    assert {pool for pool, _ in stated} == set(POOL_LIMITS)
    assert [(pool, n) for pool, n in stated if int(n) != POOL_LIMITS[pool]] == []
    # The automation table says which schedules and sensors run from the start: the code's defaults.
    automation = (REPO / "docs" / "how-it-works.md").read_text().split("## Automation", 1)[1]
    rows = {row[0].strip("`"): row for row in table_rows(automation)}
    for definition in [*repository.schedule_defs, *repository.sensor_defs]:
        running = definition.default_status.value == "RUNNING"
        assert definition.name in rows, definition.name
        assert ("on by default" in " ".join(rows[definition.name])) == running, definition.name


def test_command_help_is_whole_and_shows_the_defaults(capsys):
    from trading_pipeline import chart_server, demo
    from trading_pipeline.backtest.__main__ import parse_args

    for module in (demo, chart_server):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        shown = " ".join(capsys.readouterr().out.split())
        first_paragraph = " ".join(module.__doc__.split("\n\n")[0].split())
        assert first_paragraph.endswith(".") and first_paragraph in shown, module.__name__
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for default in ("default 2020-01-01", "default 2024-12-31", "default 5)", "default ibkr_fixed",
                    "default 100000", "default equal_weight", "default 300", "default simulated", "default sharpe"):
        assert default in shown, default
