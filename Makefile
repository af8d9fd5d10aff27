# The two commands: `make demo` runs the whole pipeline on the embedded defaults, `make dev`
# opens the Dagster UI on its runs (and the chart server for the chart links). `make test` runs
# the tests. Each sets up what it needs: .venv, packages, and a Chromium for kaleido; the demo
# installs only the package, the tests add their tools (the [test] extra).
# The interpreter .venv is built on: PYTHON if given, else the fastest Python 3.11+ on the PATH
# (deploy/local/pick-python.sh says why and prints what it chose), asked once, when .venv is made.
PYTHON ?=
VENV := .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
DAGSTER_PORT ?= 3000

.PHONY: demo test dev install install-test chromium bench backtest clean

$(VENV)/.created:
	@python="$(PYTHON)"; [ -n "$$python" ] || python=$$(sh deploy/local/pick-python.sh); \
	  "$$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	  { echo "Python 3.11 or newer is needed (found: $$("$$python" --version 2>&1 || echo "no $$python")). Install it, or run make PYTHON=python3.12 ..."; exit 1; }; \
	  echo "$$python -m venv $(VENV)"; "$$python" -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	@touch $@

# What the demo and the UI need: the package and its dependencies.
$(VENV)/.installed-demo: pyproject.toml | $(VENV)/.created
	$(VENV)/bin/pip install -q -e .
	@touch $@

# The test tools on top (pytest, moto, playwright, ruff, ...).
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-demo
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

install: $(VENV)/.installed-demo
install-test: $(VENV)/.installed-test

chromium: install
	@$(PY) -m trading_pipeline.ensure_chromium

# The local Dagster home keeps the demo's runs so `make dev` shows them.
$(DAGSTER_HOME)/dagster.yaml: deploy/local/dagster.yaml
	@mkdir -p -m 700 $(DAGSTER_HOME)  # runs, logs and asset values (orders, positions): this user only
	cp deploy/local/dagster.yaml $@

demo: chromium $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m trading_pipeline.demo $(DEMO_ARGS)

# The Dagster UI (`dg dev`, what Dagster 1.13 recommends over `dagster dev`) on workspace.yaml's one
# code location, and the chart server for the chart links; Ctrl-C stops both.
dev: chromium $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m trading_pipeline.graph.pools
	@$(PY) -m trading_pipeline.chart_server & charts=$$!; \
	  trap 'kill $$charts 2>/dev/null' EXIT; trap 'exit 0' INT TERM; \
	  $(VENV)/bin/dg dev -w workspace.yaml -h 127.0.0.1 -p $(DAGSTER_PORT)

# The suite on PYTEST_WORKERS pytest-xdist processes (0: in this one), a test file's tests on one
# worker (the deploy tests all on one: trading_pipeline_tests/conftest.py).
PYTEST_WORKERS ?= 2

test: install-test chromium
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: chromium
	$(PY) bench/pipeline.py

# A backtest of the first strategy on the simulated market; options: BACKTEST_ARGS="--start 2018-01-01 ..."
backtest: install
	$(PY) -m trading_pipeline.backtest $(BACKTEST_ARGS)

clean:
	rm -rf $(VENV) .dagster_home .pytest_cache
