r"""Model FLOPs of one distillation training step, and model FLOPs utilisation (MFU).

Only matrix multiplications are counted, each (m x k) @ (k x n) as 2 m n k FLOPs. For an encoder of width h,
feed-forward width f, vocabulary V and L positions per sequence, one forward pass costs per position:

    per layer:  4 * 2 h^2        Q, K, V and output projections
              + 2 * 2 L h        attention scores Q K^T and context P V (summed over heads: head_dim * heads = h)
              + 2 * 2 h f        feed-forward up and down projections
    LM head:    2 h^2            the MLM head's dense transform
              + 2 h V            the vocabulary projection

    forward(config, tokens, L) = tokens * (layers * (8 h^2 + 4 L h + 4 h f) + 2 h^2 + 2 h V)

Two families add to a layer: ModernBERT's gated MLP projects up to 2f (gate and value), so its MLP is 6 h f, not
4 h f; DeBERTa's disentangled attention also scores each query against 2k relative positions (content-to-position)
and each key against them (position-to-content), 2 * 2 h * 2k more, k = position_buckets (or the relative range)
when relative_attention is on. (ModernBERT's sliding-window layers are charged the full L: the attention kernels
compute the masked scores anyway. DeBERTa's projection of the relative table, once per layer and batch, is not
counted.)

The recipe computes logits at every position for the KD term (eager and fused alike), so the head is charged for
every position. Embedding lookups, LayerNorm, softmax, GELU, dropout, the losses and the optimizer are not counted
(they are O(tokens * h) or O(tokens * V) elementwise work, a few percent at BERT-base sizes).

One step distils a frozen teacher into a student, so

    step = forward(teacher) + 3 * forward(student)

the teacher runs forward only (no grad), the student forward and backward (backward = gradients of activations
and of weights = 2 x forward). Activation recomputation, if any, is not counted: these are model FLOPs, not
hardware FLOPs, so MFU = step FLOPs / step time / peak FLOP/s compares runs that recompute and runs that do not.

`tokens` is the number of *padded* positions, batch * padded length: what the GPU actually computes, padding
included. A batch that is 20% padding gets the same FLOPs as a full one; its real-token rate is lower, which the
data pipeline's padding fraction accounts for.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch

from kernels.contract import DTYPE_NAMES


class Shape(NamedTuple):
    """The four sizes the FLOP count depends on."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int


# (field, the names it goes by): BERT / RoBERTa spell them one way, DistilBERT the other.
_NAMES = (
    ("hidden", ("hidden_size", "dim")),
    ("layers", ("num_hidden_layers", "n_layers")),
    ("intermediate", ("intermediate_size", "hidden_dim")),
    ("vocab", ("vocab_size",)),
)


def _get(config: Any, name: str, default: Any = None) -> Any:
    """A field of a Hugging Face config object or of a plain dict."""
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def shape(config: Any) -> Shape:
    """The sizes of a Hugging Face config (BertConfig, RobertaConfig, DistilBertConfig) or a plain dict."""
    values = {}
    for field, names in _NAMES:
        for name in names:
            value = _get(config, name)
            if value is not None:
                values[field] = int(value)
                break
        else:
            raise ValueError(f"model config {type(config).__name__} has none of {', '.join(names)}")
    return Shape(**values)


def _family_terms(config: Any) -> tuple[bool, int]:
    """(whether the MLP is gated, relative positions k each query and key is also scored against: 2k columns)."""
    model_type = _get(config, "model_type")
    span = 0
    if model_type in ("deberta-v2", "deberta") and _get(config, "relative_attention", False):
        buckets = _get(config, "position_buckets", -1) or -1
        max_relative = _get(config, "max_relative_positions", -1) or -1
        span = buckets if buckets > 0 else max_relative if max_relative > 0 else _get(config, "max_position_embeddings")
    return model_type == "modernbert", int(span)


def forward_flops(config: Any, tokens: int, seq_len: int, *, lm_head: bool = True) -> int:
    """Matmul FLOPs of one forward pass over `tokens` padded positions in sequences of `seq_len` positions."""
    if tokens < 0 or seq_len < 1:
        raise ValueError(f"tokens must be >= 0 and seq_len >= 1, got {tokens} and {seq_len}")
    h, layers, f, vocab = shape(config)
    gated, span = _family_terms(config)
    per_layer = 4 * 2 * h * h + 2 * 2 * seq_len * h + (3 if gated else 2) * 2 * h * f + 2 * 2 * h * 2 * span
    head = 2 * h * h + 2 * h * vocab if lm_head else 0
    return tokens * (layers * per_layer + head)


def step_flops(teacher_config: Any | None, student_config: Any, tokens: int, seq_len: int) -> int:
    """Model FLOPs of one distillation micro-step: teacher forward (none without a teacher) + student forward and
    backward (3 x forward)."""
    teacher = 0 if teacher_config is None else forward_flops(teacher_config, tokens, seq_len)
    return teacher + 3 * forward_flops(student_config, tokens, seq_len)


def mfu(flops: float, seconds: float, peak_flops: float | None) -> float | None:
    """The fraction of `peak_flops` (FLOP/s) that `flops` done in `seconds` reach; None without a peak."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if peak_flops is None:
        return None
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return flops / seconds / peak_flops


# Dense (no 2:4 sparsity) peak FLOP/s from NVIDIA's data sheets, by dtype. "fp32" is plain FP32 on the CUDA cores
# (torch's default for fp32 matmuls); "tf32" is FP32 inputs on the tensor cores. First match of the device name
# wins, so the more specific patterns come first.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12}),
    (r"H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12}),
    (r"H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12}),
    (r"H100|H200|GH200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"L40S", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183.0e12, "fp32": 91.6e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"V100", {"fp16": 125e12, "fp32": 15.7e12}),  # SXM2; no bf16 tensor cores
)


def peak_flops(
    dtype: str | torch.dtype = "bf16", *, device_name: str | None = None, override: float | None = None
) -> float | None:
    """Dense peak FLOP/s of the device for `dtype` ("bf16", "fp16", "tf32", "fp32" or a torch dtype).

    `override` wins when given. Otherwise the name is `device_name`, else the current CUDA device's; None on a
    machine without CUDA, for an accelerator not in PEAK_FLOPS, or for a dtype it has no peak for.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be > 0, got {override}")
        return float(override)
    key = DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if key not in ("bf16", "fp16", "tf32", "fp32"):
        raise ValueError(f"dtype must be bf16, fp16, tf32 or fp32, got {dtype!r}")
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, device_name):
            return peaks.get(key)
    return None
