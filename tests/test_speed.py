"""`distil-scale eval --speed`: the size and speed table of tiny models on CPU, its JSON, and bad inputs.

Timings on a shared CPU are noise at this size, so only the table's structure and the exact quantities (parameter
counts, sizes, the first model's speed-up of 1) are checked, never a timing ratio.
"""

import json
import os

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from distil_scale.cli import main
from distil_scale.models import build_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BERT = os.path.join(ROOT, "configs", "models", "tiny-bert.json")
# Small and quick: a few passes of 8 tokens per model and batch size.
FAST = ["--seq-len", "8", "--iters", "2", "--warmup", "1", "--batch-sizes", "1", "2"]


def _distinct_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    """A tiny BERT teacher directory and its half-depth student directory, with their parameter counts."""
    root = tmp_path_factory.mktemp("speed-models")
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig.from_json_file(TINY_BERT))
    student = build_student(teacher)
    teacher_dir, student_dir = str(root / "teacher"), str(root / "student")
    teacher.save_pretrained(teacher_dir)
    student.save_pretrained(student_dir)
    return {
        "teacher": teacher_dir,
        "student": student_dir,
        "teacher_params": _distinct_parameters(teacher),
        "student_params": _distinct_parameters(student),
    }


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what setting the case up printed (save_pretrained's progress bar)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_speed_table_rows_counts_and_json(tiny_models, tmp_path, capsys):
    out_file = tmp_path / "speed.json"
    argv = ["eval", "--speed", tiny_models["teacher"], tiny_models["student"], TINY_BERT, *FAST]
    code, out, err = _run([*argv, "--json", "--out", str(out_file)], capsys)
    assert code == 0, err

    table, json_text = out[: out.index("\n{")], out[out.index("\n{") :]
    report = json.loads(json_text)
    assert json.loads(out_file.read_text()) == report
    lines = table.splitlines()
    assert lines[0].startswith("machine: CPU") and "torch threads" in lines[0]
    assert lines[1].startswith("settings:") and "seq len 8" in lines[1]

    # One row per device, batch size and model, in the order the models were given.
    names = ["teacher", "student", "tiny-bert"]
    cpu_rows = [r for r in report["results"] if r["device"] == "cpu"]
    assert [(r["batch_size"], r["model"]) for r in cpu_rows] == [(b, n) for b in (1, 2) for n in names]
    devices = 2 if torch.cuda.is_available() else 1
    assert len(lines) == 3 + 2 * len(names) * devices
    for row, line in zip(cpu_rows, lines[3:]):
        assert line.split()[0] == row["model"] and line.split()[3:5] == ["cpu", str(row["batch_size"])]
        assert line.endswith(f"{row['speedup']:.2f}x")
    for row in report["results"]:
        assert row["latency_ms"] > 0 and row["sequences_per_s"] > 0
        assert row["speedup"] == 1.0 or row["model"] != "teacher"  # the first model is the reference

    models = {m["name"]: m for m in report["models"]}
    assert models["teacher"]["parameters"] == tiny_models["teacher_params"]
    assert models["student"]["parameters"] == tiny_models["student_params"]  # tied projector counted once
    assert models["tiny-bert"]["parameters"] == tiny_models["teacher_params"]  # same config, random init
    assert models["tiny-bert"]["source"] == "config" and models["student"]["source"] == "directory"
    teacher_file = os.path.getsize(os.path.join(tiny_models["teacher"], "model.safetensors"))
    assert models["teacher"]["size_mb"] == round(teacher_file / 1e6, 2)
    assert all(m["size_mb"] > 0 for m in models.values())
    assert models["student"]["size_mb"] < models["teacher"]["size_mb"]


def test_speed_threads_option_is_applied_and_restored(tiny_models, capsys):
    before = torch.get_num_threads()
    code, out, err = _run(["eval", "--speed", tiny_models["student"], *FAST, "--threads", "1", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out[out.index("\n{") :])["machine"]["torch_threads"] == 1
    assert torch.get_num_threads() == before


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "no model directory or config.json"),
        ("empty-dir", "does not hold a masked language model"),
        ("encoder-only", "lacks masked-LM weights"),
        ("classifier-config", "is not a masked LM"),
        ("gpt2-config", "has no masked-LM architecture"),
        ("not-json", "is not a readable config.json"),
        ("no-data", "--data"),
        ("speed-option-without-speed", "--iters only apply with --speed"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, case, needle):
    path = str(tmp_path / "nope")
    extra: list[str] = ["--speed", *FAST]
    if case == "empty-dir":
        os.mkdir(path)
    elif case == "encoder-only":  # a bare encoder checkpoint: no MLM head to time
        BertModel(BertConfig.from_json_file(TINY_BERT)).save_pretrained(path)
    elif case == "classifier-config":
        fields = json.loads(open(TINY_BERT).read()) | {"architectures": ["BertForSequenceClassification"]}
        path = _write(tmp_path / "config.json", json.dumps(fields))
    elif case == "gpt2-config":
        path = _write(tmp_path / "config.json", json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 16}))
    elif case == "not-json":
        path = _write(tmp_path / "config.json", "model_type: bert\n")
    elif case == "no-data":
        extra = []
    elif case == "speed-option-without-speed":
        extra = ["--data", str(tmp_path), "--iters", "3"]
    code, out, err = _run(["eval", path, *extra], capsys)
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
