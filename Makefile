# Two commands matter: `make sweep` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup sweep ui test test-fast bench docs lint clean

setup: $(STAMP)

# Reinstall only when the dependency list changes; `pip install -e` keeps edits live.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job: every variant x 3 seeds on the embedded defaults (local Ray, synthetic data, ./mlflow.db).
sweep: setup
	$(PY) -m orchestrator.sweep --task segmentation $(ARGS)

# The MLflow UI of ./mlflow.db on http://127.0.0.1:5000 until Ctrl-C (ARGS="--port 5001 --tracking-uri ...").
ui: setup
	$(PY) -m orchestrator.ui $(ARGS)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m benchmarks.convs
	$(PY) -m benchmarks.segmentation
	$(PY) -m benchmarks.edge_layers
	$(PY) -m benchmarks.sweep
	$(PY) -m benchmarks.data
	$(PY) -m benchmarks.retrieval  # the thesis' scale (1M x 256 gallery): long on a laptop, see its --help

# README figures; docs.screenshot runs a tiny sweep and needs Chromium (apt-get install chromium).
docs: setup
	$(PY) -m docs.mask_flow
	$(PY) -m docs.screenshot

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
