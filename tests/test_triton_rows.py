"""The Triton row primitives against float64 torch formulas (runs on CPU through the Triton interpreter)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, so the kernels run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels._triton import cosine_rows, kd_mlm_rows, linear_logits  # noqa: E402


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


def _check_kd_mlm(s, t, labels, kd_coef, mlm_coef, temperature: float) -> None:
    """Values and both gradients against the reference; padding rows must give zeros."""
    ref = _kd_mlm_reference(s, t, labels, kd_coef, mlm_coef, temperature)
    slot, n_mlm = _slots(labels)
    g_kd = torch.full(s.shape, float("nan"))
    g_mlm = torch.full((n_mlm, s.size(1)), float("nan"))
    kl, ce = kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, temperature, g_kd=g_kd, g_mlm=g_mlm, mlm_slot=slot)
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
    kl2, ce2 = kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, temperature)
    torch.testing.assert_close(kl2, kl, rtol=0, atol=0)
    torch.testing.assert_close(ce2, ce, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_mlm_odd_shape(temperature: float) -> None:
    _check_kd_mlm(*_rows(41, 1271, seed=1), temperature)


def test_kd_mlm_tiny_row() -> None:
    _check_kd_mlm(*_rows(1, 7, seed=2), 2.0)
    s, t, _, _, mlm_coef = _rows(1, 7, seed=3)
    _check_kd_mlm(s, t, torch.tensor([3]), torch.ones(1), mlm_coef, 1.0)


def test_kd_mlm_no_labels() -> None:
    _check_kd_mlm(*_rows(9, 300, seed=4, labelled=False), 2.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_mlm_large_logits(temperature: float) -> None:
    s, t, labels, kd_coef, mlm_coef = _rows(6, 1000, scale=100.0, seed=5)
    kl, ce = kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, temperature)
    assert torch.isfinite(kl).all() and torch.isfinite(ce).all()
    _check_kd_mlm(s, t, labels, kd_coef, mlm_coef, temperature)


def test_kd_mlm_mixed_dtypes() -> None:
    s, t, labels, kd_coef, mlm_coef = _rows(5, 333, seed=6)
    s16, t16 = s.to(torch.bfloat16), t.to(torch.float16)
    _check_kd_mlm(s16, t16, labels, kd_coef, mlm_coef, 2.0)  # the reference sees the same rounded logits


def test_kd_mlm_strided_rows() -> None:
    """Row views of wider buffers (offset column slices, every other row) for s, t and g_kd."""
    s, t, labels, kd_coef, mlm_coef = _rows(14, 517, seed=7)
    s_wide, t_wide, t_tall = torch.randn(14, 700), torch.randn(14, 1300), torch.randn(28, 517)
    s_wide[:, :517], t_wide[:, 600:1117], t_tall[::2] = s, t, t
    _check_kd_mlm(s_wide[:, :517], t_wide[:, 600:1117], labels, kd_coef, mlm_coef, 2.0)
    _check_kd_mlm(s, t_tall[::2], labels, kd_coef, mlm_coef, 4.0)
    g_wide = torch.zeros(14, 600)
    kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 2.0, g_kd=g_wide[:, 40:557])
    _close(g_wide[:, 40:557], _kd_mlm_reference(s, t, labels, kd_coef, mlm_coef, 2.0)["g_kd"])
    assert torch.all(g_wide[:, :40] == 0) and torch.all(g_wide[:, 557:] == 0)


def test_kd_mlm_in_place() -> None:
    s, t, labels, kd_coef, mlm_coef = _rows(41, 1271, seed=8)
    ref = _kd_mlm_reference(s, t, labels, kd_coef, mlm_coef, 2.0)
    slot, n_mlm = _slots(labels)
    g_mlm = torch.zeros(n_mlm, s.size(1))
    buffer = torch.zeros(41, 1300)
    buffer[:, :1271] = s
    logits = buffer[:, :1271]  # strided rows, overwritten by the KD gradient
    kl, ce = kd_mlm_rows(logits, t, labels, kd_coef, mlm_coef, 2.0, g_kd=logits, g_mlm=g_mlm, mlm_slot=slot)
    pad = (kd_coef == 0) & (labels == -100)
    _close(kl[~pad], ref["kl"][~pad])
    _close(ce, ref["ce"])
    _close(logits, ref["g_kd"])
    _close(g_mlm, ref["g_mlm"][labels != -100])
    assert torch.all(buffer[:, 1271:] == 0)


def test_kd_mlm_slots_scatter() -> None:
    """Slots in any order into a larger buffer; rows not named by a slot stay untouched."""
    s, t, _, kd_coef, mlm_coef = _rows(4, 50, seed=9)
    labels = torch.tensor([5, -100, 0, 49])
    slot = torch.tensor([4, -1, 0, 2])
    g_mlm = torch.full((6, 50), 7.0)
    kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 1.0, g_mlm=g_mlm, mlm_slot=slot)
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
    with pytest.raises(ValueError, match="g_kd must be float32"):
        kd_mlm_rows(s, t, labels, kd_coef, mlm_coef, 1.0, g_kd=torch.zeros(3, 10, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------- linear logits


@pytest.mark.parametrize("bias", [True, False])
def test_linear_logits_odd_shape(bias: bool) -> None:
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(41, 24, generator=gen)
    w = torch.randn(1271, 24, generator=gen)
    b = torch.randn(1271, generator=gen) if bias else None
    out = linear_logits(x, w, b)
    expected = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
    assert out.dtype == torch.float32 and out.shape == (41, 1271)
    _close(out, expected)


def test_linear_logits_strided() -> None:
    """x with strided rows, w stored transposed (column-major) and w taken from every other row of a bigger matrix."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(17, 90, generator=gen)[:, 5:75]
    w_t = torch.randn(70, 301, generator=gen).T  # (301, 70) with stride (1, 301)
    b = torch.randn(301, generator=gen)
    _close(linear_logits(x, w_t, b), x.double() @ w_t.double().T + b.double())
    w_even = torch.randn(602, 70, generator=gen)[::2]
    _close(linear_logits(x, w_even, None), x.double() @ w_even.double().T)


