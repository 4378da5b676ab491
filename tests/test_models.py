"""Student construction from BERT and RoBERTa teachers, teacher loading, and the model-output seams."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from distil_scale.config import ConfigError
from distil_scale.models import (
    build_student,
    check_vocab,
    layer_map,
    lm_head_input,
    load_teacher,
    mlm_outputs,
    projection_replaced,
    student_config,
)

VOCAB, WIDTH = 97, 32
SMALL = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_attention_heads=4, intermediate_size=64)


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Fresh init leaves LayerNorms at (1, 0) and biases at 0: perturb so that a wrong copy cannot pass.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return model.eval()


def _bert(layers: int = 12) -> BertForMaskedLM:
    torch.manual_seed(0)
    return _perturbed(BertForMaskedLM(BertConfig(num_hidden_layers=layers, max_position_embeddings=64, **SMALL)), 1)


def _roberta(layers: int = 12) -> RobertaForMaskedLM:
    torch.manual_seed(0)
    config = RobertaConfig(num_hidden_layers=layers, max_position_embeddings=66, pad_token_id=1, **SMALL)
    return _perturbed(RobertaForMaskedLM(config), 2)


TEACHERS = {"bert": _bert, "roberta": _roberta}


def _inputs(pad_id: int, *, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, VOCAB, (3, 11), generator=gen)
    mask = torch.ones_like(input_ids)
    if padded:
        mask[1, 7:] = 0
        mask[2, 2:] = 0
        input_ids[mask == 0] = pad_id
    return input_ids, mask


def test_layer_map_distilbert_recipe():
    assert layer_map(12, 6) == [0, 2, 4, 7, 9, 11]


@pytest.mark.parametrize(("n_teacher", "n_student"), [(2, 1), (4, 2), (5, 3), (12, 4), (24, 12), (7, 7), (48, 5)])
def test_layer_map_is_evenly_spaced(n_teacher, n_student):
    mapped = layer_map(n_teacher, n_student)
    assert len(mapped) == n_student
    assert mapped[0] == 0 and (n_student == 1 or mapped[-1] == n_teacher - 1)
    assert all(a < b for a, b in zip(mapped, mapped[1:]))
    ideal = [i * (n_teacher - 1) / max(n_student - 1, 1) for i in range(n_student)]
    assert all(abs(m - x) <= 0.5 for m, x in zip(mapped, ideal))


@pytest.mark.parametrize(("n_teacher", "n_student"), [(12, 0), (12, 13)])
def test_layer_map_rejects_impossible_depths(n_teacher, n_student):
    with pytest.raises(ConfigError, match="num_layers"):
        layer_map(n_teacher, n_student)


def test_student_config_is_half_the_teacher():
    teacher = BertConfig(num_hidden_layers=12, max_position_embeddings=64, hidden_dropout_prob=0.15, **SMALL)
    config = student_config(teacher)
    assert isinstance(config, DistilBertConfig)
    assert (config.n_layers, config.dim, config.hidden_dim, config.n_heads) == (6, WIDTH, 64, 4)
    assert (config.vocab_size, config.max_position_embeddings, config.dropout) == (VOCAB, 64, 0.15)
    assert config.tie_word_embeddings and config.activation == "gelu"
    assert student_config(teacher, num_layers=3).n_layers == 3


def test_student_config_drops_roberta_position_offset():
    teacher = RobertaConfig(num_hidden_layers=4, max_position_embeddings=514, pad_token_id=1, **SMALL)
    assert student_config(teacher).max_position_embeddings == 512


def test_distilbert_base_from_bert_base_has_66m_parameters():
    # The paper's headline size: 66M for the 6-layer student of BERT-base (110M).
    with torch.device("meta"):
        student = DistilBertForMaskedLM(student_config(BertConfig()))
    count = sum(p.numel() for p in student.parameters())
    assert 66e6 < count < 67.5e6


@pytest.mark.parametrize("config", [GPT2Config(), DistilBertConfig()])
def test_student_config_rejects_unsupported_families(config):
    with pytest.raises(ConfigError, match="model_type"):
        student_config(config)


def test_student_config_warns_on_layer_norm_eps_mismatch():
    with pytest.warns(UserWarning, match="layer_norm_eps"):
        student_config(RobertaConfig(num_hidden_layers=4, layer_norm_eps=1e-5, **SMALL))


@pytest.mark.parametrize("family", TEACHERS)
def test_build_student_copies_mapped_layers(family):
    teacher = TEACHERS[family]()
    student = build_student(teacher)
    assert isinstance(student, DistilBertForMaskedLM) and student.config.n_layers == 6
    for i, j in enumerate([0, 2, 4, 7, 9, 11]):
        s, t = student.distilbert.transformer.layer[i], teacher.base_model.encoder.layer[j]
        pairs = [
            (s.attention.q_lin, t.attention.self.query),
            (s.attention.k_lin, t.attention.self.key),
            (s.attention.v_lin, t.attention.self.value),
            (s.attention.out_lin, t.attention.output.dense),
            (s.sa_layer_norm, t.attention.output.LayerNorm),
            (s.ffn.lin1, t.intermediate.dense),
            (s.ffn.lin2, t.output.dense),
            (s.output_layer_norm, t.output.LayerNorm),
        ]
        for s_mod, t_mod in pairs:
            torch.testing.assert_close(s_mod.weight, t_mod.weight, rtol=0, atol=0)
            torch.testing.assert_close(s_mod.bias, t_mod.bias, rtol=0, atol=0)


@pytest.mark.parametrize("family", TEACHERS)
def test_build_student_copies_embeddings_and_head(family):
    teacher = TEACHERS[family]()
    student = build_student(teacher)
    t_emb, s_emb = teacher.base_model.embeddings, student.distilbert.embeddings
    torch.testing.assert_close(s_emb.word_embeddings.weight, t_emb.word_embeddings.weight, rtol=0, atol=0)
    torch.testing.assert_close(s_emb.LayerNorm.weight, t_emb.LayerNorm.weight, rtol=0, atol=0)
    offset = 2 if family == "roberta" else 0  # padding_idx + 1
    folded = t_emb.position_embeddings.weight[offset:] + t_emb.token_type_embeddings.weight[0]
    torch.testing.assert_close(s_emb.position_embeddings.weight, folded, rtol=0, atol=0)
    head = teacher.cls.predictions if family == "bert" else teacher.lm_head
    transform = head.transform.dense if family == "bert" else head.dense
    norm = head.transform.LayerNorm if family == "bert" else head.layer_norm
    torch.testing.assert_close(student.vocab_transform.weight, transform.weight, rtol=0, atol=0)
    torch.testing.assert_close(student.vocab_layer_norm.bias, norm.bias, rtol=0, atol=0)
    torch.testing.assert_close(student.vocab_projector.bias, head.decoder.bias, rtol=0, atol=0)
    assert student.vocab_projector.weight is s_emb.word_embeddings.weight


@pytest.mark.parametrize("family", TEACHERS)
@pytest.mark.parametrize("padded", [False, True])
def test_student_embedding_output_equals_teacher_at_init(family, padded):
    teacher = TEACHERS[family]()
    student = build_student(teacher).eval()
    input_ids, mask = _inputs(teacher.config.pad_token_id, padded=padded)
    with torch.no_grad():
        t_out = teacher.base_model.embeddings(input_ids=input_ids)
        s_out = student.distilbert.embeddings(input_ids=input_ids)
    # Real tokens only: RoBERTa gives padding its own position (padding_idx), the student does not.
    real = mask.bool()
    torch.testing.assert_close(s_out[real], t_out[real], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", TEACHERS)
def test_full_depth_student_reproduces_the_teacher(family):
    # With every layer kept, a correct mapping of every tensor makes the student the same function.
    teacher = TEACHERS[family](layers=4)
    student = build_student(teacher, num_layers=4).eval()
    input_ids, mask = _inputs(teacher.config.pad_token_id, padded=True)
    with torch.no_grad():
        t_logits, t_hidden = mlm_outputs(teacher, input_ids, mask)
        s_logits, s_hidden = mlm_outputs(student, input_ids, mask)
    real = mask.bool()
    torch.testing.assert_close(s_hidden[real], t_hidden[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_logits[real], t_logits[real], rtol=1e-5, atol=1e-5)


def test_random_init_keeps_architecture_but_not_weights():
    teacher = _bert()
    torch.manual_seed(5)
    student = build_student(teacher, init="random")
    torch.manual_seed(5)
    again = build_student(teacher, init="random")
    copied = build_student(teacher)
    assert student.config.to_dict() == copied.config.to_dict()
    for (name, p_random), p_copied, p_again in zip(student.named_parameters(), copied.parameters(), again.parameters()):
        torch.testing.assert_close(p_random, p_again, rtol=0, atol=0)
        assert not torch.equal(p_random, p_copied), name


def test_build_student_rejects_unknown_init():
    with pytest.raises(ConfigError, match="init"):
        build_student(_bert(layers=2), init="xavier")


def test_check_vocab_accepts_matching_and_smaller_tokenizer():
    check_vocab(teacher_vocab=30522, student_vocab=30522, tokenizer_vocab=30522)
    check_vocab(teacher_vocab=30528, student_vocab=30528, tokenizer_vocab=30522)


@pytest.mark.parametrize(
    ("teacher", "student", "tokenizer", "match"),
    [
        (30522, 28996, 30522, "teacher vocab_size 30522 != student vocab_size 28996"),
        (100, 100, 101, "tokenizer has 101"),
    ],
)
def test_check_vocab_names_the_mismatch(teacher, student, tokenizer, match):
    with pytest.raises(ConfigError, match=f"data: {match}"):
        check_vocab(teacher_vocab=teacher, student_vocab=student, tokenizer_vocab=tokenizer, what="data")


@pytest.mark.parametrize("family", TEACHERS)
def test_load_teacher_freezes_and_casts(family, tmp_path):
    saved = TEACHERS[family](layers=2)
    saved.save_pretrained(tmp_path)
    teacher = load_teacher(str(tmp_path), dtype=torch.bfloat16, device="cpu")
    assert type(teacher) is type(saved) and not teacher.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())
    for (name, loaded), original in zip(teacher.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(loaded, original.bfloat16(), rtol=0, atol=0, msg=name)


def test_load_teacher_reports_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="no model directory at .*nowhere"):
        load_teacher(str(tmp_path / "nowhere"), dtype=torch.float32, device="cpu")


def test_load_teacher_rejects_a_model_without_mlm_head(tmp_path):
    torch.manual_seed(0)
    BertModel(BertConfig(num_hidden_layers=2, **SMALL)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="lacks masked-LM weights"):
        load_teacher(str(tmp_path), dtype=torch.float32, device="cpu")


def test_load_teacher_rejects_a_causal_lm(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="does not hold a masked language model"):
        load_teacher(str(tmp_path), dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("family", [*TEACHERS, "distilbert"])
def test_lm_head_input_reproduces_logits(family):
    model = build_student(_bert(layers=4)).eval() if family == "distilbert" else TEACHERS[family](layers=2)
    input_ids, mask = _inputs(model.config.pad_token_id, padded=True)
    with torch.no_grad():
        logits, hidden = mlm_outputs(model, input_ids, mask)
        head = lm_head_input(model, input_ids, mask)
    assert head.weight.shape == (VOCAB, WIDTH) and head.bias.shape == (VOCAB,)
    torch.testing.assert_close(head.x @ head.weight.T + head.bias, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.last_hidden, hidden, rtol=0, atol=0)


def test_mlm_outputs_returns_logits_and_last_hidden():
    model = _roberta(layers=2)
    input_ids, mask = _inputs(1, padded=True)
    with torch.no_grad():
        logits, hidden = mlm_outputs(model, input_ids, mask)
        expected = model.roberta(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert logits.shape == (3, 11, VOCAB)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", [*TEACHERS, "distilbert"])
def test_projection_replaced_hands_fn_the_head_input_and_restores(family):
    model = build_student(_bert(layers=4)).eval() if family == "distilbert" else TEACHERS[family](layers=2)
    input_ids, mask = _inputs(model.config.pad_token_id, padded=True)
    seen = []

    def fn(x, weight, bias):
        seen.append((weight, bias))
        return x @ weight.T + bias, "anything"

    with torch.no_grad():
        logits, _ = mlm_outputs(model, input_ids, mask)
        head = lm_head_input(model, input_ids, mask)
        with projection_replaced(model, fn):
            replaced = model(input_ids=input_ids, attention_mask=mask).logits
        after, _ = mlm_outputs(model, input_ids, mask)
    assert replaced[1] == "anything" and seen == [(head.weight, head.bias)]
    torch.testing.assert_close(replaced[0], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, logits, rtol=0, atol=0)
