"""linear_kd_mlm_loss: both LM heads fused in, both implementations, against float64 references."""

import pytest
import torch
from kernel_cases import IMPLS, backward_both, close, reference_kd_mlm, rows_data

from kernels import linear_kd_mlm_loss
from kernels.linear_kd_mlm import logits_into


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """fp32 result vs float64 reference, with an absolute tolerance scaled by the reference's magnitude."""
    expected = expected.to(torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=1e-4, atol=rel * max(scale, 1e-30))


# ----------------------------------------------------------------------------------------------------- linear logits


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = torch.full((x.shape[0], w.shape[0] + 3), float("nan"))[:, : w.shape[0]]  # a padded fp32 view, as used
    assert logits_into(out, x, w, b).data_ptr() == out.data_ptr()
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_linear_logits_odd_shape(bias: bool) -> None:
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(41, 24, generator=gen)
    w = torch.randn(1271, 24, generator=gen)
    b = torch.randn(1271, generator=gen) if bias else None
    out = _logits(x, w, b)
    expected = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
    assert out.dtype == torch.float32 and out.shape == (41, 1271)
    _close(out, expected)


def test_linear_logits_strided() -> None:
    """x with strided rows, w stored transposed (column-major) and w taken from every other row of a bigger matrix."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(17, 90, generator=gen)[:, 5:75]
    w_t = torch.randn(70, 301, generator=gen).T  # (301, 70) with stride (1, 301)
    b = torch.randn(301, generator=gen)
    _close(_logits(x, w_t, b), x.double() @ w_t.double().T + b.double())
    w_even = torch.randn(602, 70, generator=gen)[::2]
    _close(_logits(x, w_even, None), x.double() @ w_even.double().T)


def test_linear_logits_low_precision_heads_give_fp32_logits() -> None:
    """bf16 heads: fp32 logits of the rounded inputs (where CUDA has an fp32-output GEMM, the CPU a cast)."""
    gen = torch.Generator().manual_seed(12)
    x, w, b = (torch.randn(*shape, generator=gen).bfloat16() for shape in ((9, 40), (301, 40), (301,)))
    _close(_logits(x, w, b), x.double() @ w.double().T + b.double(), rel=1e-2)


# ------------------------------------------------------------------------------------------ linear_kd_mlm_loss


def linear_data(n, vocab, width, *, seed=0, bias=True, **kw):
    g = torch.Generator().manual_seed(seed + 1)
    _, _, labels, kd_mask = rows_data(n, vocab, seed=seed, **kw)
    xs, xt = torch.randn(n, width, generator=g), torch.randn(n, width, generator=g)
    ws = torch.randn(width, vocab, generator=g).T * 0.5  # transposed storage: not contiguous
    wt = torch.randn(vocab, width, generator=g) * 0.5
    bs = torch.randn(vocab, generator=g) if bias else None
    bt = torch.randn(vocab, generator=g) if bias else None
    return xs, ws, bs, xt, wt, bt, labels, kd_mask


def check_linear(impl, data, temperature=2.0, chunk_rows=16, scale=1.0):
    xs, ws, bs, xt, wt, bt, labels, kd_mask = data
    student = [None if v is None else (v * scale).detach().requires_grad_() for v in (xs, ws, bs)]
    kd, mlm = linear_kd_mlm_loss(*student, xt, wt, bt, labels, kd_mask, temperature=temperature, impl=impl,
                                 chunk_rows=chunk_rows)  # fmt: skip
    backward_both(kd, mlm)
    ref = [None if v is None else (v * scale).detach().double().requires_grad_() for v in (xs, ws, bs)]
    s = ref[0] @ ref[1].T + (0 if ref[2] is None else ref[2])
    t = xt.double() @ wt.double().T + (0 if bt is None else bt.double())
    ref_kd, ref_mlm = reference_kd_mlm(s, t, labels, kd_mask, temperature)
    backward_both(ref_kd, ref_mlm)
    close(kd, ref_kd)
    close(mlm, ref_mlm)
    for ours, theirs in zip(student, ref):
        if ours is not None:
            close(ours.grad, theirs.grad)
    return student


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_linear_kd_mlm_loss_matches_reference(impl, temperature):
    student = check_linear(impl, linear_data(41, 1271, 24), temperature=temperature)
    assert student[0].grad[-5:].abs().max() == 0  # padding rows: no gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_kd_mlm_loss_no_bias_no_labels_one_chunk(impl):
    check_linear(impl, linear_data(23, 301, 16, bias=False, label_fraction=0.0), chunk_rows=None)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_kd_mlm_loss_large_logits(impl):
    # x scaled so the logits reach |z| ~ 100
    check_linear(impl, linear_data(19, 257, 32, padding=0), temperature=1.0, scale=4.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_kd_mlm_loss_grad_weights_keeps_one_sum(impl):
    xs, ws, bs, xt, wt, bt, labels, kd_mask = linear_data(29, 211, 16)
    promised = [v.clone().requires_grad_() for v in (xs, ws, bs)]
    kd, mlm = linear_kd_mlm_loss(*promised, xt, wt, bt, labels, kd_mask, temperature=2.0, impl=impl,
                                 chunk_rows=16, grad_weights=(5.0, 2.0))  # fmt: skip
    (0.5 * (5 * kd + 2 * mlm)).backward()  # the promised combination, times a factor
    general = [v.clone().requires_grad_() for v in (xs, ws, bs)]
    kd_ref, mlm_ref = linear_kd_mlm_loss(*general, xt, wt, bt, labels, kd_mask, temperature=2.0, impl=impl)
    (0.5 * (5 * kd_ref + 2 * mlm_ref)).backward()
    close(kd, kd_ref)
    for ours, theirs in zip(promised, general):
        close(ours.grad, theirs.grad)

    kd, mlm = linear_kd_mlm_loss(*promised, xt, wt, bt, labels, kd_mask, temperature=2.0, grad_weights=(5.0, 2.0))
    with pytest.raises(RuntimeError, match="grad_weights"):
        (kd + mlm).backward()


def test_linear_kd_mlm_loss_everything_padding():
    xs, ws, bs, xt, wt, bt, labels, kd_mask = linear_data(6, 50, 8)
    labels[:], kd_mask[:] = -100, False
    xs, ws, bs = (v.requires_grad_() for v in (xs, ws, bs))
    kd, mlm = linear_kd_mlm_loss(xs, ws, bs, xt, wt, bt, labels, kd_mask, temperature=2.0, impl="torch")
    backward_both(kd, mlm)
    assert kd.item() == 0.0 and mlm.item() == 0.0
    assert xs.grad.abs().max() == 0 and ws.grad.abs().max() == 0 and bs.grad.abs().max() == 0


def test_linear_kd_mlm_loss_only_returns_student_gradients():
    xs, ws, bs, xt, wt, bt, labels, kd_mask = linear_data(10, 40, 8)
    everything = [v.requires_grad_() for v in (xs, ws, bs, xt, wt, bt)]
    kd, mlm = linear_kd_mlm_loss(*everything, labels, kd_mask, temperature=2.0, impl="torch")
    backward_both(kd, mlm)
    assert all(v.grad is not None for v in everything[:3])
    assert all(v.grad is None for v in everything[3:])


def test_linear_kd_mlm_loss_rejects_bad_shapes():
    xs, ws, bs, xt, wt, bt, labels, kd_mask = linear_data(6, 50, 8)
    with pytest.raises(ValueError, match="do not make logits"):
        linear_kd_mlm_loss(xs, ws[:, :4], bs, xt, wt, bt, labels, kd_mask, temperature=2.0)
    with pytest.raises(ValueError, match="do not match"):
        linear_kd_mlm_loss(xs, ws, bs, xt, wt[:10], bt[:10], labels, kd_mask, temperature=2.0)


def test_linear_kd_mlm_loss_under_torch_compile_graph_breaks_and_matches():
    data = linear_data(12, 64, 8)
    xs, ws, bs, xt, wt, bt, labels, kd_mask = data

    def loss(x):
        kd, mlm = linear_kd_mlm_loss(torch.tanh(x), ws, bs, xt, wt, bt, labels, kd_mask, temperature=2.0)
        return 5 * kd + 2 * mlm

    x_eager, x_compiled = xs.clone().requires_grad_(), xs.clone().requires_grad_()
    loss(x_eager).backward()
    torch.compile(loss, backend="eager")(x_compiled).backward()
    close(x_compiled.grad, x_eager.grad.double())


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_weights", [None, (5.0, 2.0)])
def test_linear_kd_mlm_loss_low_precision_path(monkeypatch, impl, dtype, grad_weights):
    """The CUDA schedule for bf16/fp16 heads (g in the heads' dtype, scaled for fp16; dx in x's dtype; dw in
    fp32), run on the CPU by turning off the CPU's upcast; compared with float64 on the same rounded inputs."""
    import kernels.linear_kd_mlm as linear

    monkeypatch.setattr(linear, "compute_in_fp32", lambda device: False)
    xs, ws, bs, xt, wt, bt, labels, kd_mask = linear_data(300, 257, 16, seed=7)
    student = [v.to(dtype).requires_grad_() for v in (xs, ws, bs)]
    teacher = [v.to(dtype) for v in (xt, wt, bt)]
    kd, mlm = linear_kd_mlm_loss(*student, *teacher, labels, kd_mask, temperature=2.0, impl=impl, chunk_rows=64,
                                 grad_weights=grad_weights)  # fmt: skip
    (5 * kd + 2 * mlm).backward()
    ref = [v.detach().double().requires_grad_() for v in student]
    s = ref[0] @ ref[1].T + ref[2]
    t = teacher[0].double() @ teacher[1].double().T + teacher[2].double()
    ref_kd, ref_mlm = reference_kd_mlm(s, t, labels, kd_mask, 2.0)
    (5 * ref_kd + 2 * ref_mlm).backward()
    close(kd, ref_kd, rel=1e-3)
    close(mlm, ref_mlm, rel=1e-3)
    for ours, theirs in zip(student, ref):
        assert ours.grad.dtype == dtype
        close(ours.grad.float(), theirs.grad, rel=2e-2)


