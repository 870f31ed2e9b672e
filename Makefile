# vendetta: `make help` lists the targets.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

setup: ## Install engines, the venv and the project (idempotent)
	bash scripts/setup.sh

demo: setup ## Run the demo: coordinator, local agent, a Docker workspace, logs, teardown
	bash scripts/demo.sh

test: setup ## Run all tests against the real engines (unit, integration, e2e)
	bash scripts/test.sh

lint: ## ruff + mypy strict on hand-written code; import-linter keeps the layers; generated code must match protos/; protos/ must stay wire compatible
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	bash scripts/gen_protos.sh --check
	$(PY) scripts/check_proto_compat.py

fmt: ## Format the code with ruff
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

protos: ## Regenerate vendetta/v1 from protos/
	bash scripts/gen_protos.sh

bench: setup ## Benchmarks against baselines in the same run (BENCH_ARGS=--quick for a short run)
	$(PY) -m bench $(BENCH_ARGS)

.PHONY: help setup demo test lint fmt protos bench
