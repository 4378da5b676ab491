"""`distil-scale finetune` on a tiny offline task: metrics, input formats, teacher and student, --out, mistakes.

The task is made up here from the synthetic corpus's words: a sentence is positive when it contains one of a few
marker words (an animal), so a tiny randomly initialised BERT learns it within seconds on a CPU and the
accuracy threshold is far from chance yet reliable. A second, two-sentence task (do both sentences name the same
city?) exercises sentence pairs and a saved `datasets` DatasetDict. The tokenizer is a WordPiece trained on
the task text; the teacher is configs/models/tiny-bert.json, the student its DistilBERT half.
"""

from __future__ import annotations

import csv
import json
import os
import random

import datasets
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from distil_scale.cli import main
from distil_scale.config import ConfigError
from distil_scale.data.labelled import detect_text_fields
from distil_scale.data.tokenizer import train_wordpiece
from distil_scale.finetune import Recipe, _print_epoch, finetune, load_finetuned
from distil_scale.models import build_student
from distil_scale.scores import classification_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKERS = ("dog", "cat", "owl", "fox")
CITIES = ("paris", "rome", "oslo", "lima", "cairo", "tokyo")
# Settings that make the tiny model learn the tiny task in seconds: a large learning rate for a random init.
# It sits on the plateau at chance for two or three epochs, then reaches ~100% eval accuracy within one more.
FAST = {"epochs": 5, "lr": 5e-4, "batch_size": 16, "max_seq_length": 32}


def fast(**changes) -> Recipe:
    return Recipe(**{**FAST, **changes})


# ---------------------------------------------------------------------------------------------------------------
# The task and the models
# ---------------------------------------------------------------------------------------------------------------


def _filler_words(corpus: str) -> list[str]:
    """Words of the synthetic corpus that are neither markers nor cities (nor start like one: "dogs")."""
    with open(corpus, encoding="utf-8") as f:
        words = set(f.read().split())
    reserved = MARKERS + CITIES
    return sorted(w for w in words if w.isalpha() and not w.startswith(reserved))


def _marker_examples(words: list[str], n: int, rng: random.Random) -> list[dict]:
    """Balanced single-sentence task: "yes" when the sentence holds a marker word, else "no"."""
    rows = []
    for i in range(n):
        sentence = rng.sample(words, rng.randint(5, 9))
        positive = i % 2 == 0
        if positive:
            sentence.insert(rng.randrange(len(sentence) + 1), rng.choice(MARKERS))
        rows.append({"sentence": " ".join(sentence), "label": "yes" if positive else "no", "idx": i})
    rng.shuffle(rows)
    return rows


def _pair_examples(words: list[str], n: int, rng: random.Random) -> list[dict]:
    """Balanced two-sentence task: label 1 when both sentences name the same city."""
    rows = []
    for i in range(n):
        first, second = rng.sample(CITIES, 2)
        if i % 2 == 0:
            second = first
        s1, s2 = rng.sample(words, 4), rng.sample(words, 4)
        s1.insert(rng.randrange(5), first)
        s2.insert(rng.randrange(5), second)
        rows.append({"sentence1": " ".join(s1), "sentence2": " ".join(s2), "label": int(i % 2 == 0)})
    rng.shuffle(rows)
    return rows


def _int_labels(rows: list[dict]) -> list[dict]:
    return [{**r, "label": int(r["label"] == "yes")} for r in rows]


def _write_csv(path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def task(tiny_corpus, tmp_path_factory) -> dict[str, str]:
    """Paths of the marker task (CSV with int labels, JSONL with string labels) and the pair task (datasets dir)."""
    root = tmp_path_factory.mktemp("task")
    words = _filler_words(tiny_corpus)
    rng = random.Random(0)
    train, test = _marker_examples(words, 480, rng), _marker_examples(words, 200, rng)
    pairs = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(_pair_examples(words, 480, rng)),
            "validation": datasets.Dataset.from_list(_pair_examples(words, 200, rng)),
        }
    )
    pairs.save_to_disk(str(root / "pairs"))
    return {
        "train_csv": _write_csv(root / "train.csv", _int_labels(train)),
        "eval_csv": _write_csv(root / "eval.csv", _int_labels(test)),
        "train_jsonl": _write_jsonl(root / "train.jsonl", train),
        "eval_jsonl": _write_jsonl(root / "eval.jsonl", test),
        "pairs": str(root / "pairs"),
        "words": " ".join(words),
        "root": str(root),
    }


