"""Pure-torch implementations of the row primitives behind the fused losses: the CPU path.

Same contract as `kernels._triton`, row for row, so `kernels.ops` drives either. Work is done on a block of
rows at a time (the caller chunks), in fp32 whatever the input dtype, with in-place arithmetic on a few
(rows, V) temporaries so that the chunk, not N, bounds the memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Bytes of one fp32 (rows, V) temporary of the KL sub-blocks: small enough to stay in cache.
SUB_BYTES = 4 << 20


def linear_logits(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(C, V) fp32 logits x @ w.T + b with fp32 accumulation and no rounding of the result to x's dtype.

    `out`, when given, is the (C, V) fp32 buffer to write into (the caller reuses one across chunks).
    """
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        if b is None:
            return torch.mm(x, w.T, out=out)
        return torch.addmm(b.float(), x, w.T, out=out)
    if x.is_cuda:
        logits = _mm_out_fp32(x, w.T)
    else:
        logits = x.float() @ w.float().T
    if b is not None:
        logits += b.float()
    if out is None:
        return logits
    return out.copy_(logits)


def _mm_out_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Low-precision CUDA GEMM with an fp32 result (cuBLAS's fp32 output), or a cast where that is missing."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError):  # a torch build without mm.dtype for these dtypes
        return torch.mm(a, b).float()


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32, for the gradient GEMMs: a is an fp32 gradient block, b a weight or input block."""
    if b.dtype == torch.float32:
        return a @ b
    if b.is_cuda:
        return _mm_out_fp32(a.to(b.dtype), b)
    return a @ b.float()


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
    """Per-row KL(p || q) and cross-entropy of (C, V) logits, and optionally their scaled gradients.

    kl[r] = KL(softmax(t/T) || softmax(s/T)); ce[r] = lse(s) - s[y] for labelled rows, 0 otherwise.
    g_kd[r] = kd_coef[r] * (q - p) (may alias `s` when s is fp32); g_mlm[mlm_slot[r]] = mlm_coef[r] *
    (softmax(s) - onehot(y)) for labelled rows.

    The KL runs over sub-blocks of SUB_ROWS rows so that its temporaries stay in cache: per sub-block, two
    fused log-softmaxes, one KL pass, and two exp + one fused multiply-add for the gradient. The MLM side
    touches the labelled rows only, and runs first, before the gradient may overwrite s.
    """
    rows, vocab = s.shape
    inv_t = 1.0 / temperature
    kl = torch.empty(rows, dtype=torch.float32, device=s.device)
    ce = torch.zeros(rows, dtype=torch.float32, device=s.device)
    labelled = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    if labelled.numel():
        y = labels[labelled].unsqueeze(-1)
        log_softmax = torch.log_softmax(s.index_select(0, labelled).float(), dim=-1)
        ce[labelled] = -log_softmax.gather(-1, y).squeeze(-1)
        if g_mlm is not None:
            block = log_softmax.exp_()
            block.scatter_add_(-1, y, torch.full_like(block[:, :1], -1.0))
            g_mlm.index_copy_(0, mlm_slot[labelled], block.mul_(mlm_coef[labelled].unsqueeze(-1)))
    step = max(1, SUB_BYTES // (4 * max(vocab, 1)))
    for a in range(0, rows, step):
        b = min(a + step, rows)
        log_p = torch.log_softmax(t[a:b].float() * inv_t, dim=-1)
        log_q = torch.log_softmax(s[a:b].float() * inv_t, dim=-1)
        kl[a:b] = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
        if g_kd is not None:  # s[a:b] has been read: g_kd[a:b] may overwrite it now
            coef = kd_coef[a:b].unsqueeze(-1)
            torch.mul(log_q.exp_(), coef, out=g_kd[a:b])
            g_kd[a:b].addcmul_(log_p.exp_(), coef, value=-1.0)
    return kl, ce


def cosine_rows(
    hs: torch.Tensor, ht: torch.Tensor, coef: torch.Tensor, eps: float = 1e-8, need_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row 1 - cos(hs, ht) with torch's eps clamping, and optionally coef[r] * its gradient w.r.t. hs.

    cos = <s, t> / (max(|s|, eps) * max(|t|, eps)); d cos / d s = t / (Ns Nt) - cos * s / (Ns |s|), with
    s / |s| taken as 0 for a zero row: the gradient torch's own cosine_similarity gives, clamped or not.
    """
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
