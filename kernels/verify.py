"""Correctness of every fused kernel against float64, on the device it runs on: the first thing a GPU run checks.

Each case builds fresh random inputs on the device, runs one op forward and backward (or its row primitive into
given buffers), and compares every output with a float64 reference computed from the same rounded inputs:

    kd_mlm_loss          logits (N, V): kd, mlm and d(a kd + b mlm)/ds
    linear_kd_mlm_loss   both LM heads fused in: kd, mlm and the gradients of x, w and b, with and without
                         grad_weights (the training path, one gradient sum)
    kd_mlm_rows          the row primitive writing into NaN-filled buffers: g in place over fp32 logits, g in
                         bf16 and in fp16 (scaled by a power of two), the compact MLM gradient
    cosine_loss          hidden rows of one tile and of several tiles (two sweeps), a zero row among them

over fp32, bf16 and fp16, temperatures 1, 2 and 4, logits of scale 3 and 100, padding rows (kd_mask 0, no label;
their gradient must be exactly 0), labelled rows outside kd_mask, labels 0 and V - 1, a student almost equal to
the teacher, and, on a GPU only (about 25 GB), logits with N x V > 2^31 elements (64-bit row offsets). The error of
a quantity is ||out - ref|| / ||ref||; NaN never passes. Buffers an op allocates itself cannot be filled first:
on CUDA the caching allocator is handed a freed NaN-filled block before every call, so a buffer it carves from
there reads NaN wherever the op did not write, and every output must be finite.

Tolerances by dtype: fp32 1e-4 (fp32 arithmetic; 2e-3 for the fused linear op, the one with GEMMs, where torch
lets fp32 GEMMs use tf32); bf16 1e-2 and fp16 5e-3, where what is rounded to the low precision (a gradient, the
GEMM inputs) sets the error. The almost-equal student's kd (about 1e-5) is a difference of log-sum-exps of size
log V in fp32: its error is taken relative to T^2 x 1e-2, at the fp32 tolerance (an absolute 1e-6 T^2).

    python -m kernels.verify [--out DIR] [--small] [--dry-run] [--impls triton,torch] [--seed 0]

`--small`: tiny shapes (seconds); `--dry-run`: `--small` on the CPU, the Triton kernels through the interpreter
(TRITON_INTERPRET=1, set for a re-run of this command when missing). Prints the table, writes DIR/verify.csv and
DIR/verify.json, and exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kernels import IGNORE_INDEX, cosine_loss, kd_mlm_loss, linear_kd_mlm_loss
from kernels.contract import DTYPES
from kernels.kd_mlm import kd_mlm_rows, mlm_slots, row_coefficients
from kernels.linear_kd_mlm import default_chunk_rows
from kernels.measure import log, machine, write_bytes, write_csv

TOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 5e-3}
TF32_TOL = 2e-3
WEIGHTS = (1.3, -0.7)  # the gradients reaching kd and mlm: neither is 1, and they differ
TRAINING_WEIGHTS = (5.0, 2.0)  # alpha_kd, alpha_mlm: what grad_weights promises
NAN = float("nan")


@dataclass(frozen=True)
class Sizes:
    rows: int
    vocab: int
    hidden: int
    wide_hidden: int  # more than one tile of the cosine kernel
    chunk_rows: int | None  # linear_kd_mlm_loss's rows per block (None: its default)
    ref_rows: int  # rows per float64 reference chunk


GPU_SIZES = Sizes(rows=1500, vocab=30522, hidden=768, wide_hidden=5000, chunk_rows=None, ref_rows=8192)
# The interpreter runs a row program in about 40 ms: few rows, but two vocabulary tiles (256 on the CPU), three blocks.
SMALL_SIZES = Sizes(rows=10, vocab=300, hidden=16, wide_hidden=300, chunk_rows=4, ref_rows=4)


@dataclass
class Check:
    """One compared quantity of one case; a row of the CSV."""

    case: str
    op: str
    impl: str
    dtype: str
    temperature: float
    quantity: str
    rel_err: float
    tol: float
    ok: bool


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN when out holds a NaN or an Inf)."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return NAN
    return float((out - ref).norm() / max(float(ref.norm()), floor))


def poison_cache(device: torch.device, nbytes: int) -> None:
    """On CUDA, leave a freed NaN-filled block of `nbytes` in torch's caching allocator for the next allocations."""
    if device.type == "cuda":
        torch.empty(max(nbytes, 4) // 4, dtype=torch.float32, device=device).fill_(NAN)


class Recorder:
    """Collects the checks of every case and the cases skipped, with their reasons."""

    def __init__(self, gemm_fp32_tol: float) -> None:
        self.checks: list[Check] = []
        self.skipped: list[str] = []
        self.gemm_fp32_tol = gemm_fp32_tol  # for ops that run fp32 GEMMs, which CUDA may run in tf32

    def add(self, case, op, impl, dtype, temperature, errors: dict[str, float], tols: dict | None = None) -> None:
        """One Check per quantity: padding quantities must be exactly 0, `tols` overrides the dtype's tolerance."""
        for quantity, err in errors.items():
            limit = 0.0 if quantity.startswith("padding") else (tols or {}).get(quantity, TOL[dtype])
            ok = not math.isnan(err) and err <= limit
            self.checks.append(Check(case, op, impl, dtype, temperature, quantity, err, limit, ok))


# ----------------------------------------------------------------------------------------------------- inputs


def row_targets(n: int, vocab: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """labels and kd_mask: ~30% labelled (0 and V - 1 among them), a labelled row outside kd_mask, padding last."""
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    labels[torch.rand(n, generator=gen, device=device) > 0.3] = IGNORE_INDEX
    labels[0], labels[1], labels[2] = 0, vocab - 1, vocab // 2
    kd_mask = torch.ones(n, dtype=torch.bool, device=device)
    kd_mask[2] = False  # MLM only
    pad = max(2, n // 8)
    kd_mask[-pad:] = False
    labels[-pad:] = IGNORE_INDEX
    return labels, kd_mask


def padding(labels: torch.Tensor, kd_mask: torch.Tensor) -> torch.Tensor:
    return (labels == IGNORE_INDEX) & (kd_mask == 0)


def terms64(s, t, labels, kd_mask, temperature, n_kd, n_mlm) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' shares of kd and mlm in float64 (normalised by the whole call's row counts), differentiable in s."""
    s, t = s.double(), t.double().detach()
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    kd = temperature**2 * (kl * (kd_mask != 0)).sum() / n_kd
    labelled = labels != IGNORE_INDEX
    ce = F.cross_entropy(s, labels.clamp(min=0), reduction="none")
    return kd, (ce * labelled).sum() / n_mlm


def counts(labels: torch.Tensor, kd_mask: torch.Tensor) -> tuple[float, float]:
    return max(int((kd_mask != 0).sum()), 1), max(int((labels != IGNORE_INDEX).sum()), 1)


def reference_logits(s, t, labels, kd_mask, temperature, chunk) -> Iterator[tuple[slice, torch.Tensor, ...]]:
    """(rows, kd share, mlm share, d(a kd + b mlm)/ds of those rows), chunk by chunk, in float64."""
    n_kd, n_mlm = counts(labels, kd_mask)
    for i in range(0, s.shape[0], chunk):
        rows = slice(i, min(i + chunk, s.shape[0]))
        s64 = s[rows].double().requires_grad_()
        kd, mlm = terms64(s64, t[rows], labels[rows], kd_mask[rows], temperature, n_kd, n_mlm)
        (WEIGHTS[0] * kd + WEIGHTS[1] * mlm).backward()
        yield rows, kd.detach(), mlm.detach(), s64.grad


def logits_errors(ours, s, t, labels, kd_mask, temperature, chunk, kd_floor=1e-30) -> dict[str, float]:
    """kd, mlm and gradient errors of kd_mlm_loss's outputs (kd, mlm, grad) against the chunked reference."""
    kd, mlm, grad = ours
    ref_kd = ref_mlm = 0.0
    diff = norm = 0.0
    finite = bool(torch.isfinite(grad).all())
    for rows, part_kd, part_mlm, ref_grad in reference_logits(s, t, labels, kd_mask, temperature, chunk):
        ref_kd, ref_mlm = ref_kd + float(part_kd), ref_mlm + float(part_mlm)
        diff += float((grad[rows].double() - ref_grad).norm() ** 2)
        norm += float(ref_grad.norm() ** 2)
    pad = padding(labels, kd_mask)
    return {
        "kd": rel_err(kd, torch.tensor(ref_kd, dtype=torch.float64), kd_floor),
        "mlm": rel_err(mlm, torch.tensor(ref_mlm, dtype=torch.float64)),
        "grad": math.sqrt(diff / max(norm, 1e-60)) if finite else NAN,
        "padding grad": float(grad[pad].abs().max()) if pad.any() else 0.0,
    }


# -------------------------------------------------------------------------------------------------------- cases


def case_kd_mlm_loss(rec, impl, dtype, temperature, scale, sizes, device, gen, *, near=False, rows=None, vocab=None):
    n, v = rows or sizes.rows, vocab or sizes.vocab
    labels, kd_mask = row_targets(n, v, gen, device)
    # In-place scaling: at N x V > 2^31 every fp32 temporary is 8.6 GB.
    s = torch.randn(n, v, generator=gen, device=device).mul_(scale).to(DTYPES[dtype])
    if near:  # the teacher is the student plus a little noise: q ~ p, kd ~ 1e-5
        t = torch.randn(n, v, generator=gen, device=device).mul_(1e-2).add_(s.float()).to(DTYPES[dtype])
    else:
        t = torch.randn(n, v, generator=gen, device=device).mul_(scale).to(DTYPES[dtype])
    s_ours = s.clone().requires_grad_()
    poison_cache(device, 3 * n * v * 4)
    kd, mlm = kd_mlm_loss(s_ours, t, labels, kd_mask, temperature=temperature, impl=impl)
    (WEIGHTS[0] * kd + WEIGHTS[1] * mlm).backward()
    grad, s_ours = s_ours.grad, None
    name = f"{'near teacher' if near else 'logits'} x{scale:g}" + (" N*V>2^31" if rows else "")
    # Near the teacher kd (~1e-5) is a difference of log-sum-exps of size log V computed in fp32 from the given
    # logits, whatever their dtype: its error is measured against T^2 x 1e-2 at fp32's tolerance.
    floor = temperature**2 * 1e-2 if near else 1e-30
    errors = logits_errors((kd, mlm, grad), s, t, labels, kd_mask, temperature, sizes.ref_rows, floor)
    rec.add(name, "kd_mlm_loss", impl, dtype, temperature, errors, {"kd": TOL["fp32"]} if near else None)


def case_linear(rec, impl, dtype, temperature, scale, sizes, device, gen, *, grad_weights):
    n, v, h = sizes.rows, sizes.vocab, sizes.hidden
    labels, kd_mask = row_targets(n, v, gen, device)
    low = DTYPES[dtype]

    def draw(*shape, std):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(low)

    # logits of std `scale`: x ~ N(0, 1), w ~ N(0, scale^2 / H)
    student = [draw(n, h, std=1.0), draw(v, h, std=scale / h**0.5), draw(v, std=0.5)]
    teacher = [draw(n, h, std=1.0), draw(v, h, std=scale / h**0.5), draw(v, std=0.5)]
    ours = [p.clone().requires_grad_() for p in student]
    weights = TRAINING_WEIGHTS if grad_weights else WEIGHTS
    poison_cache(device, 4 * (sizes.chunk_rows or default_chunk_rows(v, device)) * v * 4)
    promise = weights if grad_weights else None
    kd, mlm = linear_kd_mlm_loss(*ours, *teacher, labels, kd_mask, temperature=temperature, impl=impl,
                                 chunk_rows=sizes.chunk_rows, grad_weights=promise)  # fmt: skip
    (0.5 * (weights[0] * kd + weights[1] * mlm)).backward()

    ref = [p.double().requires_grad_() for p in student]
    s = ref[0] @ ref[1].T + ref[2]
    with torch.no_grad():
        t = teacher[0].double() @ teacher[1].double().T + teacher[2].double()
    ref_kd, ref_mlm = terms64(s, t, labels, kd_mask, temperature, *counts(labels, kd_mask))
    (0.5 * (weights[0] * ref_kd + weights[1] * ref_mlm)).backward()
    pad = padding(labels, kd_mask)
    errors = {"kd": rel_err(kd, ref_kd), "mlm": rel_err(mlm, ref_mlm)}
    for name, mine, theirs in zip(("grad x", "grad w", "grad b"), ours, ref):
        errors[name] = rel_err(mine.grad, theirs.grad)
    errors["padding grad x"] = float(ours[0].grad[pad].abs().max())
    name = f"linear x{scale:g}" + (", grad_weights" if grad_weights else "")
    tols = dict.fromkeys(errors, rec.gemm_fp32_tol) if dtype == "fp32" else None
    rec.add(name, "linear_kd_mlm_loss", impl, dtype, temperature, errors, tols)


def case_rows_poisoned(rec, impl, dtype, sizes, device, gen):
    """kd_mlm_rows into NaN-filled buffers: g in `dtype` (fp32: in place over the logits), g_mlm compact."""
    n, v, temperature = sizes.rows, sizes.vocab, 2.0
    labels, kd_mask = row_targets(n, v, gen, device)
    _, kd_coef, mlm_coef = row_coefficients(labels, kd_mask, temperature)
    s = torch.randn(n, v, generator=gen, device=device) * 3
    t = torch.randn(n, v, generator=gen, device=device) * 3
    labelled, slot = mlm_slots(labels)
    g_mlm = torch.full((labelled.numel(), v), NAN, device=device)
    scale = 1024.0 if dtype == "fp16" else 1.0
    if dtype == "fp32":  # in place: the gradient overwrites the logits, a padded row stride as in the fused op
        g = torch.full((n, v + 5), NAN, device=device)[:, :v]
        g.copy_(s)
        logits = g
    else:
        g, logits = torch.full((n, v), NAN, dtype=DTYPES[dtype], device=device), s
    kd_mlm_rows(logits, t, labels, kd_coef, mlm_coef, temperature, impl=impl, g=g, g_scale=scale, g_mlm=g_mlm,
                mlm_slot=slot)  # fmt: skip
    s64 = s.double()
    log_q, log_p = F.log_softmax(s64 / temperature, -1), F.log_softmax(t.double() / temperature, -1)
    ref_g = kd_coef.double()[:, None] * (log_q.exp() - log_p.exp())
    onehot = F.one_hot(labels[labelled], v).double()
    ref_mlm = mlm_coef.double()[labelled, None] * (F.softmax(s64[labelled], -1) - onehot)
    pad = padding(labels, kd_mask)
    errors = {
        "g": rel_err(g.double() / scale, ref_g),
        "g_mlm": rel_err(g_mlm, ref_mlm),
        "padding g": float(g[pad].double().abs().max()) if pad.any() else 0.0,
    }
    rec.add("rows into NaN buffers", "kd_mlm_rows", impl, dtype, temperature, errors)


def case_cosine(rec, impl, dtype, hidden, sizes, device, gen):
    n = sizes.rows
    hs = torch.randn(n, hidden, generator=gen, device=device)
    ht = 0.3 * hs + torch.randn(n, hidden, generator=gen, device=device)
    if dtype != "fp16":  # a zero row: torch's rule gives it a gradient along t only, 1 / eps = 1e8 times it,
        hs[0] = 0.0  # beyond fp16's range (torch's own fp16 cosine overflows there too)
    ht[1] = 2.5 * hs[1]  # parallel: loss 0, gradient 0 up to rounding
    mask = torch.ones(n, dtype=torch.bool, device=device)
    mask[-max(2, n // 8) :] = False
    hs, ht = hs.to(DTYPES[dtype]), ht.to(DTYPES[dtype])
    ours = hs.clone().requires_grad_()
    poison_cache(device, 2 * n * hidden * 4)
    cos = cosine_loss(ours, ht, mask, impl=impl)
    (0.7 * cos).backward()
    ref = hs.double().requires_grad_()
    ref_cos = (1 - F.cosine_similarity(ref[mask], ht.double()[mask], dim=-1)).sum() / mask.sum()
    (0.7 * ref_cos).backward()
    zero = dtype != "fp16"
    # The zero row's gradient is ~1e8 / |t| times the others': compared apart, so it cannot hide their errors.
    errors = {"cos": rel_err(cos, ref_cos), "grad": rel_err(ours.grad[int(zero) :], ref.grad[int(zero) :])}
    if zero:
        errors["grad zero row"] = rel_err(ours.grad[0], ref.grad[0])
    errors["padding grad"] = float(ours.grad[~mask].abs().max())
    tiles = "several tiles" if hidden > sizes.hidden else "one tile"
    rec.add(f"cosine H={hidden} ({tiles})", "cosine_loss", impl, dtype, 1.0, errors)


def sweep(dtype: str, *, small: bool) -> list[tuple[float, float]]:
    """(temperature, logit scale) pairs: all of T 1, 2, 4 x scale 3, 100; --small (the interpreter is slow) keeps
    the temperatures at scale 3 and scale 100 at T = 2 in fp32, and T = 2 at both scales in bf16 and fp16."""
    if not small:
        return [(t, s) for t in (1.0, 2.0, 4.0) for s in (3.0, 100.0)]
    if dtype == "fp32":
        return [(1.0, 3.0), (2.0, 3.0), (4.0, 3.0), (2.0, 100.0)]
    return [(2.0, 3.0), (2.0, 100.0)]


def run_cases(rec: Recorder, impls: list[str], sizes: Sizes, device: torch.device, seed: int) -> None:
    """Every case for every impl, the N x V > 2^31 one right after Triton's (what a timeout should cut last)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if "triton" not in impls:
        rec.skipped.append("N*V>2^31: the 64-bit offsets are the Triton kernel's; triton is not among --impls")
    for impl in impls:
        for dtype in DTYPES:
            for temperature, scale in sweep(dtype, small=sizes == SMALL_SIZES):
                case_kd_mlm_loss(rec, impl, dtype, temperature, scale, sizes, device, gen)
                case_linear(rec, impl, dtype, temperature, scale, sizes, device, gen, grad_weights=False)
            case_linear(rec, impl, dtype, 2.0, 3.0, sizes, device, gen, grad_weights=True)
            case_kd_mlm_loss(rec, impl, dtype, 2.0, 3.0, sizes, device, gen, near=True)
            case_rows_poisoned(rec, impl, dtype, sizes, device, gen)
            for hidden in (sizes.hidden, sizes.wide_hidden):
                case_cosine(rec, impl, dtype, hidden, sizes, device, gen)
        if impl == "triton":
            case_int64(rec, sizes, device, gen)
        log(f"[verify] {impl}: {sum(c.impl == impl for c in rec.checks)} checks")


def case_int64(rec: Recorder, sizes: Sizes, device: torch.device, gen: torch.Generator) -> None:
    """bf16 logits with N x V > 2^31: the row offsets of the last rows overflow 32 bits (about 25 GB on the GPU)."""
    if device.type != "cuda" or sizes != GPU_SIZES:
        rec.skipped.append("N*V>2^31: needs about 25 GB of GPU memory; runs on a GPU without --small")
        return
    rows = 2**31 // sizes.vocab + 64
    case_kd_mlm_loss(rec, "triton", "bf16", 2.0, 3.0, sizes, device, gen, rows=rows)
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ output


def format_table(checks: list[Check]) -> str:
    """One row per case: its worst quantity (largest error over tolerance)."""
    head = f"{'case':<28}{'op':<20}{'impl':<8}{'dtype':<6}{'T':>4}  {'worst':<16}{'rel err':>10}{'tol':>9}  ok"
    lines = [head, "-" * len(head)]
    cases: dict[tuple, list[Check]] = {}
    for c in checks:
        cases.setdefault((c.case, c.op, c.impl, c.dtype, c.temperature), []).append(c)
    for (case, op, impl, dtype, temperature), group in cases.items():
        worst = max(group, key=lambda c: math.inf if not c.ok else c.rel_err / c.tol if c.tol else 0.0)
        ok = all(c.ok for c in group)
        lines.append(
            f"{case:<28}{op:<20}{impl:<8}{dtype:<6}{temperature:>4g}  {worst.quantity:<16}{worst.rel_err:>10.2e}"
            f"{worst.tol:>9.0e}  {'ok' if ok else 'FAIL'}"
        )
    return "\n".join(lines)


def write_results(out: str, rec: Recorder, about: dict) -> None:
    os.makedirs(out, exist_ok=True)
    if rec.checks:
        write_csv(rec.checks, os.path.join(out, "verify.csv"))
    passed = all(c.ok for c in rec.checks) and bool(rec.checks) and not about.get("stopped")
    result = {**about, "passed": passed, "checks": len(rec.checks)}
    result["failed"] = [asdict(c) for c in rec.checks if not c.ok]
    result["skipped"] = rec.skipped
    result["results"] = [asdict(c) for c in rec.checks]
    write_bytes(os.path.join(out, "verify.json"), json.dumps(result, indent=1, default=str).encode())


def fp32_gemm_tol() -> float:
    """TF32_TOL when torch may run fp32 GEMMs on CUDA in tf32, else TOL["fp32"]."""
    try:
        tf32 = torch.backends.cuda.matmul.allow_tf32
    except Exception:  # a torch where the legacy flag is refused: assume the fast mode
        tf32 = True
    return TF32_TOL if tf32 else TOL["fp32"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m kernels.verify", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--out", help="directory for verify.csv and verify.json")
    parser.add_argument("--small", action="store_true", help="tiny shapes")
    parser.add_argument("--dry-run", action="store_true", help="--small on the CPU, Triton through its interpreter")
    parser.add_argument("--impls", default="triton,torch", help="comma list of triton, torch (default both)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not impls or any(i not in ("triton", "torch") for i in impls):
        parser.error(f"--impls must be a comma list of triton, torch; got {args.impls!r}")
    if args.dry_run and "triton" in impls and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads the flag when it is imported, which `kernels` has done: run again with it set.
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "kernels.verify", *argv], env)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and "triton" in impls and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("impl triton on the CPU needs TRITON_INTERPRET=1 (or --dry-run, or --impls torch)")
    sizes = SMALL_SIZES if args.small or args.dry_run else GPU_SIZES
    gemm_fp32_tol = fp32_gemm_tol() if device.type == "cuda" else TOL["fp32"]
    rec = Recorder(gemm_fp32_tol)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    about = {"machine": machine(), "device": device.type, "gpu": gpu, "sizes": asdict(sizes)}
    about["interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    about["gemm_fp32_tol"] = gemm_fp32_tol
    log(f"[verify] {device.type} ({gpu}), torch {torch.__version__}, sizes {sizes}")
    start = time.perf_counter()
    # `timeout` stops a slow run with SIGTERM: exit through the finally below, which still writes what was checked.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        run_cases(rec, impls, sizes, device, args.seed)
    except SystemExit:
        rec.skipped.append("the run was stopped (SIGTERM) before every case ran")
        about["stopped"] = True
    finally:
        about["seconds"] = round(time.perf_counter() - start, 1)
        if args.out:
            write_results(args.out, rec, about)
    print(format_table(rec.checks))
    failed = [c for c in rec.checks if not c.ok]
    for reason in rec.skipped:
        print(f"skipped: {reason}")
    for c in failed:
        print(f"FAIL: {c.case} / {c.op} / {c.impl} / {c.dtype} / T={c.temperature:g}: {c.quantity} "
              f"rel err {c.rel_err:.3e} > tol {c.tol:.0e}")  # fmt: skip
    print(
        f"verify: {len(rec.checks) - len(failed)} of {len(rec.checks)} checks passed, {len(rec.skipped)} skipped "
        f"({about['seconds']:.0f} s)"
    )
    return 1 if failed or not rec.checks or about.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
