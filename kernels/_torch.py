"""Pure-torch implementations of the row primitives behind the fused losses: the CPU path.

Same contract as `kernels._triton`, row for row, so `kernels.ops` drives either. Work is done on a block of
rows at a time (the caller chunks), in fp32 whatever the input dtype, with in-place arithmetic on a few
(rows, V) temporaries so that the chunk, not N, bounds the memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def linear_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(C, V) fp32 logits x @ w.T + b with fp32 accumulation and no rounding of the result to x's dtype."""
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        out = x @ w.T
    elif x.is_cuda:
        out = torch.mm(x, w.T, out_dtype=torch.float32)  # low-precision inputs, fp32 accumulator and result
    else:
        out = x.float() @ w.float().T
    if b is not None:
        out += b.float()
    return out


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32, for the gradient GEMMs: a is an fp32 gradient block, b a weight or input block."""
    if b.dtype == torch.float32:
        return a @ b
    if b.is_cuda:
        return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
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
    """
    inv_t = 1.0 / temperature
    s32, t32 = s.float(), t.float()
    labelled = labels != IGNORE_INDEX
    safe_labels = labels.clamp(min=0).unsqueeze(-1)

    # The MLM side reads s at T = 1, so it runs before anything may overwrite s in place.
    lse = torch.logsumexp(s32, dim=-1)
    ce = torch.where(labelled, lse - s32.gather(-1, safe_labels).squeeze(-1), 0.0)
    if g_mlm is not None:
        rows = labelled.nonzero().squeeze(-1)
        if rows.numel():
            block = s32.index_select(0, rows).sub_(lse[rows].unsqueeze(-1)).exp_()
            block.scatter_add_(-1, safe_labels[rows], torch.full_like(block[:, :1], -1.0))
            block.mul_(mlm_coef[rows].unsqueeze(-1))
            g_mlm.index_copy_(0, mlm_slot[rows], block)

    log_p = t32.mul(inv_t)
    log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))
    if g_kd is None:
        log_q = s32.mul(inv_t)
    elif g_kd.data_ptr() == s32.data_ptr():  # the caller lets the gradient overwrite s
        log_q = g_kd.mul_(inv_t)
    else:
        log_q = torch.mul(s32, inv_t, out=g_kd)
    log_q.sub_(torch.logsumexp(log_q, dim=-1, keepdim=True))
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if g_kd is not None:
        log_q.exp_().sub_(log_p.exp_()).mul_(kd_coef.unsqueeze(-1))
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
