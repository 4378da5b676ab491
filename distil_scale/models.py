"""Teacher loading, student construction and the model-family seams the loss needs.

Two kinds of student (`student.architecture`), both at half the teacher's depth by default:

- a DistilBERT (the paper's, the default for BERT and RoBERTa / XLM-R teachers): the teacher's width, no
  token-type embeddings, no pooler, a vocabulary projector tied to the word embeddings;
- the teacher's own family (the default for ModernBERT and DeBERTa-v2/v3, which a DistilBERT cannot express):
  the teacher's config with fewer layers, so the student is the teacher cut down to the layers it copies.

`build_student(init="teacher")` copies the teacher's embeddings, a subset of its layers (families.student_layers:
evenly spaced, 12 -> 6 takes [0, 2, 4, 7, 9, 11]; by attention kind and rhythm for ModernBERT) and its MLM head.
Where each family keeps those is described once, in distil_scale.families.

For a DistilBERT student two teacher quirks are folded in so that the student's embedding output equals the
teacher's at init: BERT and RoBERTa add token_type_embeddings[0] to every token (nobody passes token_type_ids
here), which the student has no table for, so that row is added to every student position embedding; RoBERTa
numbers positions from padding_idx + 1, so the student takes the rows from that offset on.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn
from transformers import (
    AutoModelForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    PreTrainedConfig,
    PreTrainedModel,
)

from distil_scale.config import ConfigError
from distil_scale.families import (
    TEACHER_MODEL_TYPES,
    Family,
    family_of,
    layer_map,
    student_layers,
)
from kernels.measure import one_line

# DistilBERT hard-codes this LayerNorm epsilon; its config has no field for it.
_DISTILBERT_LN_EPS = 1e-12


# Student layer module -> teacher layer module; both have a weight and a bias.
_LAYER_NAMES = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}


def _distilbert_family(config: PreTrainedConfig) -> Family:
    """The family of a teacher a DistilBERT student is built from; ConfigError if a DistilBERT cannot express it."""
    family = family_of(config, teacher=True)
    if not family.distilbert_student:
        raise ConfigError(
            f"student.architecture: a DistilBERT cannot express a {config.model_type} teacher "
            "(set student.architecture to auto or same)"
        )
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"teacher position_embedding_type {config.position_embedding_type!r}: only 'absolute' maps")
    return family


def _position_offset(config: PreTrainedConfig) -> int:
    return config.pad_token_id + 1 if family_of(config).offset_positions else 0


def max_positions(config: PreTrainedConfig) -> int | None:
    """The longest input a model's position table takes (RoBERTa-family rows start past padding_idx)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in TEACHER_MODEL_TYPES:
        limit -= _position_offset(config)
    return limit


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off for the block: loading a model for another head warns about
    the weights it drops or adds, and a bar would break the one-line output of a mistake found after loading."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_masked_lm_dir(path: str, *, dtype: torch.dtype, what: str = "model") -> PreTrainedModel:
    """AutoModelForMaskedLM from a local directory, refusing a directory whose MLM weights are incomplete."""
    if not os.path.isdir(path):
        raise ConfigError(f"{what}: no model directory at {path}")
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            path, local_files_only=True, dtype=dtype, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{what}: {path} does not hold a masked language model ({one_line(err)})") from err
    if info["missing_keys"]:
        # A bare encoder checkpoint loads "successfully" with a random MLM head; its logits would be noise.
        missing = sorted(info["missing_keys"])
        raise ConfigError(f"{what}: {path} lacks masked-LM weights ({len(missing)} missing, e.g. {missing[0]})")
    return model


