"""Fused losses for distillation: temperature KL + MLM cross-entropy over the vocabulary, and the cosine loss.

Every op has a Triton implementation and a chunked pure-torch implementation of the same algorithm.
This package depends on torch and triton only; `distil_scale` imports it, never the reverse.
"""
