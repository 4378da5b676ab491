"""distil_scale.flops against a count done by hand, config naming variants, MFU arithmetic and the peak table."""

import pytest
import torch
from transformers import BertConfig, DistilBertConfig, RobertaConfig

from distil_scale.flops import forward_flops, mfu, peak_flops, shape, step_flops
from distil_scale.models import student_config

# hidden 8, intermediate 16, vocab 10, 4 positions per sequence, batch 2: 8 padded positions.
TINY = {"hidden_size": 8, "num_hidden_layers": 2, "intermediate_size": 16, "vocab_size": 10}
SEQ_LEN, BATCH = 4, 2


def _bert(layers: int = 2) -> BertConfig:
    return BertConfig(**{**TINY, "num_hidden_layers": layers}, num_attention_heads=2)


def _distilbert(layers: int = 2) -> DistilBertConfig:
    return DistilBertConfig(dim=8, n_layers=layers, hidden_dim=16, vocab_size=10, n_heads=2)


def test_forward_flops_matches_a_hand_count() -> None:
    # Per position and layer: QKV + output 4 * 2*8*8 = 512, scores + context 2 * 2*4*8 = 128, FFN 2 * 2*8*16 = 512,
    # so 1152; two layers 2304. LM head: transform 2*8*8 = 128, vocabulary 2*8*10 = 160, so 288. 2592 per position,
    # 8 positions: 20736.
    assert forward_flops(_bert(), BATCH * SEQ_LEN, SEQ_LEN) == 20736
    assert forward_flops(_bert(), BATCH * SEQ_LEN, SEQ_LEN, lm_head=False) == 8 * 2304
    # Teacher 20736 + 3 x a one-layer student (1152 + 288 = 1440 per position, 11520 for 8): 20736 + 34560.
    assert step_flops(_bert(), _distilbert(layers=1), BATCH * SEQ_LEN, SEQ_LEN) == 55296


def test_attention_term_grows_with_sequence_length() -> None:
    # Same 8 positions as one sequence of 8: scores + context 2 * 2*8*8 = 256 instead of 128, per layer.
    assert forward_flops(_bert(), 8, 8) - forward_flops(_bert(), 8, 4) == 8 * 2 * (256 - 128)


def test_naming_variants_give_the_same_count() -> None:
    roberta = RobertaConfig(**TINY, num_attention_heads=2)
    assert shape(_bert()) == shape(_distilbert()) == shape(roberta) == shape(TINY) == (8, 2, 16, 10)
    assert forward_flops(_bert(), 8, SEQ_LEN) == forward_flops(_distilbert(), 8, SEQ_LEN) == 20736
    # The student the trainer builds from a BERT-base teacher: half the layers, same widths.
    half = student_config(BertConfig())
    assert shape(half) == (768, 6, 3072, 30522)
    assert 2 * forward_flops(half, 512, 512, lm_head=False) == forward_flops(BertConfig(), 512, 512, lm_head=False)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="hidden_size, dim"):
        shape({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="seq_len"):
        forward_flops(_bert(), 8, 0)
    with pytest.raises(ValueError, match="seconds"):
        mfu(1.0, 0.0, 1.0)


def test_mfu_arithmetic() -> None:
    # 55296 FLOPs in 1 ms is 55.296 MFLOP/s; against a 100 MFLOP/s peak, 0.55296.
    assert mfu(55296, 1e-3, 100e6) == pytest.approx(0.55296)
    assert mfu(989.4e12, 2.0, 989.4e12) == pytest.approx(0.5)
    assert mfu(1.0, 1.0, None) is None


def test_peak_lookup() -> None:
    assert peak_flops("bf16", device_name="NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops(torch.bfloat16, device_name="NVIDIA H200") == 989.4e12
    assert peak_flops("bf16", device_name="NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops("bf16", device_name="NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("fp32", device_name="NVIDIA A100 80GB PCIe") == 19.5e12
    assert peak_flops("bf16", device_name="NVIDIA L40S") == 362.05e12  # not the L4's
    assert peak_flops("bf16", device_name="NVIDIA A10G") is None  # not the A10's, nor the A100's
    assert peak_flops("bf16", device_name="Tesla V100-SXM2-32GB") is None
    assert peak_flops("bf16", device_name="Some Future Accelerator") is None
    assert peak_flops("bf16", device_name="NVIDIA A10G", override=70e12) == 70e12
    with pytest.raises(ValueError, match="dtype"):
        peak_flops("int8", device_name="NVIDIA H200")


def test_peak_is_none_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops("bf16") is None
    assert peak_flops("bf16", override=1e12) == 1e12


def test_modernbert_and_deberta_layers_count_their_extra_matmuls() -> None:
    from transformers import DebertaV2Config, ModernBertConfig

    sizes = dict(hidden_size=8, num_hidden_layers=2, intermediate_size=16, vocab_size=10, num_attention_heads=2)
    base = forward_flops(_bert(), BATCH * SEQ_LEN, SEQ_LEN)
    # ModernBERT's gated MLP: up to 2f then down, 3 * 2*8*16 = 768 per layer instead of 512; 2 layers, 8 positions.
    assert forward_flops(ModernBertConfig(**sizes), BATCH * SEQ_LEN, SEQ_LEN) - base == 8 * 2 * 256
    # DeBERTa with 3 position buckets: c2p and p2c score 2 * 3 relative positions each, 2 * 2*8*6 = 192 per layer.
    deberta = DebertaV2Config(**sizes, relative_attention=True, position_buckets=3)
    assert forward_flops(deberta, BATCH * SEQ_LEN, SEQ_LEN) - base == 8 * 2 * 192
    assert forward_flops(DebertaV2Config(**sizes), BATCH * SEQ_LEN, SEQ_LEN) == base  # no relative attention
