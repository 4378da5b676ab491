"""The embedded downstream suite (data/suite.py), its scores (scores.py) and `distil-scale downstream`.

The runner is exercised on a tiny generated suite and on a tiny directory in GLUE's own forms (a `datasets`
DatasetDict with ClassLabel labels and a test split of -1 labels, .tsv files, MNLI's validation_matched), with a
tiny randomly initialised BERT and its DistilBERT half: the test is about the plumbing, the table and the files,
not about the scores, which the demo measures.
"""

from __future__ import annotations

import csv
import json
import math
import os

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from distil_scale.card import CARD_FILE, is_ours
from distil_scale.cli import main
from distil_scale.data import corpus
from distil_scale.data.suite import INFERENCE_LABELS, TASKS, generate, write_suite
from distil_scale.data.tokenizer import train_wordpiece
from distil_scale.downstream import find_tasks, run_suite
from distil_scale.finetune import Recipe
from distil_scale.models import build_student
from distil_scale.scores import bootstrap, classification_metrics, score, standard_error

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = Recipe(epochs=1, lr=1e-3, batch_size=32, max_seq_length=48)


# ---------------------------------------------------------------------------------------------------------------
# The generators
# ---------------------------------------------------------------------------------------------------------------


def _text(row: dict) -> tuple:
    return tuple(v for k, v in row.items() if k != "label")


@pytest.mark.parametrize("task", list(TASKS))
def test_tasks_are_balanced_distinct_and_dev_is_unseen(task):
    train, dev = generate(task, train=600, dev=300, seed=3)
    assert (len(train), len(dev)) == (600, 300)
    for rows in (train, dev):
        counts = {}
        for r in rows:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
        assert max(counts.values()) - min(counts.values()) <= 1, counts  # balanced to one example
        assert len(counts) == (3 if task == "inference" else 2)
    texts = [_text(r) for r in train + dev]
    assert len(set(texts)) == len(texts)  # no duplicate, and so no dev example among the training ones
    assert list(train[0]) == TASKS[task]["columns"]
    assert generate(task, train=600, dev=300, seed=3) == (train, dev)  # deterministic
    assert generate(task, train=600, dev=300, seed=4)[0] != train


def test_agreement_labels_follow_the_head_noun():
    singular_verbs, plural_verbs = set(corpus._VERBS), set(corpus._VERBS.values())
    plural_nouns = set(corpus._ANIMALS.values()) - set(corpus._ANIMALS)  # "fish", "sheep" are both
    train, _ = generate("agreement", train=400, dev=10, seed=0)
    checked = 0
    for row in train:
        words = row["sentence"].split()
        head = words[2] if words[1] in corpus._ADJECTIVES else words[1]
        if head not in plural_nouns and head not in corpus._ANIMALS:
            continue
        # The main verb is the last verb form before the object's "the"; in a relative clause the first one is inner.
        verbs = [w for w in words if w in singular_verbs or w in plural_verbs]
        main_verb = verbs[-1]
        agrees = (main_verb in plural_verbs) == (head in plural_nouns)
        if head in ("fish", "sheep") or main_verb in singular_verbs & plural_verbs:
            continue
        assert agrees == (row["label"] == 1), row
        checked += 1
    assert checked > 300


def test_inference_labels_agree_with_the_world():
    world = corpus._make_world()
    people = {p.name: p for p in world.people}
    train, _ = generate("inference", train=300, dev=10, seed=0)
    for row in train:
        premise, hypothesis, label = row["premise"], row["hypothesis"], row["label"]
        name = hypothesis.split()[3] if hypothesis.startswith("the pet of") else hypothesis.split()[0]
        person = people[name]
        for fact in premise.split(" . "):  # the premise states true facts
            if fact.startswith(person.name + " lives in"):
                assert fact.rstrip(" .").endswith(person.city)
        truth = {
            f"{name} lives in {person.city} .",
            f"{name} lives in {corpus._CITIES[person.city]} .",
            f"{name} works as a {person.job} .",
            f"the pet of {name} is a {person.pet} .",
        }
        if label == "entailment":
            assert hypothesis in truth, row
        elif label == "contradiction":
            assert hypothesis not in truth, row
        assert label in INFERENCE_LABELS


