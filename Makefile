# `make run` and `make test` work on a fresh machine with Python 3.11: each
# creates .venv and installs what it needs (the CPU build of torch 2.13.0).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= .cache/models/tiny-llama

.PHONY: run test lint format clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 triton==3.6.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

$(MODEL)/config.json: | $(STAMP)
	$(BIN)/lightctl model tiny --arch llama --out $(MODEL)

run: $(STAMP) $(MODEL)/config.json
	$(BIN)/lightctl up --model $(MODEL)

# The dashboard's browser tests drive Debian's Chromium (through Playwright).
CHROMIUM_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

chromium:
	@command -v chromium >/dev/null || $(SUDO) sh -c '$(CHROMIUM_INSTALL)'

# Triton kernels run in the interpreter on CPU-only machines.
test: $(STAMP) chromium
	TRITON_INTERPRET=1 $(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache
