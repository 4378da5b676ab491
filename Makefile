# `make demo` and `make test` create .venv on first use; nothing else needs installing by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu

.PHONY: venv demo test lint format clean

$(BIN)/distil-scale: setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first and pinned: anything that depends on it must not pull a different build.
	$(BIN)/pip install -q torch==2.13.0
	# DeepSpeed ships as an sdist that imports torch while building: build it against the torch above.
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

venv: $(BIN)/distil-scale

demo: venv
	$(BIN)/distil-scale demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs
