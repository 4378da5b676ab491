"""The model families a teacher may come from, one small description each, and the layer maps of their students.

A `Family` says where a masked LM of that family keeps what distillation touches: its stack of transformer
layers, the module that projects the MLM head's output onto the vocabulary (and how to read that module's input,
weight and bias from a call), whether positions are offset (RoBERTa numbers them from padding_idx + 1), whether a
DistilBERT can express it, and, for ModernBERT, each layer's attention kind. Everything else (student
construction, the fused loss, export) is written once against these descriptions: adding a family is adding a
`Family` here and its tests in tests/test_families.py.

Layer maps. A student of n_s layers from a teacher of n_t takes, for student layer i, a teacher layer near the
evenly spaced position i * (n_t - 1) / (n_s - 1) (`layer_map`: 12 -> 6 is [0, 2, 4, 7, 9, 11]). ModernBERT
alternates global (full) and local (sliding-window) attention in a fixed rhythm, one full layer then two sliding
ones; a student layer must keep the kind of the teacher layer it copies, and the student keeps the same rhythm
(its layer i has the kind the teacher's layer i has), so it is a ModernBERT like the published ones.
`rhythm_map` picks, among the teacher layers of the kind each student layer needs, the assignment (strictly
increasing) with the smallest total distance to the evenly spaced positions, ties to the later layer:
ModernBERT-base 22 -> 11 is [0, 2, 4, 6, 8, 11, 12, 14, 17, 18, 20], ModernBERT-large 28 -> 14 is
[0, 2, 4, 6, 8, 10, 12, 14, 17, 18, 20, 23, 24, 26].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig

from distil_scale.config import ConfigError

FULL, SLIDING = "full_attention", "sliding_attention"


def _linear_input(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A vocabulary projection that is an nn.Linear: logits = x @ weight.T + bias."""
    return x, module.weight, module.bias


def _deberta_lm_head_input(module: nn.Module, hidden: torch.Tensor, word_embeddings: nn.Embedding):
    """DeBERTa's non-legacy head owns no projection module: it transforms, then multiplies by the word embedding
    table it is handed. Its transform is computed here as the head computes it (dense, activation, LayerNorm)."""
    x = module.LayerNorm(module.transform_act_fn(module.dense(hidden)))
    return x, word_embeddings.weight, module.bias


def _modernbert_kinds(config: PreTrainedConfig) -> list[str]:
    """Each layer's attention kind: `layer_types` where the installed transformers has it, else the older
    `global_attn_every_n_layers` rhythm (a full layer every n, starting with the first)."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)
    every = getattr(config, "global_attn_every_n_layers", 3)
    return [FULL if i % every == 0 else SLIDING for i in range(config.num_hidden_layers)]


@dataclass(frozen=True)
class Family:
    """Where a masked LM of one family keeps the parts distillation touches (paths from the masked-LM wrapper)."""

    name: str
    layers: str  # the ModuleList of transformer layers
    projection: str  # the module whose call returns the logits (its forward is what the fused loss replaces)
    # (projection module, its call's arguments) -> (x, weight, bias) with logits = x @ weight.T + bias
    head_input: Callable = _linear_input
    offset_positions: bool = False  # positions numbered from padding_idx + 1 (RoBERTa)
    distilbert_student: bool = False  # a DistilBERT can express it (the paper's student, the default)
    transform: str = ""  # the MLM head's dense transform (copied into a DistilBERT student)
    head_norm: str = ""  # the MLM head's LayerNorm (copied into a DistilBERT student)
    layer_kinds: Callable[[PreTrainedConfig], list[str]] | None = None  # per-layer attention kinds, if they differ
    teacher: bool = True  # accepted as a teacher

    @property
    def prefix(self) -> str:
        """The encoder's attribute in the masked-LM wrapper."""
        return self.layers.split(".")[0]


BERT = Family(
    "bert",
    layers="bert.encoder.layer",
    projection="cls.predictions.decoder",
    distilbert_student=True,
    transform="cls.predictions.transform.dense",
    head_norm="cls.predictions.transform.LayerNorm",
)
ROBERTA = Family(
    "roberta",
    layers="roberta.encoder.layer",
    projection="lm_head.decoder",
    offset_positions=True,
    distilbert_student=True,
    transform="lm_head.dense",
    head_norm="lm_head.layer_norm",
)
MODERNBERT = Family("modernbert", layers="model.layers", projection="decoder", layer_kinds=_modernbert_kinds)
# DeBERTa-v2/v3 has two head layouts (config.legacy): BERT's names with a tied Linear decoder, or `lm_predictions`,
# whose head multiplies by the word embeddings itself. The shared relative-position table lives in the encoder.
DEBERTA = Family("deberta-v2", layers="deberta.encoder.layer", projection="cls.predictions.decoder")
DEBERTA_LM_PREDICTIONS = Family(
    "deberta-v2", layers="deberta.encoder.layer", projection="lm_predictions.lm_head", head_input=_deberta_lm_head_input
)
# The student the paper builds; its seams are needed, it is not offered as a teacher.
DISTILBERT = Family("distilbert", layers="distilbert.transformer.layer", projection="vocab_projector", teacher=False)

