# Two commands from a fresh clone:
#   make serve   serve on SQLite (./signalbox.db), creating .venv and installing on first use
#   make test    ruff, mypy --strict and the whole test suite (SQLite and PostgreSQL)
# And the figures of docs/performance.md:
#   make bench   every benchmark beside its limits and peers (BENCH_ARGS=--quick for a short run)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/signalbox serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
