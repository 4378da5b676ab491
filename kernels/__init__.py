"""Fused losses for distillation: temperature KL + MLM cross-entropy over the vocabulary, and the cosine loss.

One module per op, each with its math, its Triton kernel, the torch twin of the same algorithm and its autograd
Function: `kernels.kd_mlm` (on logits), `kernels.linear_kd_mlm` (both LM heads fused in, no logits tensor) and
`kernels.cosine`. `impl="triton"` / `"torch"` picks the implementation, `"auto"` Triton on CUDA and torch
otherwise (`kernels.contract`). This package depends on torch and triton only; `distil_scale` imports it, never
the reverse. Triton reads TRITON_INTERPRET when this package is imported: set it before, to run the Triton
kernels on CPU tensors.
"""

import os

# Triton 3.9 warns that fused multiply-adds will be off by default from 3.10; the kernels are written for them.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from kernels.contract import IGNORE_INDEX, IMPLS  # noqa: E402
from kernels.cosine import cosine_loss  # noqa: E402
from kernels.kd_mlm import kd_mlm_loss  # noqa: E402
from kernels.linear_kd_mlm import linear_kd_mlm_loss  # noqa: E402

__all__ = ["IGNORE_INDEX", "IMPLS", "cosine_loss", "kd_mlm_loss", "linear_kd_mlm_loss"]