@pytest.fixture(scope="module")
def teacher(task, tmp_path_factory) -> str:
    """A tiny randomly initialised BERT masked LM (configs/models/tiny-bert.json) with its tokenizer."""
    root = tmp_path_factory.mktemp("teacher")
    texts = []
    for name in ("train_jsonl", "eval_jsonl"):
        with open(task[name], encoding="utf-8") as f:
            texts += [json.loads(line)["sentence"] for line in f]
    texts += [task["words"], " ".join(CITIES)]
    tokenizer_dir = train_wordpiece(texts, vocab_size=600, out_dir=str(root / "tokenizer"))
    with open(os.path.join(ROOT, "configs", "models", "tiny-bert.json"), encoding="utf-8") as f:
        config = BertConfig(**json.load(f))
    torch.manual_seed(0)
    model_dir = str(root / "model")
    BertForMaskedLM(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> str:
    """The teacher's DistilBERT student (half its depth, initialised from it), exported with the tokenizer."""
    out = str(tmp_path_factory.mktemp("student") / "model")
    build_student(BertForMaskedLM.from_pretrained(teacher)).save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Metrics and text-field detection
# ---------------------------------------------------------------------------------------------------------------


BINARY = {"f1_average": "binary"}
# tp 2, tn 1, fp 1, fn 1: MCC = (tp tn - fp fn) / sqrt((tp + fp)(tp + fn)(tn + fp)(tn + fn)) = 1 / sqrt(3 * 3 * 2 * 2)
MCC = {"mcc": pytest.approx(1 / 6)}


def test_binary_f1_is_that_of_label_id_1():
    # tp = 2 (rows 0, 4), fp = 1 (row 1), fn = 1 (row 3): F1 = 2*2 / (2*2 + 1 + 1)
    m = classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], num_labels=2)
    assert m == {"accuracy": pytest.approx(3 / 5), "f1": pytest.approx(4 / 6), "f1_average": "binary", **MCC}
    # Class 0 is right every time, but F1 is about class 1: never predicted, so 0.
    assert classification_metrics([0, 0, 0, 0], [0, 0, 0, 1], num_labels=2)["f1"] == 0
    assert classification_metrics([0, 1, 1], [0, 1, 1], num_labels=2)["f1"] == 1
    # No positive anywhere: precision and recall are 0/0; F1 reads 0 as in sklearn.
    assert classification_metrics([0, 0], [0, 0], num_labels=2) == {"accuracy": 1, "f1": 0, "mcc": 0, **BINARY}


def test_macro_f1_averages_the_classes_equally():
    labels = [0, 0, 1, 1, 2, 2]
    predictions = [0, 1, 1, 1, 2, 0]
    # class 0: tp 1, fp 1, fn 1 -> 1/2;  class 1: tp 2, fp 1, fn 0 -> 4/5;  class 2: tp 1, fp 0, fn 1 -> 2/3
    expected = (1 / 2 + 4 / 5 + 2 / 3) / 3
    m = classification_metrics(predictions, labels, num_labels=3)
    assert {k: m[k] for k in ("accuracy", "f1", "f1_average")} == {
        "accuracy": pytest.approx(4 / 6),
        "f1": pytest.approx(expected),
        "f1_average": "macro",
    }
    # A class neither present nor predicted is left out of the mean, as sklearn's average="macro" does.
    assert classification_metrics(predictions, labels, num_labels=4)["f1"] == pytest.approx(expected)
    assert classification_metrics([2, 1, 0], [0, 1, 2], num_labels=3)["f1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "columns, fields",
    [
        (["idx", "sentence1", "sentence2", "label"], ("sentence1", "sentence2")),
        (["question", "sentence", "label"], ("question", "sentence")),  # QNLI: the pair wins over "sentence"
        (["label", "text"], ("text",)),
        (["sentence", "label", "idx"], ("sentence",)),
    ],
)
def test_text_fields_are_found_by_their_usual_names(columns, fields):
    assert detect_text_fields(columns) == fields


