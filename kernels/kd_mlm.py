r"""Temperature KL to the teacher and MLM cross-entropy over the vocabulary, row by row.

Rows r; s, t the student and teacher logits; T the temperature; p = softmax(t/T), q = softmax(s/T):

    kd  = T^2 / |R_kd| * sum_{r in R_kd} KL(p_r || q_r)       R_kd: rows where kd_mask is non-zero
    mlm = 1 / |R_mlm| * sum_{r in R_mlm} (lse(s_r) - s_{r,y})  R_mlm: rows whose label is not -100

With KL(p || q) = sum_v p_v (t_v - s_v) / T - lse(t/T) + lse(s/T), one sweep over a row collects everything the
values need: online (max, rescaled sum) pairs for s/T, t/T and s, and the p-weighted sum of (t - s)/T. The
gradients are d kd / d s_r = T / |R_kd| * (q_r - p_r) and d mlm / d s_r = (softmax(s_r) - onehot(y_r)) / |R_mlm|;
an element of either needs its row's final normalisers, so a second sweep writes them. An empty row set gives
0, never NaN. The teacher is a constant.

The row primitive `kd_mlm_rows` takes per-row coefficients (kd_coef = T / |R_kd| on kd rows, 0 elsewhere;
mlm_coef = 1 / |R_mlm| on labelled rows) and writes either two gradients (g: the kd one, g_mlm: the mlm one
into a compact buffer of labelled rows) or, with fold_mlm, their sum into g alone. g may be s itself (fp32
logits, overwritten in place) or a lower-precision buffer, written scaled by g_scale so that fp16 does not
flush small gradients to zero.

`kd_mlm_loss` is the op on (..., V) logits: the (N, V) gradient is its only vocabulary-sized buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.contract import (
    IGNORE_INDEX,
    check_device,
    check_float,
    check_rows,
    check_temperature,
    check_vector,
    flat,
    use_triton,
)

# Memory for one (chunk_rows, V) fp32 block of the torch twin: a handful of such blocks are alive at once.
TORCH_BLOCK_BYTES = 64 << 20
# Bytes of one fp32 (rows, V) temporary of the twin's KL sub-blocks: small enough to stay in cache.
_SUB_BYTES = 4 << 20


def tile(vocab: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernel: 8 fp32 elements per thread and tile on a GPU, which sm_80 and
    sm_90 compile without spills (16 spill on sm_80; kernels.compile_check). The interpreter is slow: small
    tiles there, which also exercise the multi-tile paths in the tests."""
    block_v = min(triton.next_power_of_2(vocab), 2048 if on_gpu else 256)
    return block_v, 8 if block_v >= 2048 else 4


