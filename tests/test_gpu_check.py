"""benchmarks/gpu_check.sh --dry-run: every stage of the one-call GPU validation runs on the CPU and leaves its
files, so the script cannot rot between GPU loans; and python -m kernels.verify catches a wrong kernel."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import verify

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["wheels", "preflight", "verify", "bench", "compile", "step", "train"]
FILES = {"summary.txt", "log.txt", "verify.json", "verify.csv", "kernels-cpu.csv", "kernels-compile.csv",
         "step-cpu.csv", "train-metrics.jsonl"}  # fmt: skip


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the script sets what its dry run needs
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FILES  # the device returns at most 8 files
    assert proc.stdout.rstrip().endswith(summary.rstrip())  # the table is printed last
    rows = [line.split() for line in summary.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [(stage, "ok") for stage in STAGES], summary

    result = json.loads((out / "verify.json").read_text())
    assert result["passed"] and not result["failed"] and result["checks"] > 200
    assert all(r["ok"] for r in result["results"])
    assert {r["impl"] for r in result["results"]} == {"triton", "torch"}  # the interpreter ran the Triton kernels
    assert {r["op"] for r in result["results"]} == {"kd_mlm_loss", "linear_kd_mlm_loss", "kd_mlm_rows", "cosine_loss"}
    assert any("N*V>2^31" in reason for reason in result["skipped"])

    metrics = [json.loads(line) for line in (out / "train-metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # two steps, then one more after the resume
    log = (out / "log.txt").read_text()
    assert "resuming from" in log and "exported the student" in log
    assert "kd rel err" in log and "tokens/s" in log  # the kernel bench's and the step bench's tables


def test_verify_catches_a_wrong_kd(monkeypatch: pytest.MonkeyPatch) -> None:
    real = verify.kd_mlm_loss

    def off_by_a_thousandth(*args, **kwargs):
        kd, mlm = real(*args, **kwargs)
        return kd * 1.001, mlm

    rec = verify.Recorder(verify.TOL["fp32"])
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    verify.case_kd_mlm_loss(rec, "torch", "fp32", 2.0, 3.0, verify.SMALL_SIZES, cpu, gen)
    assert all(c.ok for c in rec.checks)
    monkeypatch.setattr(verify, "kd_mlm_loss", off_by_a_thousandth)
    verify.case_kd_mlm_loss(rec, "torch", "fp32", 2.0, 3.0, verify.SMALL_SIZES, cpu, gen)
    failed = [c.quantity for c in rec.checks if not c.ok]
    assert failed == ["kd", "grad"]  # 1.001 kd backpropagates as 1.001 times its gradient too


def test_verify_fails_nan_and_nonzero_padding() -> None:
    assert verify.rel_err(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0])) != 0.0
    rec = verify.Recorder(verify.TOL["fp32"])
    rec.add("c", "op", "torch", "bf16", 2.0, {"grad": float("nan"), "padding grad": 1e-30, "kd": 5e-3})
    assert [(c.quantity, c.ok) for c in rec.checks] == [("grad", False), ("padding grad", False), ("kd", True)]


def test_verify_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "kernels.verify", "--impls", "cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--impls must be a comma list" in proc.stderr


BLOCKER = """
import importlib.abc, runpy, sys

class Missing(importlib.abc.MetaPathFinder):  # as on the GPU image: none of these is installed there
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"deepspeed", "webdataset", "datasets"}:
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Missing())
import distil_scale.train  # noqa: the training loop imports without them (DeepSpeed is imported at its setup)
sys.argv = ["distil_scale.bench", *sys.argv[1:]]
runpy.run_module("distil_scale.bench", run_name="__main__")
"""


def test_step_bench_starts_without_deepspeed_webdataset_or_datasets() -> None:
    args = ["step", "--teacher-config", "configs/models/tiny-bert.json", "--micro-batch-size", "1", "--seq-len", "8"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", BLOCKER, *args, "--warmup", "0", "--iters", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("eager ", "fused "))]
    assert [(r[0], r[4]) for r in rows] == [("eager", "ok"), ("fused", "ok")], proc.stdout
