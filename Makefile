# fedrec: every target sets itself up (uv from PyPI if missing, then the locked environment).
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV := $(shell command -v uv 2>/dev/null)
UV_SHOWN := uv
ifeq ($(UV),)
# uv from PyPI into the clone's .tools/uv: pip allows a --target install where PEP 668 refuses
# one into the system's Python (Debian 12, Ubuntu 24.04)
UV := $(CURDIR)/.tools/uv/bin/uv
UV_SHOWN := .tools/uv/bin/uv
endif
RUN := $(UV) run --frozen
export FEDREC_DATASETS ?= $(abspath ../shared/datasets)
# Local state (MLflow SQLite store and artifacts, client partitions, Prefect's database) lives here.
export FEDREC_HOME ?= $(CURDIR)/.fedrec
export PREFECT_HOME ?= $(FEDREC_HOME)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# No usage telemetry from MLflow or Prefect, in processes that do not import fedrec first too
export DO_NOT_TRACK ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
MLFLOW_PORT ?= 5000
# `fedrec server start` (make demo, make server) listens on PREFECT_PORT when one is given, else
# on 4200 when free, else on any free port
ifneq ($(origin PREFECT_PORT),undefined)
export FEDREC_PREFECT_PORT ?= $(PREFECT_PORT)
endif
PREFECT_PORT ?= 4200

PREFECT_POOL ?= fedrec-local
# deploy, worker and serve report to the local server that runs (its port from its state file),
# else to PREFECT_PORT
RUNNING_API = $(shell FEDREC_HOME="$(FEDREC_HOME)" $(RUN) python -c 'from fedrec.local_server \
	import read_state; s = read_state(); print(s.api_url if s else "")' 2>/dev/null)
