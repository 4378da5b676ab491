"""cosine: the row primitive and cosine_loss, both implementations, against float64 references."""

import pytest
import torch
from kernel_cases import IMPLS, close, reference_cos

from kernels import cosine_loss
from kernels.cosine import cosine_rows


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """fp32 result vs float64 reference, with an absolute tolerance scaled by the reference's magnitude."""
    expected = expected.to(torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=1e-4, atol=rel * max(scale, 1e-30))


# ------------------------------------------------------------------------------------------------------- cosine rows


def _cosine_reference(hs: torch.Tensor, ht: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and coef-weighted gradient from torch's own cosine_similarity and autograd, in float64."""
    s = hs.double().requires_grad_(True)
    loss = 1.0 - torch.nn.functional.cosine_similarity(s, ht.double(), dim=-1)
    (grad,) = torch.autograd.grad((loss * coef.double()).sum(), s)
    return loss.detach(), grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hidden", [24, 600])  # one tile in registers, and several tiles in two sweeps
def test_cosine_rows(hidden: int, impl: str) -> None:
    gen = torch.Generator().manual_seed(12)
    hs = torch.randn(9, hidden, generator=gen)
    ht = torch.randn(9, hidden, generator=gen)
    hs[1] = 0.0  # zero row: the s / |s| term vanishes
    hs[2] *= 1e-10  # tiny norm: clamped at eps
    ht[3] = 2.5 * hs[3]  # parallel: loss 0
    coef = torch.rand(9, generator=gen) + 0.5
    coef[4] = 0.0
    loss, grad = cosine_rows(hs, ht, coef, impl=impl)
    ref_loss, ref_grad = _cosine_reference(hs, ht, coef)
    assert grad is not None and loss.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    clamped = torch.tensor([1, 2])  # gradients ~1e8 times larger than the others: compared on their own scale
    regular = torch.tensor([0, 3, 4, 5, 6, 7, 8])
    _close(grad[clamped], ref_grad[clamped])
    _close(grad[regular], ref_grad[regular])
    loss2, no_grad = cosine_rows(hs, ht, coef, need_grad=False, impl=impl)
    assert no_grad is None
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_cosine_rows_strided_and_single(impl: str) -> None:
    gen = torch.Generator().manual_seed(13)
    big_s = torch.randn(10, 300, generator=gen)
    big_t = torch.randn(20, 280, generator=gen).to(torch.bfloat16)
    hs, ht = big_s[:, 3:283], big_t[::2]  # strided rows, mixed dtypes
    coef = torch.rand(10, generator=gen)
    loss, grad = cosine_rows(hs, ht, coef, eps=1e-8, impl=impl)
    ref_loss, ref_grad = _cosine_reference(hs, ht, coef)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    assert grad is not None
    _close(grad, ref_grad)
    one_s, one_t = torch.randn(1, 7, generator=gen), torch.randn(1, 7, generator=gen)
    loss, grad = cosine_rows(one_s, one_t, torch.ones(1), impl=impl)
    ref_loss, ref_grad = _cosine_reference(one_s, one_t, torch.ones(1))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    assert grad is not None
    _close(grad, ref_grad)


def test_cosine_rows_validation() -> None:
    with pytest.raises(ValueError, match="ht must have shape"):
        cosine_rows(torch.randn(3, 4), torch.randn(3, 5), torch.ones(3))
    with pytest.raises(ValueError, match="coef must be torch.float32"):
        cosine_rows(torch.randn(3, 4), torch.randn(3, 4), torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ cosine_loss


@pytest.mark.parametrize("impl", IMPLS)
def test_cosine_loss_matches_reference(impl):
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(37, 48, generator=g)
    ht = torch.randn(37, 48, generator=g)
    hs[4] = 0  # zero row: torch gives cos = 0 and a finite gradient
    hs[5] *= 1e-10  # below eps: torch's clamped branch
    mask = torch.ones(37)
    mask[-4:] = 0
    ours = hs.clone().requires_grad_()
    cos = cosine_loss(ours, ht, mask, impl=impl)
    (2.5 * cos).backward()
    ref = hs.double().requires_grad_()
    ref_cos = reference_cos(ref, ht, mask)
    (2.5 * ref_cos).backward()
    close(cos, ref_cos)
    normal = [r for r in range(37) if r not in (4, 5)]
    close(ours.grad[normal], ref.grad[normal])
    close(ours.grad[4:6], ref.grad[4:6])  # the clamped rows, on their own (huge) scale
    assert ours.grad[-4:].abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_cosine_loss_three_dim_non_contiguous_bf16(impl):
    hs = torch.randn(2, 9, 40).bfloat16()[:, :, :33]  # row stride 40, width 33
    ht = torch.randn(2, 9, 33).bfloat16()
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    ours = hs.clone().requires_grad_()
    cos = cosine_loss(ours, ht, mask, impl=impl)
    cos.backward()
    ref = hs.double().requires_grad_()
    ref_cos = reference_cos(ref.reshape(-1, 33), ht.reshape(-1, 33), mask.reshape(-1))
    ref_cos.backward()
    close(cos, ref_cos)
    assert ours.grad.dtype == torch.bfloat16
    close(ours.grad.float(), ref.grad, rel=1e-2)


def test_cosine_loss_empty_mask_is_zero():
    hs = torch.randn(4, 8, requires_grad=True)
    cos = cosine_loss(hs, torch.randn(4, 8), torch.zeros(4))
    cos.backward()
    assert cos.item() == 0.0 and hs.grad.abs().max() == 0
