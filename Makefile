# Quick start: `make demo` (the whole study on the embedded data) and `make test`.
# Both create .venv on first use and are safe to run again.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# MLproject commands call plain `python`: make it the venv's
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m mlflow run . --env-manager local

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check sceneml entrypoints tests benchmarks

clean:
	rm -rf $(VENV) mlruns mlflow.db
