# dualkd — set-up and the two everyday commands.
#   make demo   install into .venv and run the main job (a tiny teacher -> student distillation on CPU)
#   make test   install into .venv and run the test suite
# TORCH_SPEC pins torch in the same pip call as everything else, so pip never swaps in a multi-GB CUDA
# build; on a GPU machine use e.g. `make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.dualkd-installed

.PHONY: install demo test test-all lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/dualkd demo

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
