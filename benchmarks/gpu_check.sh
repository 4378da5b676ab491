#!/usr/bin/env bash
# One prepared GPU validation in one call: every GPU path of distil-scale starts, is correct, and is timed.
#
#   bash benchmarks/gpu_check.sh OUT_DIR              on one H100/H200, under 8 minutes
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR    the same stages and files at tiny sizes on the CPU
#
# Stages, each under its own `timeout` (the limits sum to 470 s on a GPU):
#   wheels      installs .whl/*.whl (made by `make gpu-wheels`) into /tmp/site when the folder is there
#   preflight   versions, the GPU, which optional packages import (with the wheels installed)
#   verify      python -m kernels.verify: every kernel forward and backward against float64
#   bench       python -m kernels.bench: eager vs ours (Triton and torch) vs Liger's fused loss, N = 8K and 32K
#   compile     python -m kernels.bench: torch.compile of the eager loss at N = 8K (cold builds, so apart)
#   step        python -m distil_scale.bench step: BERT-base -> 6 layers, seq 512, eager vs fused, largest batch
#   train       configs/debug.yaml through cluster/launch.py, one process, loss.impl=fused, bf16: trains and
#               checkpoints, then a second run resumes it, trains further and exports
# A failing stage is recorded and the next one runs. OUT_DIR gets at most 8 files: summary.txt (the table printed
# last), log.txt (every stage's output), verify.json, verify.csv, kernels-<tag>.csv, kernels-compile.csv,
# step-<tag>.csv and train-metrics.jsonl. Exit status: 0 when every stage passed, 1 otherwise, 2 for bad usage.
set -uo pipefail
export PYTHONUNBUFFERED=1
{ # the whole script is read before it runs: an edit of this file during a run cannot shift what runs next

usage() {
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR" >&2
  exit 2
}
DRY=0
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
[[ $# -eq 1 && $1 != -* ]] || usage
mkdir -p "$1" || usage
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.txt
: >"$LOG"
rm -f "$SUMMARY"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} GPU_CHECK_WORK=$WORK
ROWS=()
FAILED=0

if ((DRY)); then
  # The CPU stands in for the GPU: DeepSpeed's CPU accelerator, the Triton kernels through the interpreter.
  export DS_ACCELERATOR=cpu TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  T_PRE=60 T_WHL=30 T_VER=120 T_BENCH=120 T_COMP=60 T_STEP=120 T_TRAIN=240
  VERIFY_ARGS=(--dry-run)
  # On the CPU `ours` is the torch twin, so ours_torch would measure it twice; each case is a fresh process here.
  BENCH_ARGS=(--rows 256 --vocab 1000 --hidden 64 --dtypes fp32 --impls eager,ours,liger_fused --repeats 1 --warmup 0)
  # A cold torch.compile build takes minutes on two cores: the dry run checks the stage's plumbing on eager.
  COMPILE_ARGS=(--rows 64 --vocab 1000 --hidden 64 --dtypes fp32 --impls eager --repeats 1 --warmup 0)
  STEP_ARGS=(--teacher-config configs/models/tiny-bert.json --seq-len 32 --micro-batch-size 2 --warmup 0 --iters 1)
  TRAIN_ARGS=(--train.precision=fp32 --train.max_steps=2 --checkpoint.every_steps=1 --data.embedded_docs=300
    --data.num_workers=0 --log.every_steps=1 --train.sequences_per_step=16)
  MORE_STEPS=3
  TAG=cpu
else
  # Triton builds every kernel variant on first use (about 20 of them in verify), torch.compile one graph.
  T_PRE=20 T_WHL=20 T_VER=100 T_BENCH=100 T_COMP=60 T_STEP=80 T_TRAIN=90
  VERIFY_ARGS=()
  BENCH_ARGS=(--rows 8192,32768 --dtypes bf16,fp32 --impls eager,ours,ours_torch,liger_fused --repeats 5 --warmup 1)
  # One cold build (bf16, the training dtype) fits its minute; fp32 would need a second.
  COMPILE_ARGS=(--rows 8192 --compile-rows 8192 --dtypes bf16 --impls eager,compile --repeats 5 --warmup 1)
  STEP_ARGS=(--teacher-config configs/models/bert-base.json --seq-len 512 --start-micro-batch-size 16
    --max-micro-batch-size 512 --warmup 1 --iters 3)
  # DeepSpeed's fused Adam would be compiled on first use (a minute of nvcc): torch's AdamW does the same update.
  TRAIN_ARGS=(--train.precision=bf16 --train.max_steps=40 --checkpoint.every_steps=20
    --deepspeed.optimizer.params.torch_adam=true)
  MORE_STEPS=60
  TAG=cuda
fi

# stage NAME LIMIT_S COMMAND...: runs it under `timeout`, its output to the terminal and to log.txt; the status
# and seconds go into the summary with the key figure that `figure NAME` prints afterwards.
stage() {
  local name=$1 limit=$2 start=$SECONDS rc status
  shift 2
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  if declare -F "$1" >/dev/null; then  # a function of this script: `timeout` runs it in a bash of its own
    set -- bash -c "$(declare -p ROOT WORK OUT PY TRAIN_ARGS MORE_STEPS); $(declare -f "$1"); $1"
  fi
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status=TIMEOUT ;;
    *) status="FAIL($rc)" ;;
  esac
  [[ $status == ok ]] || FAILED=1
  local key
  key=$("$PY" benchmarks/gpu_check_report.py figure "$name" "$OUT" "$WORK" "$TAG" 2>>"$LOG" | tail -n 1)
  ROWS+=("$(printf '%-10s %-10s %6d  %s' "$name" "$status" $((SECONDS - start)) "${key:--}")")
  echo "=== $name: $status in $((SECONDS - start)) s" | tee -a "$LOG"
}

install_wheels() {
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "no .whl/*.whl here: nothing to install (make gpu-wheels makes them; carry .whl)"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

train_twice() {
  local common=(--config configs/debug.yaml --run.output_dir="$WORK/debug" --loss.impl=fused "${TRAIN_ARGS[@]}")
  if [[ -f .whl/debug-inputs/shards/dataset.json ]]; then  # prepared by `make gpu-wheels`: no `datasets` needed
    common+=(--data.shards="$ROOT/.whl/debug-inputs/shards" --data.tokenizer="$ROOT/.whl/debug-inputs/tokenizer"
      "--data.prepare_from=[]")
  else  # prepared here, into the work folder (this needs `datasets`)
    common+=(--data.shards="$WORK/inputs/shards" --data.tokenizer="$WORK/inputs/tokenizer")
  fi
  common+=(--teacher.path="$WORK/inputs/teacher" --checkpoint.export=false)
  # A port of our own: another process on this machine may hold DeepSpeed's default one.
  MASTER_PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  export MASTER_PORT
  echo "--- first run: train and checkpoint"
  "$PY" cluster/launch.py "${common[@]}" || return
  echo "--- second run: resume, train to step $MORE_STEPS, export"
  "$PY" cluster/launch.py "${common[@]}" --train.max_steps="$MORE_STEPS" --checkpoint.export=true || return
  cp "$WORK/debug/metrics.jsonl" "$OUT/train-metrics.jsonl"
}

if ((DRY)); then
  stage wheels "$T_WHL" echo "dry run: wheels are not installed"
else
  stage wheels "$T_WHL" install_wheels
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
stage preflight "$T_PRE" "$PY" benchmarks/gpu_check_report.py preflight
stage verify "$T_VER" "$PY" -m kernels.verify --out "$OUT" "${VERIFY_ARGS[@]}"
stage bench "$T_BENCH" "$PY" -m kernels.bench --out "$WORK" --tag "$TAG" "${BENCH_ARGS[@]}"
cp "$WORK/kernels-$TAG.csv" "$OUT/" 2>/dev/null
stage compile "$T_COMP" "$PY" -m kernels.bench --out "$WORK" --tag compile "${COMPILE_ARGS[@]}"
cp "$WORK/kernels-compile.csv" "$OUT/" 2>/dev/null
stage step "$T_STEP" "$PY" -m distil_scale.bench step --out "$OUT" --tag "$TAG" "${STEP_ARGS[@]}"
stage train "$T_TRAIN" train_twice

{
  echo "gpu_check$( ((DRY)) && echo ' --dry-run') on $(date -u +%Y-%m-%dT%H:%MZ), $SECONDS s in all"
  printf '%-10s %-10s %6s  %s\n' stage status s "key figure"
  printf '%s\n' "${ROWS[@]}"
} >"$SUMMARY"
echo | tee -a "$LOG"
tee -a "$LOG" <"$SUMMARY"
exit $FAILED
}