def test_linear_kd_mlm_loss_under_autocast_runs_in_the_autocast_dtype():
    xs, ws, bs, xt, wt, bt, labels, kd_mask = linear_data(40, 120, 16)
    student = [v.clone().requires_grad_() for v in (xs, ws, bs)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kd, mlm = linear_kd_mlm_loss(*student, xt, wt, bt, labels, kd_mask, temperature=2.0, impl="torch")
    backward_both(kd, mlm)
    rounded = [v.detach().bfloat16().double().requires_grad_() for v in (xs, ws, bs)]
    s = rounded[0] @ rounded[1].T + rounded[2]
    t = xt.bfloat16().double() @ wt.bfloat16().double().T + bt.bfloat16().double()
    ref_kd, ref_mlm = reference_kd_mlm(s, t, labels, kd_mask, 2.0)
    backward_both(ref_kd, ref_mlm)
    close(kd, ref_kd)
    close(mlm, ref_mlm)
    for ours, theirs in zip(student, rounded):
        assert ours.grad.dtype == torch.float32  # back through the casts to the fp32 parameters
        close(ours.grad, theirs.grad, rel=1e-2)


def test_linear_kd_mlm_loss_rejects_mixed_dtypes_outside_autocast():
    xs, ws, bs, xt, wt, bt, labels, kd_mask = linear_data(6, 50, 8)
    with pytest.raises(ValueError, match="student x is torch.float32 but w is torch.bfloat16"):
        linear_kd_mlm_loss(xs, ws.bfloat16(), bs, xt, wt, bt, labels, kd_mask, temperature=2.0)
