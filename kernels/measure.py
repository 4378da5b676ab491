"""What every benchmark of this project shares: clocks, the machine line, table cells and result files.

`python -m kernels.bench`, `python -m distil_scale.bench`, `distil-scale eval --speed` and the evaluation's
forward timings all read time the same way: wait for the device, read the clock, run, wait again (`timed`), or, for
several intervals of one pass on a GPU, CUDA events (`Clock`). Depends on torch only, like the rest of `kernels`.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued kernels (a no-op on CPU), before reading a clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], object], device: torch.device | str) -> float:
    """Seconds of one call, queued device work included (kernels run asynchronously on a GPU)."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


class Clock:
    """Marks on the CPU clock, or CUDA events on the current stream; `intervals_ms` waits for them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> str:
    """One line: the CPU model and the cores this process may use, the GPU if any, torch and triton, the date."""
    gpu = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if torch.cuda.is_available() else "none"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not importable"
    return (
        f"CPU {cpu_name()} ({usable_cores()} cores); GPU {gpu}; torch {torch.__version__}, "
        f"triton {triton_version}; {datetime.date.today().isoformat()}"
    )


def cell(value: float, spec: str) -> str:
    """A table cell: `value` formatted by `spec`, or "-" for NaN (not measured)."""
    return "-" if math.isnan(value) else format(value, spec)


def write_bytes(path: str, data: bytes) -> None:
    """Whole or not at all: a temp file beside `path`, renamed over it. (`kernels` never imports `distil_scale`,
    whose `atomic` module does this for the package; benchmark results need only this much of it.)"""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_csv(results: list, path: str) -> None:
    """All fields of the result dataclasses, one row each, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f.name for f in fields(results[0])])
    writer.writeheader()
    for r in results:
        writer.writerow(asdict(r))
    write_bytes(path, buf.getvalue().encode())


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and the first line of its message, white space folded. For failed
    benchmark rows and for the one-line errors of the package, which wraps library errors in them (it lives here
    because `distil_scale` imports `kernels` and never the reverse)."""
    lines = [" ".join(line.split()) for line in str(error).splitlines()]
    text = next((line for line in lines if line), "")
    return f"{type(error).__name__}: {text}"[:limit] if text else type(error).__name__


def log(msg: str) -> None:
    """Progress on stderr, so that stdout holds only the tables."""
    print(msg, file=sys.stderr, flush=True)