def test_unclear_text_fields_name_the_columns():
    with pytest.raises(ConfigError, match="ambiguous.*columns: text, sentence, label"):
        detect_text_fields(["text", "sentence", "label"])
    with pytest.raises(ConfigError, match="body, label.*--text-fields"):
        detect_text_fields(["body", "label"])


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_teacher_learns_the_task_from_csv(task, teacher, capsys):
    results = finetune(teacher, train_data=task["train_csv"], eval_data=task["eval_csv"], recipe=fast())
    printed = capsys.readouterr().out.splitlines()
    assert results["final"]["accuracy"] >= 0.75 and results["final"]["f1"] >= 0.75, printed
    assert results["labels"] == ["0", "1"] and results["positive_label"] == "1"  # CSV "0"/"1" read as ints
    assert results["text_fields"] == ["sentence"] and results["f1_average"] == "binary"
    assert (results["num_train"], results["num_eval"]) == (480, 200)
    assert [e["epoch"] for e in results["epochs"]] == [1, 2, 3, 4, 5]
    assert results["final"]["accuracy"] == results["epochs"][-1]["accuracy"]  # the last epoch, not the best
    assert results["epochs"][0]["total_steps"] == 5 * 30 and results["epochs"][0]["warmup_steps"] == 15
    epoch_lines = [line for line in printed if line.startswith("epoch ")]
    assert len(epoch_lines) == 5 and all("accuracy" in line and "MCC" in line for line in epoch_lines)
    assert "positive class '1' = label id 1" in printed[-1] and results["out"] is None


