"""Size and inference speed of masked LMs, teacher against students: the paper's Table 3.

    distil-scale eval --speed configs/models/bert-base.json configs/models/distilbert-base.json
    distil-scale eval --speed runs/teacher runs/demo/student --batch-sizes 1 32 --seq-len 128 --json

A MODEL is either a local Hugging Face masked-LM directory (a teacher, an export) or a Hugging Face config.json
file, built at random init: speed and size depend on the architecture only, so BERT-base and its 6-layer student
can be timed at their real sizes without downloading weights. For each model the table gives its distinct
parameters (a tied projector counted once), its size on disk (the directory's weight files; a config's model is
saved once, as safetensors, to a temporary directory and measured there) and, at each batch size, the median
latency of one forward pass, the throughput in sequences/s and the speed-up over the first model given.

What is timed: by default the encoder (`--forward encoder`: the model's base transformer, without the MLM head).
That is what the paper's Table 3 times, a downstream task (STS-B) whose small head costs next to nothing, and what
a fine-tuned model runs. `--forward mlm` times the whole masked LM instead; its vocabulary projection (hidden x
vocab per token, as large as two BERT-base layers) is the same in teacher and student, so it narrows the speed-up.
Inputs are random token ids from a fixed seed, every sequence `seq_len` long with no padding, so each model
computes exactly the same shapes. CPU always runs fp32; on a GPU (when torch.cuda.is_available()) the models
run fp32 too, or bf16 with `dtype="bf16"`.

Timing is robust to other load on the machine: after untimed warm-up passes, the models' timed passes are
interleaved round-robin (teacher, student, teacher, student, ...), so a burst of load slows both alike instead of
whichever model happened to be running, and the median drops the outliers. Each pass runs under
torch.inference_mode with the garbage collector paused; on a GPU the clock is read after a synchronize.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoConfig, AutoModelForMaskedLM, PreTrainedModel

from distil_scale import atomic
from distil_scale.config import ConfigError
from distil_scale.evaluate import parameter_count
from distil_scale.models import load_masked_lm_dir, max_positions, quiet_transformers
from kernels.contract import DTYPES as _ALL_DTYPES
from kernels.measure import cpu_name, one_line, synchronize, timed, usable_cores

DEFAULT_BATCH_SIZES = (1, 32)
DEFAULT_SEQ_LEN = 128
# Warm-up and timed passes per model at batch 1 (fewer at larger batches on CPU, see default_passes). On 2 CPU
# cores a BERT-base pass takes ~0.1-0.3 s at batch 1 but several seconds at batch 32 x 128 tokens, so the CPU
# times about 20 sequences' worth of passes (at least 5) to keep the BERT-base comparison to a few minutes; a GPU
# pass takes milliseconds, so 100 passes there buy a steadier median for free.
DEFAULT_ITERS = {"cpu": 20, "cuda": 100}
DEFAULT_WARMUP = {"cpu": 3, "cuda": 10}
MIN_CPU_ITERS = 5
FORWARDS = ("encoder", "mlm")
DTYPES = {name: _ALL_DTYPES[name] for name in ("fp32", "bf16")}  # what inference is timed in


@dataclass
class SpeedModel:
    """One model under test: where it came from, its size, and the module in memory."""

    path: str  # as given on the command line
    name: str  # short name for the table
    source: str  # "directory" or "config"
    model: PreTrainedModel
    parameters: int
    size_mb: float  # weight files on disk, 1 MB = 10**6 bytes

    def summary(self) -> dict:
        config = self.model.config
        return {
            "name": self.name,
            "path": self.path,
            "source": self.source,
            "model_type": config.model_type,
            "architecture": type(self.model).__name__,
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "parameters": self.parameters,
            "size_mb": round(self.size_mb, 2),
        }


def weight_bytes(directory: str) -> int:
    """Bytes of a Hugging Face directory's weight files: its safetensors, else its pytorch_model*.bin files.

    Only one format is counted when a directory ships both, and side files (training_args.bin, the tokenizer)
    are not weights.
    """
    files = sorted(os.listdir(directory))
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        weights = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
    return sum(os.path.getsize(os.path.join(directory, f)) for f in weights)


def _config_model(path: str) -> PreTrainedModel:
    """A randomly initialised masked LM (seed 0) from a Hugging Face config.json file."""
    try:
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"speed: {path} is not a readable config.json ({one_line(err)})") from err
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise ConfigError(f"speed: {path} is not a Hugging Face config.json (no model_type)")
    fields = dict(fields)
    try:
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"speed: {path}: {one_line(err)}") from err
    torch.manual_seed(0)
    try:
        model = AutoModelForMaskedLM.from_config(config, dtype=torch.float32)
    except ValueError as err:  # no masked-LM class for this model_type
        raise ConfigError(f"speed: {path}: model_type {config.model_type!r} has no masked-LM architecture") from err
    architectures = getattr(config, "architectures", None) or []
    if architectures and type(model).__name__ not in architectures:
        raise ConfigError(
            f"speed: {path}: architectures {architectures} is not a masked LM (expected {type(model).__name__})"
        )
    return model


def _short_names(paths: Sequence[str]) -> list[str]:
    """File stem of a config, last component of a directory; the paths as given if two would collide."""
    names = []
    for path in paths:
        base = os.path.basename(os.path.normpath(path))
        names.append(os.path.splitext(base)[0] if os.path.isfile(path) else base)
    return names if len(set(names)) == len(names) else list(paths)


def load_speed_model(path: str, name: str) -> SpeedModel:
    """A masked LM in eval mode, fp32 on CPU, from a model directory or a config.json, with its size."""
    with quiet_transformers():
        return _load_speed_model(path, name)


def _load_speed_model(path: str, name: str) -> SpeedModel:
    if os.path.isdir(path):
        model = load_masked_lm_dir(path, dtype=torch.float32, what="speed")
        size = weight_bytes(path)
        source = "directory"
    elif os.path.isfile(path):
        model = _config_model(path)
        with tempfile.TemporaryDirectory(prefix="distil-scale-speed-") as tmp:
            model.save_pretrained(tmp)  # safetensors; tied weights are stored once
            size = weight_bytes(tmp)
        source = "config"
    else:
        raise ConfigError(f"speed: no model directory or config.json at {path}")
    return SpeedModel(path, name, source, model.eval(), parameter_count(model), size / 1e6)


def _forward_call(sm: SpeedModel, forward: str, batch: int, seq_len: int, seed: int, device: str) -> Callable:
    """A no-argument callable running one forward pass of `sm` on a fixed random batch already on `device`."""
    gen = torch.Generator().manual_seed(seed)  # the same ids for every model sharing a vocabulary
    input_ids = torch.randint(0, sm.model.config.vocab_size, (batch, seq_len), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)  # full length: no padding
    module = sm.model.base_model if forward == "encoder" else sm.model

    def call() -> None:
        module(input_ids=input_ids, attention_mask=attention_mask)

    return call


def time_round_robin(calls: Sequence[Callable], *, warmup: int, iters: int, device: str) -> list[list[float]]:
    """Seconds of each of `iters` timed calls per callable, the callables interleaved round-robin.

    Each callable first runs `warmup` untimed times (allocator, kernel selection, caches). Interleaving makes
    load from other processes fall on every model alike rather than on whichever was being timed.
    """
    with torch.inference_mode():
        for call in calls:
            for _ in range(warmup):
                call()
        synchronize(device)
        times: list[list[float]] = [[] for _ in calls]
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside a timed pass would be charged to that model alone
        try:
            for _ in range(iters):
                for call, row in zip(calls, times):
                    row.append(timed(call, device))
        finally:
            if gc_was_enabled:
                gc.enable()
    return times


def machine_info() -> dict:
    """CPU model, usable cores, torch threads, GPU and library versions."""
    return {
        "cpu": cpu_name(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def default_passes(device: str, batch: int) -> tuple[int, int]:
    """(untimed warm-up passes, timed passes) per model: fewer on CPU as the batch grows, as many on a GPU."""
    if device == "cpu":
        return -(-DEFAULT_WARMUP["cpu"] // batch), max(MIN_CPU_ITERS, -(-DEFAULT_ITERS["cpu"] // batch))
    return DEFAULT_WARMUP[device], DEFAULT_ITERS[device]


def _check_settings(batch_sizes, seq_len, iters, warmup, threads, dtype, forward) -> None:
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"speed: batch sizes must be positive integers, got {list(batch_sizes)}")
    if seq_len < 1:
        raise ConfigError(f"speed: --seq-len must be at least 1, got {seq_len}")
    if iters is not None and iters < 1:
        raise ConfigError(f"speed: --iters must be at least 1, got {iters}")
    if warmup is not None and warmup < 0:
        raise ConfigError(f"speed: --warmup must be 0 or more, got {warmup}")
    if threads is not None and threads < 1:
        raise ConfigError(f"speed: --threads must be at least 1, got {threads}")
    if dtype not in DTYPES:
        raise ConfigError(f"speed: --dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if forward not in FORWARDS:
        raise ConfigError(f"speed: --forward must be one of {', '.join(FORWARDS)}, got {forward!r}")


def measure_speed(
    paths: Sequence[str],
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    seq_len: int = DEFAULT_SEQ_LEN,
    iters: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    dtype: str = "fp32",
    forward: str = "encoder",
    seed: int = 0,
    devices: Sequence[str] | None = None,
) -> dict:
    """{"machine", "settings", "models", "results"}: size and speed of `paths`, the first one the reference.

    `results` holds one row per (device, batch size, model) with the median latency (ms per batch), the
    throughput (sequences/s) and the speed-up over the first model on that device and batch size (its median
    latency over this one's). `iters`/`warmup` default per device and batch size (default_passes); `threads` sets
    torch's CPU thread count for the measurement (torch's default otherwise) and is restored afterwards.
    `dtype` applies on the GPU only; the CPU runs fp32. `devices` defaults to cpu, plus cuda when available.
    """
    batch_sizes = list(batch_sizes)
    _check_settings(batch_sizes, seq_len, iters, warmup, threads, dtype, forward)
    devices = list(devices) if devices is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        models = [load_speed_model(path, name) for path, name in zip(paths, _short_names(paths))]
        for sm in models:
            longest = max_positions(sm.model.config)
            if seq_len > longest:
                raise ConfigError(f"speed: --seq-len {seq_len} exceeds {sm.path}'s {longest} positions")
        report = {
            "machine": machine_info(),
            "settings": {
                "seq_len": seq_len,
                "batch_sizes": batch_sizes,
                "forward": forward,
                "seed": seed,
                "dtypes": {device: "fp32" if device == "cpu" else dtype for device in devices},
            },
            "models": [sm.summary() for sm in models],
            "results": [],
        }
        for device in devices:
            device_dtype = report["settings"]["dtypes"][device]
            for sm in models:  # the CPU pass comes first, so the fp32 CPU weights are no longer needed here
                sm.model.to(device=device, dtype=DTYPES[device_dtype])
            for batch in batch_sizes:
                n_warmup, n_iters = default_passes(device, batch)
                n_warmup = n_warmup if warmup is None else warmup
                n_iters = n_iters if iters is None else iters
                print(
                    f"distil-scale: timing {device} batch {batch} x {seq_len} tokens, {n_warmup} warm-up + {n_iters} "
                    "timed passes per model ...",
                    file=sys.stderr,
                    flush=True,
                )
                calls = [_forward_call(sm, forward, batch, seq_len, seed, device) for sm in models]
                times = time_round_robin(calls, warmup=n_warmup, iters=n_iters, device=device)
                medians = [statistics.median(t) for t in times]
                for sm, t, median in zip(models, times, medians):
                    report["results"].append(
                        {
                            "model": sm.name,
                            "device": device,
                            "dtype": device_dtype,
                            "batch_size": batch,
                            "warmup": n_warmup,
                            "iters": n_iters,
                            "latency_ms": median * 1e3,
                            "latency_ms_min": min(t) * 1e3,
                            "latency_ms_max": max(t) * 1e3,
                            "sequences_per_s": batch / median,
                            "speedup": medians[0] / median,
                        }
                    )
    finally:
        torch.set_num_threads(previous_threads)
    return report


def header_lines(report: dict) -> list[str]:
    """The machine and settings lines printed above the table."""
    m, s = report["machine"], report["settings"]
    gpu = m["gpu"] or "none"
    passes: dict[str, dict[int, str]] = {}  # device -> batch -> "batch 1: 3+20" (warm-up + timed passes per model)
    for r in report["results"]:
        passes.setdefault(r["device"], {})[r["batch_size"]] = f"batch {r['batch_size']}: {r['warmup']}+{r['iters']}"
    per_device = "; ".join(
        f"{device} {dtype}, warm-up+timed passes per model at {', '.join(passes.get(device, {}).values())}"
        for device, dtype in s["dtypes"].items()
    )
    return [
        f"machine: CPU {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads); GPU {gpu}; "
        f"torch {m['torch']}, transformers {m['transformers']}",
        f"settings: forward {s['forward']}, seq len {s['seq_len']} (random ids, seed {s['seed']}, no padding), "
        f"batch sizes {', '.join(map(str, s['batch_sizes']))}; {per_device}; models interleaved round-robin, "
        "median latency",
    ]


def format_speed_table(report: dict) -> str:
    """Machine and settings lines, then one fixed-width row per device, batch size and model."""
    models = {m["name"]: m for m in report["models"]}
    width = max(len("model"), *(len(name) for name in models))
    head = (
        f"{'model':<{width}}  {'params M':>8}  {'size MB':>8}  {'device':<6}  {'batch':>5}  {'ms/batch':>9}  "
        f"{'seq/s':>9}  {'speed-up':>8}"
    )
    lines = [*header_lines(report), head]
    for r in report["results"]:
        m = models[r["model"]]
        lines.append(
            f"{r['model']:<{width}}  {m['parameters'] / 1e6:>8.2f}  {m['size_mb']:>8.1f}  {r['device']:<6}  "
            f"{r['batch_size']:>5d}  {r['latency_ms']:>9.2f}  {r['sequences_per_s']:>9.2f}  {r['speedup']:>7.2f}x"
        )
    return "\n".join(lines)


def run_speed(paths: Sequence[str], *, out: str | None = None, **settings) -> dict:
    """measure_speed, print the table, write the JSON to `out` when given (temp file + rename)."""
    if out is not None:
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):  # checked before minutes of timing, not after
            raise ConfigError(f"speed: --out {out}: directory {parent} does not exist")
    report = measure_speed(paths, **settings)
    print(format_speed_table(report), flush=True)
    if out is not None:
        atomic.write_json(out, report)
    return report