def test_write_suite_is_atomic_and_reused(tmp_path):
    out = tmp_path / "suite"
    write_suite(str(out), train=40, dev=20, seed=0)
    assert sorted(os.listdir(tmp_path)) == ["suite"]  # no temp dir left
    assert sorted(os.listdir(out)) == ["agreement", "inference", "paraphrase", "suite.json"]
    meta = json.loads((out / "inference" / "task.json").read_text())
    assert meta["metric"] == "accuracy" and "premise" in meta["description"]
    with open(out / "agreement" / "dev.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 20
    stamp = os.path.getmtime(out / "agreement" / "train.csv")
    write_suite(str(out), train=40, dev=20, seed=0)  # same settings: kept
    assert os.path.getmtime(out / "agreement" / "train.csv") == stamp
    write_suite(str(out), train=30, dev=20, seed=0)  # other settings: replaced
    with open(out / "agreement" / "train.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 30


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------


def test_mcc_matches_its_formulas():
    labels = [0, 0, 1, 1, 1, 0, 1, 0]
    predictions = [0, 1, 1, 1, 0, 0, 1, 1]
    tp, tn, fp, fn = 3, 2, 2, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert score("mcc", predictions, labels, num_labels=2) == pytest.approx(expected)
    assert score("mcc", labels, labels, num_labels=2) == pytest.approx(1)
    assert score("mcc", [1 - y for y in labels], labels, num_labels=2) == pytest.approx(-1)
    assert score("mcc", [1] * 8, labels, num_labels=2) == 0  # one class predicted: undefined, read as 0
    # Three classes, Gorodkin's R_K: c*n - sum p_k t_k over sqrt((n^2 - sum p_k^2)(n^2 - sum t_k^2)).
    labels3, predictions3 = [0, 1, 2, 2, 1, 0], [0, 2, 2, 2, 1, 1]
    c, n, p, t = 4, 6, [1, 2, 3], [2, 2, 2]
    r_k = (c * n - sum(a * b for a, b in zip(p, t))) / math.sqrt(
        (n * n - sum(a * a for a in p)) * (n * n - sum(b * b for b in t))
    )
    assert classification_metrics(predictions3, labels3, num_labels=3)["mcc"] == pytest.approx(r_k)


def test_bootstrap_se_of_accuracy_matches_the_binomial_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=2000)
    predictions = np.where(rng.random(2000) < 0.8, labels, 1 - labels)  # ~80% right
    accuracy = score("accuracy", predictions, labels, num_labels=2)
    se = standard_error(bootstrap("accuracy", predictions, labels, num_labels=2))
    assert se == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / 2000), rel=0.15)
    # Two seeds that agree everywhere have the SE of one; the mean of the resamples sits on the score.
    twice = bootstrap("accuracy", np.stack([predictions, predictions]), labels, num_labels=2)
    assert standard_error(twice) == pytest.approx(se) and np.mean(twice) == pytest.approx(accuracy, abs=0.005)


# ---------------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> str:
    return write_suite(str(tmp_path_factory.mktemp("suite") / "suite"), train=64, dev=48, seed=0)


@pytest.fixture(scope="module")
def models(suite, tmp_path_factory) -> dict[str, str]:
    """A tiny random BERT teacher and its DistilBERT half, with a WordPiece trained on the suite's text."""
    root = tmp_path_factory.mktemp("models")
    texts = []
    for task in TASKS:
        for split in ("train", "dev"):
            with open(os.path.join(suite, task, f"{split}.csv"), encoding="utf-8") as f:
                texts += [" ".join(_text(r)) for r in csv.DictReader(f)]
    texts.append(" ".join(["yes no maybe"] * 3))
    tokenizer = AutoTokenizer.from_pretrained(train_wordpiece(texts, vocab_size=500, out_dir=str(root / "tok")))
    with open(os.path.join(ROOT, "configs", "models", "tiny-bert.json"), encoding="utf-8") as f:
        config = BertConfig(**json.load(f))
    torch.manual_seed(0)
    teacher = BertForMaskedLM(config)
    paths = {"teacher": str(root / "teacher"), "student": str(root / "student")}
    teacher.save_pretrained(paths["teacher"])
    build_student(teacher).save_pretrained(paths["student"])
    for path in paths.values():
        tokenizer.save_pretrained(path)
    # The student carries a card of ours (as an export does), the teacher a foreign README: only ours is updated.
    (root / "student" / CARD_FILE).write_text("---\ntags:\n- distil-scale\n---\n\n# student\n\n## Evaluation\n")
    (root / "teacher" / CARD_FILE).write_text("# a downloaded model's own card\n")
    return paths


