"""Float64 references and input builders shared by the kernel tests (tests/test_kernel_*.py)."""

import os

import torch
import torch.nn.functional as F

# The tests' tensors are on the CPU: impl="triton" runs them through the interpreter, which conftest turns on only
# where no GPU is present. On a GPU the compiled kernels are checked on CUDA tensors by `python -m kernels.verify`.
IMPLS = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]
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
