r"""The reference triple loss of DistilBERT, in plain torch.

Rows are token positions: the (B, L, ...) inputs are flattened to (B*L, ...). With s, t the student and
teacher logits of a row, T the temperature, p = softmax(t / T), q = softmax(s / T):

    kd  = T^2 / |R_kd| * sum_{r in R_kd} KL(p_r || q_r)
        = T^2 / |R_kd| * sum_r [ sum_v p_rv (t_rv - s_rv) / T - lse(t_r / T) + lse(s_r / T) ]
    mlm = 1 / |R_mlm| * sum_{r in R_mlm} [ lse(s_r) - s_{r, y_r} ]                       (T = 1)
    cos = 1 / |R_cos| * sum_{r in R_cos} [ 1 - <h_s, h_t> / (max(|h_s|, eps) * max(|h_t|, eps)) ]
    total = alpha_kd * kd + alpha_mlm * mlm + alpha_cos * cos

R_cos is every real token (attention_mask == 1); R_kd is R_cos, or the MLM-labelled rows with
restrict_kd_to_mlm; R_mlm is every row whose label is not -100. A term over an empty row set is 0, not NaN,
and stays connected to the graph so backward still runs. The T^2 factor keeps the kd gradient's scale
independent of T (the soft targets' gradient shrinks as 1/T^2).

Every softmax and log-sum-exp runs in fp32 whatever the input dtype. Rows are selected before any
(N, V) arithmetic, so padding costs no vocabulary-sized temporaries. Teacher tensors are detached.

A term whose alpha is 0 is skipped (not computed) and reported as a zero tensor; its teacher tensor may
then be None (an MLM-only teacher run, or the from-scratch baseline with alpha_kd = alpha_cos = 0).

`loss.impl: fused` computes the same terms with the `kernels` package instead: `head_loss` makes the function
the student's vocabulary projection runs in place of its logits (see models.projection_replaced), fusing both
LM heads into `linear_kd_mlm_loss`, and `fused_triple_loss` adds the cosine term and the weights.

`eager_terms` and `fused_terms` run the teacher and the student (or its engine) on one micro-batch and return
its LossTerms, the way training does; the step benchmark calls them too.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from distil_scale.config import LossConfig
from distil_scale.models import LMHeadInput, lm_head_input, mlm_outputs, projection_replaced
from kernels import IGNORE_INDEX, cosine_loss, linear_kd_mlm_loss


class LossTerms(NamedTuple):
    """0-dim fp32 tensors; only `total` is meant for backward."""

    total: torch.Tensor
    kd: torch.Tensor
    mlm: torch.Tensor
    cos: torch.Tensor


def _mean(row_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # clamp, not a branch: an empty row set gives 0 / 1 without a host sync
    return row_sum / count.clamp(min=1)


def kd_term(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, rows: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """T^2 * mean over `rows` (bool, flat) of KL(softmax(t/T) || softmax(s/T)); logits flat (N, V)."""
    # Boolean indexing syncs with the host once (it needs the count); it saves far more than it costs.
    # One expression per side, so the selected and scaled copies are freed as soon as log_softmax has run.
    with torch.no_grad():
        log_p = torch.log_softmax(teacher_logits[rows].float() / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits[rows].float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
    return temperature**2 * _mean(kl, rows.sum())


def mlm_term(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled rows, 0 when there are none; logits flat (N, V), labels (N,)."""
    rows = labels != IGNORE_INDEX
    ce = F.cross_entropy(student_logits[rows].float(), labels[rows], reduction="sum")
    return _mean(ce, rows.sum())


