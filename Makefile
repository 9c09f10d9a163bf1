# `make run` and `make test` work on a fresh machine with Python 3.11: each
# creates .venv and installs what it needs (the CPU build of torch 2.13.0).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Empty: lightctl's default, a tiny model with random weights (it answers gibberish).
MODEL :=

.PHONY: run test lint format clean chromium

# The first install takes a few minutes: each step says
# what it does, and pip shows what it fetches (no -q).
$(STAMP): pyproject.toml
	@echo "==> [1/4] creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/4] upgrading pip"
	$(BIN)/pip install --upgrade pip
	@echo "==> [3/4] installing torch 2.13.0 and triton 3.6.0 (the largest download)"
	$(BIN)/pip install torch==2.13.0 triton==3.6.0
	@echo "==> [4/4] installing lightpd and its test tools (.[test], editable)"
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)
	@echo "==> installed into $(VENV)"

# `make run MODEL=/path/to/model` serves a real checkpoint (a Hugging Face folder).
run: $(STAMP)
	$(BIN)/lightctl up $(MODEL)

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
