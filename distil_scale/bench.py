"""Throughput of the two halves of a training step: the CPU data pipeline and the GPU step.

    python -m distil_scale.bench data [--seq-len 128 512] [--micro-batch-size 32] [--workers 0 1 2] [--seconds 5]
    python -m distil_scale.bench step [--teacher-config configs/models/tiny-bert.json] [--impls eager fused]
        [--activation-checkpointing]

`data` prepares a dataset offline (the synthetic corpus, a WordPiece tokenizer, `prepare`) into --workdir or a
temporary directory, or reuses one given with --data, then measures how many masked, collated tokens per second
the batch stream makes: first in-process on one core (`BatchStream` iterated directly, one torch thread: read
shards -> shuffle -> length grouping -> collate -> mask), then through `make_loader` with each --workers count.
The synthetic documents are short (15-200 words), so they are joined into lines of about 2 x seq_len words: most
samples then fill seq_len, as they do on Wikipedia or book text, and the rest are the documents' tails. Each
measurement starts after one warm-up group of batches (the shuffle buffer and the first length group are filled
then) and ends on a whole number of groups. "cpu-s" is the CPU time of every process involved (the measuring
process and the loader workers) over the measured window; the per-core rate is padded tokens per CPU second,
judged against the target of 1M tokens/s per core. Padded tokens are what the GPU computes (see flops.py); the
real-token rate is lower by the padding fraction. --profile adds a cProfile of the in-process pipeline.

`step` times one training step on random data: a teacher (BertConfig defaults, BERT-base, or --teacher-config)
in no-grad forward, a half-depth DistilBERT student from models.build_student (random init) in forward and
backward, loss.impl eager (losses.eager_terms: losses.triple_loss on full logits) or fused (losses.fused_terms:
the kernels package, no logits), and an AdamW step. On GPU both models are held in bf16 as the trainer's DeepSpeed
bf16 mode holds them, the student's update running on fp32 master weights; the micro-batch doubles until it runs
out of memory. On CPU everything is fp32 and the --micro-batch-size list is taken as given. Model FLOPs and MFU
come from distil_scale.flops; peak memory is torch.cuda.max_memory_allocated on GPU and the RSS high-water mark on
CPU (reset per row through /proc/self/clear_refs where the kernel allows, else the process's resource.getrusage
maximum so far). --out DIR writes DIR/step-<tag>.csv.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import math
import os
import pstats
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from distil_scale import flops
from distil_scale.config import Config, DataConfig
from kernels.contract import IGNORE_INDEX
from kernels.measure import cell, log, machine, one_line, timed, write_csv

TARGET_TOKENS_PER_CORE_S = 1e6
_DATA = DataConfig()


def _header(subcommand: str, argv: list[str]) -> None:
    print(f"command: python -m distil_scale.bench {subcommand} {shlex.join(argv)}".rstrip())
    print(f"machine: {machine()}")


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


def _join_documents(src: str, dst: str, *, words: int) -> None:
    """Rewrite a one-document-per-line corpus with consecutive documents joined into lines of >= `words` words."""
    with open(src, encoding="utf-8") as f_in, open(dst, "w", encoding="utf-8") as f_out:
        line: list[str] = []
        for doc in f_in:
            line += doc.split()
            if len(line) >= words:
                f_out.write(" ".join(line) + "\n")
                line = []
        if line:
            f_out.write(" ".join(line) + "\n")


def prepare_dataset(workdir: str, seq_len: int, *, docs: int, seed: int = 0) -> str:
    """A prepared dataset of sequences of at most `seq_len` tokens under `workdir`, made once and then reused."""
    import transformers

    from distil_scale.data.corpus import write_synthetic_corpus
    from distil_scale.data.shards import prepare
    from distil_scale.data.tokenizer import train_wordpiece

    root = os.path.join(workdir, f"docs{docs}-seed{seed}")
    out = os.path.join(root, f"seq{seq_len}")
    if os.path.exists(os.path.join(out, "dataset.json")):
        return out
    synthetic = os.path.join(root, "synthetic.txt")
    if not os.path.exists(synthetic):
        write_synthetic_corpus(synthetic, num_docs=docs, seed=seed)
    tokenizer = os.path.join(root, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer, "tokenizer.json")):
        with open(synthetic, encoding="utf-8") as f:
            train_wordpiece(f.read().splitlines(), vocab_size=_DATA.tokenizer_vocab_size, out_dir=tokenizer)
    corpus = os.path.join(root, f"corpus-{seq_len}.txt")
    _join_documents(synthetic, corpus, words=2 * seq_len)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than model_max_length": prepare cuts them
    try:
        prepare(
            [corpus],
            tokenizer_dir=tokenizer,
            out_dir=out,
            max_seq_length=seq_len,
            samples_per_shard=_DATA.samples_per_shard,
            heldout_fraction=0.0,
            num_proc=1,
            seed=seed,
            progress=False,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    return out


@dataclass
class DataResult:
    """One row of the data table: what one pipeline made over the measured window."""

    seq_len: int
    mode: str  # stream (in-process, one torch thread) | loader (make_loader)
    workers: int
    batches: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    seconds: float = math.nan
    cpu_seconds: float = math.nan
    warmup_s: float = math.nan  # until the first measured batch: workers start, buffers fill

    @property
    def padded_per_s(self) -> float:
        return self.padded_tokens / self.seconds

    @property
    def per_core(self) -> float:
        return self.padded_tokens / self.cpu_seconds


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process (all its threads) plus that of the given child processes."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            total += (int(stat[11]) + int(stat[12])) / tick  # utime, stime (fields 14 and 15)
        except (OSError, IndexError, ValueError):
            pass
    return total


def _measure(res: DataResult, batches: Iterator[dict], pids, *, warmup: int, unit: int, seconds, count) -> None:
    """Consume `warmup` batches untimed, then whole `unit`s of batches until `seconds` passed (or `count` batches)."""
    start = time.perf_counter()
    for _ in range(warmup):
        next(batches)
    res.warmup_s = time.perf_counter() - start
    cpu0, t0 = _cpu_seconds(pids()), time.perf_counter()
    while True:
        batch = next(batches)
        res.batches += 1
        res.padded_tokens += batch["input_ids"].numel()
        res.real_tokens += int(batch["attention_mask"].sum())
        if count is not None:
            if res.batches >= count:
                break
        elif res.batches % unit == 0 and time.perf_counter() - t0 >= seconds:
            break
    res.seconds = time.perf_counter() - t0
    res.cpu_seconds = _cpu_seconds(pids()) - cpu0


def _stream(data_dir: str, args: argparse.Namespace):
    from distil_scale.data.masking import Masker
    from distil_scale.data.shards import read_manifest
    from distil_scale.data.stream import BatchStream

    manifest = read_manifest(data_dir)
    return BatchStream(
        manifest.urls("train"),
        manifest.samples("train"),
        rank=0,
        world_size=1,
        seed=0,
        micro_batch_size=args.micro_batch_size,
        masker=Masker.for_manifest(manifest, smoothing=_DATA.mlm_smoothing, mlm_probability=_DATA.mlm_probability),
        pad_id=manifest.special_ids["pad"],
        shuffle_buffer=args.shuffle_buffer,
        group_batches=args.group_batches,
    ), manifest.max_seq_length


def _run_stream(data_dir: str, args: argparse.Namespace, *, profiler: cProfile.Profile | None = None) -> DataResult:
    stream, seq_len = _stream(data_dir, args)
    res = DataResult(seq_len, "stream", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as in one loader worker (the DataLoader sets 1 thread there too)
    if profiler is not None:
        profiler.enable()
    try:
        unit = args.group_batches
        _measure(res, iter(stream), lambda: [], warmup=unit, unit=unit, seconds=args.seconds, count=args.batches)
    finally:
        if profiler is not None:
            profiler.disable()
        torch.set_num_threads(threads)
    return res


def _run_loader(data_dir: str, args: argparse.Namespace, workers: int) -> DataResult:
    from distil_scale.data.loader import close_loader, make_loader

    stream, seq_len = _stream(data_dir, args)
    res = DataResult(seq_len, "loader", workers)
    batches = iter(make_loader(stream, num_workers=workers, prefetch_factor=_DATA.prefetch_factor))
    try:
        unit = args.group_batches * max(workers, 1)  # the loader takes batches from its workers in turn
        workers_of = getattr(batches, "loader_iter", batches)  # the DataLoader's own iterator holds the workers
        pids = lambda: [w.pid for w in getattr(workers_of, "_workers", [])]  # noqa: E731
        _measure(res, batches, pids, warmup=unit, unit=unit, seconds=args.seconds, count=args.batches)
    finally:
        close_loader(batches)
    return res


def profile_stream(data_dir: str, args: argparse.Namespace, *, top: int = 15) -> str:
    """cProfile of the in-process pipeline over one measurement window: the `top` functions by own time."""
    profiler = cProfile.Profile()
    _run_stream(data_dir, args, profiler=profiler)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def format_data_table(results: list[DataResult]) -> str:
    head = (
        f"{'seq':>5} {'mode':<7}{'workers':>8}{'batches':>9}{'padded tok/s':>14}{'real tok/s':>12}{'pad %':>7}"
        f"{'cpu-s/s':>9}{'tok/s/core':>12}{'warm-up s':>11}  >=1M/core"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        pad = 100.0 * (1 - r.real_tokens / r.padded_tokens)
        lines.append(
            f"{r.seq_len:>5} {r.mode:<7}{r.workers:>8}{r.batches:>9}{r.padded_per_s:>14,.0f}"
            f"{r.real_tokens / r.seconds:>12,.0f}{pad:>7.1f}{r.cpu_seconds / r.seconds:>9.2f}{r.per_core:>12,.0f}"
            f"{r.warmup_s:>11.2f}  {'yes' if r.per_core >= TARGET_TOKENS_PER_CORE_S else 'no'}"
        )
    return "\n".join(lines)


def run_data(args: argparse.Namespace) -> list[DataResult]:
    """Every (dataset, pipeline) measurement, printed as one table; returns the rows."""
    tmp = None
    if args.data:
        datasets = [args.data]
        if args.seq_len:
            log("[bench] --data given: sequences are as long as that dataset's max_seq_length; --seq-len ignored")
    else:
        if args.workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="distil-bench-")
        workdir = args.workdir or tmp.name
        datasets = []
        for seq_len in args.seq_len or [128, 512]:
            log(f"[bench] preparing the synthetic dataset at seq_len {seq_len} under {workdir}")
            datasets.append(prepare_dataset(workdir, seq_len, docs=args.docs))
    results, profiles = [], []
    try:
        for data_dir in datasets:
            results.append(_run_stream(data_dir, args))
            log(f"[bench] {format_data_table(results[-1:]).splitlines()[-1]}")
            for workers in args.workers:
                results.append(_run_loader(data_dir, args, workers))
                log(f"[bench] {format_data_table(results[-1:]).splitlines()[-1]}")
            if args.profile:
                profiles.append((results[-1 - len(args.workers)].seq_len, profile_stream(data_dir, args)))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(
        f"masked, collated batches of {args.micro_batch_size} (shuffle buffer {args.shuffle_buffer}, "
        f"{args.group_batches} batches per length group); target {TARGET_TOKENS_PER_CORE_S:,.0f} padded tokens/s "
        "per core"
    )
    print(format_data_table(results))
    print(
        "stream = BatchStream in this process, 1 torch thread; loader = make_loader (0 workers: in this process). "
        "cpu-s/s = CPU seconds of all its processes per second; tok/s/core = padded tokens per CPU second."
    )
    for seq_len, text in profiles:
        print(f"\ncProfile of the in-process pipeline, seq_len {seq_len} (sorted by own time):\n{text}")
    return results


# ---------------------------------------------------------------------------------------------------------------
# step
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """One row of the step table and the CSV; NaN where a value was not measured."""

    impl: str
    micro_batch_size: int
    seq_len: int
    device: str
    dtype: str
    status: str = "ok"  # ok | OOM | error
    step_ms: float = math.nan
    tokens_per_s: float = math.nan
    model_tflops: float = math.nan
    mfu: float = math.nan
    peak_mb: float = math.nan
    note: str = ""  # why a row failed, in one line


_OPTIM_LR = 1e-4  # any rate: the step's cost does not depend on it


class _AdamW:
    """Fused AdamW. Low-precision weights are updated the way DeepSpeed's bf16 mode does it: through fp32 master
    copies (fp32 gradients, moments and weights), the model's weights being their bf16 copies."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float):
        self.params = params
        self.master = params
        if params[0].dtype != torch.float32:
            self.master = [p.detach().float().requires_grad_() for p in params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, fused=True)  # on CPU too: ~10x the foreach loop there

    def step(self) -> None:
        if self.master is not self.params:
            for master, p in zip(self.master, self.params, strict=True):
                master.grad, p.grad = p.grad.float(), None
        self.opt.step()
        if self.master is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)
        self.zero_grad()

    def zero_grad(self) -> None:
        for p in (*self.params, *self.master):
            p.grad = None


