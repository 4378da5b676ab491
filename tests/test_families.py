"""Every teacher family: the student at init is the teacher cut down to the layers it copies, as a function (logits
and last hidden states), the layer maps keep ModernBERT's attention kinds and rhythm, and the LM-head seams give
the fused loss the same terms as the eager one."""

import copy
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM, DebertaV2Config, DistilBertForMaskedLM, ModernBertConfig

from distil_scale.config import ConfigError, LossConfig, load_config
from distil_scale.families import FULL, SLIDING, family_of, rhythm_map, student_layers
from distil_scale.losses import eager_terms, fused_terms
from distil_scale.models import build_student, lm_head_input, mlm_outputs, student_architecture

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 97
# name -> (config file under configs/models, overrides): small enough for milliseconds per forward.
TEACHERS = {
    "bert": ("tiny-bert.json", {}),
    "roberta": ("tiny-roberta.json", {"layer_norm_eps": 1e-12}),
    "xlm-roberta": ("tiny-xlm-roberta.json", {"layer_norm_eps": 1e-12}),
    "modernbert": ("tiny-modernbert.json", {"local_attention": 4}),
    "deberta-v3": ("tiny-deberta-v3.json", {}),
    "deberta-v2-legacy-head": ("tiny-deberta-v3.json", {"legacy": True}),
}


def _teacher(name: str, layers: int | None = None) -> torch.nn.Module:
    path, overrides = TEACHERS[name]
    config = AutoConfig.from_pretrained(os.path.join(ROOT, "configs", "models", path))
    fields = {"vocab_size": VOCAB, "hidden_size": 32, **overrides}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    for key, value in fields.items():
        setattr(config, key, value)
    if name == "modernbert" and layers is not None:
        config.layer_types = [FULL if i % 3 == 0 else SLIDING for i in range(layers)]
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config)
    # Fresh init leaves norms at (1, 0) and biases at 0: perturb so that a wrong copy cannot pass.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return model.eval()


