# `make demo` and `make test` create .venv on first use; nothing else needs installing by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu
# DeepSpeed's compiled ops live with this environment, not in a cache that other checkouts share (and lock).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: venv demo test test-fast lint format clean

$(BIN)/distil-scale: setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first and pinned: anything that depends on it must not pull a different build.
	$(BIN)/pip install -q torch==2.13.0
	# DeepSpeed ships as an sdist that imports torch while building: build it against the torch above.
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	# DeepSpeed compiles its CPU communication op on first use (about a minute): once here, not inside a test
	# whose timeout could kill the compiler and leave its lock file behind.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

venv: $(BIN)/distil-scale

demo: venv
	$(BIN)/distil-scale demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=15 tests

# The fast tier: everything but the tests marked slow (multi-process runs, trainings), in about two minutes.
test-fast: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow" tests

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs
