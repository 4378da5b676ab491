"""DeepSpeed checkpoint (ZeRO 0 and 3) -> Hugging Face directory, and the evaluation metrics on it.

The checkpoints come from real DeepSpeed engines on a single-process gloo group. They are made in a child
process (this file run as a script) so that the process group and DeepSpeed's global state never leak into
other tests of the session.
"""

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForMaskedLM,
    pipeline,
)

from distil_scale.config import ConfigError
from distil_scale.evaluate import (
    evaluate_models,
    forward_seconds,
    heldout_batches,
    load_masked_lm,
    mlm_metrics,
    parameter_count,
)
from distil_scale.export import _fill_tied, _strip_prefix, export_student, save_pretrained_atomic

VOCAB = 97
# (model family, ZeRO stage); a BERT teacher is exported through the same path as the student.
CASES = (("distilbert", 0), ("distilbert", 3), ("bert", 3))
TAG = "step00000001"
WORDS = "the a cat dog sat on mat and ran to red big old new sun sky sea hat box fox".split()


def _tiny_config() -> DistilBertConfig:
    return DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64)


def _tiny_model(family: str) -> torch.nn.Module:
    if family == "bert":
        return BertForMaskedLM(
            BertConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
            )
        )
    return DistilBertForMaskedLM(_tiny_config())


def _ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
    }


def _make_checkpoints(root: Path) -> None:
    """Child process: one optimizer step per ZeRO stage, save, and record the engine's gathered weights."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for family, stage in CASES:
        torch.manual_seed(0)
        model = _tiny_model(family)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_ds_config(stage))
        input_ids = torch.randint(5, VOCAB, (2, 12))
        loss = engine(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        save_dir = root / f"{family}{stage}"
        engine.save_checkpoint(str(save_dir), tag=TAG)
        # What distil_scale.checkpoint adds to DeepSpeed's files.
        engine.module.config.to_json_file(str(save_dir / TAG / "model_config.json"))
        (save_dir / TAG / "COMPLETE").write_text("1\n")
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        torch.save(weights, save_dir / "engine_weights.pt")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, __file__, str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A WordPiece tokenizer with exactly VOCAB tokens, built from a vocab file (no hub)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *(f"##{c}" for c in letters)]
    tokens += [f"w{i}" for i in range(VOCAB - len(tokens))]
    assert len(tokens) == VOCAB
    path = tmp_path_factory.mktemp("tok")
    (path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    # transformers 5 takes the vocabulary as `vocab` (path or dict); a `vocab_file` kwarg is silently ignored.
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(tokens)})
    tokenizer.save_pretrained(path)
    return str(path)


def _assert_state_equal(model: torch.nn.Module, expected: dict) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "stage"), CASES)
def test_export_matches_engine_weights(family, stage, checkpoints, tokenizer_dir, tmp_path):
    save_dir = checkpoints / f"{family}{stage}"
    out = export_student(str(save_dir), str(tmp_path / "export"), tokenizer_dir=tokenizer_dir)
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    model = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True)
    assert isinstance(model, type(_tiny_model(family)))
    _assert_state_equal(model, torch.load(save_dir / "engine_weights.pt"))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert os.listdir(tmp_path) == ["export"]  # no temp dir left behind


@pytest.mark.slow  # shares the `checkpoints` fixture (DeepSpeed runs)
def test_export_from_tag_dir_and_fill_mask_pipeline(checkpoints, tokenizer_dir, tmp_path):
    out = export_student(str(checkpoints / "distilbert3" / TAG), str(tmp_path / "export"), tokenizer_dir=tokenizer_dir)
    fill = pipeline("fill-mask", model=out, tokenizer=out)
    predictions = fill("the cat [MASK] on the mat")
    assert len(predictions) == 5
    assert all(p["token_str"] and 0 < p["score"] <= 1 for p in predictions)
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)


@pytest.mark.slow  # shares the `checkpoints` fixture (DeepSpeed runs)
def test_reexport_replaces_the_previous_export(checkpoints, tokenizer_dir, tmp_path):
    out = tmp_path / "export"
    export_student(str(checkpoints / "distilbert0"), str(out), tokenizer_dir=None)
    (out / "stale.txt").write_text("from an older export")
    assert not (out / "tokenizer.json").exists()
    export_student(str(checkpoints / "distilbert3"), str(out), tokenizer_dir=tokenizer_dir)
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.slow  # shares the `checkpoints` fixture (DeepSpeed runs)
def test_export_reports_missing_or_foreign_checkpoints(checkpoints, tokenizer_dir, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint directory at .*missing"):
        export_student(str(tmp_path / "missing"), str(tmp_path / "out"), tokenizer_dir=None)
    with pytest.raises(ConfigError, match="no DeepSpeed checkpoint"):
        export_student(str(tmp_path), str(tmp_path / "out"), tokenizer_dir=None)
    with pytest.raises(ConfigError, match="no tokenizer directory"):
        export_student(str(checkpoints / "distilbert0"), str(tmp_path / "out"), tokenizer_dir=str(tmp_path / "tok"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # shares the `checkpoints` fixture (DeepSpeed runs)
def test_export_without_latest_takes_newest_complete_tag(checkpoints, tmp_path):
    save_dir = tmp_path / "checkpoints"
    shutil.copytree(checkpoints / "distilbert0", save_dir)
    (save_dir / "latest").unlink()
    shutil.copytree(save_dir / TAG, save_dir / "step00000002")  # newer but incomplete: skipped
    (save_dir / "step00000002" / "COMPLETE").unlink()
    out = export_student(str(save_dir), str(tmp_path / "export"), tokenizer_dir=None)
    _assert_state_equal(load_masked_lm(out), torch.load(save_dir / "engine_weights.pt"))


@pytest.mark.slow  # shares the `checkpoints` fixture (DeepSpeed runs)
def test_export_warns_about_a_tag_without_complete_marker(checkpoints, tmp_path):
    tag_dir = tmp_path / "step00000009"
    shutil.copytree(checkpoints / "distilbert0" / TAG, tag_dir)
    (tag_dir / "COMPLETE").unlink()
    with pytest.warns(UserWarning, match="no COMPLETE marker"):
        export_student(str(tag_dir), str(tmp_path / "export"), tokenizer_dir=None)


def test_prefixed_state_dict_without_tied_key_loads_strictly():
    torch.manual_seed(0)
    source = DistilBertForMaskedLM(_tiny_config())
    state = {f"module.{k}": v for k, v in source.state_dict().items() if k != "vocab_projector.weight"}
    target = DistilBertForMaskedLM(_tiny_config())
    target.load_state_dict(_fill_tied(target, _strip_prefix(state)), strict=True)
    _assert_state_equal(target, source.state_dict())


def test_save_pretrained_atomic_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(_tiny_config())
    out = save_pretrained_atomic(model, None, str(tmp_path / "nested" / "model"))
    _assert_state_equal(load_masked_lm(out), model.state_dict())


class _CopyModel(torch.nn.Module):
    """Predicts its own input token with a fixed confidence: logits = 5 * one_hot(input_ids)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=5.0 * torch.nn.functional.one_hot(input_ids, VOCAB).float())


def test_mlm_metrics_of_a_copying_model():
    input_ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 20, 21, 3, 0, 0]])
    labels = torch.full_like(input_ids, -100)
    labels[0, 1], labels[0, 2], labels[1, 1] = 10, 30, 20  # two right, one wrong
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "labels": labels, "epoch": 0}
    metrics = mlm_metrics(_CopyModel(), [batch])
    lse = math.log(math.exp(5.0) + VOCAB - 1)
    expected_loss = ((lse - 5.0) * 2 + lse) / 3
    assert metrics["tokens"] == 3 and math.isclose(metrics["mlm_accuracy"], 2 / 3)
    assert math.isclose(metrics["loss"], expected_loss, rel_tol=1e-6)
    assert math.isclose(metrics["perplexity"], math.exp(expected_loss), rel_tol=1e-6)


