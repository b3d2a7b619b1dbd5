# `make pipeline` runs the whole pipeline on params.yaml; `make test` runs the test suite.
# Both create the virtual environment first (.venv, with the project installed in editable mode).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: pipeline test lint install

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

pipeline: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m flows.pipeline

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -n 2 --dist loadgroup -q

lint: $(STAMP)
	$(BIN)/ruff check ebm flows tests benchmarks
	$(BIN)/mypy ebm
