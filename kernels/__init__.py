"""Fused losses for distillation: temperature KL + MLM cross-entropy over the vocabulary, and the cosine loss.

Every op has a Triton implementation and a chunked pure-torch implementation of the same algorithm
(`impl="triton"` / `"torch"`; `"auto"` picks Triton on CUDA, torch otherwise). See `kernels.ops` for the
definitions and the schedule. This package depends on torch and triton only; `distil_scale` imports it,
never the reverse.
"""

from kernels.ops import IMPLS, cosine_loss, kd_mlm_loss, linear_kd_mlm_loss

__all__ = ["IMPLS", "cosine_loss", "kd_mlm_loss", "linear_kd_mlm_loss"]
