# dualkd — set-up and the two everyday commands.
#   make demo   install dualkd (runtime dependencies only) into .venv and run the main job on CPU
#   make test   install dualkd with its test tools (DeepSpeed, llama.cpp's server) and run the test suite
# TORCH_SPEC pins torch in the same pip call as everything else, so pip never swaps in a multi-GB CUDA
# build; on a GPU machine use e.g. `make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# llama-cpp-python (the served teacher, a dev extra) compiles llama.cpp. A native build (-march=native) uses
# every instruction the CPU reports; some VMs report AMX that then traps (SIGILL on the first request), so
# build for a portable x86-64 baseline with AVX2 and no AVX-512/AMX. Override for a tuned build.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
BIN := $(VENV)/bin
STAMP := $(VENV)/.dualkd-installed
DEV_STAMP := $(VENV)/.dualkd-dev-installed

.PHONY: install install-dev demo test test-all lint clean

install: $(STAMP)

install-dev: $(DEV_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet $(TORCH_SPEC) -e '.[dev]'
	touch $(DEV_STAMP)

demo: install
	$(BIN)/dualkd demo

# the suite in TEST_WORKERS processes (pytest-xdist), a test file at a time each (its module fixtures made once),
# in collection order: tests/conftest.py puts the long multi-process files first
TEST_WORKERS ?= 2

test: install-dev
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install-dev
	$(BIN)/ruff check src tests benchmarks experiments

clean:
	rm -rf runs .pytest_cache .ruff_cache