def test_linear_logits_validation() -> None:
    with pytest.raises(ValueError, match="w must have shape"):
        linear_logits(torch.randn(3, 4), torch.randn(5, 6), None)
    with pytest.raises(ValueError, match="share a dtype"):
        linear_logits(torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float16), None)
    with pytest.raises(ValueError, match="b must have shape"):
        linear_logits(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4))


# ------------------------------------------------------------------------------------------------------- cosine rows


def _cosine_reference(hs: torch.Tensor, ht: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and coef-weighted gradient from torch's own cosine_similarity and autograd, in float64."""
    s = hs.double().requires_grad_(True)
    loss = 1.0 - torch.nn.functional.cosine_similarity(s, ht.double(), dim=-1)
    (grad,) = torch.autograd.grad((loss * coef.double()).sum(), s)
    return loss.detach(), grad


@pytest.mark.parametrize("hidden", [24, 600])  # one tile in registers, and several tiles in two sweeps
def test_cosine_rows(hidden: int) -> None:
    gen = torch.Generator().manual_seed(12)
    hs = torch.randn(9, hidden, generator=gen)
    ht = torch.randn(9, hidden, generator=gen)
    hs[1] = 0.0  # zero row: the s / |s| term vanishes
    hs[2] *= 1e-10  # tiny norm: clamped at eps
    ht[3] = 2.5 * hs[3]  # parallel: loss 0
    coef = torch.rand(9, generator=gen) + 0.5
    coef[4] = 0.0
    loss, grad = cosine_rows(hs, ht, coef)
    ref_loss, ref_grad = _cosine_reference(hs, ht, coef)
    assert grad is not None and loss.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    clamped = torch.tensor([1, 2])  # gradients ~1e8 times larger than the others: compared on their own scale
    regular = torch.tensor([0, 3, 4, 5, 6, 7, 8])
    _close(grad[clamped], ref_grad[clamped])
    _close(grad[regular], ref_grad[regular])
    loss2, no_grad = cosine_rows(hs, ht, coef, need_grad=False)
    assert no_grad is None
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


def test_cosine_rows_strided_and_single() -> None:
    gen = torch.Generator().manual_seed(13)
    big_s = torch.randn(10, 300, generator=gen)
    big_t = torch.randn(20, 280, generator=gen).to(torch.bfloat16)
    hs, ht = big_s[:, 3:283], big_t[::2]  # strided rows, mixed dtypes
    coef = torch.rand(10, generator=gen)
    loss, grad = cosine_rows(hs, ht, coef, eps=1e-8)
    ref_loss, ref_grad = _cosine_reference(hs, ht, coef)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    assert grad is not None
    _close(grad, ref_grad)
    one_s, one_t = torch.randn(1, 7, generator=gen), torch.randn(1, 7, generator=gen)
    loss, grad = cosine_rows(one_s, one_t, torch.ones(1))
    ref_loss, ref_grad = _cosine_reference(one_s, one_t, torch.ones(1))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    assert grad is not None
    _close(grad, ref_grad)


def test_cosine_rows_validation() -> None:
    with pytest.raises(ValueError, match="ht must have shape"):
        cosine_rows(torch.randn(3, 4), torch.randn(3, 5), torch.ones(3))
    with pytest.raises(ValueError, match="coef must be torch.float32"):
        cosine_rows(torch.randn(3, 4), torch.randn(3, 4), torch.ones(3, dtype=torch.float64))