def test_student_learns_the_task_from_jsonl_through_the_cli(task, student, tmp_path, capsys):
    out = tmp_path / "runs" / "sst-like"
    argv = ["finetune", student, "--train", task["train_jsonl"], "--eval", task["eval_jsonl"], "--out", str(out)]
    argv += ["--json", "--seed", "0"] + [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    results = json.loads(stdout[stdout.index("{") :])
    assert results["final"]["accuracy"] >= 0.75 and results["final"]["f1"] >= 0.75, stdout
    assert results["labels"] == ["no", "yes"] and results["positive_label"] == "yes"  # string labels, sorted

    # The output directory: model, tokenizer, results.json; nothing else left beside it.
    assert json.loads((out / "results.json").read_text()) == results
    assert results["out"] == str(out)
    files = {"config.json", "model.safetensors", "head.pt", "tokenizer.json", "tokenizer_config.json"}
    assert files <= set(os.listdir(out))
    assert os.listdir(out.parent) == ["sst-like"]
    model, tokenizer, names = load_finetuned(str(out))
    assert model.encoder.config.model_type == "distilbert" and names == ["no", "yes"] and model.pooling == "mean"

    # The saved model is the one that was scored: its predictions give the reported metrics.
    with open(task["eval_jsonl"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    encoded = tokenizer(
        [r["sentence"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    with torch.no_grad():
        predictions = model(**encoded).argmax(-1).tolist()
    labels = [int(r["label"] == "yes") for r in rows]
    metrics = classification_metrics(predictions, labels, num_labels=2)
    assert metrics["accuracy"] == pytest.approx(results["final"]["accuracy"], abs=0.011)
    assert metrics["f1"] == pytest.approx(results["final"]["f1"], abs=0.011)


def test_sentence_pairs_from_a_saved_dataset_dict(task, teacher):
    results = finetune(teacher, train_data=task["pairs"], eval_data=task["pairs"], recipe=fast(epochs=1))
    assert results["text_fields"] == ["sentence1", "sentence2"]
    assert (results["settings"]["train_split"], results["settings"]["eval_split"]) == ("train", "validation")
    assert (results["num_train"], results["num_eval"]) == (480, 200)
    assert 0 <= results["final"]["accuracy"] <= 1 and results["final"]["eval_loss"] > 0


def test_a_failed_save_leaves_the_previous_output_alone(task, teacher, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"previous": true}')  # an earlier finetune output: may be replaced

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("distil_scale.finetune.json.dump", full_disk)
    with pytest.raises(OSError, match="No space left"):
        finetune(teacher, train_data=task["train_csv"], eval_data=task["eval_csv"], out=str(out), recipe=fast(epochs=1))
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["results.json"]  # no temp dir left either
    assert json.loads((out / "results.json").read_text()) == {"previous": True}


# ---------------------------------------------------------------------------------------------------------------
# User mistakes: one line on stderr, exit code 2, no output directory
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(task) -> dict[str, str]:
    root = task["root"]
    rows = _int_labels(
        _marker_examples("alpha beta gamma delta epsilon zeta eta theta iota kappa".split(), 8, random.Random(1))
    )
    files = {
        "one_class": _write_csv(os.path.join(root, "one_class.csv"), [{**r, "label": 1} for r in rows]),
        "new_label": _write_csv(os.path.join(root, "new_label.csv"), rows[:-1] + [{**rows[-1], "label": 2}]),
        "two_texts": _write_csv(os.path.join(root, "two_texts.csv"), [{**r, "text": "x"} for r in rows]),
        "float_label": _write_jsonl(os.path.join(root, "float.jsonl"), [{**r, "label": 0.5} for r in rows]),
        "empty_csv": os.path.join(root, "empty.csv"),
        "empty_jsonl": os.path.join(root, "empty.jsonl"),
        "header_only": os.path.join(root, "header_only.csv"),
        "foreign_out": os.path.join(root, "foreign"),
    }
    open(files["empty_csv"], "w").close()
    open(files["empty_jsonl"], "w").close()
    with open(files["header_only"], "w") as f:
        f.write("sentence,label\n")
    os.makedirs(files["foreign_out"], exist_ok=True)
    with open(os.path.join(files["foreign_out"], "notes.txt"), "w") as f:
        f.write("not ours")
    return files


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{teacher}", "--train", "nope.csv", "--eval", "{eval}"], "--train: nope.csv does not exist"),
        (["{teacher}", "--train", "{train}", "--eval", "{eval}", "--text-fields", "body"], "no column 'body'"),
        (["{teacher}", "--train", "{train}", "--eval", "{eval}", "--label-field", "y"], "set --label-field"),
        (["{teacher}", "--train", "{one_class}", "--eval", "{eval}"], "single class"),
        (["{teacher}", "--train", "{train}", "--eval", "{new_label}"], "labels 2 that are not train classes"),
        (["{teacher}", "--train", "{two_texts}", "--eval", "{eval}"], "ambiguous text fields"),
        (["{teacher}", "--train", "{float_label}", "--eval", "{eval}"], "not regression"),
        (["{teacher}", "--train", "{empty_csv}", "--eval", "{eval}"], "empty"),
        (["{teacher}", "--train", "{train}", "--eval", "{empty_jsonl}"], "--eval: {empty_jsonl} holds no examples"),
        (["{teacher}", "--train", "{header_only}", "--eval", "{eval}"], "holds no examples"),
        (["{teacher}", "--train", "{pairs}", "--eval", "{pairs}", "--eval-split", "test"], "splits: train, valid"),
        (["{root}", "--train", "{train}", "--eval", "{eval}"], "not a Hugging Face masked-LM directory"),
        (["no-such-model", "--train", "{train}", "--eval", "{eval}"], "no model directory at no-such-model"),
        (["{teacher}", "--train", "{train}", "--eval", "{eval}", "--tokenizer", "{root}"], "set --tokenizer"),
        (["{teacher}", "--train", "{train}", "--eval", "{eval}", "--max-seq-length", "600"], "512 positions"),
        (["{teacher}", "--train", "{train}", "--eval", "{eval}", "--out", "{foreign_out}"], "not written by"),
        (["{teacher}", "--train", "{train}", "--eval", "{eval}", "--out", "{teacher}"], "is an input directory"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(task, teacher, bad_files, tmp_path, capsys, args, needle):
    fmt = {"teacher": teacher, "train": task["train_csv"], "eval": task["eval_csv"], **task, **bad_files}
    argv = ["finetune", *[a.format(**fmt) for a in args]]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle.format(**fmt) in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_epochs_without_an_evaluation_print_the_train_loss_only(capsys):
    log = _print_epoch(2)
    log({"epoch": 1, "train_loss": 0.5, "seconds": 1.0})
    log({"epoch": 2, "train_loss": 0.25, "seconds": 1.0, "eval_loss": 0.3, "accuracy": 0.9, "f1": 0.8, "mcc": 0.7})
    first, last = capsys.readouterr().out.splitlines()
    assert first == "epoch 1/2: train loss 0.5000 (1.0s)"
    assert "accuracy 0.9000" in last and "MCC 0.7000" in last
