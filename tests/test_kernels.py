"""The public fused losses, both implementations, against float64 references (Triton through its interpreter)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, so impl="triton" runs on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import cosine_loss, kd_mlm_loss, linear_kd_mlm_loss  # noqa: E402

IMPLS = ["torch", "triton"]
WEIGHTS = (1.3, -0.7)  # incoming gradients of kd and mlm: neither is 1, and they differ


def reference_kd_mlm(s, t, labels, kd_mask, temperature):
    s, t = s.double(), t.double()
    rows, labelled = kd_mask != 0, labels != -100
    log_q = F.log_softmax(s[rows] / temperature, dim=-1)
    log_p = F.log_softmax(t[rows] / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
    kd = temperature**2 * kl / rows.sum().clamp(min=1)
    mlm = F.cross_entropy(s[labelled], labels[labelled], reduction="sum") / labelled.sum().clamp(min=1)
    return kd, mlm


def reference_cos(hs, ht, mask):
    rows = mask != 0
    cos = F.cosine_similarity(hs.double()[rows], ht.double()[rows], dim=-1)
    return (1 - cos).sum() / rows.sum().clamp(min=1)


def close(actual, expected, rel=2e-5):
    """fp32 result vs float64 reference, the absolute tolerance scaled by the reference's magnitude."""
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=rel * max(scale, 1e-12))


def rows_data(n, vocab, *, seed=0, scale=3.0, label_fraction=0.3, padding=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) > label_fraction] = -100
    kd_mask = torch.ones(n, dtype=torch.bool)
    if padding:
        kd_mask[-padding:] = False
        labels[-padding:] = -100
    s = torch.randn(n, vocab, generator=g) * scale
    t = torch.randn(n, vocab, generator=g) * scale
    return s, t, labels, kd_mask


def backward_both(kd, mlm):
    (WEIGHTS[0] * kd + WEIGHTS[1] * mlm).backward()


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
    assert student[0].grad[-5:].abs().max() == 0  # padding rows: no gradient, and no GEMM either


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
