# Two commands for a newcomer: `make demo` and `make test`. Each sets up what it needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test test-slow lint bench race clean openapi deploy-shares k8s-secrets screenshot

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; install Python 3.11 or run 'make PY=/path/to/python3.11'"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Headless Chromium for tests/test_web_e2e.py: Debian's packages, installed only when missing.
CHROMIUM_PKGS := chromium chromium-driver
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(CHROMIUM_PKGS) for the browser test"; \
	    $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends $(CHROMIUM_PKGS) \
	      || echo "warning: could not install $(CHROMIUM_PKGS); the browser test will not run"; \
	  else \
	    echo "note: /usr/bin/chromium or /usr/bin/chromedriver is missing and cannot be installed" \
	      "here (needs apt-get and root or sudo): install $(CHROMIUM_PKGS) yourself;" \
	      "tests/test_web_e2e.py skips without them (and fails in CI)"; \
	  fi; \
	fi

setup: $(STAMP) browser

demo: $(STAMP)
	$(BIN)/python -m service demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m benchmarks.engine

# The same CNN and weights through plaintext torch, the engine, the service and CrypTen 0.4.1
# (installed once into .cache/race/crypten-venv).
race: $(STAMP)
	$(BIN)/python -m benchmarks.race

# docs/web-page.png, made by the browser test itself from today's page (commit the result).
screenshot: $(STAMP) browser
	PRIVDIGIT_DOCS_SCREENSHOT=docs/web-page.png $(BIN)/python -m pytest -q tests/test_web_e2e.py -k draw

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

openapi: $(STAMP)
	$(BIN)/python -m service openapi --write

# Copy a model's manifest and each party's share into its own directory, and make each party's
# credentials and certificate in a folder of its own (docker-compose secrets).
MODEL ?= models/default
deploy-shares: $(STAMP)
	@test -f $(MODEL)/manifest.json || { echo "error: $(MODEL)/manifest.json not found"; exit 1; }
	mkdir -p deploy/share-0 deploy/share-1
	cp $(MODEL)/manifest.json $(MODEL)/share-0.safetensors deploy/share-0/
	cp $(MODEL)/manifest.json $(MODEL)/share-1.safetensors deploy/share-1/
	$(BIN)/python -m service certs deploy/credentials --force --host replica-0=replica-0 --host replica-1=replica-1 --host dealer=dealer

# Kubernetes (deploy/k8s, docs/deploy.md): the signer fills each overlay's secrets/ folder (its
# own share and keys only) from the signer's folder K8S_CA, issuing credentials there on first
# use; K8S_CA keeps the CA's private key and never goes into a cluster.
K8S_CA ?= deploy/k8s-ca
k8s-secrets: $(STAMP)
	$(BIN)/python -m service k8s-secrets --model $(MODEL) --ca $(K8S_CA)
