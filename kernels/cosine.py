r"""The cosine loss between student and teacher hidden states, row by row.

    cos = 1 / |R| * sum_{r in R} (1 - cos(h_s, h_t))      R: rows where mask is non-zero

with torch's eps clamping, cos(s, t) = <s, t> / (max(|s|, eps) * max(|t|, eps)), and its gradient

    d cos / d s = t / (Ns Nt) - cos * s / (Ns |s|),      Ns, Nt the clamped norms,

with s / |s| taken as 0 for a zero row: the gradient torch's own cosine_similarity gives, clamped or not. The
loss is the end of the graph, so forward computes the gradient too and backward only scales it. The teacher is
a constant. The Triton kernel keeps a row in registers when it fits one tile, and makes two sweeps otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.contract import check_device, check_float, check_rows, check_vector, flat, use_triton

EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


def tile(hidden: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_H, num_warps) of the row kernel; a row of at most BLOCK_H elements stays in registers."""
    block_h = min(triton.next_power_of_2(max(hidden, 1)), 4096 if on_gpu else 256)
    return block_h, 8 if block_h >= 4096 else 4


@triton.jit
def _cosine_rows_kernel(
    hs_ptr,
    ht_ptr,
    coef_ptr,
    loss_ptr,
    grad_ptr,
    hs_stride,
    ht_stride,
    grad_stride,
    H,
    eps,
    NEED_GRAD: tl.constexpr,
    ONE_TILE: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One row: 1 - cos(s, t) with clamped norms, and coef * d(1 - cos)/ds; one tile kept in registers if it fits."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    s_row = hs_ptr + row * hs_stride
    t_row = ht_ptr + row * ht_stride
    g_row = grad_ptr + row * grad_stride

    # Sweep 1: <s, s>, <t, t>, <s, t>, accumulated lane-wise and reduced once.
    if ONE_TILE:
        mask = offs < H
        s = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        ss = tl.sum(s * s, axis=0)
        tt = tl.sum(t * t, axis=0)
        st = tl.sum(s * t, axis=0)
    else:
        acc_ss = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc_tt = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc_st = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            cols = start + offs
            mask = cols < H
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            acc_ss += s * s
            acc_tt += t * t
            acc_st += s * t
        ss = tl.sum(acc_ss, axis=0)
        tt = tl.sum(acc_tt, axis=0)
        st = tl.sum(acc_st, axis=0)

    norm_s = tl.sqrt(ss)
    clamped_s = tl.maximum(norm_s, eps)
    clamped_t = tl.maximum(tl.sqrt(tt), eps)
    cos = st / (clamped_s * clamped_t)
    tl.store(loss_ptr + row, 1.0 - cos)

    # Sweep 2: coef * (cos * s / (Ns * ns) - t / (Ns * Nt)), with s / ns taken as 0 for a zero row (torch's rule).
    if NEED_GRAD:
        coef = tl.load(coef_ptr + row)
        a = coef * cos / tl.where(norm_s > 0.0, clamped_s * norm_s, 1.0)
        a = tl.where(norm_s > 0.0, a, 0.0)
        c = coef / (clamped_s * clamped_t)
        if ONE_TILE:
            tl.store(g_row + offs, a * s - c * t, mask=mask)
        else:
            for start in range(0, H, BLOCK_H):
                cols = start + offs
                mask = cols < H
                s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
                t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(g_row + cols, a * s - c * t, mask=mask)


def _rows_triton(hs, ht, coef, eps, need_grad):
    n_rows, hidden = hs.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=hs.device)
    grad = torch.empty(n_rows, hidden, dtype=torch.float32, device=hs.device) if need_grad else None
    if n_rows == 0:
        return loss, grad
    block_h, num_warps = tile(hidden, hs.device.type == "cuda")
    _cosine_rows_kernel[(n_rows,)](
        hs,
        ht,
        coef,
        loss,
        loss if grad is None else grad,  # placeholder, compiled out when NEED_GRAD is False
        hs.stride(0),
        ht.stride(0),
        0 if grad is None else grad.stride(0),
        hidden,
        eps,
        NEED_GRAD=need_grad,
        ONE_TILE=hidden <= block_h,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return loss, grad


def _rows_torch(hs, ht, coef, eps, need_grad):
    s, t = hs.float(), ht.float()
    dot = (s * t).sum(-1)
    norm_s, norm_t = s.norm(dim=-1), t.norm(dim=-1)
    clamped_s, clamped_t = norm_s.clamp_min(eps), norm_t.clamp_min(eps)
    cos = dot / (clamped_s * clamped_t)
    if not need_grad:
        return 1.0 - cos, None
    inv_norm_s = torch.where(norm_s > 0, norm_s.reciprocal(), 0.0)
    along_s = (coef * cos * inv_norm_s / clamped_s).unsqueeze(-1)
    along_t = (coef / (clamped_s * clamped_t)).unsqueeze(-1)
    return 1.0 - cos, s * along_s - t * along_t


def cosine_rows(
    hs: torch.Tensor,
    ht: torch.Tensor,
    coef: torch.Tensor,
    eps: float = EPS,
    need_grad: bool = True,
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row 1 - cosine_similarity(hs, ht) (torch semantics, norms clamped at eps) and coef * its gradient w.r.t. hs.

    Returns (loss (C,) fp32, grad (C, H) fp32 or None when `need_grad` is False).
    """
    if hs.dim() != 2:
        raise ValueError(f"hs must be 2-D (C, H), got shape {tuple(hs.shape)}")
    n_rows, hidden = hs.shape
    device = hs.device
    check_float("hs", hs)
    check_float("ht", ht)
    check_rows("hs", hs, (n_rows, hidden))
    check_rows("ht", ht, (n_rows, hidden))
    check_device("ht", ht, device)
    check_vector("coef", coef, n_rows, torch.float32, device)
    rows = _rows_triton if use_triton(impl, device) else _rows_torch
    return rows(hs, ht, coef, eps, need_grad)


class _CosineLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ht, mask, impl, eps):
        width = hs.shape[-1]
        rows = (mask.reshape(-1) != 0).float()
        coef = rows / rows.sum().clamp(min=1)
        loss, grad = cosine_rows(flat(hs, width), flat(ht, width), coef, eps, ctx.needs_input_grad[0], impl=impl)
        ctx.grad = grad
        ctx.like = (hs.shape, hs.dtype)
        return (loss * coef).sum()

    @staticmethod
    def backward(ctx, grad_cos):
        if ctx.grad is None:
            return None, None, None, None, None
        shape, dtype = ctx.like
        return ctx.grad.mul(grad_cos).to(dtype).reshape(shape), None, None, None, None


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
    return _CosineLoss.apply(student_hidden, teacher_hidden.detach(), mask, impl, EPS)
