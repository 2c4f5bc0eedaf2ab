# volclf — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RESULTS ?= results
# torch first, pinned: here it installs a CPU build from local disk in seconds, where a bare
# `pip install torch` could pull a multi-GB CUDA build. On a GPU machine set TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast report status slurm-up slurm-up-noacct slurm-down bench clean-results

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $@

## The demo campaign on this machine: 5 transformer + 5 ResNet runs on synthetic data, then the report.
demo: setup
	$(BIN)/python launch.py --arch vit --n 5 --preset small --data synthetic --cluster local --results $(RESULTS)
	$(BIN)/python launch.py --arch cnn --n 5 --preset small --data synthetic --cluster local --results $(RESULTS)
	$(BIN)/python -m volclf.report $(RESULTS)

## The test suite (SLURM tests need `make slurm-up` first; they skip without it unless CI=true).
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

report: setup
	$(BIN)/python -m volclf.report $(RESULTS)

status: setup
	$(BIN)/python launch.py status --results $(RESULTS)

## A one-node SLURM on this machine shaped like a CEDIA node (Debian, root): for the tests.
slurm-up:
	bash scripts/slurm-test-cluster.sh up

slurm-up-noacct:
	bash scripts/slurm-test-cluster.sh up --no-accounting

slurm-down:
	bash scripts/slurm-test-cluster.sh down

bench: setup
	$(BIN)/python bench/train.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/report.py
