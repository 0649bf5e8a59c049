# Every user-facing target depends on `setup`, so a fresh clone needs only `make test` or `make demo`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
APT_PKGS := fuse3 libfuse3-dev pkg-config
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: setup test soak demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing apt packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing apt packages ($$missing); run as root or install them" >&2; fi; fi
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(PIP) -e '.[dev,bench,ray]'
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

# The corpus-reader fuzzers with thousands of damaged corpora per format (make test runs 40), and kill -9
# of a 2-rank training job at 12 moments of its checkpoint saves (make test: 2).
soak: setup
	LOADERS_FUZZ_EXAMPLES=$${LOADERS_FUZZ_EXAMPLES:-5000} $(BIN)/python -m pytest -q tests/test_loaders_fuzz.py
	LING_KILL9_MOMENTS=$${LING_KILL9_MOMENTS:-12} $(BIN)/python -m pytest -q tests/test_ling_ckpt.py -k kill9

demo: setup
	$(BIN)/python -m ling_train.demo

bench: setup
	$(BIN)/python -m bench.run_all

lint: setup
	$(BIN)/ruff check lingcore pcache fusefs babel_sync loaders ling_train tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache bench/results