def build_step_models(
    teacher_config_path: str | None, device: torch.device, dtype: torch.dtype, *, activation_checkpointing: bool = False
):
    """(teacher, student, optimizer): a random teacher, the half-depth student of models.build_student, AdamW;
    `activation_checkpointing` as train.activation_checkpointing does it."""
    from transformers import AutoConfig, AutoModelForMaskedLM, BertConfig

    from distil_scale.models import build_student

    config = BertConfig() if teacher_config_path is None else AutoConfig.from_pretrained(teacher_config_path)
    torch.manual_seed(0)
    teacher = AutoModelForMaskedLM.from_config(config)
    teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)
    student = build_student(teacher, init="random").to(device=device, dtype=dtype).train()
    if activation_checkpointing:
        student.activation_checkpointing_enable({"use_reentrant": False})
    return teacher, student, _AdamW([p for p in student.parameters() if p.requires_grad], lr=_OPTIM_LR)


def _random_batch(batch: int, seq_len: int, vocab: int, device: torch.device, gen: torch.Generator):
    ids = torch.randint(5, vocab, (batch, seq_len), generator=gen)  # past the 5 BERT special tokens
    labels = torch.where(torch.rand(batch, seq_len, generator=gen) < _DATA.mlm_probability, ids, IGNORE_INDEX)
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    return ids.to(device), mask.to(device), labels.to(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _time_steps(models, impl: str, batch: tuple, *, warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds of one forward + backward + optimizer step."""
    from distil_scale.losses import eager_terms, fused_terms

    teacher, student, optimizer = models
    loss = Config().loss
    terms_of = fused_terms if impl == "fused" else eager_terms

    def step() -> None:
        terms_of(student, teacher, *batch, loss).total.backward()
        optimizer.step()

    # A sync point per step (in `timed`): the row's time is the step's, not its launches'.
    times = [timed(step, device) for _ in range(warmup + iters)]
    return statistics.median(times[warmup:])


def run_step_case(models, impl: str, batch_size: int, seq_len: int, args, device: torch.device) -> StepResult:
    teacher, student, optimizer = models
    dtype = next(student.parameters()).dtype
    res = StepResult(impl, batch_size, seq_len, device.type, str(dtype).removeprefix("torch."))
    gen = torch.Generator().manual_seed(batch_size)
    _reset_peak(device)
    try:
        batch = _random_batch(batch_size, seq_len, teacher.config.vocab_size, device, gen)
        res.step_ms = 1e3 * _time_steps(models, impl, batch, warmup=args.warmup, iters=args.iters, device=device)
    except torch.OutOfMemoryError:
        res.status = "OOM"
    except Exception as e:  # one failing row (a kernel, a shape) is recorded; the other rows still run
        res.status, res.note = "error", one_line(e)
    batch = None
    optimizer.zero_grad()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if res.status != "ok":
        return res
    res.peak_mb = _peak_mb(device)
    tokens = batch_size * seq_len
    seconds = res.step_ms / 1e3
    res.tokens_per_s = tokens / seconds
    step = flops.step_flops(teacher.config, student.config, tokens, seq_len)
    res.model_tflops = step / seconds / 1e12
    peak = flops.peak_flops(dtype, override=args.peak_tflops * 1e12 if args.peak_tflops else None)
    value = flops.mfu(step, seconds, peak)
    res.mfu = math.nan if value is None else value
    return res


def format_step_table(results: list[StepResult]) -> str:
    head = (
        f"{'impl':<7}{'micro-batch':>12}{'seq':>6} {'dtype':<9}{'status':<7}{'step ms':>10}{'tokens/s':>11}"
        f"{'TFLOP/s':>9}{'MFU':>7}{'peak MB':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.impl:<7}{r.micro_batch_size:>12}{r.seq_len:>6} {r.dtype:<9}{r.status:<7}{cell(r.step_ms, '.1f'):>10}"
            f"{cell(r.tokens_per_s, ',.0f'):>11}{cell(r.model_tflops, '.2f'):>9}{cell(r.mfu, '.1%'):>7}"
            f"{cell(r.peak_mb, ',.0f'):>10}"
        )
    return "\n".join(lines)


def run_step(args: argparse.Namespace) -> list[StepResult]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    seq_len = args.seq_len or (512 if gpu else 64)
    warmup, iters = args.warmup if args.warmup is not None else (3 if gpu else 1), args.iters or (10 if gpu else 1)
    args.warmup, args.iters = warmup, iters
    dtype = torch.bfloat16 if gpu else torch.float32
    models = build_step_models(
        args.teacher_config, device, dtype, activation_checkpointing=args.activation_checkpointing
    )
    results = []
    path = os.path.join(args.out, f"step-{args.tag or device.type}.csv") if args.out else None
    for impl in args.impls:
        if args.micro_batch_size or not gpu:
            sizes, search = list(args.micro_batch_size or [2, 4]), False
        else:
            sizes, search = [args.start_micro_batch_size], True
        while sizes:
            size = sizes.pop(0)
            res = run_step_case(models, impl, size, seq_len, args, device)
            results.append(res)
            log(f"[bench] {format_step_table(results[-1:]).splitlines()[-1]}")
            if path:  # after every row: a run stopped by a time limit keeps what it measured
                write_csv(results, path)
            if search and res.status == "ok" and size * 2 <= args.max_micro_batch_size:
                sizes.append(size * 2)
    teacher, student, _ = models
    print(
        f"one distillation step: teacher {teacher.config.num_hidden_layers} layers x {teacher.config.hidden_size} "
        f"(vocab {teacher.config.vocab_size}, no grad) -> student {student.config.n_layers} layers, forward + "
        f"backward{' with activation checkpointing' if args.activation_checkpointing else ''} + AdamW; median of "
        f"{iters} after {warmup} warm-up; random full-length sequences"
    )
    print(format_step_table(results))
    for r in results:
        if r.note:
            print(f"{r.impl} micro-batch {r.micro_batch_size}: {r.status}, {r.note}")
    peak_note = "torch.cuda.max_memory_allocated" if gpu else "RSS high-water mark of the process"
    print(
        "TFLOP/s and MFU count model FLOPs (distil_scale.flops: teacher forward + 3 x student forward, padded "
        f"positions); MFU against the dense {str(dtype).removeprefix('torch.')} peak; peak MB = {peak_note}."
    )
    if path:
        print(f"wrote {path}")
    return results


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distil_scale.bench", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="tokens/s of the data pipeline", allow_abbrev=False)
    data.add_argument("--data", help="a prepared dataset directory to reuse instead of the synthetic one")
    data.add_argument("--workdir", help="where to prepare (and next time reuse) the synthetic datasets")
    data.add_argument("--docs", type=int, default=50000, help="synthetic documents (default 50000)")
    data.add_argument("--seq-len", type=int, nargs="+", help="max sequence lengths to prepare (default 128 512)")
    data.add_argument("--micro-batch-size", type=int, default=32)
    data.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="make_loader worker counts")
    data.add_argument("--shuffle-buffer", type=int, default=_DATA.shuffle_buffer)
    data.add_argument("--group-batches", type=int, default=_DATA.group_batches)
    data.add_argument("--seconds", type=float, default=5.0, help="measure at least this long (whole groups)")
    data.add_argument("--batches", type=int, help="measure exactly this many batches instead of --seconds")
    data.add_argument("--profile", action="store_true", help="also cProfile the in-process pipeline")
    step = sub.add_parser("step", help="tokens/s, TFLOP/s and MFU of a training step", allow_abbrev=False)
    step.add_argument("--teacher-config", help="a Hugging Face config.json (default: BertConfig(), BERT-base)")
    step.add_argument("--impls", nargs="+", default=["eager", "fused"], choices=["eager", "fused"])
    step.add_argument("--seq-len", type=int, help="positions per sequence (default 512 on GPU, 64 on CPU)")
    step.add_argument("--micro-batch-size", type=int, nargs="+", help="sizes to run (CPU default 2 4; GPU: search)")
    step.add_argument("--start-micro-batch-size", type=int, default=8, help="GPU: first size of the doubling")
    step.add_argument("--max-micro-batch-size", type=int, default=1024, help="GPU: stop doubling here")
    step.add_argument("--warmup", type=int, help="untimed steps per row (default 3 GPU, 1 CPU)")
    step.add_argument("--iters", type=int, help="timed steps per row (default 10 GPU, 1 CPU)")
    step.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute the student's layers in backward"
    )
    step.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: from the device name)")
    step.add_argument("--out", help="directory to write step-<tag>.csv into (default: no CSV)")
    step.add_argument("--tag", help="file name suffix (default: cpu or cuda)")
    return parser


def main(argv: list[str] | None = None) -> list[DataResult] | list[StepResult]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    for name in ("micro_batch_size", "iters", "batches", "docs"):
        values = getattr(args, name, None)
        if values is not None and min(values if isinstance(values, list) else [values]) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    _header(args.command, argv[1:])
    return run_data(args) if args.command == "data" else run_step(args)


if __name__ == "__main__":
    main()
