# The README's commands. Everything runs inside .venv, created on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SCALE ?= cpu
WORKERS ?= 2

.PHONY: setup figures smoke calibrate test bench gpu-check export clean-cache

# (Re)install when the package metadata changes. torch/torchvision are pinned in settings.ini.
$(VENV)/.installed: settings.ini setup.py pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev,cluster]"
	@touch $@

setup: $(VENV)/.installed

## Regenerate every figure notebook (nbs/paper, nbs/course) at $(SCALE) scale.
figures: setup
	$(BIN)/sm-regenerate --scale $(SCALE) --workers $(WORKERS)

## The same at smoke scale (seconds; outputs go to figures/smoke/, not committed).
smoke:
	$(MAKE) figures SCALE=smoke

## Rerun the cpu scale's calibration search (every setting of nbs/paper/calibration.ipynb, 3 seeds, about half an hour on
## 2 cores): rewrites the record data/calibration_grid.csv that `make figures` reads for the settings it does not train.
calibrate: setup
	$(BIN)/sm-regenerate --scale cpu --only calibration -p search=True --workers $(WORKERS)

## Library notebooks' inline tests, then pytest (which runs every figure notebook at smoke scale) in two workers, one test
## file each at a time (files share module fixtures, such as the smoke regeneration).
## The notebooks' scratch folders (tempfile.mkdtemp) go into one folder that is removed afterwards.
test: setup
	@scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	  echo "SM_PROGRESS=0 $(BIN)/nbdev_test --path nbs --n_workers 2"; \
	  TMPDIR="$$scratch" SM_PROGRESS=0 $(BIN)/nbdev_test --path nbs --n_workers 2
	SM_PROGRESS=0 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=8 -o tmp_path_retention_policy=failed tests

## Speed benchmarks (ratios measured in one process; not a test): writes figures/bench_*.json.
bench: setup
	$(BIN)/sm-bench --scale $(SCALE)

## On a machine with CUDA: the paper-scale paths on the GPU in a few minutes (writes figures/bench_gpu.json).
## Without CUDA it says so and exits 0.
gpu-check: setup
	$(BIN)/sm-gpu-check

## Export the package from the notebooks and strip notebook outputs (run before committing).
export: setup
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

clean-cache:
	rm -rf .cache
