# Two commands for a newcomer: `make demo` and `make test`. Each sets up what it needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint bench clean openapi deploy-shares

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; install Python 3.11 or run 'make PY=/path/to/python3.11'"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m service demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m benchmarks.engine

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

openapi: $(STAMP)
	$(BIN)/python -m service openapi --write

# Copy a model's manifest and each party's share into its own directory (docker-compose volumes).
MODEL ?= models/default
deploy-shares: $(STAMP)
	@test -f $(MODEL)/manifest.json || { echo "error: $(MODEL)/manifest.json not found"; exit 1; }
	mkdir -p deploy/share-0 deploy/share-1
	cp $(MODEL)/manifest.json $(MODEL)/share-0.safetensors deploy/share-0/
	cp $(MODEL)/manifest.json $(MODEL)/share-1.safetensors deploy/share-1/
	$(BIN)/python -m service certs deploy/certs --host replica-0 --host replica-1 --host dealer
