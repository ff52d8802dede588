# Two commands on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-fast clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

quickstart: $(BIN)/.installed
	$(BIN)/prunetune search experiments/quickstart.toml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

test-fast: $(BIN)/.installed  # everything but the tests marked slow (clusters, servers, browser, kill/resume, searches)
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:  # build output only: your results (runs/, ray_results/, mlflow.db, mlruns/) are yours to delete
	rm -rf $(VENV) .pytest_cache *.egg-info