deploy worker serve: export PREFECT_API_URL ?= $(or $(RUNNING_API),http://127.0.0.1:$(PREFECT_PORT)/api)

.PHONY: help setup demo test test-fast test-unit lint format mlflow-ui prefect-ui server server-status server-stop \
	deploy worker serve \
	bench-quality bench-overhead bench-speed bench-ranking bench-scale bench-cli clean \
	sites-demo stores-start stores-stop stores-status

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

setup: .venv/.synced ## install uv if missing, then the locked environment
	@mkdir -p "$(PREFECT_HOME)"  # Prefect makes only the last folder of its home, at import

.venv/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet --target $(CURDIR)/.tools/uv uv
	$(UV) sync --frozen
	@touch $@

demo: setup ## train on built-in synthetic data (local Prefect server + SQLite MLflow), register, promote
	$(RUN) fedrec server start
	$(RUN) fedrec train --data synthetic --rounds 10
	@echo
	@echo "Inspect it:  the Prefect UI above keeps running (make server-status; make server-stop ends it)"
	@echo "             make mlflow-ui   -> http://127.0.0.1:$(MLFLOW_PORT)  (runs, metrics per round, model registry)"
	@echo "Use it:      $(UV_SHOWN) run fedrec recommend --model models:/fedrec-mf@champion --history examples/history.csv --k 5"

# without MLflow's job runner and its consumers (about 1.9 GB more; fedrec submits no jobs)
mlflow-ui: setup ## MLflow UI on 127.0.0.1 for the local store
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(RUN) mlflow ui --backend-store-uri sqlite:///$(FEDREC_HOME)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

prefect-ui: server ## alias of `make server`: its UI shows the demo's flow runs too

server: setup ## start the local Prefect server + UI in the background (127.0.0.1:PREFECT_PORT, SQLite under FEDREC_HOME)
	$(RUN) fedrec server start

server-status: setup ## URL, PID and health of the local Prefect server
	$(RUN) fedrec server status

server-stop: setup ## stop the local Prefect server (SIGTERM, then SIGKILL)
	$(RUN) fedrec server stop

# A real federation's coordinator stores (PostgreSQL, Prefect server, MLflow server); see README
STORES_DIR ?= $(FEDREC_HOME)/stores

stores-start: setup ## PostgreSQL + Prefect server + MLflow server (artifact proxy) in STORES_DIR, on loopback
	$(RUN) fedrec stores start --dir $(STORES_DIR)

stores-status: setup ## addresses, PIDs and health of the stores in STORES_DIR
	$(RUN) fedrec stores status --dir $(STORES_DIR)

stores-stop: setup ## stop the stores in STORES_DIR by PID (their data stays)
	$(RUN) fedrec stores stop --dir $(STORES_DIR)

sites-demo: setup ## ML-100K by occupation on 3 site processes in their own mount namespaces, coordinator on the stores; one JSON line
	$(RUN) python -m fedrec.sites_demo

deploy: setup ## check deployments/prefect.yaml, create the process work pool if missing, deploy, crash silent runs
	$(RUN) python -m fedrec.deployment_check deployments/prefect.yaml --api
	$(RUN) prefect work-pool inspect $(PREFECT_POOL) >/dev/null 2>&1 || $(RUN) prefect work-pool create $(PREFECT_POOL) --type process
	$(RUN) prefect --no-prompt deploy --prefect-file deployments/prefect.yaml --all
	$(RUN) python -m fedrec.lock_parameters
	$(RUN) python -m fedrec.silent_runs

worker: setup ## a process worker on the pool: runs scheduled and triggered flow runs
	$(RUN) python -m fedrec.deployment_check --api
	$(RUN) prefect worker start --pool $(PREFECT_POOL)

serve: setup ## single-process alternative to deploy + worker: the same schedule on a Prefect Runner in this process
	$(RUN) fedrec serve

lint: setup ## ruff lint and format check
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: setup ## apply ruff fixes and formatting
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

# One pytest worker per core (at most 4), a test file to each: most of the suite's
# time is spent waiting on servers and subprocesses, and a file's module-scoped servers start once.
test: lint ## lint, then every test (MovieLens tests skip with a reason when FEDREC_DATASETS lacks the files)
	$(RUN) pytest --numprocesses auto --maxprocesses 4 --dist loadfile

test-unit: setup ## the unit tests of the core (tests/unit: no Prefect, no MLflow, no servers)
	$(RUN) pytest tests/unit -m "not slow and not realdata"

test-fast: setup ## every test not marked slow or realdata: unit, flow (one Prefect test server) and quick e2e
	$(RUN) pytest -m "not slow and not realdata"

.PHONY: mutation
mutation: setup ## mutation check of the modules in benchmarks/mutation.py TARGETS on their unit tests (niced, 2 jobs, stops after 1 h) -> benchmarks/results/mutation.json
	$(RUN) nice -n 10 python -m benchmarks.mutation --jobs 2 --budget 3600

bench-quality: setup ## RMSE/MAE and timings on ML-100K and ML-1M (Surprise's 5-fold protocol)
	$(RUN) python -m benchmarks.quality

bench-speed: setup ## seconds per ML-1M ALS round (k=64, 10 clients), default vs tuned allocator
	$(RUN) python -m benchmarks.round_speed --repeats 3

bench-ranking: setup ## Recall/NDCG/Hit@10 on ML-1M (RecBole's protocol): retrieval models, federated re-ranker
	$(RUN) python -m benchmarks.ranking

bench-scale: setup ## seconds/round and peak memory of the flow vs interactions (1M-10M) and clients per round
	$(RUN) python -m benchmarks.scale

bench-overhead: setup ## orchestration overhead: the Prefect flow with MLflow vs the same core calls in a loop
	$(RUN) python -m benchmarks.overhead

bench-cli: setup ## first-run reliability under CPU load (10 trainings) and cold CLI latencies (medians of 5)
	$(RUN) python -m benchmarks.cli

clean: ## stop the local Prefect server, then remove the environment, caches and local runs (.fedrec)
	@if [ -x .venv/bin/fedrec ] && [ -d .fedrec ]; then FEDREC_HOME=.fedrec .venv/bin/fedrec server stop || true; fi
	rm -rf .venv .pytest_cache .ruff_cache .fedrec .tools
