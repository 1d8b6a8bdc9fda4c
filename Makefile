# fedrec: every target sets itself up (uv from PyPI if missing, then the locked environment).
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := python3 -m uv
endif
RUN := $(UV) run --frozen
export FEDREC_DATASETS ?= $(abspath ../shared/datasets)

.PHONY: help setup test test-fast lint format bench-quality clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

setup: .venv/.synced ## install uv if missing, then the locked environment

.venv/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $@

lint: setup ## ruff lint and format check
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: setup ## apply ruff fixes and formatting
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

test: lint ## lint, then every test (MovieLens tests skip with a reason when FEDREC_DATASETS lacks the files)
	$(RUN) pytest

test-fast: setup ## unit tests without the slow and real-data ones
	$(RUN) pytest -m "not slow and not realdata"

bench-quality: setup ## RMSE/MAE and timings on ML-100K and ML-1M (Surprise's 5-fold protocol)
	$(RUN) python -m benchmarks.quality

clean: ## remove the environment and caches
	rm -rf .venv .pytest_cache .ruff_cache
