"""triple_loss against an independent float64 computation, values and gradients."""

import math

import pytest
import torch

from distil_scale.losses import LossTerms, fused_triple_loss, head_loss, triple_loss
from distil_scale.models import LMHeadInput

B, L, V, H = 3, 7, 41, 16
ALPHAS = dict(alpha_kd=5.0, alpha_mlm=2.0, alpha_cos=1.0)


def _batch(*, labelled: bool = True, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0  # a padded sequence
    mask[2, 1:] = 0  # a sequence that is almost all padding
    labels = torch.full((B, L), -100)
    if labelled:
        labels[0, [1, 4]] = torch.randint(0, V, (2,), generator=gen)
        labels[1, 2] = 7
    return {
        "student_logits": 3 * torch.randn(B, L, V, generator=gen),
        "teacher_logits": 3 * torch.randn(B, L, V, generator=gen),
        "labels": labels,
        "attention_mask": mask,
        "student_hidden": torch.randn(B, L, H, generator=gen),
        "teacher_hidden": torch.randn(B, L, H, generator=gen),
    }


def _reference(batch: dict, *, temperature: float, restrict: bool, alphas: dict = ALPHAS) -> dict:
    """Per-row float64 loops, written from the recipe's formulas (the lse identity for KL)."""
    s, t = batch["student_logits"].double(), batch["teacher_logits"].double()
    hs, ht = batch["student_hidden"].double(), batch["teacher_hidden"].double()
    labels, mask = batch["labels"], batch["attention_mask"]
    kd = mlm = cos = torch.zeros((), dtype=torch.float64)
    n_kd = n_mlm = n_cos = 0
    for b in range(B):
        for pos in range(L):
            labelled = bool(labels[b, pos] != -100)
            if labelled if restrict else bool(mask[b, pos]):
                s_row, t_row = s[b, pos] / temperature, t[b, pos] / temperature
                p = torch.softmax(t_row, dim=0)
                kd = kd + (p * (t_row - s_row)).sum() - torch.logsumexp(t_row, 0) + torch.logsumexp(s_row, 0)
                n_kd += 1
            if labelled:
                mlm = mlm + torch.logsumexp(s[b, pos], 0) - s[b, pos, labels[b, pos]]
                n_mlm += 1
            if mask[b, pos]:
                a, c = hs[b, pos], ht[b, pos]
                sim = (a @ c) / (a.norm().clamp(min=1e-8) * c.norm().clamp(min=1e-8))
                cos = cos + 1 - sim
                n_cos += 1
    kd = temperature**2 * kd / max(n_kd, 1)
    mlm, cos = mlm / max(n_mlm, 1), cos / max(n_cos, 1)
    total = alphas["alpha_kd"] * kd + alphas["alpha_mlm"] * mlm + alphas["alpha_cos"] * cos
    return {"total": total, "kd": kd, "mlm": mlm, "cos": cos}


def _with_grad(batch: dict, dtype: torch.dtype) -> dict:
    out = dict(batch)
    for key in ("student_logits", "student_hidden", "teacher_logits", "teacher_hidden"):
        out[key] = batch[key].detach().to(dtype, copy=True).requires_grad_(True)
    return out


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("restrict", [False, True])
def test_matches_float64_reference(temperature, restrict):
    batch = _batch()
    ours = triple_loss(**_with_grad(batch, torch.float32), temperature=temperature, restrict_kd_to_mlm=restrict)
    ref = _reference(_with_grad(batch, torch.float64), temperature=temperature, restrict=restrict)
    assert isinstance(ours, LossTerms)
    for name in ("total", "kd", "mlm", "cos"):
        value = getattr(ours, name)
        assert value.dim() == 0 and value.dtype == torch.float32
        torch.testing.assert_close(value.double(), ref[name].detach(), rtol=2e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("restrict", [False, True])
def test_gradients_match_float64_autograd(temperature, restrict):
    batch = _batch(seed=1)
    ours_in, ref_in = _with_grad(batch, torch.float32), _with_grad(batch, torch.float64)
    grad_out = 0.37  # not 1, so a gradient that ignores grad_output shows
    (grad_out * triple_loss(**ours_in, temperature=temperature, restrict_kd_to_mlm=restrict).total).backward()
    (grad_out * _reference(ref_in, temperature=temperature, restrict=restrict)["total"]).backward()
    for key in ("student_logits", "student_hidden"):
        torch.testing.assert_close(ours_in[key].grad.double(), ref_in[key].grad, rtol=1e-4, atol=1e-6, msg=key)
    # Padding rows get exactly no gradient.
    padding = batch["attention_mask"] == 0
    assert ours_in["student_logits"].grad[padding].abs().max() == 0
    assert ours_in["student_hidden"].grad[padding].abs().max() == 0


def test_teacher_tensors_get_no_gradient():
    inputs = _with_grad(_batch(), torch.float32)
    triple_loss(**inputs).total.backward()
    assert inputs["teacher_logits"].grad is None and inputs["teacher_hidden"].grad is None
    assert inputs["student_logits"].grad is not None


@pytest.mark.parametrize("restrict", [False, True])
def test_batch_without_labels_gives_zero_mlm_and_finite_gradients(restrict):
    inputs = _with_grad(_batch(labelled=False), torch.float32)
    terms = triple_loss(**inputs, restrict_kd_to_mlm=restrict)
    assert terms.mlm.item() == 0.0 and torch.isfinite(terms.total)
    if restrict:  # kd rows are the labelled rows: none
        assert terms.kd.item() == 0.0
    terms.total.backward()
    for key in ("student_logits", "student_hidden"):
        assert torch.isfinite(inputs[key].grad).all()
    ref = _reference(_batch(labelled=False), temperature=2.0, restrict=restrict)
    torch.testing.assert_close(terms.total.double(), ref["total"], rtol=2e-5, atol=1e-6)


def test_only_mlm_term_without_teacher():
    batch = _batch()
    inputs = _with_grad(batch, torch.float32) | {"teacher_logits": None, "teacher_hidden": None}
    terms = triple_loss(**inputs, alpha_kd=0.0, alpha_mlm=1.0, alpha_cos=0.0)
    ref = _reference(batch, temperature=2.0, restrict=False)
    assert terms.kd.item() == 0.0 and terms.cos.item() == 0.0  # skipped terms report 0
    torch.testing.assert_close(terms.total.double(), ref["mlm"], rtol=2e-5, atol=1e-6)
    terms.total.backward()
    assert inputs["student_logits"].grad.abs().sum() > 0


def test_bf16_inputs_are_computed_in_fp32():
    batch = _batch()
    low = {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}
    ours = triple_loss(**low, temperature=2.0)
    ref = _reference(low, temperature=2.0, restrict=False)
    assert ours.total.dtype == torch.float32
    torch.testing.assert_close(ours.total.double(), ref["total"], rtol=2e-5, atol=1e-6)


def test_non_contiguous_inputs():
    batch = _batch()
    wide = torch.randn(B, L, 2 * V)
    wide[..., ::2] = batch["student_logits"]
    strided = batch | {"student_logits": wide[..., ::2]}
    assert not strided["student_logits"].is_contiguous()
    torch.testing.assert_close(triple_loss(**strided).total, triple_loss(**batch).total)


def test_identical_student_and_teacher_have_zero_kd_and_cos():
    batch = _batch()
    same = batch | {"student_logits": batch["teacher_logits"], "student_hidden": batch["teacher_hidden"]}
    terms = triple_loss(**same, temperature=3.0)
    assert abs(terms.kd.item()) < 1e-5 and abs(terms.cos.item()) < 1e-6
    assert math.isclose(terms.total.item(), 2.0 * terms.mlm.item(), rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"teacher_logits": None}, "teacher_logits is None"),
        ({"labels": torch.zeros(B, L + 1, dtype=torch.long)}, "shape mismatch"),
        ({"teacher_hidden": torch.zeros(B, L, H + 1)}, "teacher_hidden shape"),
    ],
)
def test_rejects_inconsistent_inputs(change, match):
    with pytest.raises(ValueError, match=match):
        triple_loss(**(_batch() | change))


