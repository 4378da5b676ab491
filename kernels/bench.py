"""Benchmark of the fused linear KD + MLM loss against eager torch, torch.compile and Liger-Kernel.

The problem is the loss head of one distillation step: forward and backward of ``5 * kd + 2 * mlm`` computed from the
student and teacher LM heads, as ``linear_kd_mlm_loss`` does (N rows, V = 30,522, H = 768, temperature 2, ~15% of the
rows labelled, every row distilled, gradients for the student's input, weight and bias). For each implementation, row
count and dtype it reports the median time of the forward, the backward and the full pass, the peak memory of the full
pass above its inputs (gradients included), and how far kd, mlm and the student weight's gradient are from eager torch,
so that a fast but wrong kernel shows in the table. The floor printed with it is the time of the four N x H x V GEMMs
any implementation has to do (student and teacher logits, grad of x, grad of w).

Memory on CUDA is ``max_memory_allocated`` during a pass after the warm-up minus what was allocated before it. On CPU
each case runs in a fresh subprocess and memory is the growth of the process RSS over its first pass, before any
warm-up (VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before): it includes allocator slack and
one-time buffers, so it is an upper bound of tensor memory and what a training step's first loss sees.
kd and mlm errors are relative to eager's; the gradient error is max |g - g_eager| / max |g_eager| over student_w.grad.

    python -m kernels.bench [--rows 4096,8192] [--dtypes bf16,fp32] [--impls eager,ours] [--compile-rows 8192]
                            [--out benchmarks/]

writes ``{out}/kernels-{tag}.csv`` and ``{out}/kernels-{tag}.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kernels.contract import DTYPES, IGNORE_INDEX
from kernels.measure import Clock, cell, log, machine, one_line, write_bytes, write_csv

KD_WEIGHT = 5.0
MLM_WEIGHT = 2.0
TEMPERATURE = 2.0
LABELLED_FRACTION = 0.15
IMPLS = ("eager", "compile", "liger", "liger_exact", "liger_fused", "ours", "ours_torch")
# The CUDA sweep fits a few minutes of a lent GPU: torch.compile builds cold for every shape, so it runs at one
# row count (--compile-rows), and Liger's chunked torch loss is launch-bound there (its fused Triton loss is not).
DEFAULTS = {
    "cpu": {"rows": "4096", "dtypes": "fp32", "impls": "eager,compile,liger,ours", "repeats": 3, "warmup": 1},
    "cuda": {
        "rows": "8192,32768",
        "dtypes": "bf16,fp32",
        "impls": "eager,compile,liger_fused,ours,ours_torch",
        "repeats": 10,
        "warmup": 2,
    },
}
NOTES = {
    "liger": "Liger's chunked loss averages KD over the labelled rows only (one mask for both terms), so its kd and "
    "grad errors measure that difference, not a bug (liger_exact computes our quantity); it computes gradients in "
    "the forward, so its bwd only hands them back.",
    "liger_exact": "two Liger chunked calls: KD over kd_mask rows, then CE (plus a discarded KL) on the labelled rows.",
    "liger_fused": "Liger Triton fused-linear JSD (biases folded into the heads) + fused-linear CE on the labelled "
    "rows; gradients are computed in the forward.",
}
RESULT_PREFIX = "BENCH_RESULT "

# (loss to backpropagate, kd, mlm) from one problem instance.
LossFn = Callable[["Inputs"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Inputs:
    """One problem instance: both heads' inputs and parameters, the MLM labels and the KD row mask."""

    student_x: torch.Tensor
    student_w: torch.Tensor
    student_b: torch.Tensor
    teacher_x: torch.Tensor
    teacher_w: torch.Tensor
    teacher_b: torch.Tensor
    labels: torch.Tensor
    kd_mask: torch.Tensor

    def clear_grads(self) -> None:
        """Drop the student gradients, so that every pass allocates (and is charged for) its own."""
        for t in (self.student_x, self.student_w, self.student_b):
            t.grad = None


@dataclass
class Case:
    """One measurement, serialisable so that it can run in a subprocess."""

    impl: str
    rows: int
    vocab: int
    hidden: int
    dtype: str
    repeats: int
    warmup: int
    ref_path: str
    chunk_rows: int | None = None  # ours: rows per block (None: the library's default)


@dataclass
class Result:
    """One row of the table and the CSV; NaN where a value was not measured."""

    impl: str
    rows: int
    vocab: int
    hidden: int
    dtype: str
    device: str
    status: str = "ok"  # ok | OOM | skipped | error
    fwd_ms: float = math.nan
    bwd_ms: float = math.nan
    full_ms: float = math.nan
    peak_mb: float = math.nan
    speedup_vs_eager: float = math.nan
    mem_vs_eager: float = math.nan
    kd: float = math.nan
    mlm: float = math.nan
    kd_rel_err: float = math.nan
    mlm_rel_err: float = math.nan
    grad_rel_err: float = math.nan
    floor_ms: float = math.nan
    note: str = ""


def make_inputs(rows: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Deterministic inputs (drawn on the CPU, so every process and device gets the same ones); logits std 2 and 3."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int, std: float, grad: bool = False) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype).requires_grad_(grad)

    student = (
        draw(rows, hidden, std=1.0, grad=True),
        draw(vocab, hidden, std=2.0 / hidden**0.5, grad=True),
        draw(vocab, std=0.5, grad=True),
    )
    teacher = (draw(rows, hidden, std=1.0), draw(vocab, hidden, std=3.0 / hidden**0.5), draw(vocab, std=0.5))
    labelled = torch.rand(rows, generator=gen) < LABELLED_FRACTION
    labelled[0] = True  # at least one labelled row at any size
    labels = torch.where(labelled, torch.randint(0, vocab, (rows,), generator=gen), IGNORE_INDEX)
    kd_mask = torch.ones(rows, dtype=torch.bool)
    return Inputs(*student, *teacher, labels.to(device), kd_mask.to(device))


def eager_kd_mlm(inp: Inputs, temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, the baseline: both N x V logits, fp32 log-softmax, KL via kl_div(log_target=True), cross-entropy."""
    s = F.linear(inp.student_x, inp.student_w, inp.student_b).float()
    with torch.no_grad():
        t = F.linear(inp.teacher_x, inp.teacher_w, inp.teacher_b).float()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    rows = inp.kd_mask.float()
    kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    kd = temperature**2 * (kl * rows).sum() / rows.sum().clamp_min(1)
    ce = F.cross_entropy(s, inp.labels, ignore_index=IGNORE_INDEX, reduction="sum")
    mlm = ce / (inp.labels != IGNORE_INDEX).sum().clamp_min(1)  # 0, not NaN, without labels
    return kd, mlm


def _weighted(fn: Callable[[Inputs], tuple[torch.Tensor, torch.Tensor]]) -> LossFn:
    """Adapt a (kd, mlm) function to the (5 kd + 2 mlm, kd, mlm) every implementation returns."""

    def loss(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kd, mlm = fn(inp)
        return KD_WEIGHT * kd + MLM_WEIGHT * mlm, kd, mlm

    return loss


def _ours(impl: str, chunk_rows: int | None) -> LossFn:
    from kernels import linear_kd_mlm_loss

    def fn(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_kd_mlm_loss(
            inp.student_x,
            inp.student_w,
            inp.student_b,
            inp.teacher_x,
            inp.teacher_w,
            inp.teacher_b,
            inp.labels,
            inp.kd_mask,
            temperature=TEMPERATURE,
            impl=impl,
            chunk_rows=chunk_rows,
            grad_weights=(KD_WEIGHT, MLM_WEIGHT),  # as training calls it: one gradient sum for 5 kd + 2 mlm
        )

    return _weighted(fn)


# Liger-Kernel's chunked distillation loss (pure torch, runs on CPU): LigerFusedLinearJSDLoss. With beta=0 its
# generalised JSD is kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True) summed over the vocabulary, the
# forward KL(teacher || student) at the temperature, as ours; its hard loss is the CE of the unscaled logits in fp32,
# as ours. What differs: (1) the soft loss is masked with the labels and averaged over the labelled rows, so its kd is
# the mean KL over the ~15% labelled rows, not over kd_mask; the work is the same, as logits and KL are computed for
# every row before masking. (2) It has no T^2 factor: T^2 goes into weight_soft_loss. (3) The KL runs in the logits'
# dtype (bf16 for bf16 heads); only the CE is upcast to fp32. (4) Gradients are computed chunk by chunk (1024 rows,
# torch.func.grad_and_value, torch.compile'd when compiled=True) inside the forward; the backward only returns them.
def _liger_chunked(compiled: bool) -> LossFn:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=MLM_WEIGHT,
        weight_soft_loss=KD_WEIGHT * TEMPERATURE**2,
        beta=0.0,
        ignore_index=IGNORE_INDEX,
        temperature=TEMPERATURE,
        compiled=compiled,
        return_soft_hard_loss=True,
    )

    def fn(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, soft, hard = loss_fn(
            inp.student_x, inp.student_w, inp.teacher_x, inp.teacher_w, inp.labels, inp.student_b, inp.teacher_b
        )
        # Only `loss` carries the gradient: Liger's backward ignores the gradients of the returned soft/hard terms.
        return loss, TEMPERATURE**2 * soft.detach(), hard.detach()

    return fn


# The same Liger class used so that it computes exactly our quantity: one call for the KD term alone (labels made
# from kd_mask, hard weight 0, which skips the CE), one call on the labelled rows for the CE (soft weight 0; Liger
# still computes that KL and the teacher logits of those rows, ~15% of extra head work).
def _liger_chunked_exact(compiled: bool) -> LossFn:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    common = dict(beta=0.0, ignore_index=IGNORE_INDEX, temperature=TEMPERATURE, compiled=compiled)
    kd_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, **common)
    ce_fn = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=0.0, **common)

    def fn(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        kd_rows = torch.where(inp.kd_mask.bool(), 0, IGNORE_INDEX)  # labels here only select the KD rows
        args = (inp.student_x, inp.student_w, inp.teacher_x, inp.teacher_w)
        kd = TEMPERATURE**2 * kd_fn(*args, kd_rows, inp.student_b, inp.teacher_b)
        idx = (inp.labels != IGNORE_INDEX).nonzero().squeeze(1)
        if idx.numel() == 0:
            return kd, kd.new_zeros(())
        sx, tx = inp.student_x[idx], inp.teacher_x[idx]
        mlm = ce_fn(sx, inp.student_w, tx, inp.teacher_w, inp.labels[idx], inp.student_b, inp.teacher_b)
        return kd, mlm

    return _weighted(fn)


def _fold_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[x, 1, 0...] and [w, b, 0...], so that x @ w.T + b is one GEMM; padded to a multiple of 8 columns."""
    extra = 8 - x.shape[1] % 8
    ones = x.new_zeros(x.shape[0], extra)
    ones[:, 0] = 1
    bias_cols = torch.cat([b[:, None], w.new_zeros(w.shape[0], extra - 1)], dim=1)
    return torch.cat([x, ones], dim=1), torch.cat([w, bias_cols], dim=1)


# Liger-Kernel's Triton fused-linear losses (CUDA only). LigerFusedLinearJSD with jsd_beta=0 is the forward
# KL(teacher || student) at the temperature, in fp32, averaged over the rows whose label is not ignore_index, so the
# labels passed to it are made from kd_mask; it has no T^2 (applied here) and no bias, so both biases are folded into
# the heads as an extra input column (a copy of each head per call). It has no CE term: the MLM term is
# LigerFusedLinearCrossEntropyLoss on the labelled rows only, a second pass over the student head for ~15% of the
# rows. Weight gradients are accumulated in fp32 (accum_dtype). Both compute their gradients inside the forward.
def _liger_fused() -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(
        jsd_beta=0.0, ignore_index=IGNORE_INDEX, temperature=TEMPERATURE, accum_dtype=torch.float32
    )
    ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean", accum_dtype=torch.float32)

    def fn(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        sx, sw = _fold_bias(inp.student_x, inp.student_w, inp.student_b)
        with torch.no_grad():
            tx, tw = _fold_bias(inp.teacher_x, inp.teacher_w, inp.teacher_b)
        kd_rows = torch.where(inp.kd_mask.bool(), 0, IGNORE_INDEX)
        kd = TEMPERATURE**2 * jsd(sx, sw, tx, tw, kd_rows)
        idx = (inp.labels != IGNORE_INDEX).nonzero().squeeze(1)
        if idx.numel() == 0:
            return kd, kd.new_zeros(())
        mlm = ce(inp.student_w, inp.student_x[idx], inp.labels[idx], inp.student_b)
        return kd, mlm

    return _weighted(fn)


def build_loss(impl: str, *, liger_compiled: bool = True, chunk_rows: int | None = None) -> LossFn:
    """The loss function of one implementation (imports its optional dependency)."""
    if impl == "eager":
        return _weighted(eager_kd_mlm)
    if impl == "compile":
        return _weighted(torch.compile(eager_kd_mlm, dynamic=False))
    if impl == "liger":
        return _liger_chunked(liger_compiled)
    if impl == "liger_exact":
        return _liger_chunked_exact(liger_compiled)
    if impl == "liger_fused":
        return _liger_fused()
    if impl in ("ours", "ours_torch"):
        return _ours("auto" if impl == "ours" else "torch", chunk_rows)
    raise ValueError(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")


def unavailable(impl: str, device: torch.device) -> str | None:
    """Why `impl` cannot run here, or None; checked once, before any case runs."""
    try:
        if impl in ("liger", "liger_exact", "liger_fused"):
            if importlib.util.find_spec("liger_kernel") is None:
                return "liger-kernel is not installed (pip install -e '.[bench]')"
            if impl == "liger_fused":
                if device.type != "cuda":
                    return "Liger's Triton kernels need CUDA"
                import liger_kernel.transformers  # noqa: F401
            else:
                import liger_kernel.chunked_loss  # noqa: F401
        elif impl in ("ours", "ours_torch"):
            from kernels import linear_kd_mlm_loss  # noqa: F401
    except Exception as e:  # an optional dependency that does not import is skipped, whatever the reason
        return f"import failed: {one_line(e)}"
    return None


def _full_pass(fn: LossFn, inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    inp.clear_grads()
    loss, kd, mlm = fn(inp)
    loss.backward()
    return kd.detach(), mlm.detach()


def _timed_pass(fn: LossFn, inp: Inputs, device: torch.device) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(forward ms, backward ms, kd, mlm) of one full pass."""
    inp.clear_grads()
    clock = Clock(device)
    clock.mark()
    loss, kd, mlm = fn(inp)
    clock.mark()
    loss.backward()
    clock.mark()
    fwd, bwd = clock.intervals_ms()
    return fwd, bwd, kd.detach(), mlm.detach()


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _peak_mb(fn: LossFn, inp: Inputs, device: torch.device) -> float:
    """Memory a full pass needs above its inputs (gradients included); NaN where the RSS peak cannot be reset."""
    inp.clear_grads()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _full_pass(fn, inp)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _status_kb("VmRSS")
    except OSError:
        return math.nan
    _full_pass(fn, inp)
    return (_status_kb("VmHWM") - base) / 1024


def _rel(a: float, ref: float) -> float:
    return abs(a - ref) / max(abs(ref), 1e-30)


def _measure(case: Case, device: torch.device, res: Result) -> None:
    torch.compiler.reset()  # in one process (CUDA), compiled graphs of earlier cases would count to recompile limits
    inp = make_inputs(case.rows, case.vocab, case.hidden, DTYPES[case.dtype], device)
    fn = build_loss(case.impl, chunk_rows=case.chunk_rows)
    if device.type == "cpu":  # the whole first pass of a fresh process: what a training step's memory sees
        res.peak_mb = _peak_mb(fn, inp, device)
    try:
        for _ in range(case.warmup):
            _full_pass(fn, inp)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        if case.impl == "compile":
            res.status, res.note = "skipped", f"torch.compile failed: {one_line(e)}"
            return
        if case.impl not in ("liger", "liger_exact"):
            raise
        res.note = f"Liger ran with compiled=False: torch.compile failed ({one_line(e)})"
        fn = build_loss(case.impl, liger_compiled=False)
        for _ in range(case.warmup):
            _full_pass(fn, inp)
    if device.type == "cuda":  # after the warm-up: compile, autotune and cuBLAS workspaces are not the loss's
        res.peak_mb = _peak_mb(fn, inp, device)
    passes = [_timed_pass(fn, inp, device) for _ in range(case.repeats)]
    res.fwd_ms = statistics.median(p[0] for p in passes)
    res.bwd_ms = statistics.median(p[1] for p in passes)
    res.full_ms = statistics.median(p[0] + p[1] for p in passes)
    res.kd, res.mlm = float(passes[-1][2]), float(passes[-1][3])
    w_grad = inp.student_w.grad.detach().float().cpu()
    if case.impl == "eager":
        buf = io.BytesIO()
        torch.save({"kd": res.kd, "mlm": res.mlm, "w_grad": w_grad}, buf)
        write_bytes(case.ref_path, buf.getvalue())
        res.kd_rel_err = res.mlm_rel_err = res.grad_rel_err = 0.0
    elif os.path.exists(case.ref_path):
        ref = torch.load(case.ref_path)
        res.kd_rel_err = _rel(res.kd, ref["kd"])
        res.mlm_rel_err = _rel(res.mlm, ref["mlm"])
        scale = ref["w_grad"].abs().max().clamp_min(1e-30)
        res.grad_rel_err = float((w_grad - ref["w_grad"]).abs().max() / scale)


def run_case(case: Case, device: torch.device) -> Result:
    """Measure one (impl, rows, dtype); an OOM or a failure becomes the row's status instead of an exception."""
    res = Result(case.impl, case.rows, case.vocab, case.hidden, case.dtype, device.type)
    try:
        _measure(case, device, res)
    except torch.OutOfMemoryError:
        res.status = "OOM"
    except Exception as e:
        res.status, res.note = "error", one_line(e)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _run_subprocess(case: Case) -> Result:
    """`run_case` in a fresh interpreter, so that its RSS peak is its own."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "kernels.bench", "--_case", json.dumps(asdict(case))]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return Result(**json.loads(line[len(RESULT_PREFIX) :]))
    res = Result(case.impl, case.rows, case.vocab, case.hidden, case.dtype, "cpu", status="error")
    killed = " (killed: out of memory?)" if proc.returncode < 0 else ""
    res.note = f"subprocess exited with {proc.returncode}{killed}"
    return res


def gemm_ms(rows: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Median time of one (rows x hidden) @ (hidden x vocab) GEMM, the unit of the floor."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, hidden, generator=gen).to(device, dtype)
    w = torch.randn(vocab, hidden, generator=gen).to(device, dtype)
    times = []
    for i in range(repeats + 1):
        clock = Clock(device)
        clock.mark()
        out = x @ w.T
        clock.mark()
        del out
        if i:  # the first one is the warm-up
            times.append(clock.intervals_ms()[0])
    return statistics.median(times)


def format_table(results: list[Result]) -> str:
    """The plain-text table of all rows."""
    head = (
        f"{'impl':<12}{'rows':>7} {'dtype':<6}{'fwd ms':>10}{'bwd ms':>10}{'full ms':>10}{'peak MB':>10}"
        f"{'x eager':>9}{'mem/eager':>10}{'kd rel err':>12}{'mlm rel err':>12}{'grad rel err':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if r.status != "ok":
            lines.append(f"{r.impl:<12}{r.rows:>7} {r.dtype:<6}{r.status:>10}")
            continue
        lines.append(
            f"{r.impl:<12}{r.rows:>7} {r.dtype:<6}{cell(r.fwd_ms, '.1f'):>10}{cell(r.bwd_ms, '.1f'):>10}"
            f"{cell(r.full_ms, '.1f'):>10}{cell(r.peak_mb, '.0f'):>10}{cell(r.speedup_vs_eager, '.2f'):>9}"
            f"{cell(r.mem_vs_eager, '.2f'):>10}{cell(r.kd_rel_err, '.1e'):>12}{cell(r.mlm_rel_err, '.1e'):>12}"
            f"{cell(r.grad_rel_err, '.1e'):>13}"
        )
    return "\n".join(lines)


def write_png(results: list[Result], path: str, title: str) -> bool:
    """Full time and peak memory against rows, one line per impl/dtype; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(13, 5))
    series = sorted({(r.impl, r.dtype) for r in results if r.status == "ok"})
    for impl, dtype in series:
        ok = sorted((r for r in results if (r.impl, r.dtype, r.status) == (impl, dtype, "ok")), key=lambda r: r.rows)
        rows = [r.rows for r in ok]
        ax_time.plot(rows, [r.full_ms for r in ok], marker="o", label=f"{impl} {dtype}")
        ax_mem.plot(rows, [r.peak_mb for r in ok], marker="o", label=f"{impl} {dtype}")
    for dtype in sorted({r.dtype for r in results}):
        floor = sorted({(r.rows, r.floor_ms) for r in results if r.dtype == dtype and not math.isnan(r.floor_ms)})
        if floor:
            xs, ys = zip(*floor)
            ax_time.plot(xs, ys, "k--", marker="x", label=f"4 GEMMs {dtype}")
    for ax, ylabel in ((ax_time, "full pass (fwd + bwd), ms"), (ax_mem, "peak memory above inputs, MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows (N)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return True


def _csv_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run_all(args: argparse.Namespace, device: torch.device, csv_path: str) -> tuple[list[Result], list[str]]:
    """Every (rows, dtype, impl) case in order, eager first in each group; returns the results and the notes."""
    notes: list[str] = []
    impls = _csv_list(args.impls)
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")
    impls.sort(key=lambda i: i != "eager")
    runnable = []
    for impl in impls:
        reason = unavailable(impl, device)
        if reason:
            notes.append(f"{impl}: skipped, {reason}")
            log(notes[-1])
        else:
            runnable.append(impl)
    results: list[Result] = []
    all_rows = [int(r) for r in _csv_list(args.rows)]
    compile_rows = {int(r) for r in _csv_list(args.compile_rows)} if args.compile_rows else {min(all_rows)}
    with tempfile.TemporaryDirectory(prefix="kernels-bench-") as refs:
        for rows in all_rows:
            for dtype in _csv_list(args.dtypes):
                if dtype not in DTYPES:
                    raise SystemExit(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
                try:
                    floor = 4 * gemm_ms(rows, args.vocab, args.hidden, DTYPES[dtype], device, args.repeats)
                except torch.OutOfMemoryError:
                    floor = math.nan
                gc.collect()
                notes.append(
                    f"floor, {rows} rows {dtype}: one {rows}x{args.hidden}x{args.vocab} GEMM {floor / 4:.1f} ms, "
                    f"the four GEMMs {floor:.1f} ms"
                )
                group: list[Result] = []
                for impl in list(runnable):
                    if impl == "compile" and rows not in compile_rows:
                        continue
                    ref_path = os.path.join(refs, f"eager-{rows}-{dtype}.pt")
                    case = Case(
                        impl, rows, args.vocab, args.hidden, dtype, args.repeats, args.warmup, ref_path, args.chunk_rows
                    )
                    start = time.perf_counter()
                    res = _run_subprocess(case) if device.type == "cpu" else run_case(case, device)
                    if res.status == "skipped":  # torch.compile does not work here: no point retrying
                        notes.append(f"{impl}: skipped, {res.note}")
                        log(notes[-1])
                        runnable.remove(impl)
                        continue
                    res.floor_ms = floor
                    group.append(res)
                    if res.note:
                        notes.append(f"{impl} ({rows} rows {dtype}): {res.note}")
                    log(
                        f"[bench] {impl:<11} rows={rows} {dtype}: {res.status}, full {cell(res.full_ms, '.1f')} ms, "
                        f"peak {cell(res.peak_mb, '.0f')} MB ({time.perf_counter() - start:.0f} s)"
                    )
                eager = next((r for r in group if r.impl == "eager" and r.status == "ok"), None)
                for r in group:
                    if eager is not None and r.status == "ok":
                        r.speedup_vs_eager = eager.full_ms / r.full_ms
                        r.mem_vs_eager = r.peak_mb / eager.peak_mb if eager.peak_mb > 0 else math.nan
                results += group
                if results:  # after every group: a run stopped by a time limit keeps what it measured
                    write_csv(results, csv_path)
    notes += [f"{impl}: {NOTES[impl]}" for impl in runnable if impl in NOTES]
    return results, notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.bench", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--rows", help="comma list of N (default 4096 on CPU, 4096..32768 on CUDA)")
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--dtypes", help="comma list of fp32, bf16, fp16 (default fp32 on CPU, bf16,fp32 on CUDA)")
    parser.add_argument("--impls", help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--repeats", type=int, help="timed passes per case, after the warm-up (default 3 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed passes first (default 1 CPU, 3 CUDA)")
    parser.add_argument("--out", default="benchmarks/", help="directory of the CSV and PNG")
    parser.add_argument("--chunk-rows", type=int, help="ours: rows per block (default: the library's choice)")
    parser.add_argument("--compile-rows", help="comma list of N at which `compile` runs (default: the smallest --rows)")
    parser.add_argument("--tag", help="file name suffix: kernels-{tag}.csv (default: cpu or cuda)")
    parser.add_argument("--_case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args._case:  # a child process: one case, its result as one JSON line
        res = run_case(Case(**json.loads(args._case)), device)
        print(RESULT_PREFIX + json.dumps(asdict(res)), flush=True)
        return
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    for flag in ("rows", "compile_rows"):
        value = getattr(args, flag)
        if value is not None and not all(r.isdigit() and int(r) > 0 for r in _csv_list(value)):
            parser.error(f"--{flag.replace('_', '-')} must be a comma list of positive integers, got {value!r}")
    tag = args.tag or device.type
    about = machine()
    log(f"[bench] {about}")
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"kernels-{tag}.csv")
    results, notes = run_all(args, device, csv_path)

    print(
        f"linear KD + MLM loss, fwd + bwd of {KD_WEIGHT:g} kd + {MLM_WEIGHT:g} mlm; V={args.vocab} H={args.hidden} "
        f"T={TEMPERATURE:g}, {LABELLED_FRACTION:.0%} rows labelled; "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    print(about)
    print(format_table(results))
    print("x eager = eager full time / this full time; mem/eager = this peak / eager peak; errors relative to eager.")
    for note in notes:
        print(note)
    if results:
        print(f"wrote {csv_path}")
    png_path = os.path.join(args.out, f"kernels-{tag}.png")
    if write_png(results, png_path, f"linear KD + MLM loss, V={args.vocab}, H={args.hidden} -- {about}"):
        print(f"wrote {png_path}")
    else:
        print("no PNG: matplotlib is not installed")


if __name__ == "__main__":
    main()
