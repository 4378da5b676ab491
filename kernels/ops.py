r"""The fused distillation losses: autograd functions over the Triton or torch row primitives.

Definitions (rows r; s, t student and teacher logits; T the temperature; p = softmax(t/T), q = softmax(s/T)):

    kd  = T^2 / |R_kd| * sum_{r in R_kd} KL(p_r || q_r)       R_kd: rows where kd_mask is non-zero
    mlm = 1 / |R_mlm| * sum_{r in R_mlm} (lse(s_r) - s_{r,y})  R_mlm: rows whose label is not -100
    cos = 1 / |R_cos| * sum_{r in R_cos} (1 - cos(h_s, h_t))   R_cos: rows where mask is non-zero

An empty row set gives 0, never NaN. Gradients flow to the student tensors only; teacher tensors are treated
as constants.

How the work is scheduled. The loss is the end of the graph, so each forward computes the gradient too,
block of rows by block of rows, and backward only scales what forward stored by the incoming gradients.
kd and mlm get separate gradient buffers because their incoming gradients are independent; the MLM buffers
only hold the labelled rows (about 15% of them), so keeping the two apart costs little. `linear_kd_mlm_loss`
makes each block's logits from x @ w.T + b in fp32, turns them into the gradient in place, and feeds that
straight into the two gradient GEMMs: four GEMMs over the kd rows (teacher and student logits, d/dx, d/dw)
plus two over the labelled rows, and O(chunk_rows x V) memory. Recomputing the logits in backward instead,
as Cut Cross-Entropy does, would need two more GEMMs, and would need the LM-head weight again in backward,
when ZeRO-3 has already taken it away; this schedule needs nothing from the weight after forward.

Backward may run once per forward: it scales the stored gradient buffers in place, so a second backward
through the same graph (retain_graph) raises instead of silently returning wrong gradients.

torch.compile: the functions count rows on the host (`nonzero`) and are autograd.Functions with Python-side
chunk loops, so dynamo does not trace into them: expect one graph break at each call, the rest of the model
compiles around it. They are not registered as custom ops.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import NamedTuple

import torch

from kernels import _torch

IGNORE_INDEX = -100
IMPLS = ("auto", "torch", "triton")
# Memory for one (chunk_rows, V) fp32 block of the torch path; a handful of such blocks are alive at once.
_TORCH_BLOCK_BYTES = 64 << 20
_TRITON_BLOCK_BYTES = 128 << 20  # a first guess: not tuned on a GPU yet


def _backend(impl: str, device: torch.device) -> ModuleType:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "torch"
    if impl == "torch":
        return _torch
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported for CPU tensors"
        )
    from kernels import _triton  # imported on first use: triton reads TRITON_INTERPRET at import time

    return _triton


def default_chunk_rows(vocab: int, backend: ModuleType) -> int:
    """Rows per block so that one (rows, vocab) fp32 block stays within the backend's budget."""
    budget = _TORCH_BLOCK_BYTES if backend is _torch else _TRITON_BLOCK_BYTES
    return max(16, budget // (4 * vocab) // 16 * 16)


def _flat(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) -> (rows, width) with a unit stride along width (what the row primitives need)."""
    x = x.reshape(-1, width)
    return x if x.stride(-1) == 1 else x.contiguous()


class _RowSets(NamedTuple):
    labelled: torch.Tensor  # (N,) bool
    kd_weight: torch.Tensor  # (N,) fp32: kd = sum_r kl_r * kd_weight_r
    kd_coef: torch.Tensor  # (N,) fp32: d kd / d s_r = kd_coef_r * (q_r - p_r)
    mlm_coef: torch.Tensor  # (N,) fp32: mlm = sum_r ce_r * mlm_coef_r, and the gradient's scale


def _row_sets(labels: torch.Tensor, kd_mask: torch.Tensor, temperature: float) -> _RowSets:
    labelled = labels != IGNORE_INDEX
    kd_rows = (kd_mask != 0).float()
    kd_norm = kd_rows / kd_rows.sum().clamp(min=1)  # clamp, not a branch: no host sync
    mlm_rows = labelled.float()
    return _RowSets(labelled, temperature**2 * kd_norm, temperature * kd_norm, mlm_rows / mlm_rows.sum().clamp(min=1))


def _check_rows(what: str, labels: torch.Tensor, kd_mask: torch.Tensor, rows: int) -> None:
    if labels.numel() != rows or kd_mask.numel() != rows:
        raise ValueError(
            f"{what}: labels has {labels.numel()} and kd_mask {kd_mask.numel()} elements, but there are {rows} rows"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: labels must be int64 (or int32), got {labels.dtype}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _slots(labelled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of labelled rows, per-row slot into a compact buffer of them or -1); syncs once for the count."""
    rows = labelled.nonzero().squeeze(-1)
    slot = torch.full(labelled.shape, -1, dtype=torch.int64, device=labelled.device)
    slot[rows] = torch.arange(rows.numel(), device=labelled.device)
    return rows, slot


class _KdMlmLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, kd_mask, temperature, impl, chunk_rows):
        vocab = s.shape[-1]
        backend = _backend(impl, s.device)
        s2, t2 = _flat(s, vocab), _flat(t, vocab)
        labels, kd_mask = labels.reshape(-1).long(), kd_mask.reshape(-1)
        sets = _row_sets(labels, kd_mask, temperature)
        need_grad = ctx.needs_input_grad[0]
        n = s2.shape[0]
        g_kd = g_mlm = mlm_rows = slot = None
        if need_grad:
            mlm_rows, slot = _slots(sets.labelled)
            g_kd = torch.empty(s2.shape, dtype=torch.float32, device=s.device)
            g_mlm = torch.empty((mlm_rows.numel(), vocab), dtype=torch.float32, device=s.device)
        kl = torch.empty(n, dtype=torch.float32, device=s.device)
        ce = torch.empty_like(kl)
        step = chunk_rows or (default_chunk_rows(vocab, backend) if backend is _torch else max(n, 1))
        for i in range(0, n, step):
            j = min(i + step, n)
            kl[i:j], ce[i:j] = backend.kd_mlm_rows(
                s2[i:j],
                t2[i:j],
                labels[i:j],
                sets.kd_coef[i:j],
                sets.mlm_coef[i:j],
                temperature,
                g_kd=None if g_kd is None else g_kd[i:j],
                g_mlm=g_mlm,
                mlm_slot=None if slot is None else slot[i:j],
            )
        ctx.grads = (g_kd, g_mlm, mlm_rows)
        ctx.shape_dtype = (s.shape, s.dtype)
        return (kl * sets.kd_weight).sum(), (ce * sets.mlm_coef).sum()

    @staticmethod
    def backward(ctx, grad_kd, grad_mlm):
        if ctx.grads is None:
            raise RuntimeError("kd_mlm_loss: backward ran twice through one forward; recompute the loss instead")
        g_kd, g_mlm, mlm_rows = ctx.grads
        ctx.grads = None
        grad = None
        if g_kd is not None:
            grad = g_kd.mul_(grad_kd).index_add_(0, mlm_rows, g_mlm.mul_(grad_mlm))
            shape, dtype = ctx.shape_dtype
            grad = grad.reshape(shape).to(dtype)
        return grad, None, None, None, None, None, None