@pytest.mark.parametrize(("kwargs", "match"), [({"temperature": 0.0}, "temperature"), ({"alpha_mlm": -1.0}, "alphas")])
def test_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        triple_loss(**_batch(), **kwargs)


@pytest.mark.parametrize(
    "alphas, restrict",
    [(ALPHAS, False), (ALPHAS, True), (dict(alpha_kd=0.0, alpha_mlm=1.0, alpha_cos=0.0), False)],
)
def test_fused_path_matches_triple_loss(alphas, restrict):
    """head_loss + fused_triple_loss (the kernels, LM heads fused in) against triple_loss on the logits."""
    gen = torch.Generator().manual_seed(5)
    batch = _batch()
    x_s, x_t = torch.randn(B, L, H, generator=gen), torch.randn(B, L, H, generator=gen)
    w_s, w_t = torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen)
    b_s, b_t = torch.randn(V, generator=gen), torch.randn(V, generator=gen)
    teacher = None if alphas["alpha_kd"] == 0 else LMHeadInput(x_t, w_t, b_t, batch["teacher_hidden"])
    leaves = [v.clone().requires_grad_() for v in (x_s, w_s, b_s, batch["student_hidden"])]
    fn = head_loss(
        teacher,
        batch["labels"],
        batch["attention_mask"],
        temperature=2.0,
        alpha_kd=alphas["alpha_kd"],
        alpha_mlm=alphas["alpha_mlm"],
        restrict_kd_to_mlm=restrict,
    )
    fused = fused_triple_loss(
        fn(*leaves[:3]), batch["attention_mask"], leaves[3], None if teacher is None else teacher.last_hidden, **alphas
    )
    fused.total.backward()

    refs = [v.clone().requires_grad_() for v in (x_s, w_s, b_s, batch["student_hidden"])]
    eager = triple_loss(
        refs[0] @ refs[1].T + refs[2],
        x_t @ w_t.T + b_t,
        batch["labels"],
        batch["attention_mask"],
        refs[3],
        batch["teacher_hidden"],
        temperature=2.0,
        restrict_kd_to_mlm=restrict,
        **alphas,
    )
    eager.total.backward()
    for name in LossTerms._fields:
        torch.testing.assert_close(getattr(fused, name), getattr(eager, name), rtol=1e-5, atol=1e-6, msg=name)
    for ours, theirs in zip(leaves, refs):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)
