# `make run` and `make test` work on a fresh machine with Python 3.11: each
# creates .venv and installs what it needs (the CPU build of torch 2.13.0), at the
# exact versions of requirements.lock, so a release elsewhere cannot break them.
# `make test-latest` runs the suite against the newest versions pyproject.toml
# allows (in .venv-latest), to see such a break before a user does; `make lock`
# writes those versions into requirements.lock once they pass.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LATEST := .venv-latest
LATEST_STAMP := $(LATEST)/.installed
TORCH := torch==2.13.0 triton==3.6.0
PIP := pip==26.3
# Empty: lightctl's default, a tiny model with random weights (it answers gibberish).
MODEL :=

.PHONY: run test test-latest lock lint format clean chromium

# The first install takes a few minutes: each step says
# what it does, and pip shows what it fetches (no -q).
$(STAMP): pyproject.toml requirements.lock
	@echo "==> [1/4] creating $(VENV) with $(PYTHON), pip $(PIP)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP)
	@echo "==> [2/4] installing torch and triton (the largest download): $(TORCH)"
	$(BIN)/pip install $(TORCH)
	@echo "==> [3/4] installing the locked versions of requirements.lock"
	$(BIN)/pip install --no-deps -r requirements.lock
	@echo "==> [4/4] installing lightpd itself (editable, nothing else resolved)"
	$(BIN)/pip install --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)
	@echo "==> installed into $(VENV)"

# The newest versions pyproject.toml allows, resolved afresh each time.
$(LATEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --upgrade pip
	$(LATEST)/bin/pip install $(TORCH)
	$(LATEST)/bin/pip install --upgrade --upgrade-strategy eager -e '.[test]'
	touch $(LATEST_STAMP)

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

test-latest: chromium
	rm -f $(LATEST_STAMP)
	$(MAKE) $(LATEST_STAMP)
	$(LATEST)/bin/pip list --format=freeze | grep -iE '^(transformers|tokenizers|kernels|fastapi|xgrammar|numpy)=' || true
	TRITON_INTERPRET=1 $(LATEST)/bin/pytest -q

# Pin what test-latest installed (after it passed).
lock: $(LATEST_STAMP)
	{ echo "# Exact versions for make run / make test / the Docker image (refresh: make lock)."; \
	  echo "# torch and triton are installed before this file (the CPU build here, CUDA in the image)."; \
	  $(LATEST)/bin/pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|lightpd)'; \
	} > requirements.lock

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(LATEST) .cache