class _GradSums:
    """The gradients w.r.t. x (rows), w and b of one loss term, accumulated block by block in fp32."""

    def __init__(self, rows: int, w: torch.Tensor, need: tuple[bool, bool, bool]):
        f32 = {"dtype": torch.float32, "device": w.device}
        self.x = torch.zeros((rows, w.shape[1]), **f32) if need[0] else None
        self.w = torch.zeros(w.shape, **f32) if need[1] else None
        self.b = torch.zeros(w.shape[0], **f32) if need[2] else None

    def add(self, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rows: slice) -> None:
        """g: (rows, V) d loss / d logits of the block whose inputs are x (rows, H)."""
        if self.x is not None:
            self.x[rows] = _torch.matmul_fp32(g, w)
        if self.w is not None:
            if x.dtype == torch.float32:
                self.w.addmm_(g.T, x)  # in place: no (V, H) temporary
            else:
                self.w += _torch.matmul_fp32(g.T, x)
        if self.b is not None:
            self.b += g.sum(0)

    def scale_(self, factor: torch.Tensor) -> _GradSums:
        for grad in (self.x, self.w, self.b):
            if grad is not None:
                grad.mul_(factor)
        return self


def _check_ratio(grad_kd: torch.Tensor, grad_mlm: torch.Tensor, weights: tuple[float, float]) -> torch.Tensor:
    """The common factor f of (grad_kd, grad_mlm) = f * weights; raises if they are not in that ratio."""
    a, b = weights
    if not torch.isclose(grad_kd * b, grad_mlm * a, rtol=1e-5, atol=1e-12 * (abs(a) + abs(b))):
        raise RuntimeError(
            f"linear_kd_mlm_loss: called with grad_weights={weights}, but the gradients reaching kd and mlm are "
            f"{grad_kd.item():.6g} and {grad_mlm.item():.6g}; drop grad_weights or backpropagate "
            f"{a} * kd + {b} * mlm"
        )
    return grad_kd / a if a != 0 else grad_mlm / b


