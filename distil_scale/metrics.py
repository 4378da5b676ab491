"""Metrics sinks (JSONL, TensorBoard, the progress line) behind one small interface, and throughput arithmetic.

Only rank 0 writes. The training loop calls `sink.write(row)` once per log interval and never branches on
which sinks are on.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Protocol

from distil_scale import atomic


class Sink(Protocol):
    def write(self, row: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line, flushed each write so a crash loses nothing already logged."""

    def __init__(self, path: str, *, keep_until_step: int | None = None):
        if keep_until_step is not None:
            truncate_after_step(path, keep_until_step)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardSink:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir)

    def write(self, row: dict) -> None:
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"train/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class ProgressSink:
    """The fixed-width progress line with an ETA."""

    def __init__(self, max_steps: int, stream=sys.stdout):
        self.max_steps = max_steps
        self.stream = stream

    def write(self, row: dict) -> None:
        step, elapsed, done = row["step"], row["elapsed_s"], row.get("steps_this_run", row["step"])
        eta = elapsed / max(done, 1) * (self.max_steps - step)
        line = (
            f"step {step:>7d}/{self.max_steps} | loss {row['loss']:8.4f} | kd {row['kd']:7.4f} | "
            f"mlm {row['mlm']:7.4f} | cos {row['cos']:6.4f} | lr {row['lr']:.2e} | gnorm {row['grad_norm']:7.3f} | "
            f"{format_count(row['tokens_per_s'])} tok/s | eta {format_duration(eta)}"
        )
        if row.get("mfu") is not None:
            line += f" | {row['model_tflops']:.1f} TFLOP/s/gpu, MFU {row['mfu']:.1%}"
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class MultiSink:
    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def write(self, row: dict) -> None:
        for sink in self.sinks:
            sink.write(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(output_dir: str, *, max_steps: int, tensorboard: bool, resumed_step: int | None) -> MultiSink:
    sinks: list[Sink] = [
        JsonlSink(os.path.join(output_dir, "metrics.jsonl"), keep_until_step=resumed_step),
        ProgressSink(max_steps),
    ]
    if tensorboard:
        sinks.append(TensorBoardSink(os.path.join(output_dir, "tensorboard")))
    return MultiSink(sinks)


class AuditLog:
    """`audit/rank<r>.jsonl`: the sample keys each optimizer step trained on, every rank.

    One row per step and epoch, `{"step": s, "epoch": e, "keys": [...]}`: a step whose micro-batches straddle an
    epoch boundary writes two rows, so that the rows of one epoch list exactly what that epoch trained on.
    """

    def __init__(self, output_dir: str, rank: int, *, world_size: int, keep_until_step: int):
        folder = os.path.join(output_dir, "audit")
        os.makedirs(folder, exist_ok=True)
        self._sink = JsonlSink(os.path.join(folder, f"rank{rank}.jsonl"), keep_until_step=keep_until_step)
        if rank == 0:  # the logs of ranks an earlier, larger world had: their steps after the resumed one are undone
            for name in os.listdir(folder):
                match = re.fullmatch(r"rank(\d+)\.jsonl", name)
                if match and int(match.group(1)) >= world_size:
                    truncate_after_step(os.path.join(folder, name), keep_until_step)

    def write(self, step: int, keys_by_epoch: dict[int, list[str]]) -> None:
        for epoch, keys in sorted(keys_by_epoch.items()):
            self._sink.write({"step": step, "epoch": epoch, "keys": keys})

    def close(self) -> None:
        self._sink.close()


def truncate_after_step(path: str, step: int) -> None:
    """Drop rows logged after `step` (a resume replays those steps; the file must describe one history)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic.write_text(path, "".join(rows))


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Clock:
    """Wall time of this process plus the time of earlier runs that this one resumes."""

    def __init__(self, earlier_s: float = 0.0):
        self.earlier_s = earlier_s
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.earlier_s + time.perf_counter() - self.start


def format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:6.1f}{unit}"
    return f"{n:7.0f}"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
