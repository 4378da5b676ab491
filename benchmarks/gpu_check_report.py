"""The Python side of benchmarks/gpu_check.sh: the preflight report and each stage's key figure for the summary.

    python benchmarks/gpu_check_report.py preflight
    python benchmarks/gpu_check_report.py figure STAGE OUT_DIR WORK_DIR TAG

`preflight` prints the versions, the GPU and which optional packages import (and saves them for `figure`);
`figure` prints one short line from what a stage left in OUT_DIR / WORK_DIR, or "-" when there is nothing.
Standard library only, except that `preflight` imports what it reports on.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys

OPTIONAL = ("deepspeed", "webdataset", "datasets", "liger_kernel", "pydantic", "hjson")


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "imported")
    except Exception as e:  # a package that fails to import is reported, whatever the reason
        return f"missing ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def preflight() -> int:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers", *OPTIONAL):
        info[name] = _version(name)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        info["capability"] = f"{props.major}.{props.minor}"
    else:
        info["gpu"] = "none"
    info["cpus"] = len(os.sched_getaffinity(0))
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia-smi"] = (smi.stdout or smi.stderr).strip()
    for key, value in info.items():
        print(f"{key:<13} {value}")
    with open(os.path.join(os.environ.get("GPU_CHECK_WORK", "."), "preflight.json"), "w") as f:
        json.dump(info, f)
    print(f"optional packages missing: {_missing(info)}")
    return 0


def _missing(info: dict) -> str:
    """The optional packages the preflight could not import, or "none"."""
    return ", ".join(name for name in OPTIONAL if str(info[name]).startswith("missing")) or "none"


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict, key: str) -> float:
    try:
        return float(row.get(key, "nan"))
    except ValueError:
        return math.nan


def _bench(path: str) -> str:
    """ours (and Liger's fused loss) at the largest N, per dtype: time, x eager, peak memory."""
    rows = [r for r in _rows(path) if r["status"] == "ok"]
    if not rows:
        return "-"
    parts = []
    largest = max(int(r["rows"]) for r in rows)
    only_eager = all(r["impl"] == "eager" for r in rows)
    for r in rows:
        if int(r["rows"]) == largest and (r["impl"] != "eager" or only_eager):
            parts.append(
                f"{r['impl']} {r['dtype']} N={largest}: {_num(r, 'full_ms'):.1f} ms "
                f"{_num(r, 'speedup_vs_eager'):.1f}x eager {_num(r, 'peak_mb'):.0f} MB"
            )
    return "; ".join(parts) or "-"


def _step(path: str) -> str:
    """Per impl, the largest micro-batch that ran: tokens/s, MFU, peak memory."""
    best: dict[str, dict] = {}
    for r in _rows(path):
        if r["status"] == "ok" and int(r["micro_batch_size"]) >= int(best.get(r["impl"], {}).get("micro_batch_size", 0)):
            best[r["impl"]] = r
    parts = []
    for impl, r in best.items():
        mfu = _num(r, "mfu")
        parts.append(
            f"{impl} mb {r['micro_batch_size']}: {_num(r, 'tokens_per_s'):,.0f} tok/s, "
            f"MFU {'-' if math.isnan(mfu) else f'{mfu:.0%}'}, {_num(r, 'peak_mb'):,.0f} MB"
        )
    return "; ".join(parts) or "-"


def _train(out: str, work: str) -> str:
    path = os.path.join(out, "train-metrics.jsonl")
    if not os.path.exists(path):
        return "-"
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return "no metrics"
    last = rows[-1]
    exported = os.path.exists(os.path.join(work, "debug", "export", "config.json"))
    return (
        f"steps {rows[0]['step']}..{last['step']} logged, last loss {last['loss']:.3f}, "
        f"{last.get('tokens_per_s', math.nan):,.0f} tok/s, export {'written' if exported else 'MISSING'}"
    )


def _load_json(path: str):
    """The JSON a stage wrote, or None when the stage did not get that far."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def figure(stage: str, out: str, work: str, tag: str) -> str:
    if stage == "preflight":
        info = _load_json(os.path.join(work, "preflight.json"))
        if info is None:
            return "-"
        return f"torch {info['torch']}, GPU {info['gpu']}; missing: {_missing(info)}"
    if stage == "wheels":
        site = "/tmp/site"
        wheels = [n for n in os.listdir(".whl") if n.endswith(".whl")] if os.path.isdir(".whl") else []
        if not wheels:
            return "no .whl/ carried"
        if not os.path.isdir(site):
            return f"{len(wheels)} wheels in .whl/, not installed"
        return f"{len(wheels)} wheels installed into {site}"
    if stage == "verify":
        result = _load_json(os.path.join(out, "verify.json"))
        if result is None:
            return "-"
        passed = result["checks"] - len(result["failed"])
        return f"{passed}/{result['checks']} checks passed, {len(result['skipped'])} skipped"
    if stage == "bench":
        return _bench(os.path.join(work, f"kernels-{tag}.csv"))
    if stage == "compile":
        return _bench(os.path.join(work, "kernels-compile.csv"))
    if stage == "step":
        return _step(os.path.join(out, f"step-{tag}.csv"))
    if stage == "train":
        return _train(out, work)
    return "-"


def main(argv: list[str]) -> int:
    if argv[:1] == ["preflight"] and len(argv) == 1:
        return preflight()
    if argv[:1] == ["figure"] and len(argv) == 5:
        print(figure(*argv[1:]))
        return 0
    print("usage:\n" + __doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