def _random_batches(seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for size, length in ((2, 9), (3, 5), (1, 7)):
        input_ids = torch.randint(5, VOCAB, (size, length), generator=gen)
        labels = torch.where(torch.rand(size, length, generator=gen) < 0.4, input_ids, -100)
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return batches


def test_mlm_metrics_pool_over_tokens_and_restore_mode():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(_tiny_config()).train()
    batches = _random_batches(1)
    metrics = mlm_metrics(model, iter(batches), max_batches=2)
    assert model.training  # restored
    with torch.no_grad():
        model.eval()
        logits = [model(input_ids=b["input_ids"]).logits for b in batches[:2]]
    rows = torch.cat([lg[b["labels"] != -100] for lg, b in zip(logits, batches)])
    targets = torch.cat([b["labels"][b["labels"] != -100] for b in batches[:2]])
    ce = torch.nn.functional.cross_entropy(rows.double(), targets)
    assert metrics["tokens"] == len(targets)
    assert math.isclose(metrics["loss"], ce.item(), rel_tol=1e-5)
    assert math.isclose(metrics["mlm_accuracy"], (rows.argmax(-1) == targets).double().mean().item())


def test_mlm_metrics_without_labels_is_an_error():
    batch = _random_batches(2)[0]
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ConfigError, match="no MLM-labelled token"):
        mlm_metrics(_CopyModel(), [batch])


def test_parameter_count_counts_tied_weights_once():
    model = DistilBertForMaskedLM(_tiny_config())
    state_numel = sum(v.numel() for v in model.state_dict().values())
    assert parameter_count(model) == state_numel - model.vocab_projector.weight.numel()


def test_forward_seconds_times_the_batches():
    model = DistilBertForMaskedLM(_tiny_config())
    assert forward_seconds(model, _random_batches(3), max_batches=2) > 0
    assert forward_seconds(model, [], max_batches=2) == 0


@pytest.fixture(scope="module")
def prepared_data(tokenizer_dir, tmp_path_factory) -> str:
    """A tiny dataset written by `distil-scale prepare`'s code, with a held-out split."""
    from distil_scale.data.shards import prepare

    root = tmp_path_factory.mktemp("data")
    rng = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (20,), generator=rng)) for _ in range(60)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    out = root / "prepared"
    prepare(
        [str(root / "corpus.txt")],
        tokenizer_dir=tokenizer_dir,
        out_dir=str(out),
        max_seq_length=64,
        samples_per_shard=20,
        heldout_fraction=0.3,
        num_proc=1,
        progress=False,
    )
    return str(out)


def test_evaluate_models_compares_on_identical_batches(prepared_data, tmp_path, capsys):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_pretrained_atomic(DistilBertForMaskedLM(_tiny_config()), None, str(tmp_path / f"m{seed}")))
    results = evaluate_models(paths, data=prepared_data, batch_size=4, seed=3)
    batches = heldout_batches(prepared_data, batch_size=4, seed=3)
    assert batches and all(set(b) == {"input_ids", "attention_mask", "labels"} for b in batches)
    for path in paths:
        expected = mlm_metrics(load_masked_lm(path), batches)
        assert {k: results[path][k] for k in expected} == pytest.approx(expected)
        assert results[path]["parameters"] == parameter_count(load_masked_lm(path))
        assert results[path]["eval_seconds"] > 0
    assert results[paths[0]]["loss"] != results[paths[1]]["loss"]
    table = capsys.readouterr().out
    assert all(path in table for path in paths)


def test_load_masked_lm_reports_missing_or_empty_directory(tmp_path):
    with pytest.raises(ConfigError, match="eval: no model directory at .*nowhere"):
        load_masked_lm(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="eval: .* does not hold a masked language model"):
        load_masked_lm(str(tmp_path))


if __name__ == "__main__":
    _make_checkpoints(Path(sys.argv[1]))
