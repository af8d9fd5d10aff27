# The two commands: `make demo` runs the whole pipeline on the embedded defaults, `make test`
# runs the tests. Both set up what they need: .venv, packages, and a Chromium for kaleido.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: demo test dev install chromium bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	  { echo "Python 3.11 or newer is needed (found: $$($(PYTHON) --version)). Install it, or run make PYTHON=python3.12 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

chromium: install
	@$(PY) -m trading_pipeline.ensure_chromium

# The local Dagster home keeps the demo's runs so `make dev` shows them.
$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: chromium $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m trading_pipeline.demo $(DEMO_ARGS)

dev: chromium $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m trading_pipeline.graph.pools
	$(VENV)/bin/dagster dev -m trading_pipeline.definitions -h 127.0.0.1 -p 3000

test: chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: chromium
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) .dagster_home .pytest_cache