def cos_term(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(h_s, h_t) over `rows`; hidden flat (N, H)."""
    h_s = student_hidden[rows].float()
    h_t = teacher_hidden.detach()[rows].float()
    return _mean((1.0 - F.cosine_similarity(h_s, h_t, dim=-1)).sum(), rows.sum())


def _check(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    alphas: tuple[float, float, float],
    temperature: float,
) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if min(alphas) < 0 or max(alphas) == 0:
        raise ValueError(f"alphas (kd, mlm, cos) must be >= 0 and not all 0, got {alphas}")
    rows_shape = student_logits.shape[:-1]
    if labels.shape != rows_shape or attention_mask.shape != rows_shape or student_hidden.shape[:-1] != rows_shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(student_logits.shape)}, labels {tuple(labels.shape)}, "
            f"attention_mask {tuple(attention_mask.shape)}, student_hidden {tuple(student_hidden.shape)}"
        )
    for name, alpha, student, teacher in (
        ("teacher_logits", alphas[0], student_logits, teacher_logits),
        ("teacher_hidden", alphas[2], student_hidden, teacher_hidden),
    ):
        if alpha > 0 and teacher is None:
            raise ValueError(f"{name} is None but its alpha is {alpha}")
        if alpha > 0 and teacher.shape != student.shape:
            raise ValueError(f"{name} shape {tuple(teacher.shape)} != student's {tuple(student.shape)}")


def triple_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    *,
    temperature: float = 2.0,
    alpha_kd: float = 5.0,
    alpha_mlm: float = 2.0,
    alpha_cos: float = 1.0,
    restrict_kd_to_mlm: bool = False,
) -> LossTerms:
    """kd + mlm + cos of one micro-batch; see the module docstring for the exact definition."""
    alphas = (alpha_kd, alpha_mlm, alpha_cos)
    _check(student_logits, teacher_logits, labels, attention_mask, student_hidden, teacher_hidden, alphas, temperature)
    vocab, width = student_logits.shape[-1], student_hidden.shape[-1]
    s_logits = student_logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    real = attention_mask.reshape(-1).bool()
    zero = torch.zeros((), dtype=torch.float32, device=student_logits.device)

    kd = mlm = cos = zero
    if alpha_kd > 0:
        kd_rows = flat_labels != IGNORE_INDEX if restrict_kd_to_mlm else real
        kd = kd_term(s_logits, teacher_logits.reshape(-1, vocab), kd_rows, temperature=temperature)
    if alpha_mlm > 0:
        mlm = mlm_term(s_logits, flat_labels)
    if alpha_cos > 0:
        cos = cos_term(student_hidden.reshape(-1, width), teacher_hidden.reshape(-1, width), real)
    total = alpha_kd * kd + alpha_mlm * mlm + alpha_cos * cos
    return LossTerms(total=total, kd=kd, mlm=mlm, cos=cos)


def head_loss(
    teacher: LMHeadInput | None,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float,
    alpha_kd: float,
    alpha_mlm: float,
    restrict_kd_to_mlm: bool = False,
):
    """fn(x, weight, bias) -> (kd, mlm) of the student's LM head against the teacher's, for projection_replaced.

    The (B, L, V) logits of neither model are made. When only the labelled rows matter (no kd, or kd restricted
    to them) only those are projected: counting them is one host sync, and it saves the GEMMs of the other ~85%.
    Without a teacher (alpha_kd = 0) the student's own head stands in for it with no kd rows.
    """
    labels = labels.reshape(-1) if alpha_mlm > 0 else torch.full_like(labels.reshape(-1), IGNORE_INDEX)
    if alpha_kd == 0:
        kd_rows = torch.zeros_like(labels, dtype=torch.bool)
    else:
        kd_rows = labels != IGNORE_INDEX if restrict_kd_to_mlm else attention_mask.reshape(-1).bool()
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1) if alpha_kd == 0 or restrict_kd_to_mlm else None
    if rows is not None:
        labels, kd_rows = labels[rows], kd_rows[rows]

    def fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        t_x, t_w, t_b = (x, weight, bias) if teacher is None else (teacher.x, teacher.weight, teacher.bias)
        if rows is not None:
            x, t_x = x.reshape(-1, x.shape[-1])[rows], t_x.reshape(-1, t_x.shape[-1])[rows]
        return linear_kd_mlm_loss(
            x, weight, bias, t_x, t_w, t_b, labels, kd_rows, temperature=temperature, grad_weights=(alpha_kd, alpha_mlm)
        )

    return fn


def fused_triple_loss(
    kd_mlm: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    *,
    alpha_kd: float,
    alpha_mlm: float,
    alpha_cos: float,
) -> LossTerms:
    """The triple loss from head_loss's (kd, mlm) and the fused cosine kernel; same values as triple_loss."""
    kd, mlm = kd_mlm
    cos = torch.zeros((), dtype=torch.float32, device=kd.device)
    if alpha_cos > 0:
        if teacher_hidden is None:
            raise ValueError(f"teacher_hidden is None but its alpha is {alpha_cos}")
        cos = cosine_loss(student_hidden, teacher_hidden, attention_mask)
    total = alpha_kd * kd + alpha_mlm * mlm + alpha_cos * cos
    return LossTerms(total=total, kd=kd, mlm=mlm, cos=cos)


def eager_terms(student, teacher, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, loss: LossConfig):
    """LossTerms of one micro-batch from both models' full (B, L, V) logits: the reference path."""
    t_logits = t_hidden = None
    if teacher is not None:
        with torch.no_grad():
            t_logits, t_hidden = mlm_outputs(teacher, ids, mask)
    s_logits, s_hidden = mlm_outputs(student, ids, mask)
    return triple_loss(
        s_logits,
        t_logits,
        labels,
        mask,
        s_hidden,
        t_hidden,
        temperature=loss.temperature,
        alpha_kd=loss.alpha_kd,
        alpha_mlm=loss.alpha_mlm,
        alpha_cos=loss.alpha_cos,
        restrict_kd_to_mlm=loss.restrict_kd_to_mlm,
    )


def fused_terms(student, teacher, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, loss: LossConfig):
    """The same terms with no (B, L, V) logits: the LM heads run inside the fused kernels.

    The student still runs through its own forward (a DeepSpeed engine's hooks and backward prologue), with its
    vocabulary projection swapped for the fused head loss; see models.projection_replaced.
    """
    t_head = None
    if teacher is not None:
        with torch.no_grad():
            t_head = lm_head_input(teacher, ids, mask)
    fn = head_loss(
        t_head,
        labels,
        mask,
        temperature=loss.temperature,
        alpha_kd=loss.alpha_kd,
        alpha_mlm=loss.alpha_mlm,
        restrict_kd_to_mlm=loss.restrict_kd_to_mlm,
    )
    # A partitioned teacher's vocabulary projection is gathered for the student's forward, where the fused loss
    # uses it (the fused backward does not).
    with gathered(t_head), projection_replaced(student, fn):
        out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return fused_triple_loss(
        out.logits,
        mask,
        out.hidden_states[-1],
        None if t_head is None else t_head.last_hidden,
        alpha_kd=loss.alpha_kd,
        alpha_mlm=loss.alpha_mlm,
        alpha_cos=loss.alpha_cos,
    )


def gathered(head: LMHeadInput | None):
    """Gathers a ZeRO-3 teacher's head weights for the block; nothing to do (and no DeepSpeed import) otherwise."""
    params = [] if head is None else [p for p in (head.weight, head.bias) if p is not None and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