@triton.jit
def _kd_mlm_rows_kernel(
    s_ptr,
    t_ptr,
    labels_ptr,
    kd_coef_ptr,
    mlm_coef_ptr,
    kl_ptr,
    ce_ptr,
    g_ptr,
    g_mlm_ptr,
    slot_ptr,
    s_stride,
    t_stride,
    g_stride,
    g_mlm_stride,
    V,
    inv_temp,
    g_scale,
    WRITE_G: tl.constexpr,
    FOLD_MLM: tl.constexpr,
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
    g_row = g_ptr + row * g_stride

    if (kd_coef == 0.0) & (label == -100):
        # Padding row: nothing is used but the zeros of g.
        if WRITE_G:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty), mask=cols < V)
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

        # Sweep 2: tile k of s (and t) is read before tile k of g is written, which keeps g = s safe.
        if WRITE_G or WRITE_MLM:
            mlm_coef = tl.where(has_label, tl.load(mlm_coef_ptr + row), 0.0)
            slot = tl.load(slot_ptr + row) if WRITE_MLM else 0
            g_mlm_row = g_mlm_ptr + tl.where(has_label, slot, 0).to(tl.int64) * g_mlm_stride
            mlm_end = tl.where(has_label, V, 0)  # an unlabelled row stores nothing into g_mlm
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
                g_ce = mlm_coef * (tl.exp(s - lse_1) - tl.where(cols == label, 1.0, 0.0))
                if WRITE_G:
                    t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                    g = kd_coef * (tl.exp(s * inv_temp - lse_s) - tl.exp(t * inv_temp - lse_t))
                    if FOLD_MLM:
                        g += g_ce
                    tl.store(g_row + cols, (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)
                if WRITE_MLM:
                    tl.store(g_mlm_row + cols, g_ce, mask=cols < mlm_end)


def _rows_triton(s, t, labels, kd_coef, mlm_coef, temperature, g, g_scale, fold_mlm, g_mlm, mlm_slot):
    n_rows, vocab = s.shape
    kl = torch.empty(n_rows, dtype=torch.float32, device=s.device)
    ce = torch.empty_like(kl)
    if n_rows == 0:
        return kl, ce
    block_v, num_warps = tile(vocab, s.device.type == "cuda")
    _kd_mlm_rows_kernel[(n_rows,)](
        s,
        t,
        labels,
        kd_coef,
        mlm_coef,
        kl,
        ce,
        kl if g is None else g,  # placeholders are never dereferenced: the constexpr flags compile the use out
        kl if g_mlm is None else g_mlm,
        labels if mlm_slot is None else mlm_slot,
        s.stride(0),
        t.stride(0),
        0 if g is None else g.stride(0),
        0 if g_mlm is None else g_mlm.stride(0),
        vocab,
        1.0 / temperature,
        g_scale,
        WRITE_G=g is not None,
        FOLD_MLM=fold_mlm,
        WRITE_MLM=g_mlm is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return kl, ce


def _lse(z: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """logsumexp of z's rows from prob = softmax(z): at a row's maximum prob = 1 / sum exp(z - max), exactly the
    normaliser, and no exponential is taken again (torch's exp is several times slower than its softmax)."""
    return z.amax(-1) - prob.amax(-1).log()


def _rows_torch(s, t, labels, kd_coef, mlm_coef, temperature, g, g_scale, fold_mlm, g_mlm, mlm_slot):
    """The same rows in torch: the MLM side first (labelled rows only), then the KL over cache-sized sub-blocks.

    Each side takes one softmax: KL(p || q) = <p, z_t - z_s> - lse(z_t) + lse(z_s) with z = logits / T, the
    normalisers read off the softmaxes (`_lse`). The MLM side reads s before the KL loop may overwrite it in
    place; its folded gradient is added last.
    """
    rows, vocab = s.shape
    inv_t = 1.0 / temperature
    kl = torch.empty(rows, dtype=torch.float32, device=s.device)
    ce = torch.zeros(rows, dtype=torch.float32, device=s.device)
    labelled = (labels != IGNORE_INDEX).nonzero().squeeze(-1)  # a host sync: the twin is the CPU path
    g_ce = None
    if labelled.numel():
        y = labels[labelled].unsqueeze(-1)
        s_l = s.index_select(0, labelled).float()
        prob = torch.softmax(s_l, dim=-1)
        ce[labelled] = _lse(s_l, prob) - s_l.gather(-1, y).squeeze(-1)
        if g_mlm is not None or (fold_mlm and g is not None):
            g_ce = prob.scatter_add_(-1, y, torch.full_like(prob[:, :1], -1.0))
            g_ce.mul_(mlm_coef[labelled].unsqueeze(-1))
            if g_mlm is not None:
                g_mlm.index_copy_(0, mlm_slot[labelled], g_ce)
    step = max(1, min(rows, _SUB_BYTES // (4 * max(vocab, 1))))
    # four sub-block temporaries, made once: fresh ones per sub-block would each be page-faulted in anew
    scratch = torch.empty((4, step, vocab), dtype=torch.float32, device=s.device)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        z_t, z_s, p, q = scratch[:, : b - a]
        torch.mul(t[a:b].float(), inv_t, out=z_t)  # .float(): a bf16 product would be rounded before the cast
        torch.mul(s[a:b].float(), inv_t, out=z_s)
        torch.softmax(z_t, dim=-1, out=p)
        torch.softmax(z_s, dim=-1, out=q)
        lse = _lse(z_s, q) - _lse(z_t, p)
        if g is not None:  # s[a:b] has been read: g[a:b] may overwrite it now
            coef = kd_coef[a:b].unsqueeze(-1) * g_scale
            if g.dtype == torch.float32:
                torch.mul(q.sub_(p), coef, out=g[a:b])
            else:  # fp32 arithmetic, one rounding to g's dtype
                g[a:b].copy_(q.sub_(p).mul_(coef))
        kl[a:b] = p.mul_(z_t.sub_(z_s)).sum(-1) + lse
    kl.masked_fill_((kd_coef == 0) & (labels == IGNORE_INDEX), 0.0)  # padding rows, as the kernel leaves them
    if g is not None and fold_mlm and g_ce is not None:
        if g.dtype == torch.float32:
            g.index_add_(0, labelled, g_ce, alpha=g_scale)
        else:
            g.index_copy_(0, labelled, (g.index_select(0, labelled).float() + g_ce.mul_(g_scale)).to(g.dtype))
    return kl, ce


def kd_mlm_rows(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    kd_coef: torch.Tensor,
    mlm_coef: torch.Tensor,
    temperature: float,
    *,
    impl: str = "auto",
    g: torch.Tensor | None = None,
    g_scale: float = 1.0,
    fold_mlm: bool = False,
    g_mlm: torch.Tensor | None = None,
    mlm_slot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(softmax(t/T) || softmax(s/T)) and CE(s, y) at T = 1, in fp32, with optional gradient outputs.

    g[r] = g_scale * kd_coef[r] * (q - p), plus g_scale * mlm_coef[r] * (softmax(s) - onehot(y)) on labelled rows
    with `fold_mlm`; g is (C, V) of any float dtype and may be `s` itself. Without fold_mlm, g_mlm[mlm_slot[r]] =
    mlm_coef[r] * (softmax(s) - onehot(y)) for labelled rows when `g_mlm` (fp32) is given. Rows with kd_coef == 0
    and no label are padding: kl = ce = 0 and g = 0 there. Labels must lie in [0, V) or be -100 (not checked:
    that would need a device sync).
    """
    if s.dim() != 2:
        raise ValueError(f"s must be 2-D (C, V), got shape {tuple(s.shape)}")
    n_rows, vocab = s.shape
    if vocab == 0:
        raise ValueError("s must have a non-empty vocabulary dimension")
    device = s.device
    check_float("s", s)
    check_float("t", t)
    check_rows("s", s, (n_rows, vocab))
    check_rows("t", t, (n_rows, vocab))
    check_device("t", t, device)
    check_vector("labels", labels, n_rows, torch.int64, device)
    check_vector("kd_coef", kd_coef, n_rows, torch.float32, device)
    check_vector("mlm_coef", mlm_coef, n_rows, torch.float32, device)
    check_temperature(temperature)
    if g is not None:
        check_float("g", g)
        check_rows("g", g, (n_rows, vocab))
        check_device("g", g, device)
        if g.data_ptr() == s.data_ptr() and (g.stride() != s.stride() or g.dtype != s.dtype):
            raise ValueError("g aliases s with different strides or dtype; in-place needs the very same view")
    if (g_mlm is None) != (mlm_slot is None):
        raise ValueError("g_mlm and mlm_slot must be given together")
    if fold_mlm and (g is None or g_mlm is not None):
        raise ValueError("fold_mlm needs g and no g_mlm: the MLM gradient goes into g")
    if g_mlm is not None and mlm_slot is not None:
        if g_mlm.dim() != 2 or g_mlm.dtype != torch.float32:
            raise ValueError(f"g_mlm must be a 2-D float32 tensor, got {g_mlm.dtype} of shape {tuple(g_mlm.shape)}")
        check_rows("g_mlm", g_mlm, (g_mlm.size(0), vocab))
        check_device("g_mlm", g_mlm, device)
        check_vector("mlm_slot", mlm_slot, n_rows, torch.int64, device)
    rows = _rows_triton if use_triton(impl, device) else _rows_torch
    return rows(s, t, labels, kd_coef, mlm_coef, temperature, g, float(g_scale), fold_mlm, g_mlm, mlm_slot)


def row_coefficients(
    labels: torch.Tensor, kd_mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kd_weight, kd_coef, mlm_coef), (N,) fp32: kd = sum_r kl_r kd_weight_r, mlm = sum_r ce_r mlm_coef_r.

    kd_coef = kd_weight / T is the scale of d kd / d s_r = kd_coef_r (q_r - p_r). No host sync: the counts are
    clamped, not branched on.
    """
    kd_rows = (kd_mask != 0).float()
    kd_norm = kd_rows / kd_rows.sum().clamp(min=1)
    mlm_rows = (labels != IGNORE_INDEX).float()
    return temperature**2 * kd_norm, temperature * kd_norm, mlm_rows / mlm_rows.sum().clamp(min=1)


def check_row_inputs(what: str, labels: torch.Tensor, kd_mask: torch.Tensor, rows: int) -> None:
    if labels.numel() != rows or kd_mask.numel() != rows:
        raise ValueError(
            f"{what}: labels has {labels.numel()} and kd_mask {kd_mask.numel()} elements, but there are {rows} rows"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: labels must be int64 (or int32), got {labels.dtype}")


def mlm_slots(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of labelled rows, per-row slot into a compact buffer of them or -1); syncs once for the count."""
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    slot = torch.full(labels.shape, -1, dtype=torch.int64, device=labels.device)
    slot[rows] = torch.arange(rows.numel(), device=labels.device)
    return rows, slot


class _KdMlmLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, kd_mask, temperature, impl, chunk_rows):
        vocab = s.shape[-1]
        s2, t2 = flat(s, vocab), flat(t, vocab)
        labels, kd_mask = labels.reshape(-1).long(), kd_mask.reshape(-1)
        kd_weight, kd_coef, mlm_coef = row_coefficients(labels, kd_mask, temperature)
        n = s2.shape[0]
        g = g_mlm = mlm_rows = slot = None
        if ctx.needs_input_grad[0]:  # kd and mlm may receive unrelated gradients: two buffers
            mlm_rows, slot = mlm_slots(labels)
            g = torch.empty(s2.shape, dtype=torch.float32, device=s.device)
            g_mlm = torch.empty((mlm_rows.numel(), vocab), dtype=torch.float32, device=s.device)
        triton_path = use_triton(impl, s.device)
        step = chunk_rows or (max(n, 1) if triton_path else max(16, TORCH_BLOCK_BYTES // (4 * vocab) // 16 * 16))
        kl, ce = [], []
        for i in range(0, n, step):
            j = min(i + step, n)
            block = kd_mlm_rows(
                s2[i:j],
                t2[i:j],
                labels[i:j],
                kd_coef[i:j],
                mlm_coef[i:j],
                temperature,
                impl=impl,
                g=None if g is None else g[i:j],
                g_mlm=g_mlm,
                mlm_slot=None if slot is None else slot[i:j],
            )
            kl.append(block[0])
            ce.append(block[1])
        ctx.grads = (g, g_mlm, mlm_rows)
        ctx.shape_dtype = (s.shape, s.dtype)
        kl = torch.cat(kl) if kl else kd_weight[:0]
        ce = torch.cat(ce) if ce else mlm_coef[:0]
        return (kl * kd_weight).sum(), (ce * mlm_coef).sum()

    @staticmethod
    def backward(ctx, grad_kd, grad_mlm):
        if ctx.grads is None:
            raise RuntimeError("kd_mlm_loss: backward ran twice through one forward; recompute the loss instead")
        g, g_mlm, mlm_rows = ctx.grads
        ctx.grads = None
        grad = None
        if g is not None:
            grad = g.mul_(grad_kd).index_add_(0, mlm_rows, g_mlm.mul_(grad_mlm))
            shape, dtype = ctx.shape_dtype
            grad = grad.reshape(shape).to(dtype)
        return grad, None, None, None, None, None, None


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
    check_temperature(temperature)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"kd_mlm_loss: teacher logits {tuple(teacher_logits.shape)} != student's {tuple(student_logits.shape)}"
        )
    check_row_inputs("kd_mlm_loss", labels, kd_mask, student_logits.numel() // max(student_logits.shape[-1], 1))
    return _KdMlmLoss.apply(
        student_logits, teacher_logits.detach(), labels, kd_mask, float(temperature), impl, chunk_rows
    )
