# `make demo` and `make test` create .venv on first use; nothing else needs installing by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu
# DeepSpeed's compiled ops live with this environment, not in a cache that other checkouts share (and lock).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: venv demo test test-fast lint format clean gpu-wheels

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

# Every wheel the GPU machine's image lacks (Python 3.12; it has torch, triton, transformers, numpy, pyyaml, msgpack,
# ninja, py-cpuinfo, einops, psutil, tqdm, pyarrow), for benchmarks/gpu_check.sh to install there, into the ignored
# .whl/, within the 64 MiB a device call carries: DeepSpeed as a pure-Python wheel built here from its sdist with
# its ops off, its pydantic and hjson, webdataset, liger-kernel; and the debug run's prepared shards, so that the
# run there needs no `datasets`. Versions are this environment's, so the GPU runs what the tests here ran.
GPU_WHEEL_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_WHEEL_PINS := hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand

gpu-wheels: venv
	rm -rf .whl && mkdir -p .whl/sdist
	$(BIN)/pip download -q --no-deps $(GPU_WHEEL_PLATFORM) -d .whl liger-kernel \
		$$($(BIN)/python -c "import importlib.metadata as m, sys; print(*(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $(GPU_WHEEL_PINS))
	$(BIN)/pip download -q --no-deps --no-binary :all: -d .whl/sdist \
		deepspeed==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('deepspeed'))")
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-deps --no-build-isolation -w .whl .whl/sdist/deepspeed-*
	rm -rf .whl/sdist
	DS_ACCELERATOR=cpu $(BIN)/python -c "from distil_scale.config import load_config; \
		from distil_scale.inputs import ensure_inputs; \
		ensure_inputs(load_config('configs/debug.yaml', ['--data.shards=.whl/debug-inputs/shards', \
		'--data.tokenizer=.whl/debug-inputs/tokenizer', '--teacher.path=.whl/debug-inputs/teacher']))"
	rm -rf .whl/debug-inputs/teacher .whl/debug-inputs/corpus.txt .whl/debug-inputs/shards/.prepare-cache
	ls .whl/*.whl
	du -sh .whl

clean:
	rm -rf $(VENV) runs
