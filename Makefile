# One target per job. Every target creates .venv itself (CPU torch from the local wheel) when missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-fast bench rank-table clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: pip takes the CPU wheel from local disk instead of a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## the test suite (CI runs exactly this)
test: $(STAMP)
	$(PY) -m pytest

## the suite without the LLaMA-2-7B-shape checks (seconds)
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

## side-by-side step time / memory / ΔW-build ratios: bare Linear vs LoRA vs MoRA (results/bench/)
bench: $(STAMP)
	$(PY) benchmarks/bench_adapters.py

## per-module r̂ of MoRA at LLaMA-2-7B shapes (the README table)
rank-table: $(STAMP)
	$(PY) -m mora.rank_table

clean:
	rm -rf $(VENV) .pytest_cache results/bench