def _inputs(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (3, 13), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad_id
    return ids, mask


def _cut(teacher: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """The teacher itself with only `layers` left in its stack, in order: what the student must compute at init."""
    cut = copy.deepcopy(teacher)
    stack_path = family_of(cut.config).layers
    parent, name = stack_path.rsplit(".", 1)
    stack = cut.get_submodule(stack_path)
    setattr(cut.get_submodule(parent), name, torch.nn.ModuleList([stack[j] for j in layers]))
    return cut


CASES = [
    ("bert", "distilbert"),
    ("bert", "same"),
    ("roberta", "distilbert"),
    ("roberta", "same"),
    ("xlm-roberta", "distilbert"),
    ("xlm-roberta", "same"),
    ("modernbert", "same"),
    ("deberta-v3", "same"),
    ("deberta-v2-legacy-head", "same"),
]


@pytest.mark.parametrize(("name", "architecture"), CASES)
def test_student_at_init_is_the_teacher_cut_down(name, architecture):
    teacher = _teacher(name, layers=6)
    student = build_student(teacher, num_layers=3, architecture=architecture).eval()
    expected_class = DistilBertForMaskedLM if architecture == "distilbert" else type(teacher)
    assert type(student) is expected_class
    layers = student_layers(teacher.config, 3)
    assert len(layers) == 3 and layers[0] == 0
    ids, mask = _inputs(teacher.config.pad_token_id)
    with torch.no_grad():
        s_logits, s_hidden = mlm_outputs(student, ids, mask)
        t_logits, t_hidden = mlm_outputs(_cut(teacher, layers), ids, mask)
        full_logits, _ = mlm_outputs(teacher, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(s_hidden[real], t_hidden[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_logits[real], t_logits[real], rtol=1e-5, atol=1e-5)
    assert (s_logits[real] - full_logits[real]).abs().max() > 1e-3  # the cut is not a no-op


def test_modernbert_student_keeps_kinds_and_rhythm():
    teacher = _teacher("modernbert", layers=9)
    student = build_student(teacher, num_layers=5)
    layers = student_layers(teacher.config, 5)
    t_kinds = [layer.attention_type for layer in teacher.model.layers]
    s_kinds = [layer.attention_type for layer in student.model.layers]
    assert s_kinds == [t_kinds[j] for j in layers]  # each layer keeps the kind of the layer it copies
    assert s_kinds == [FULL, SLIDING, SLIDING, FULL, SLIDING]  # and the family's rhythm
    assert student.config.layer_types == s_kinds
    windows = [layer.attn.sliding_window for layer in student.model.layers]
    assert windows == [None if k == FULL else teacher.config.sliding_window + 1 for k in s_kinds]


@pytest.mark.parametrize(
    ("layers", "student", "expected"),
    [
        (22, 11, [0, 2, 4, 6, 8, 11, 12, 14, 17, 18, 20]),  # ModernBERT-base
        (28, 14, [0, 2, 4, 6, 8, 10, 12, 14, 17, 18, 20, 23, 24, 26]),  # ModernBERT-large
        (22, 22, list(range(22))),
        (22, 20, [*range(19), 20]),  # the nearest pick per layer would run out of layers here
        (6, 1, [0]),
    ],
)
def test_modernbert_published_layer_maps(layers, student, expected):
    config = ModernBertConfig(num_hidden_layers=layers)
    assert student_layers(config, student) == expected
    kinds = config.layer_types
    assert [kinds[j] for j in expected] == [kinds[i] for i in range(student)]


def test_rhythm_map_without_a_rhythm_is_evenly_spaced():
    kinds = [FULL, SLIDING, FULL, FULL, SLIDING, SLIDING, SLIDING]
    assert rhythm_map(kinds, 3) == [0, 3, 6]


@pytest.mark.parametrize(
    ("name", "auto"),
    [("bert", "distilbert"), ("xlm-roberta", "distilbert"), ("modernbert", "same"), ("deberta-v3", "same")],
)
def test_architecture_auto_is_distilbert_where_it_can_express_the_teacher(name, auto):
    config = _teacher(name, layers=2).config
    assert student_architecture(config) == auto
    assert student_architecture(config, "same") == "same"
    if auto == "same":
        with pytest.raises(ConfigError, match="student.architecture: a DistilBERT cannot express"):
            student_architecture(config, "distilbert")


def test_student_architecture_config_is_validated(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {shards: d}\nteacher: {path: t}\n")
    assert load_config(str(path), ["--student.architecture=same"]).student.architecture == "same"
    with pytest.raises(ConfigError, match="^student.architecture: 'tiny' is not one of auto, same, distilbert$"):
        load_config(str(path), ["--student.architecture=tiny"])
    with pytest.raises(ConfigError, match="student.architecture: has no effect with student.arch_config"):
        load_config(str(path), ["--student.architecture=same", "--student.arch_config=x.json"])


@pytest.mark.parametrize("name", ["modernbert", "deberta-v3"])
def test_same_family_random_init_differs_from_the_teacher(name):
    teacher = _teacher(name, layers=4)
    student = build_student(teacher, init="random")
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    word = student.get_input_embeddings().weight
    assert word.shape == teacher.get_input_embeddings().weight.shape
    assert not torch.equal(word, teacher.get_input_embeddings().weight)


@pytest.mark.parametrize("name", TEACHERS)
def test_lm_head_input_reproduces_the_logits(name):
    model = _teacher(name, layers=2)
    ids, mask = _inputs(model.config.pad_token_id)
    with torch.no_grad():
        logits, hidden = mlm_outputs(model, ids, mask)
        head = lm_head_input(model, ids, mask)
    assert head.weight.shape == (VOCAB, 32) and head.bias.shape == (VOCAB,)
    torch.testing.assert_close(head.x @ head.weight.T + head.bias, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.last_hidden, hidden, rtol=0, atol=0)


# One case per distinct LM head (BERT's, RoBERTa's, ModernBERT's, DeBERTa's two layouts, DistilBERT's).
HEADS = [("bert", "same"), ("roberta", "same"), ("modernbert", "same"), ("deberta-v3", "same")]
HEADS += [("deberta-v2-legacy-head", "same"), ("xlm-roberta", "distilbert")]


@pytest.mark.parametrize(("name", "architecture"), HEADS)
def test_fused_loss_equals_eager_per_family(name, architecture):
    teacher = _teacher(name, layers=4)
    student = build_student(teacher, architecture=architecture).train()
    torch.manual_seed(4)
    with torch.no_grad():  # move the student off the teacher so that every term is non-trivial
        for param in student.parameters():
            param.add_(0.02 * torch.randn_like(param))
    ids, mask = _inputs(teacher.config.pad_token_id)
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4]] = ids[0, [1, 4]]
    labels[1, 2] = ids[1, 2]
    loss = LossConfig()
    grads = []
    for terms_of in (eager_terms, fused_terms):
        student.zero_grad()
        torch.manual_seed(5)  # the same dropout masks in both
        terms = terms_of(student, teacher, ids, mask, labels, loss)
        terms.total.backward()
        grads.append((terms, [p.grad.clone() for p in student.parameters()]))
    (eager, eager_grads), (fused, fused_grads) = grads
    for key in ("total", "kd", "mlm", "cos"):
        torch.testing.assert_close(getattr(fused, key), getattr(eager, key), rtol=1e-4, atol=1e-5)
    assert eager.kd > 0 and eager.mlm > 0 and eager.cos > 0
    for got, want in zip(fused_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    ("recipe", "teacher", "expected"),
    [
        ("modernbert-base.yaml", ModernBertConfig(), [0, 2, 4, 6, 8, 11, 12, 14, 17, 18, 20]),
        ("deberta-v3-base.yaml", DebertaV2Config(num_hidden_layers=12, hidden_size=768), [0, 2, 4, 7, 9, 11]),
    ],
)
def test_family_recipes_build_a_same_family_student(recipe, teacher, expected):
    cfg = load_config(os.path.join(ROOT, "configs", recipe))
    assert student_architecture(teacher, cfg.student.architecture) == "same"
    assert student_layers(teacher, cfg.student.num_layers) == expected
    assert (cfg.loss.impl, cfg.loss.alpha_kd, cfg.loss.alpha_mlm, cfg.loss.alpha_cos) == ("fused", 5.0, 2.0, 1.0)