class _LinearKdMlmLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, labels, kd_mask, temperature, impl, chunk_rows, grad_weights):
        (vocab, width), device = ws.shape, xs.device
        backend = _backend(impl, device)
        xs2, xt2 = _flat(xs, width), _flat(xt, width)
        if backend is _torch and device.type == "cpu" and ws.dtype != torch.float32:
            # no low-precision GEMM with an fp32 result on the CPU: upcast the heads once, not per block
            xs2, ws, xt2, wt = xs2.float(), ws.float(), xt2.float(), wt.float()
        labels, kd_mask = labels.reshape(-1).long(), kd_mask.reshape(-1)
        sets = _row_sets(labels, kd_mask, temperature)
        # Rows with neither a kd weight nor a label contribute nothing: drop them before any GEMM.
        active = ((kd_mask != 0) | sets.labelled).nonzero().squeeze(-1)
        all_active = active.numel() == xs2.shape[0]
        if not all_active:
            xs2, xt2, labels = xs2[active], xt2[active], labels[active]
            sets = _RowSets(*(v[active] for v in sets))
        mlm_rows, slot = _slots(sets.labelled)
        n, m = xs2.shape[0], mlm_rows.numel()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bs is not None and ctx.needs_input_grad[2])
        kd_coef, mlm_coef = sets.kd_coef, sets.mlm_coef
        main = mlm_sums = None
        if any(need):
            main = _GradSums(n, ws, need)
            if grad_weights is None:  # kd and mlm may receive unrelated gradients: keep their sums apart
                mlm_sums = _GradSums(m, ws, need)
            else:  # one sum of a * d kd + b * d mlm
                kd_coef, mlm_coef = kd_coef * grad_weights[0], mlm_coef * grad_weights[1]

        f32 = {"dtype": torch.float32, "device": device}
        kd = torch.zeros((), **f32)
        mlm = torch.zeros((), **f32)
        step = min(chunk_rows or default_chunk_rows(vocab, backend), max(n, 1))
        s_buf, t_buf = torch.empty((step, vocab), **f32), torch.empty((step, vocab), **f32)  # reused by every block
        starts = list(range(0, n, step))
        # where each block's labelled rows begin in the compact list: one host sync for all blocks
        bounds = torch.searchsorted(mlm_rows, torch.tensor(starts + [n], device=device)).tolist()
        for k, i in enumerate(starts):
            j = min(i + step, n)
            a, b = bounds[k], bounds[k + 1]
            s = backend.linear_logits(xs2[i:j], ws, bs, out=s_buf[: j - i])
            t = backend.linear_logits(xt2[i:j], wt, bt, out=t_buf[: j - i])
            g_mlm = torch.empty((b - a, vocab), **f32) if main is not None else None
            kl, ce = backend.kd_mlm_rows(
                s,
                t,
                labels[i:j],
                kd_coef[i:j],
                mlm_coef[i:j],
                temperature,
                g_kd=s if main is not None else None,  # the gradient overwrites the logits block in place
                g_mlm=g_mlm,
                mlm_slot=(slot[i:j] - a).clamp(min=-1) if main is not None else None,
            )
            kd += (kl * sets.kd_weight[i:j]).sum()
            mlm += (ce * sets.mlm_coef[i:j]).sum()
            if main is None:
                continue
            local = mlm_rows[a:b] - i
            if mlm_sums is None:
                main.add(s.index_add_(0, local, g_mlm), xs2[i:j], ws, slice(i, j))
            else:
                main.add(s, xs2[i:j], ws, slice(i, j))
                mlm_sums.add(g_mlm, xs2[i:j][local], ws, slice(a, b))
        ctx.sums = (main, mlm_sums)
        ctx.rows = (None if all_active else active, mlm_rows)
        ctx.like = (xs.shape, xs.dtype, ws.dtype, None if bs is None else bs.dtype)
        ctx.grad_weights = grad_weights
        return kd, mlm

    @staticmethod
    def backward(ctx, grad_kd, grad_mlm):
        if ctx.sums is None:
            raise RuntimeError("linear_kd_mlm_loss: backward ran twice through one forward; recompute the loss instead")
        main, mlm_sums = ctx.sums
        ctx.sums = None
        if main is None:
            return (None,) * 12
        active, mlm_rows = ctx.rows
        x_shape, x_dtype, w_dtype, b_dtype = ctx.like
        if mlm_sums is None:
            main.scale_(_check_ratio(grad_kd, grad_mlm, ctx.grad_weights))
        else:
            main.scale_(grad_kd)
            mlm_sums.scale_(grad_mlm)
            if main.x is not None:
                main.x.index_add_(0, mlm_rows, mlm_sums.x)
            if main.w is not None:
                main.w += mlm_sums.w
            if main.b is not None:
                main.b += mlm_sums.b
        grad_x = grad_w = grad_b = None
        if main.x is not None:
            if active is None:
                grad_x = main.x.to(x_dtype).reshape(x_shape)
            else:
                grad_x = torch.zeros(x_shape, dtype=x_dtype, device=main.x.device)
                grad_x.view(-1, x_shape[-1]).index_copy_(0, active, main.x.to(x_dtype))
        if main.w is not None:
            grad_w = main.w.to(w_dtype)
        if main.b is not None:
            grad_b = main.b.to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


