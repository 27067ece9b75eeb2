# The two Quick-start commands: `make demo` and `make test` (CI runs `make test-all`). Each creates
# .venv and installs what it needs the first time. TORCH pins the CPU build that installs from local
# disk on our machines; override it elsewhere, e.g. `make test TORCH="torch>=2.5"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= hybridkit/recipes/tiny_hybrid.yaml

STUDY ?= hybridkit/recipes/studies/lengthgen_quickstart.yaml

.PHONY: demo show test test-all lint gpu-test clean

$(BIN)/hybridkit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

# The main job: train four architectures on a retrieval task and compare them at 1x-8x the
# training length (report + plot in runs/quickstart; under a minute on 2 CPU cores).
demo: $(BIN)/hybridkit
	$(BIN)/hybridkit study $(STUDY) -o runs/quickstart

# Inspect a recipe: layer table, memory, a short generation, decode == forward check.
show: $(BIN)/hybridkit
	$(BIN)/hybridkit show $(RECIPE) --seq-len 4096
	$(BIN)/hybridkit generate $(RECIPE) --prompt-ids 1,2,3,4 --max-new-tokens 16 --seed 0
	$(BIN)/hybridkit check $(RECIPE)

# The fast CPU suite: all but the GPU-only and the slow tests (Triton kernels in the interpreter).
test: $(BIN)/hybridkit
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu and not slow" tests

# The whole CPU suite, slow tests too (torchrun, subprocesses, torch.compile, learning runs): CI.
test-all: $(BIN)/hybridkit
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" tests

lint: $(BIN)/hybridkit
	$(BIN)/ruff check hybridkit tests examples benchmarks
	$(BIN)/ruff format --check hybridkit tests examples benchmarks

# On the GPU machine: every GPU test, compilations spread over 14 processes (pytest-xdist);
# the 64-bit offset tests (~45 GB each) run one after the other (--dist loadgroup).
gpu-test:
	python -m pytest -q -m gpu -n 14 --dist loadgroup tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
