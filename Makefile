# autodiff-opt: two commands on a fresh machine do everything: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
STORAGE ?= sqlite:///autodiff_opt.db
WORKERS ?= 2
PORT   ?= 8080
ARTIFACTS ?= artifacts

.PHONY: setup run test dashboard workers bench bench-search bench-stage2 bench-gpu bench-skip bench-storage clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Run the default experiment (the embedded digits model), or pass overrides: make run ARGS='search.num_steps=6'
run: $(STAMP)
	$(PY) -m autodiff_opt $(ARGS)

## The import contracts (pyproject.toml [tool.importlinter]), then the whole test suite, offline.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n 2 $(ARGS)

## optuna-dashboard on the study storage, bound to 127.0.0.1, with the sample grids (report.artifact_dir).
dashboard: $(STAMP)
	mkdir -p '$(ARTIFACTS)'
	$(VENV)/bin/optuna-dashboard --host 127.0.0.1 --port $(PORT) --artifact-dir '$(ARTIFACTS)' '$(STORAGE)'

## N local worker processes on one study: make workers WORKERS=4 STORAGE=postgresql://... ARGS='...'
workers: $(STAMP)
	$(PY) -m autodiff_opt.workers --workers $(WORKERS) --storage '$(STORAGE)' -- $(ARGS)

## Benchmarks print their figures (see README "Measured").
bench: $(STAMP)
	$(PY) experiments/bench_eval.py

## Every search.sampler and the trajectory-DP peer at equal image-step budgets (docs/search.md); ARGS: Hydra overrides
bench-search: $(STAMP)
	$(PY) experiments/bench_search.py -- $(ARGS)

## Stage 1, the two-stage search, diffusers' caches and uniform DDIM at equal FLOPs on the deep models (docs/stage2.md)
bench-stage2: $(STAMP)
	$(PY) experiments/bench_stage2.py $(ARGS)

## The fast path on this machine's device (docs/gpu.md): eager / compiled / CUDA graphs against the roofline
bench-gpu: $(STAMP)
	$(PY) experiments/bench_gpu.py $(ARGS)

bench-skip: $(STAMP)
	$(PY) experiments/bench_skip.py --threads 1

bench-storage: $(STAMP)
	$(PY) experiments/bench_storage.py

clean:
	rm -rf outputs multirun .pytest_cache
