"""kernels.bench end to end at a tiny size: the CSV's rows and columns, sane timings, and ours agreeing with eager."""

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {"impl", "rows", "dtype", "status", "fwd_ms", "bwd_ms", "full_ms", "peak_mb", "kd_rel_err", "grad_rel_err"}


@pytest.mark.slow
def test_bench_end_to_end(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "kernels.bench", "--rows", "64", "--vocab", "503", "--hidden", "32"]
    cmd += ["--dtypes", "fp32", "--impls", "eager,ours", "--repeats", "1", "--out", str(tmp_path), "--tag", "test"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kd rel err" in proc.stdout and "the four GEMMs" in proc.stdout

    with open(tmp_path / "kernels-test.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert COLUMNS <= set(reader.fieldnames or ())
        rows = list(reader)
    assert [(r["impl"], r["rows"], r["dtype"], r["status"]) for r in rows] == [
        ("eager", "64", "fp32", "ok"),
        ("ours", "64", "fp32", "ok"),
    ], rows
    for r in rows:
        for key in ("fwd_ms", "bwd_ms", "full_ms", "floor_ms"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (key, r)
        assert math.isfinite(float(r["peak_mb"])) and float(r["peak_mb"]) >= 0, r
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "kernels-test.png").stat().st_size > 0
    ours = rows[1]
    assert float(ours["kd_rel_err"]) < 1e-4 and float(ours["mlm_rel_err"]) < 1e-4, ours
    assert float(ours["grad_rel_err"]) < 1e-4, ours