_BY_MODEL_TYPE = {
    "bert": BERT,
    "roberta": ROBERTA,
    "xlm-roberta": ROBERTA,
    "camembert": ROBERTA,
    "modernbert": MODERNBERT,
    "deberta-v2": DEBERTA,
    "distilbert": DISTILBERT,
}
TEACHER_MODEL_TYPES = tuple(sorted(t for t, f in _BY_MODEL_TYPE.items() if f.teacher))


def family_of(config: PreTrainedConfig, *, teacher: bool = False) -> Family:
    """The description of a model's family; ConfigError for a model_type none describes (or not a teacher one)."""
    family = _BY_MODEL_TYPE.get(config.model_type)
    if family is None or (teacher and not family.teacher):
        raise ConfigError(
            f"teacher model_type {config.model_type!r} is not supported; use one of {', '.join(TEACHER_MODEL_TYPES)}"
        )
    if family is DEBERTA and not getattr(config, "legacy", True):
        return DEBERTA_LM_PREDICTIONS
    return family


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers for each student layer, first and last included (12 -> 6: [0, 2, 4, 7, 9, 11]).

    Rounds half up in integer arithmetic, so the map does not depend on float rounding. A one-layer student
    takes the teacher's first layer: it is the only one trained on embedding outputs.
    """
    if not 1 <= n_student <= n_teacher:
        raise ConfigError(f"student num_layers must be between 1 and the teacher's {n_teacher}, got {n_student}")
    if n_student == 1:
        return [0]
    span, steps = n_teacher - 1, n_student - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(n_student)]


def rhythm(kinds: list[str]) -> int | None:
    """The shortest period of a layer-kind sequence that repeats at least twice, None if it has none."""
    for period in range(1, len(kinds) // 2 + 1):
        if all(kinds[j] == kinds[j % period] for j in range(len(kinds))):
            return period
    return None


def rhythm_map(kinds: list[str], n_student: int) -> list[int]:
    """Teacher layers for a student whose layer i has the kind kinds[i % rhythm] and copies a teacher layer of that
    kind; among such strictly increasing maps, the one closest in total to the evenly spaced positions (ties to the
    later layer). A teacher without a rhythm gets the evenly spaced map (each student layer keeps its kind)."""
    n_teacher = len(kinds)
    evenly = layer_map(n_teacher, n_student)
    period = rhythm(kinds)
    if period is None or n_student == 1:
        return evenly
    want = [kinds[i % period] for i in range(n_student)]
    steps, span = n_student - 1, n_teacher - 1

    def cost(i: int, j: int) -> int:
        # Distance to i * span / steps in units of 1 / steps, weighted so that the tie-break (below the ideal
        # position costs one unit more) can never outweigh a real difference in distance, however many ties.
        d = j * steps - i * span
        return 2 * (n_student + 1) * abs(d) + (d < 0)

    inf = float("inf")
    # best[i][j]: the least cost of student layers 0..i with layer i copying teacher layer j.
    best = [[inf] * n_teacher for _ in range(n_student)]
    came: list[list[int]] = [[-1] * n_teacher for _ in range(n_student)]
    for j in range(n_teacher):
        if kinds[j] == want[0]:
            best[0][j] = cost(0, j)
    for i in range(1, n_student):
        low, arg = inf, -1  # min of best[i-1][:j]
        for j in range(n_teacher):
            if kinds[j] == want[i] and low < inf:
                best[i][j], came[i][j] = low + cost(i, j), arg
            if best[i - 1][j] < low:
                low, arg = best[i - 1][j], j
    last = min(range(n_teacher), key=lambda j: best[-1][j])
    assert best[-1][last] < inf, (kinds, n_student)  # the teacher's own first n_student layers always qualify
    mapped = [last]
    for i in range(n_student - 1, 0, -1):
        mapped.append(came[i][mapped[-1]])
    return mapped[::-1]


def student_layers(config: PreTrainedConfig, n_student: int) -> list[int]:
    """The teacher layers a student of `n_student` layers copies: by kind and rhythm where the family has kinds."""
    family = family_of(config)
    if family.layer_kinds is None:
        return layer_map(config.num_hidden_layers, n_student)
    return rhythm_map(family.layer_kinds(config), n_student)
