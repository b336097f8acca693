# Two commands from a fresh clone:
#   make serve   serve on SQLite (./signalbox.db), creating .venv and installing on first use
#   make test    ruff, mypy --strict, the web checks and the whole test suite (SQLite and
#                PostgreSQL, the dashboard in headless Chromium)
# And:
#   make web     rebuild the dashboard (web/) into pipeline/static, to be committed
#   make bench   every benchmark beside its limits and peers (BENCH_ARGS=--quick for a short run)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: serve test lint install bench clean web web-deps web-check chromium

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

# npm ci: exactly the locked packages (and a failure when package.json and the lock disagree).
web-deps:
	cd web && npm ci --no-audit --no-fund

web: web-deps
	cd web && npm run build

# The TypeScript type check, the unit tests, and the committed build against a fresh one.
web-check: web-deps
	cd web && npx tsc --noEmit
	cd web && npx vitest run
	cd web && node scripts/check-build.mjs

# The end-to-end test drives Debian's Chromium; never a browser download.
chromium:
	@test -x $(CHROMIUM) || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# Two test processes, each taking whole files (their module-scoped servers start once).
test: lint web-check chromium
	$(BIN)/pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache web/node_modules