def test_runner_on_the_generated_suite(suite, models, tmp_path, capsys):
    out = tmp_path / "out"
    results = run_suite(
        suite, [models["teacher"], models["student"]], recipe=QUICK, seeds=2, lrs=(1e-3, 3e-3), out=str(out)
    )
    printed = capsys.readouterr().out
    assert set(results["tasks"]) == set(TASKS)
    assert {t: r["metric"] for t, r in results["tasks"].items()} == {k: v["metric"] for k, v in TASKS.items()}
    assert results["tasks"]["agreement"] == {"metric": "mcc", "train": 64, "dev": 48}
    teacher, student = results["models"]["teacher"], results["models"]["student"]
    assert teacher["share_of_teacher"] == 1.0
    for row in (teacher, student):
        assert row["macro"] == pytest.approx(np.mean([t["score"] for t in row["tasks"].values()]))
        for t in row["tasks"].values():
            assert len(t["by_seed"]) == 2 and t["score"] == pytest.approx(np.mean(t["by_seed"]))
            by_lr = t["seed0_by_lr"]  # the rate is chosen on seed 0, and seed 0 is among the scored runs
            assert str(t["lr"]) == max(by_lr, key=by_lr.get) and t["by_seed"][0] == by_lr[str(t["lr"])]
            assert t["se"] >= 0  # 0 when a model predicts one class on every resample (MCC 0 throughout)
        assert row["tasks"]["inference"]["se"] > 0 and row["macro_se"] > 0
    assert student["share_of_teacher"] == pytest.approx(student["macro"] / teacher["macro"])
    assert "teacher - student" in results["macro_differences"]
    # The table: a column per task with its metric, the macro, the share of the teacher.
    header = next(line for line in printed.splitlines() if line.startswith("model"))
    for column in ("agreement (MCC)", "inference (acc)", "paraphrase (F1)", "macro", "of teacher"):
        assert column in header
    assert json.loads((out / "downstream.json").read_text())["models"]["student"]["macro"] == student["macro"]
    assert (out / "downstream.png").is_file() or "matplotlib is not installed" in printed
    student_card = open(os.path.join(models["student"], CARD_FILE), encoding="utf-8").read()
    assert is_ours(student_card) and "<!-- distil-scale:downstream -->" in student_card
    assert "| student |" in student_card and "agreement (MCC)" in student_card
    assert open(os.path.join(models["teacher"], CARD_FILE)).read() == "# a downloaded model's own card\n"


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> str:
    """Three tasks in GLUE's own forms: CoLA saved by `datasets`, MRPC as .tsv files, MNLI with validation_matched."""
    root = tmp_path_factory.mktemp("glue")
    cola_rows = [{"sentence": f"the dog {v} the cat .", "label": int(v == "sees")} for v in ("sees", "see") * 24]
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["unacceptable", "acceptable"])}
    )
    cola = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(cola_rows, features=features),
            "validation": datasets.Dataset.from_list(cola_rows[:16], features=features),
            "test": datasets.Dataset.from_list([{**r, "label": -1} for r in cola_rows[:8]], features=features),
        }
    )
    cola.save_to_disk(str(root / "cola"))
    (root / "mrpc").mkdir()
    for split, n in (("train", 32), ("dev", 16)):
        with open(root / "mrpc" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("sentence1\tsentence2\tlabel\n")
            for i in range(n):
                f.write(f"anna lives in paris .\t{'anna' if i % 2 else 'ben'} lives in paris .\t{i % 2}\n")
    mnli_rows = [
        {"premise": "anna lives in rome .", "hypothesis": f"anna lives in {c} .", "label": i % 3}
        for i, c in enumerate(["rome", "oslo", "lima"] * 12)
    ]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(mnli_rows),
            "validation_matched": datasets.Dataset.from_list(mnli_rows[:12]),
        }
    ).save_to_disk(str(root / "mnli"))
    (root / "notes").mkdir()  # not a task: skipped
    return str(root)


