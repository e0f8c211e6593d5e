# Two commands on a fresh clone: `make demo` runs the default search, `make test` the checks.
# `make test` = ruff + the default suite (tests not marked slow); `make test-slow` = the slow end-to-end tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-slow install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/autocompress search experiments/digits_cnn.yaml

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

# The long end-to-end tests (parallel workers, SIGKILL + resume, Ray, MLflow server, profile measurement).
test-slow: install-dev
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
