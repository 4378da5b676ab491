"""The `distil-scale` command as users call it: real subprocesses, exit codes, files left behind."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distil_scale.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_prepare_from_jsonl_writes_shards_and_manifest(tmp_path, tiny_corpus, tiny_tokenizer):
    src = tmp_path / "docs.jsonl"
    with open(tiny_corpus, encoding="utf-8") as f, open(src, "w", encoding="utf-8") as out:
        for line in f:
            out.write(json.dumps({"body": line.strip(), "id": 1}) + "\n")
    out_dir = tmp_path / "shards"
    proc = _cli("prepare", str(src), "--tokenizer", tiny_tokenizer, "--out", str(out_dir), "--text-field", "body")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out_dir / "dataset.json").read_text())
    train = manifest["splits"]["train"]
    assert train and all((out_dir / s["url"]).exists() for s in train)
    assert sum(s["samples"] for s in train) > 200


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, needle",
    [
        (["prepare", "nope.txt", "--tokenizer", "{tok}", "--out", "{out}"], "nope.txt"),
        (["prepare", "{corpus}", "--tokenizer", "no-such-tokenizer", "--out", "{out}"], "no-such-tokenizer"),
        (["export", "no-such-checkpoints", "--out", "{out}"], "no-such-checkpoints"),
        (["eval", "no-such-model", "--data", "{data}"], "no-such-model"),
        (["eval", "no-such-model", "--data", "{out}"], "no dataset.json"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, tiny_corpus, tiny_tokenizer, tiny_dataset, args, needle):
    out = tmp_path / "out"
    fmt = {"tok": tiny_tokenizer, "out": str(out), "corpus": tiny_corpus, "data": tiny_dataset}
    proc = _cli(*[a.format(**fmt) for a in args], cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (out / "dataset.json").exists() and not (out / "config.json").exists()


@pytest.mark.slow
def test_eval_reports_accuracy_and_perplexity(tmp_path, tiny_dataset, tiny_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer, local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model_dir = tmp_path / "model"
    BertForMaskedLM(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    proc = _cli("eval", str(model_dir), "--data", tiny_dataset, "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout[proc.stdout.index("{") :])
    metrics = results[str(model_dir)]
    assert 0 <= metrics["mlm_accuracy"] < 0.2  # an untrained model guesses
    assert metrics["perplexity"] > 50 and metrics["tokens"] > 0
    assert metrics["parameters"] == sum(p.numel() for p in BertForMaskedLM(config).parameters())


def test_config_explain_lists_every_section():
    proc = _cli("config", "--explain")
    assert proc.returncode == 0
    for section in ("run", "data", "teacher", "student", "loss", "optim", "train", "checkpoint", "log", "deepspeed"):
        assert f"\n{section}:" in "\n" + proc.stdout
    assert "temperature: 2.0" in proc.stdout


def test_transformers_does_not_take_our_kernels_package_for_its_namesake():
    # `transformers` probes for an unrelated PyPI package also imported as `kernels`.
    from transformers.utils.import_utils import is_kernels_available

    import kernels

    assert os.path.dirname(kernels.__file__) == os.path.join(ROOT, "kernels")
    assert not is_kernels_available()
