# Quick start: `make demo` (the whole study on the embedded data), `make check` (the fast tests)
# and `make test` (everything, what CI runs). All create .venv on first use and are safe to run again.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# MLproject commands call plain `python`: make it the venv's
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo check test lint ui clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m mlflow run . --env-manager local --experiment-name sceneml

# Both run the tests in a random order drawn from ORDER_SEED (pytest-randomly): a test that needs
# another's leftovers fails here, and the same seed gives the same order again. `-p no:randomly` runs
# them in file order.
ORDER_SEED ?= 20261130

# the fast tier: unit tests, no `mlflow run`, no subprocess training
check: install
	$(PY) -m pytest -m "not slow" -p randomly --randomly-seed=$(ORDER_SEED) --durations=10

# two workers: most of a test's time is one process importing torch and MLflow, which leaves the
# other core idle; the tests that share a costly fixture stay together (tests/conftest.py)
TEST_WORKERS ?= 2
# ends with the machine's pace (benchmarks/pace.py) and the suite's budget at that pace (5 min at 90 img/s);
# PACE_ARGS=--record adds the row to benchmarks/results/pace.csv
test: install
	@start=$$(date +%s); \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -p randomly --randomly-seed=$(ORDER_SEED) --durations=10; \
	status=$$?; $(PY) benchmarks/pace.py --since $$start $(PACE_ARGS); exit $$status

lint: install
	$(VENV)/bin/ruff check sceneml entrypoints tests benchmarks tools

# the MLflow UI on this folder's store; switch it to "Model training" (top left) for runs and models
ui: install
	@echo "MLflow UI: http://127.0.0.1:5000  (Ctrl-C stops it)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) mlruns mlflow.db
