"""The model card (distil_scale.card): written with an export from the checkpoint's config and state, updated by
evaluations section by section, and never written into a README that distil-scale did not write."""

from __future__ import annotations

import json
import os

import yaml
from transformers import BertConfig, BertForMaskedLM

from distil_scale.card import CARD_FILE, card_for_checkpoint, is_ours, update_card
from distil_scale.config import load_config, save_config
from distil_scale.export import save_pretrained_atomic
from distil_scale.models import build_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = {"step": 800, "epoch": 0, "samples": 25600, "tokens": 1234567, "elapsed_s": 120.0}


def _tag_dir(tmp_path, overrides: list[str]) -> str:
    tag = tmp_path / "checkpoints" / "step00000800"
    tag.mkdir(parents=True)
    save_config(load_config(os.path.join(ROOT, "configs", "demo.yaml"), overrides), str(tag / "config.yaml"))
    (tag / "training_state.json").write_text(json.dumps(STATE))
    return str(tag)


def _student() -> BertForMaskedLM:
    with open(os.path.join(ROOT, "configs", "models", "tiny-bert.json"), encoding="utf-8") as f:
        return build_student(BertForMaskedLM(BertConfig(**json.load(f))))


def test_the_export_carries_a_card_of_its_training(tmp_path):
    model = _student()
    card = card_for_checkpoint(_tag_dir(tmp_path, []), model.config.to_dict(), parameters=123456)
    out = save_pretrained_atomic(model, None, str(tmp_path / "export"), card=card)
    text = open(os.path.join(out, CARD_FILE), encoding="utf-8").read()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "fill-mask"
    assert "distil-scale" in front["tags"] and front["model_parameters"] == 123456 and is_ours(text)
    assert "| distilled from | `runs/demo/teacher/export` |" in text
    assert "kd 5.0 (temperature 2.0), mlm 2.0, cos 1.0" in text
    assert "800 steps, 25600 sequences, 1234567 tokens" in text
    assert "from the teacher" in text and "distilled by distil-scale" in text
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "export"]  # no temp dir left


def test_a_run_without_distillation_says_so(tmp_path):
    tag = _tag_dir(tmp_path, ["--loss.alpha_kd=0", "--loss.alpha_cos=0", "--student.init=random"])
    text = card_for_checkpoint(tag, _student().config.to_dict(), parameters=1)
    assert "| distilled from | nothing (masked-LM loss only) |" in text and "without distillation" in text
    assert "| initialisation | random |" in text


def test_a_checkpoint_without_its_config_gets_no_card(tmp_path):
    assert card_for_checkpoint(str(tmp_path), {}, parameters=1) is None


def test_sections_are_added_then_replaced_and_foreign_readmes_kept(tmp_path):
    model = _student()
    card = card_for_checkpoint(_tag_dir(tmp_path, []), model.config.to_dict(), parameters=1)
    out = save_pretrained_atomic(model, None, str(tmp_path / "export"), card=card)
    assert update_card(out, "downstream", "| model | macro |\n| a | 1.0 |")
    assert update_card(out, "mlm", "mlm table")
    assert update_card(out, "downstream", "| model | macro |\n| a | 2.0 |")
    text = open(os.path.join(out, CARD_FILE), encoding="utf-8").read()
    assert "No evaluation has been run" not in text and "| a | 1.0 |" not in text
    assert text.count("<!-- distil-scale:downstream -->") == 1 and "| a | 2.0 |" in text and "mlm table" in text
    assert text.index("distil-scale:downstream") < text.index("distil-scale:mlm")  # replaced in place
    foreign = tmp_path / "downloaded"
    foreign.mkdir()
    (foreign / CARD_FILE).write_text("---\nlicense: apache-2.0\n---\n# BERT\n")
    assert not update_card(str(foreign), "downstream", "x") and not update_card(str(tmp_path / "none"), "x", "y")
    assert (foreign / CARD_FILE).read_text() == "---\nlicense: apache-2.0\n---\n# BERT\n"
    (foreign / CARD_FILE).write_text("---\ntags: [distil-scale]\n# front matter never closed\n")
    assert not is_ours((foreign / CARD_FILE).read_text()) and not update_card(str(foreign), "downstream", "x")


def test_eval_out_writes_json_and_the_mlm_table_into_the_card(tiny_dataset, tiny_tokenizer, tmp_path, capsys):
    from transformers import AutoTokenizer

    from distil_scale.cli import main

    with open(os.path.join(ROOT, "configs", "models", "tiny-bert.json"), encoding="utf-8") as f:
        config = BertConfig(**{**json.load(f), "vocab_size": 400})
    model = BertForMaskedLM(config)
    card = card_for_checkpoint(_tag_dir(tmp_path, []), model.config.to_dict(), parameters=1)
    out = save_pretrained_atomic(model, AutoTokenizer.from_pretrained(tiny_tokenizer), str(tmp_path / "m"), card=card)
    results = tmp_path / "mlm.json"
    assert main(["eval", out, "--data", tiny_dataset, "--max-batches", "1", "--out", str(results)]) == 0
    assert json.loads(results.read_text())[out]["tokens"] > 0
    text = open(os.path.join(out, CARD_FILE), encoding="utf-8").read()
    assert "<!-- distil-scale:mlm -->" in text and f"Held-out MLM on `{tiny_dataset}`" in text
    assert main(["eval", out, "--data", tiny_dataset, "--out", str(tmp_path / "no" / "x.json")]) == 2
    assert "its directory does not exist" in capsys.readouterr().err
