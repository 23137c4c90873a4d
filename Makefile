# One command each: `make demo` runs the three-stage recipe on the embedded default, `make test` the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test test-fast demo bench bench-recipe bench-curriculum bench-entropy bench-sharding lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m app.demo

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

bench-recipe: $(STAMP)
	$(BIN)/python -m bench.recipe

bench-curriculum: $(STAMP)
	$(BIN)/python -m bench.curriculum

bench-entropy: $(STAMP)
	$(BIN)/python -m bench.entropy

bench-sharding: $(STAMP)
	$(BIN)/python -m bench.sharding_memory

lint: $(STAMP)
	$(BIN)/python -m ruff check app modules datamodules callbacks tests bench

clean:
	rm -rf artifacts runs lightning_logs