class _CosineLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ht, mask, impl, eps):
        width = hs.shape[-1]
        backend = _backend(impl, hs.device)
        rows = (mask.reshape(-1) != 0).float()
        coef = rows / rows.sum().clamp(min=1)
        loss, grad = backend.cosine_rows(_flat(hs, width), _flat(ht, width), coef, eps, ctx.needs_input_grad[0])
        ctx.grad = grad
        ctx.like = hs
        return (loss * coef).sum()

    @staticmethod
    def backward(ctx, grad_cos):
        if ctx.grad is None:
            return None, None, None, None, None
        hs = ctx.like
        return ctx.grad.mul(grad_cos).to(hs.dtype).reshape(hs.shape), None, None, None, None


def kd_mlm_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    temperature: float,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd, mlm) of (..., V) logits in one sweep pair per row; the only (N, V) buffer is the gradient.

    `labels` and `kd_mask` have the logits' leading shape; kd_mask is bool or 0/1. Any float dtype, fp32 math.
    """
    _check_temperature(temperature)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"kd_mlm_loss: teacher logits {tuple(teacher_logits.shape)} != student's {tuple(student_logits.shape)}"
        )
    _check_rows("kd_mlm_loss", labels, kd_mask, student_logits.numel() // max(student_logits.shape[-1], 1))
    return _KdMlmLoss.apply(
        student_logits, teacher_logits.detach(), labels, kd_mask, float(temperature), impl, chunk_rows
    )


def linear_kd_mlm_loss(
    student_x: torch.Tensor,
    student_w: torch.Tensor,
    student_b: torch.Tensor | None,
    teacher_x: torch.Tensor,
    teacher_w: torch.Tensor,
    teacher_b: torch.Tensor | None,
    labels: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    temperature: float,
    impl: str = "auto",
    chunk_rows: int | None = None,
    grad_weights: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd, mlm) with both LM heads fused in: logits = x @ w.T + b are made a block of rows at a time.

    x is (..., H), w (V, H), b (V,) or None. Gradients for student_x, student_w and student_b are all computed
    in forward, so the weight is not needed after this call returns (what ZeRO-3 requires).
    `chunk_rows` overrides the rows per block (default: a 64 MB fp32 block on the torch path, 128 MB on Triton).

    `grad_weights=(a, b)` promises that what is backpropagated is a * kd + b * mlm (times any factor), as in
    training. Forward then keeps one gradient sum instead of two, which saves a (V, H) fp32 buffer and the
    GEMMs of the labelled rows' separate gradient. Backward checks the promise and raises if it is broken.
    """
    _check_temperature(temperature)
    for side, x, w, b in (("student", student_x, student_w, student_b), ("teacher", teacher_x, teacher_w, teacher_b)):
        if w.dim() != 2 or x.shape[-1] != w.shape[1] or (b is not None and b.shape != (w.shape[0],)):
            bias = None if b is None else tuple(b.shape)
            raise ValueError(
                f"linear_kd_mlm_loss: {side} x {tuple(x.shape)}, w {tuple(w.shape)}, b {bias} do not make logits"
            )
    if teacher_w.shape[0] != student_w.shape[0] or teacher_x.shape[:-1] != student_x.shape[:-1]:
        raise ValueError(
            f"linear_kd_mlm_loss: teacher x {tuple(teacher_x.shape)} / w {tuple(teacher_w.shape)} do not match "
            f"student x {tuple(student_x.shape)} / w {tuple(student_w.shape)} in rows and vocabulary"
        )
    _check_rows("linear_kd_mlm_loss", labels, kd_mask, student_x.numel() // max(student_x.shape[-1], 1))
    if grad_weights is not None and (len(grad_weights) != 2 or not any(grad_weights)):
        raise ValueError(f"linear_kd_mlm_loss: grad_weights must be two numbers, not both 0, got {grad_weights}")
    return _LinearKdMlmLoss.apply(
        student_x,
        student_w,
        student_b,
        teacher_x.detach(),
        teacher_w.detach(),
        None if teacher_b is None else teacher_b.detach(),
        labels,
        kd_mask,
        float(temperature),
        impl,
        chunk_rows,
        None if grad_weights is None else (float(grad_weights[0]), float(grad_weights[1])),
    )


def cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """Mean over rows where `mask` is non-zero of 1 - cos(h_s, h_t), eps = 1e-8 as torch's cosine_similarity."""
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"cosine_loss: teacher hidden {tuple(teacher_hidden.shape)} != student's {tuple(student_hidden.shape)}"
        )
    rows = student_hidden.numel() // max(student_hidden.shape[-1], 1)
    if mask.numel() != rows:
        raise ValueError(f"cosine_loss: mask has {mask.numel()} elements, but there are {rows} rows")
    return _CosineLoss.apply(student_hidden, teacher_hidden.detach(), mask, impl, 1e-8)