def load_teacher(path: str, *, dtype: torch.dtype, device: torch.device | str) -> PreTrainedModel:
    """A frozen masked LM from a local Hugging Face directory, in eval mode, cast to `dtype` on `device`."""
    model = load_masked_lm_dir(path, dtype=dtype, what="teacher")
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _depth(config: PreTrainedConfig, num_layers: int | None) -> int:
    """The student's depth: `num_layers`, or half the teacher's; validated against the teacher's."""
    n_layers = max(1, config.num_hidden_layers // 2) if num_layers is None else num_layers
    layer_map(config.num_hidden_layers, n_layers)  # validates n_layers
    return n_layers


def student_architecture(teacher_config: PreTrainedConfig, architecture: str = "auto") -> str:
    """ "distilbert" or "same" (the teacher's family): `architecture` resolved for this teacher ("auto": DistilBERT
    where it can express the teacher, the paper's student, else the teacher's family)."""
    family = family_of(teacher_config, teacher=True)
    if architecture == "auto":
        return "distilbert" if family.distilbert_student else "same"
    if architecture not in ("distilbert", "same"):
        raise ConfigError(f"student.architecture: {architecture!r} is not one of auto, distilbert, same")
    if architecture == "distilbert":
        _distilbert_family(teacher_config)
    return architecture


def same_family_config(teacher_config: PreTrainedConfig, *, num_layers: int | None = None) -> PreTrainedConfig:
    """The teacher's own config at half depth (or `num_layers`); ModernBERT's layers keep the kinds of the teacher
    layers they copy (which, by the rhythm map, are the teacher's own rhythm)."""
    t = teacher_config
    family = family_of(t, teacher=True)
    n_layers = _depth(t, num_layers)
    fields = {**t.to_dict(), "num_hidden_layers": n_layers}
    picked = None
    if family.layer_kinds is not None:
        kinds = family.layer_kinds(t)
        picked = [kinds[j] for j in student_layers(t, n_layers)]
        if hasattr(t, "layer_types"):
            fields["layer_types"] = picked
    config = type(t).from_dict(fields)
    if picked is not None and family.layer_kinds(config) != picked:  # an older config has a rhythm, no list
        raise ConfigError(f"student.num_layers: {n_layers} layers cannot keep the teacher's attention rhythm")
    return config


def student_config(teacher_config: PreTrainedConfig, *, num_layers: int | None = None) -> DistilBertConfig:
    """The teacher's architecture as a DistilBertConfig at half depth (or `num_layers`)."""
    t = teacher_config
    family = _distilbert_family(t)
    n_layers = _depth(t, num_layers)
    if not isinstance(t.hidden_act, str):
        raise ConfigError(f"teacher hidden_act must be a named activation, got {t.hidden_act!r}")
    if family.offset_positions and t.hidden_act != "gelu":
        warnings.warn(f"RoBERTa's MLM head uses gelu, the student's uses hidden_act {t.hidden_act!r}", stacklevel=2)
    if t.layer_norm_eps != _DISTILBERT_LN_EPS:
        warnings.warn(
            f"teacher layer_norm_eps={t.layer_norm_eps} but DistilBERT uses {_DISTILBERT_LN_EPS}: the student's "
            "outputs at init match the teacher's only approximately",
            stacklevel=2,
        )
    return DistilBertConfig(
        vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings - _position_offset(t),
        sinusoidal_pos_embds=False,
        n_layers=n_layers,
        n_heads=t.num_attention_heads,
        dim=t.hidden_size,
        hidden_dim=t.intermediate_size,
        dropout=t.hidden_dropout_prob,
        attention_dropout=t.attention_probs_dropout_prob,
        activation=t.hidden_act,
        initializer_range=t.initializer_range,
        pad_token_id=t.pad_token_id,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        tie_word_embeddings=True,
    )


def _embedding_tensors(state: dict[str, torch.Tensor], config: PreTrainedConfig, n_pos: int) -> dict:
    src = f"{family_of(config).prefix}.embeddings"
    offset = _position_offset(config)
    positions = state[f"{src}.position_embeddings.weight"][offset : offset + n_pos].float()
    token_type = state.get(f"{src}.token_type_embeddings.weight")
    if token_type is not None:
        positions = positions + token_type[0].float()
    return {
        "distilbert.embeddings.word_embeddings.weight": state[f"{src}.word_embeddings.weight"],
        "distilbert.embeddings.position_embeddings.weight": positions,
        "distilbert.embeddings.LayerNorm.weight": state[f"{src}.LayerNorm.weight"],
        "distilbert.embeddings.LayerNorm.bias": state[f"{src}.LayerNorm.bias"],
    }


def _distilbert_tensors(teacher: PreTrainedModel, student_config: DistilBertConfig) -> dict[str, torch.Tensor]:
    """DistilBERT student parameter name -> the teacher tensor it is initialised from."""
    config = teacher.config
    family = _distilbert_family(config)
    state = teacher.state_dict()
    out = _embedding_tensors(state, config, student_config.max_position_embeddings)
    for i, j in enumerate(student_layers(config, student_config.n_layers)):
        for s_name, t_name in _LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"distilbert.transformer.layer.{i}.{s_name}.{kind}"] = state[f"{family.layers}.{j}.{t_name}.{kind}"]
    for s_name, t_name in (("vocab_transform", family.transform), ("vocab_layer_norm", family.head_norm)):
        for kind in ("weight", "bias"):
            out[f"{s_name}.{kind}"] = state[f"{t_name}.{kind}"]
    # The projector weight is the word embedding matrix (tied); only its bias is a tensor of its own.
    out["vocab_projector.bias"] = state[f"{family.projection}.bias"]
    return out


def _same_family_tensors(teacher: PreTrainedModel, n_layers: int) -> dict[str, torch.Tensor]:
    """Same-family student parameter name -> teacher tensor: everything outside the layer stack as it is (the
    embeddings, DeBERTa's shared relative-position table, the MLM head), layer j of the map renamed to layer i."""
    layers = family_of(teacher.config).layers + "."
    renamed = {str(j): str(i) for i, j in enumerate(student_layers(teacher.config, n_layers))}
    out = {}
    for name, tensor in teacher.state_dict().items():
        if not name.startswith(layers):
            out[name] = tensor
            continue
        index, rest = name[len(layers) :].split(".", 1)
        if index in renamed:
            out[f"{layers}{renamed[index]}.{rest}"] = tensor
    return out