def test_runner_on_a_glue_format_directory_through_the_cli(glue_dir, models, tmp_path, capsys):
    tasks = {t.name: t for t in find_tasks(glue_dir)}
    assert sorted(tasks) == ["cola", "mnli", "mrpc"]
    assert {n: t.metric for n, t in tasks.items()} == {"cola": "mcc", "mnli": "accuracy", "mrpc": "f1"}
    assert tasks["mnli"].dev_split == "validation_matched" and tasks["mrpc"].dev.endswith("dev.tsv")
    argv = ["downstream", models["teacher"], models["student"], "--tasks", glue_dir, "--seeds", "1"]
    argv += ["--lrs", "1e-3", "--epochs", "1", "--batch-size", "16", "--names", "big", "small", "--json"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    results = json.loads(stdout[stdout.index("\n{") :])
    assert list(results["models"]) == ["big", "small"]
    assert results["tasks"] == {
        "cola": {"metric": "mcc", "train": 48, "dev": 16},
        "mnli": {"metric": "accuracy", "train": 36, "dev": 12},
        "mrpc": {"metric": "f1", "train": 32, "dev": 16},
    }
    assert all(-100 <= t["score"] <= 100 for row in results["models"].values() for t in row["tasks"].values())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--tasks", "{empty}"], "holds no task directory"),
        (["--tasks", "{missing}"], "is not a directory"),
        (["--tasks", "{half}"], "needs a train file and a dev"),
        (["--tasks", "{suite}", "--names", "a"], "1 names for 2 models"),
        (["--tasks", "{suite}", "--seeds", "0"], "--seeds >= 1"),
        (["--tasks", "{suite}", "--out", "{teacher}"], "is an input directory"),
        (["--tasks", "{suite}", "--max-seq-length", "100000"], "exceeds the model's"),
    ],
)
def test_runner_mistakes_exit_2_with_one_line(suite, models, tmp_path, capsys, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "half" / "task").mkdir(parents=True)
    (tmp_path / "half" / "task" / "train.csv").write_text("sentence,label\na,0\n")
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "nope", "half": tmp_path / "half", "suite": suite}
    fmt = {**{k: str(v) for k, v in paths.items()}, **models}
    argv = ["downstream", models["teacher"], models["student"], *[a.format(**fmt) for a in args]]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.slow
def test_worker_processes_give_the_same_results(glue_dir, models):
    # Spawned workers tokenise, initialise and shuffle from the same seeds: the table does not depend on --workers.
    plan = {"recipe": QUICK, "seeds": 2, "lrs": (1e-3,), "names": ["big", "small"]}
    here = run_suite(glue_dir, [models["teacher"], models["student"]], workers=1, **plan)
    spawned = run_suite(glue_dir, [models["teacher"], models["student"]], workers=2, **plan)
    for name in ("big", "small"):
        for task, row in here["models"][name]["tasks"].items():
            assert spawned["models"][name]["tasks"][task]["by_seed"] == row["by_seed"], (name, task)


def test_the_demo_table_has_every_figure_of_the_abstract():
    from distil_scale.demo import abstract_table

    tasks = {name: {"metric": spec["metric"]} for name, spec in TASKS.items()}

    def row(params, speedup, acc, macro, share):
        scores = {t: {"score": 50.0 + i, "se": 1.0} for i, t in enumerate(tasks)}
        downstream = {"macro": macro, "macro_se": 0.5, "share_of_teacher": share, "tasks": scores}
        return {"parameters": params, "speedup_batch1": speedup, "speedup_batch32": speedup + 0.1,
                "mlm_accuracy": acc, "downstream": downstream}  # fmt: skip

    summary = {"teacher": row(1000, 1.0, 0.6, 70.0, 1.0), "student": row(600, 1.8, 0.58, 68.6, 0.98)}
    diff = {"student - scratch": {"points": 12.0, "se": 0.7}}
    lines = abstract_table(summary, {"tasks": tasks, "macro_differences": diff}).splitlines()
    header, student = lines[1], lines[-2]
    for column in ("params", "speed b1", "b32", "MLM acc", "agreement MCC", "inference acc", "paraphrase F1", "macro"):
        assert column in header
    assert student.split()[:6] == ["student", "600", "60%", "1.80x", "1.90x", "0.5800"]
    assert "96.7%" in student and "68.6 +-0.5" in student and student.endswith("98.0%")
    assert lines[-1] == "distilled - scratch, downstream macro: +12.0 +-0.7 points (paired)"
