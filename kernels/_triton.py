"""Triton implementations of the three row primitives behind the fused distillation losses.

`kd_mlm_rows` handles one row (C rows, vocabulary V) per program and makes two sweeps over the vocabulary in
BLOCK_V tiles. Sweep 1 reads the student and teacher logits once and keeps online log-sum-exp statistics (running
max and rescaled sum) for s/T, t/T and s, plus the p-weighted running sum that the KL needs; the running sums are
rescaled whenever the running max grows, so large logits never overflow. Sweep 2 exists because a gradient element
needs the final normalisers of its row: it reads the logits a second time and writes each gradient element once.
No (C, V) temporary is allocated besides the requested outputs.

In-place rule: `g_kd` may be `s` itself (fp32 logits). This is safe because a program only touches its own row,
sweep 1 only reads, and sweep 2 reads tile k of s and t before it writes tile k of `g_kd`.

`linear_logits` is a tiled GEMM (fp32 accumulation, bias in the epilogue, fp32 output) and `cosine_rows` computes the
per-row cosine loss and its gradient, again one program per row with two sweeps when a row spans several tiles.

All arithmetic is fp32 whatever the storage dtype, and row offsets are 64-bit so C * V may exceed 2**31.
Under TRITON_INTERPRET=1 (CPU tensors) smaller tiles are used: the interpreter is slow, and the tests then exercise
the multi-tile code paths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cosine_rows", "kd_mlm_rows", "linear_logits"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------- helpers


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")


def _check_rows(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Exact shape, and stride 1 along the last dimension (rows may have any stride)."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if tensor.dim() == 2 and tensor.size(1) > 1 and tensor.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dimension, got strides {tensor.stride()}")


def _check_vector(name: str, tensor: torch.Tensor, length: int, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(tensor.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(tensor.shape)}")
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {tensor.dtype}")
    _check_device(name, tensor, device)


def _kd_block_v(vocab: int, on_gpu: bool) -> int:
    return min(triton.next_power_of_2(vocab), 4096 if on_gpu else 256)


def _cos_block_h(hidden: int, on_gpu: bool) -> int:
    return min(triton.next_power_of_2(hidden), 8192 if on_gpu else 256)


# ------------------------------------------------------------------------------------------------- KL + MLM per row


@triton.jit
def _kd_mlm_rows_kernel(
    s_ptr,
    t_ptr,
    labels_ptr,
    kd_coef_ptr,
    mlm_coef_ptr,
    kl_ptr,
    ce_ptr,
    g_kd_ptr,
    g_mlm_ptr,
    slot_ptr,
    V,
    s_stride,
    t_stride,
    g_kd_stride,
    g_mlm_stride,
    inv_temp,
    WRITE_KD: tl.constexpr,
    WRITE_MLM: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row: KL(p || q) at temperature T and CE at T = 1, then (optionally) their gradients w.r.t. s."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    kd_coef = tl.load(kd_coef_ptr + row)
    has_label = label != -100
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_kd_row = g_kd_ptr + row * g_kd_stride

    if (kd_coef == 0.0) & (label == -100):
        # Padding row: nothing is used but the zeros of g_kd.
        if WRITE_KD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(g_kd_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < V)
        tl.store(kl_ptr + row, 0.0)
        tl.store(ce_ptr + row, 0.0)
    else:
        # s[y], read before sweep 2 can overwrite s in place (index 0 stands in for "no label").
        s_y = tl.load(s_row + tl.where(has_label, label, 0)).to(tl.float32)

        # Sweep 1: online (max, sum) for s/T, t/T and s; w_t accumulates exp(t/T - m_t) * (t - s)/T.
        m_s = -float("inf")
        d_s = 0.0
        m_t = -float("inf")
        d_t = 0.0
        w_t = 0.0
        m_1 = -float("inf")
        d_1 = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            # Every tile holds at least one valid column, so each new max is finite and exp(-inf - max) = 0.
            zs = tl.where(mask, s * inv_temp, -float("inf"))
            zt = tl.where(mask, t * inv_temp, -float("inf"))
            z1 = tl.where(mask, s, -float("inf"))

            m_s_new = tl.maximum(m_s, tl.max(zs, axis=0))
            d_s = d_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(zs - m_s_new), axis=0)
            m_s = m_s_new

            m_t_new = tl.maximum(m_t, tl.max(zt, axis=0))
            scale_t = tl.exp(m_t - m_t_new)
            e_t = tl.exp(zt - m_t_new)
            d_t = d_t * scale_t + tl.sum(e_t, axis=0)
            w_t = w_t * scale_t + tl.sum(e_t * ((t - s) * inv_temp), axis=0)
            m_t = m_t_new

            m_1_new = tl.maximum(m_1, tl.max(z1, axis=0))
            d_1 = d_1 * tl.exp(m_1 - m_1_new) + tl.sum(tl.exp(z1 - m_1_new), axis=0)
            m_1 = m_1_new

        lse_s = m_s + tl.log(d_s)
        lse_t = m_t + tl.log(d_t)
        lse_1 = m_1 + tl.log(d_1)
        tl.store(kl_ptr + row, w_t / d_t - lse_t + lse_s)
        tl.store(ce_ptr + row, tl.where(has_label, lse_1 - s_y, 0.0))

        # Sweep 2: tile k of s (and t) is read before tile k of g_kd is written, which keeps g_kd = s safe.
        if WRITE_KD or WRITE_MLM:
            mlm_coef = tl.load(mlm_coef_ptr + row)
            slot = tl.load(slot_ptr + row) if WRITE_MLM else 0
            g_mlm_row = g_mlm_ptr + tl.where(has_label, slot, 0).to(tl.int64) * g_mlm_stride
            mlm_end = tl.where(has_label, V, 0)  # an unlabelled row stores nothing into g_mlm
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
                if WRITE_KD:
                    t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                    q = tl.exp(s * inv_temp - lse_s)
                    p = tl.exp(t * inv_temp - lse_t)
                    tl.store(g_kd_row + cols, kd_coef * (q - p), mask=mask)
                if WRITE_MLM:
                    onehot = tl.where(cols == label, 1.0, 0.0)
                    g = mlm_coef * (tl.exp(s - lse_1) - onehot)
                    tl.store(g_mlm_row + cols, g, mask=cols < mlm_end)


def kd_mlm_rows(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    kd_coef: torch.Tensor,
    mlm_coef: torch.Tensor,
    temperature: float,
    g_kd: torch.Tensor | None = None,
    g_mlm: torch.Tensor | None = None,
    mlm_slot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(softmax(t/T) || softmax(s/T)) and CE(s, y) at T = 1, in fp32, with optional gradient outputs.

    g_kd[r] = kd_coef[r] * (q - p) is written when `g_kd` ((C, V) fp32, may be `s` itself) is given, and
    g_mlm[mlm_slot[r]] = mlm_coef[r] * (softmax(s) - onehot(y)) for labelled rows when `g_mlm` is given.
    Rows with kd_coef == 0 and no label are padding: kl = ce = 0 and g_kd = 0 there. Labels must lie in [0, V) or be
    -100 (not checked: that would need a device sync).
    """
    if s.dim() != 2:
        raise ValueError(f"s must be 2-D (C, V), got shape {tuple(s.shape)}")
    n_rows, vocab = s.shape
    if vocab == 0:
        raise ValueError("s must have a non-empty vocabulary dimension")
    device = s.device
    _check_float("s", s)
    _check_float("t", t)
    _check_rows("s", s, (n_rows, vocab))
    _check_rows("t", t, (n_rows, vocab))
    _check_device("t", t, device)
    _check_vector("labels", labels, n_rows, torch.int64, device)
    _check_vector("kd_coef", kd_coef, n_rows, torch.float32, device)
    _check_vector("mlm_coef", mlm_coef, n_rows, torch.float32, device)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if g_kd is not None:
        if g_kd.dtype != torch.float32:
            raise ValueError(f"g_kd must be float32, got {g_kd.dtype}")
        _check_rows("g_kd", g_kd, (n_rows, vocab))
        _check_device("g_kd", g_kd, device)
        if g_kd.data_ptr() == s.data_ptr() and g_kd.stride() != s.stride():
            raise ValueError("g_kd aliases s with different strides; in-place needs the very same view")
    if (g_mlm is None) != (mlm_slot is None):
        raise ValueError("g_mlm and mlm_slot must be given together")
    if g_mlm is not None and mlm_slot is not None:
        if g_mlm.dim() != 2 or g_mlm.dtype != torch.float32:
            raise ValueError(f"g_mlm must be a 2-D float32 tensor, got {g_mlm.dtype} of shape {tuple(g_mlm.shape)}")
        _check_rows("g_mlm", g_mlm, (g_mlm.size(0), vocab))
        _check_device("g_mlm", g_mlm, device)
        _check_vector("mlm_slot", mlm_slot, n_rows, torch.int64, device)

    kl = torch.empty(n_rows, dtype=torch.float32, device=device)
    ce = torch.empty(n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return kl, ce
    write_kd, write_mlm = g_kd is not None, g_mlm is not None
    block_v = _kd_block_v(vocab, device.type == "cuda")
    _kd_mlm_rows_kernel[(n_rows,)](
        s,
        t,
        labels.contiguous(),
        kd_coef.contiguous(),
        mlm_coef.contiguous(),
        kl,
        ce,
        g_kd if write_kd else kl,  # placeholders are never dereferenced: the constexpr flags compile the use out
        g_mlm if write_mlm else kl,
        mlm_slot.contiguous() if mlm_slot is not None else labels,
        vocab,
        s.stride(0),
        t.stride(0),
        g_kd.stride(0) if g_kd is not None else 0,
        g_mlm.stride(0) if g_mlm is not None else 0,
        1.0 / temperature,
        WRITE_KD=write_kd,
        WRITE_MLM=write_mlm,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return kl, ce


# -------------------------------------------------------------------------------------------------- tiled x @ w.T + b


@triton.jit
def _linear_logits_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    C,
    V,
    H,
    x_stride_c,
    x_stride_h,
    w_stride_v,
    w_stride_h,
    out_stride_c,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of out = x @ w.T (+ b), accumulated in fp32 over BLOCK_K slices of H."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < C
    col_ok = cols < V
    x_tile = x_ptr + rows[:, None] * x_stride_c
    w_tile = w_ptr + cols[None, :] * w_stride_v  # read w as its transpose: a (BLOCK_K, BLOCK_N) tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, H, BLOCK_K):
        k = start + ks
        k_ok = k < H
        a = tl.load(x_tile + k[None, :] * x_stride_h, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_tile + k[:, None] * w_stride_h, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride_c + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def linear_logits(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(C, V) fp32 logits x @ w.T + b, from a tiled GEMM with fp32 accumulation; x and w may have any strides.

    `out`, when given, is a (C, V) fp32 buffer with unit stride along V to write into (reused across chunks).

    fp32 inputs follow torch's global matmul precision: IEEE fp32 products under "highest" (the default), TF32
    otherwise, so the result matches `x @ w.T` computed by torch in the same setting.
    """
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x and w must be 2-D, got shapes {tuple(x.shape)} and {tuple(w.shape)}")
    n_rows, hidden = x.shape
    vocab = w.size(0)
    if w.size(1) != hidden:
        raise ValueError(f"w must have shape (V, {hidden}), got {tuple(w.shape)}")
    _check_float("x", x)
    if w.dtype != x.dtype:
        raise ValueError(f"x and w must share a dtype, got {x.dtype} and {w.dtype}")
    device = x.device
    _check_device("w", w, device)
    if b is not None:
        if tuple(b.shape) != (vocab,):
            raise ValueError(f"b must have shape ({vocab},), got {tuple(b.shape)}")
        _check_float("b", b)
        _check_device("b", b, device)

    if out is None:
        out = torch.empty(n_rows, vocab, dtype=torch.float32, device=device)
    elif out.shape != (n_rows, vocab) or out.dtype != torch.float32 or (vocab > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be a ({n_rows}, {vocab}) fp32 buffer with unit stride along V")
    if n_rows == 0 or vocab == 0:
        return out
    block_m, block_n, block_k = 64, 128, 32
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(vocab, block_n))
    _linear_logits_kernel[grid](
        x,
        w,
        b if b is not None else out,  # placeholder, compiled out when HAS_BIAS is False
        out,
        n_rows,
        vocab,
        hidden,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        HAS_BIAS=b is not None,
        PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=3,
    )
    return out


# ------------------------------------------------------------------------------------------------- cosine loss per row


@triton.jit
def _cosine_rows_kernel(
    hs_ptr,
    ht_ptr,
    coef_ptr,
    loss_ptr,
    grad_ptr,
    H,
    hs_stride,
    ht_stride,
    grad_stride,
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


def cosine_rows(
    hs: torch.Tensor, ht: torch.Tensor, coef: torch.Tensor, eps: float = 1e-8, need_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row 1 - cosine_similarity(hs, ht) (torch semantics, norms clamped at eps) and coef * its gradient w.r.t. hs.

    Returns (loss (C,) fp32, grad (C, H) fp32 or None when `need_grad` is False).
    """
    if hs.dim() != 2:
        raise ValueError(f"hs must be 2-D (C, H), got shape {tuple(hs.shape)}")
    n_rows, hidden = hs.shape
    device = hs.device
    _check_float("hs", hs)
    _check_float("ht", ht)
    _check_rows("hs", hs, (n_rows, hidden))
    _check_rows("ht", ht, (n_rows, hidden))
    _check_device("ht", ht, device)
    _check_vector("coef", coef, n_rows, torch.float32, device)

    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = torch.empty(n_rows, hidden, dtype=torch.float32, device=device) if need_grad else None
    if n_rows == 0:
        return loss, grad
    block_h = _cos_block_h(max(hidden, 1), device.type == "cuda")
    _cosine_rows_kernel[(n_rows,)](
        hs,
        ht,
        coef.contiguous(),
        loss,
        grad if grad is not None else loss,  # placeholder, compiled out when NEED_GRAD is False
        hidden,
        hs.stride(0),
        ht.stride(0),
        grad.stride(0) if grad is not None else 0,
        eps,
        NEED_GRAD=need_grad,
        ONE_TILE=hidden <= block_h,
        BLOCK_H=block_h,
        num_warps=8 if block_h >= 4096 else 4,
    )
    return loss, grad