def build_student(
    teacher: PreTrainedModel, *, num_layers: int | None = None, init: str = "teacher", architecture: str = "auto"
) -> PreTrainedModel:
    """The student masked LM, initialised from the teacher or at random (the baseline): a DistilBertForMaskedLM of
    the teacher's width, or the teacher's own class at reduced depth (see `student_architecture`).

    "random" draws from the default generator: seed it first for a reproducible baseline.
    """
    if init not in ("teacher", "random"):
        raise ConfigError(f"student init must be 'teacher' or 'random', got {init!r}")
    if student_architecture(teacher.config, architecture) == "same":
        config = same_family_config(teacher.config, num_layers=num_layers)
        student = type(teacher)(config).float()
        if init == "teacher":
            _copy_into(student, _same_family_tensors(teacher, config.num_hidden_layers), buffers=True)
        return student
    config = student_config(teacher.config, num_layers=num_layers)
    student = DistilBertForMaskedLM(config)
    if init == "random":
        return student
    if not getattr(teacher.config, "tie_word_embeddings", True):
        warnings.warn(
            "teacher's vocab projection is untied; the student's is tied to the word embeddings", stacklevel=2
        )
    _copy_into(student, _distilbert_tensors(teacher, config))
    return student


def _copy_into(student: nn.Module, sources: dict[str, torch.Tensor], *, buffers: bool = False) -> None:
    """Copy every parameter (and persistent buffer) of the student from `sources`, which must name exactly those:
    with buffers, by the student's state_dict names (a tied parameter under each of its names)."""
    params = student.state_dict(keep_vars=True) if buffers else dict(student.named_parameters())
    assert set(params) == set(sources), sorted(set(params) ^ set(sources))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(sources[name])


def check_vocab(*, teacher_vocab: int, student_vocab: int, tokenizer_vocab: int, what: str = "") -> None:
    """Raise ConfigError unless teacher and student share one vocabulary the tokenizer fits into.

    A tokenizer smaller than the embedding matrix is fine (matrices are often padded to a multiple of 8);
    a larger one would produce ids past the last embedding row.
    """
    where = f"{what}: " if what else ""
    if teacher_vocab != student_vocab:
        raise ConfigError(
            f"{where}teacher vocab_size {teacher_vocab} != student vocab_size {student_vocab}; they must be equal"
        )
    if tokenizer_vocab > teacher_vocab:
        raise ConfigError(
            f"{where}tokenizer has {tokenizer_vocab} tokens but the model's vocab_size is {teacher_vocab}; "
            "use the tokenizer the teacher was trained with"
        )


def mlm_outputs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, L, V), last hidden state (B, L, H)) of a masked LM of a known family, or its engine.

    No token_type_ids: the student has none, and zeros are what the teacher would use anyway.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


class LMHeadInput(NamedTuple):
    """What a fused loss needs instead of logits: logits = x @ weight.T + bias."""

    x: torch.Tensor  # (B, L, H) input of the vocabulary projection
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    last_hidden: torch.Tensor  # (B, L, H), for the cosine term


def lm_head_input(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LMHeadInput:
    """Run the encoder and the MLM head up to, not including, the vocabulary projection.

    The model's own forward runs with its projection replaced (it hands back its input), so the head's transform
    is computed as that family computes it, the (B, L, V) logits never exist and a DeepSpeed engine's hooks run as
    in any forward. Under ZeRO-3 (a partitioned teacher) the returned weight and bias are partitioned parameters
    again by the time this returns: gather them before use.
    """
    seen = []

    def keep(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        seen.append((weight, bias))
        return x

    with projection_replaced(model, keep):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    (weight, bias), *_ = seen
    return LMHeadInput(out.logits, weight, bias, out.hidden_states[-1])


@contextlib.contextmanager
def projection_replaced(model: nn.Module, fn: Callable) -> Iterator[None]:
    """Within the block, the model's vocabulary projection returns fn(x, weight, bias) instead of its logits.

    The model's forward then hands back whatever fn returns in place of `logits`, and no (B, L, V) tensor is
    made. The call still goes through the projection module, so a DeepSpeed engine's hooks run around fn: under
    ZeRO-3 the (tied) weight is gathered while fn runs and released after, and fn's outputs are outputs of the
    engine's forward, whose backward hooks must run before any parameter gradient (engine.forward registers them).
    """
    inner = getattr(model, "module", model)
    family = family_of(inner.config)
    projection = inner.get_submodule(family.projection)
    # An instance attribute shadows the class's forward; the module's __call__ (and its hooks) still run.
    projection.forward = lambda *args: fn(*family.head_input(projection, *args))
    try:
        yield
    finally:
        del projection.forward
