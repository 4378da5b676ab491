"""kd_mlm: the row primitive (Triton through its interpreter, and the torch twin) and kd_mlm_loss, against
float64 references."""

import pytest
import torch
from kernel_cases import IMPLS, backward_both, close, reference_kd_mlm, rows_data

from kernels import kd_mlm_loss
from kernels.kd_mlm import kd_mlm_rows


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """fp32 result vs float64 reference, with an absolute tolerance scaled by the reference's magnitude."""
    expected = expected.to(torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=1e-4, atol=rel * max(scale, 1e-30))


# ----------------------------------------------------------------------------------------------------------- KL + MLM


def _kd_mlm_reference(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    kd_coef: torch.Tensor,
    mlm_coef: torch.Tensor,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """kl, ce, g_kd and the per-row MLM gradient (zero for unlabelled rows), in float64."""
    s, t = s.double(), t.double()
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(t / temperature, dim=-1)
    log_q1 = torch.log_softmax(s, dim=-1)
    labelled = labels != -100
    safe = labels.clamp(min=0)
    ce = torch.where(labelled, -log_q1.gather(1, safe[:, None])[:, 0], torch.zeros_like(log_q1[:, 0]))
    onehot = torch.nn.functional.one_hot(safe, s.size(1)).double()
    g_mlm = mlm_coef.double()[:, None] * (log_q1.exp() - onehot) * labelled[:, None]
    return {
        "kl": (log_p.exp() * (log_p - log_q)).sum(-1),
        "ce": ce,
        "g_kd": kd_coef.double()[:, None] * (log_q.exp() - log_p.exp()),
        "g_mlm": g_mlm,
    }


def _rows(
    n: int, vocab: int, *, scale: float = 3.0, seed: int = 0, labelled: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """s, t, labels, kd_coef, mlm_coef with about half the rows labelled and every fifth row padding."""
    gen = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(n, vocab, generator=gen)
    t = scale * torch.randn(n, vocab, generator=gen)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if labelled:
        labels[torch.rand(n, generator=gen) < 0.5] = -100
    else:
        labels.fill_(-100)
    kd_coef = torch.rand(n, generator=gen) + 0.5
    mlm_coef = torch.rand(n, generator=gen) + 0.5
    kd_coef[::5] = 0.0
    labels[::5] = -100
    return s, t, labels, kd_coef, mlm_coef


def _slots(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Compact MLM slots: labelled rows numbered in order, -1 elsewhere."""
    labelled = labels != -100
    slot = torch.full_like(labels, -1)
    slot[labelled] = torch.arange(int(labelled.sum()))
    return slot, int(labelled.sum())


def _check_kd_mlm(s, t, labels, kd_coef, mlm_coef, temperature: float, impl: str) -> None:
    """Values and both gradients against the reference; padding rows must give zeros."""
    ref = _kd_mlm_reference(s, t, labels, kd_coef, mlm_coef, temperature)
    slot, n_mlm = _slots(labels)
    g_kd = torch.full(s.shape, float("nan"))
    g_mlm = torch.full((n_mlm, s.size(1)), float("nan"))
    kl, ce = kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, temperature, impl=impl, g=g_kd, g_mlm=g_mlm, mlm_slot=slot)
    assert kl.dtype == ce.dtype == torch.float32
    pad = (kd_coef == 0) & (labels == -100)
    live = ~pad
    _close(kl[live], ref["kl"][live])
    assert torch.all(kl[pad] == 0) and torch.all(ce[pad] == 0)
    _close(ce, ref["ce"])
    assert torch.all(ce[labels == -100] == 0)
    _close(g_kd, ref["g_kd"])
    assert torch.all(g_kd[pad] == 0)
    _close(g_mlm, ref["g_mlm"][labels != -100])
    # Stats only: the same values without any gradient sweep.
    kl2, ce2 = kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, temperature, impl=impl)
    torch.testing.assert_close(kl2, kl, rtol=0, atol=0)
    torch.testing.assert_close(ce2, ce, rtol=0, atol=0)
    # Folded: one gradient buffer holding the sum of both.
    g = torch.full(s.shape, float("nan"))
    kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, temperature, impl=impl, g=g, fold_mlm=True)
    _close(g, ref["g_kd"] + ref["g_mlm"])
    assert torch.all(g[pad] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_mlm_odd_shape(temperature: float, impl: str) -> None:
    _check_kd_mlm(*_rows(41, 1271, seed=1), temperature, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_mlm_tiny_row(impl: str) -> None:
    _check_kd_mlm(*_rows(1, 7, seed=2), 2.0, impl)
    s, t, _, _, mlm_coef = _rows(1, 7, seed=3)
    _check_kd_mlm(s, t, torch.tensor([3]), torch.ones(1), mlm_coef, 1.0, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_mlm_no_rows(impl: str) -> None:
    s = torch.zeros(0, 50, requires_grad=True)
    empty = torch.zeros(0)
    kl, ce = kd_mlm_rows(s.detach(), s.detach(), empty.long(), empty, empty, 2.0, impl=impl, g=torch.zeros(0, 50))
    assert kl.shape == ce.shape == (0,)
    kd, mlm = kd_mlm_loss(s, s.detach(), empty.long(), empty.bool(), temperature=2.0, impl=impl)
    (kd + mlm).backward()
    assert kd.item() == mlm.item() == 0.0 and s.grad.shape == (0, 50)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_mlm_no_labels(impl: str) -> None:
    _check_kd_mlm(*_rows(9, 300, seed=4, labelled=False), 2.0, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_mlm_large_logits(temperature: float, impl: str) -> None:
    s, t, labels, kd_coef, mlm_coef = _rows(6, 1000, scale=100.0, seed=5)
    kl, ce = kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, temperature, impl=impl)
    assert torch.isfinite(kl).all() and torch.isfinite(ce).all()
    _check_kd_mlm(s, t, labels, kd_coef, mlm_coef, temperature, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [2.0, 3.0])  # 3: logits / T is not exact in the logits' own dtype
def test_kd_mlm_mixed_dtypes(temperature: float, impl: str) -> None:
    s, t, labels, kd_coef, mlm_coef = _rows(5, 333, seed=6)
    s16, t16 = s.to(torch.bfloat16), t.to(torch.float16)
    _check_kd_mlm(s16, t16, labels, kd_coef, mlm_coef, temperature, impl)  # the reference sees the same rounding


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kd_mlm_low_precision_gradient_is_scaled_and_rounded_once(dtype: torch.dtype, impl: str) -> None:
    """g in bf16/fp16 (the GPU path's GEMM input), written times g_scale from fp32 arithmetic."""
    s, t, labels, kd_coef, mlm_coef = _rows(23, 517, seed=14)
    kd_coef, mlm_coef = kd_coef * 1e-4, mlm_coef * 1e-4  # gradients of a 10,000-row call: fp16 would flush them
    ref = _kd_mlm_reference(s, t, labels, kd_coef, mlm_coef, 2.0)
    g = torch.full(s.shape, float("nan"), dtype=dtype)
    kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 2.0, impl=impl, g=g, g_scale=4096.0, fold_mlm=True)
    expected = 4096.0 * (ref["g_kd"] + ref["g_mlm"])
    torch.testing.assert_close(g.double(), expected.to(dtype).double(), rtol=1e-2, atol=1e-3 * expected.abs().max())
    assert torch.all(g[(kd_coef == 0) & (labels == -100)] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_mlm_strided_rows(impl: str) -> None:
    """Row views of wider buffers (offset column slices, every other row) for s, t and g."""
    s, t, labels, kd_coef, mlm_coef = _rows(14, 517, seed=7)
    s_wide, t_wide, t_tall = torch.randn(14, 700), torch.randn(14, 1300), torch.randn(28, 517)
    s_wide[:, :517], t_wide[:, 600:1117], t_tall[::2] = s, t, t
    _check_kd_mlm(s_wide[:, :517], t_wide[:, 600:1117], labels, kd_coef, mlm_coef, 2.0, impl)
    _check_kd_mlm(s, t_tall[::2], labels, kd_coef, mlm_coef, 4.0, impl)
    g_wide = torch.zeros(14, 600)
    kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 2.0, impl=impl, g=g_wide[:, 40:557])
    _close(g_wide[:, 40:557], _kd_mlm_reference(s, t, labels, kd_coef, mlm_coef, 2.0)["g_kd"])
    assert torch.all(g_wide[:, :40] == 0) and torch.all(g_wide[:, 557:] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fold", [False, True])
def test_kd_mlm_in_place(impl: str, fold: bool) -> None:
    s, t, labels, kd_coef, mlm_coef = _rows(41, 1271, seed=8)
    ref = _kd_mlm_reference(s, t, labels, kd_coef, mlm_coef, 2.0)
    slot, n_mlm = _slots(labels)
    g_mlm = None if fold else torch.zeros(n_mlm, s.size(1))
    buffer = torch.zeros(41, 1300)
    buffer[:, :1271] = s
    logits = buffer[:, :1271]  # strided rows, overwritten by the gradient
    kl, ce = kd_mlm_rows(
        logits, t, labels, kd_coef, mlm_coef, 2.0, impl=impl, g=logits, fold_mlm=fold, g_mlm=g_mlm,
        mlm_slot=None if fold else slot,
    )  # fmt: skip
    pad = (kd_coef == 0) & (labels == -100)
    _close(kl[~pad], ref["kl"][~pad])
    _close(ce, ref["ce"])
    if fold:
        _close(logits, ref["g_kd"] + ref["g_mlm"])
    else:
        _close(logits, ref["g_kd"])
        _close(g_mlm, ref["g_mlm"][labels != -100])
    assert torch.all(buffer[:, 1271:] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_mlm_slots_scatter(impl: str) -> None:
    """Slots in any order into a larger buffer; rows not named by a slot stay untouched."""
    s, t, _, kd_coef, mlm_coef = _rows(4, 50, seed=9)
    labels = torch.tensor([5, -100, 0, 49])
    slot = torch.tensor([4, -1, 0, 2])
    g_mlm = torch.full((6, 50), 7.0)
    kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 1.0, impl=impl, g_mlm=g_mlm, mlm_slot=slot)
    ref = _kd_mlm_reference(s, t, labels, kd_coef, mlm_coef, 1.0)["g_mlm"]
    _close(g_mlm[[4, 0, 2]], ref[[0, 2, 3]])
    assert torch.all(g_mlm[[1, 3, 5]] == 7.0)


def test_kd_mlm_validation() -> None:
    s, t, labels, kd_coef, mlm_coef = _rows(3, 10)
    with pytest.raises(ValueError, match="t must have shape"):
        kd_mlm_rows(s, t[:, :9], labels, kd_coef, mlm_coef, 1.0)
    with pytest.raises(ValueError, match="labels must be torch.int64"):
        kd_mlm_rows(s, t, labels.int(), kd_coef, mlm_coef, 1.0)
    with pytest.raises(ValueError, match="contiguous along its last dimension"):
        kd_mlm_rows(s.t().contiguous().t(), t, labels, kd_coef, mlm_coef, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 0.0)
    with pytest.raises(ValueError, match="together"):
        kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 1.0, g_mlm=torch.zeros(3, 10))
    with pytest.raises(ValueError, match="g must be float32"):
        kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 1.0, g=torch.zeros(3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="fold_mlm needs g"):
        kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 1.0, fold_mlm=True)
    with pytest.raises(ValueError, match="impl must be one of"):
        kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 1.0, impl="cuda")


# ------------------------------------------------------------------------------------------------ kd_mlm_loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_mlm_loss_matches_reference(impl, temperature):
    s, t, labels, kd_mask = rows_data(41, 1271)
    s_ours = s.clone().requires_grad_()
    kd, mlm = kd_mlm_loss(s_ours, t, labels, kd_mask, temperature=temperature, impl=impl, chunk_rows=16)
    backward_both(kd, mlm)
    s_ref = s.double().requires_grad_()
    ref_kd, ref_mlm = reference_kd_mlm(s_ref, t, labels, kd_mask, temperature)
    backward_both(ref_kd, ref_mlm)
    close(kd, ref_kd)
    close(mlm, ref_mlm)
    close(s_ours.grad, s_ref.grad)
    assert s_ours.grad[-5:].abs().max() == 0  # padding rows get no gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_mlm_loss_three_dim_non_contiguous_large_logits(impl):
    # (B, L, V) logits made as a transpose (last dim not contiguous) and with |z| ~ 100
    s = torch.randn(203, 7, 3).permute(2, 1, 0) * 100  # (3, 7, 203), vocabulary stride 21
    t = torch.randn(3, 7, 203) * 100
    labels = torch.randint(0, 203, (3, 7))
    labels[0] = -100
    kd_mask = torch.ones(3, 7)
    kd_mask[2, 5:] = 0
    s_ours = s.clone().requires_grad_()
    kd, mlm = kd_mlm_loss(s_ours, t, labels, kd_mask, temperature=2.0, impl=impl)
    backward_both(kd, mlm)
    s_ref = s.double().requires_grad_()
    ref_kd, ref_mlm = reference_kd_mlm(s_ref.reshape(-1, 203), t.reshape(-1, 203), labels.reshape(-1),
                                       kd_mask.reshape(-1), 2.0)  # fmt: skip
    backward_both(ref_kd, ref_mlm)
    assert torch.isfinite(kd) and torch.isfinite(mlm)
    close(kd, ref_kd)
    close(mlm, ref_mlm)
    close(s_ours.grad, s_ref.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_mlm_loss_without_labels_is_zero_not_nan(impl):
    s, t, labels, kd_mask = rows_data(9, 64, label_fraction=0.0, padding=0)
    s = s.requires_grad_()
    kd, mlm = kd_mlm_loss(s, t, labels, kd_mask, temperature=2.0, impl=impl)
    backward_both(kd, mlm)
    assert mlm.item() == 0.0 and kd.item() > 0
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_mlm_loss_low_precision_inputs_use_fp32_math(impl):
    s, t, labels, kd_mask = rows_data(17, 311)
    s16, t16 = s.bfloat16().requires_grad_(), t.half()
    kd, mlm = kd_mlm_loss(s16, t16, labels, kd_mask, temperature=2.0, impl=impl)
    backward_both(kd, mlm)
    s_ref = s16.detach().double().requires_grad_()  # the same rounded inputs, in float64
    ref_kd, ref_mlm = reference_kd_mlm(s_ref, t16, labels, kd_mask, 2.0)
    backward_both(ref_kd, ref_mlm)
    close(kd, ref_kd)
    close(mlm, ref_mlm)
    assert s16.grad.dtype == torch.bfloat16
    close(s16.grad.float(), s_ref.grad, rel=1e-2)  # the gradient itself is rounded to bf16


def test_kd_mlm_loss_second_backward_raises():
    s, t, labels, kd_mask = rows_data(8, 32)
    s.requires_grad_()
    kd, mlm = kd_mlm_loss(s, t, labels, kd_mask, temperature=2.0, impl="torch")
    (kd + mlm).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (kd + mlm).backward()


def test_kd_mlm_loss_rejects_bad_input():
    s, t, labels, kd_mask = rows_data(8, 32)
    with pytest.raises(ValueError, match="impl must be one of"):
        kd_mlm_loss(s, t, labels, kd_mask, temperature=2.0, impl="cuda")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_mlm_loss(s, t, labels, kd_mask, temperature=0.0)
    with pytest.raises(ValueError, match="teacher logits"):
        kd_mlm_loss(s, t[:, :-1], labels, kd_mask, temperature=2.0)
    with pytest.raises(ValueError, match="labels has 7"):
        kd_mlm_loss(s, t, labels[:7], kd_mask, temperature=2.0)
