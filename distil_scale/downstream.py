"""`distil-scale downstream --tasks DIR MODEL...`: the DistilBERT paper's Table 1 for any suite of tasks.

Every model is fine-tuned on every task with one Recipe (distil_scale.finetune) at each learning rate of a small
grid; per model and task the learning rate with the best dev score is kept (as the paper does for GLUE: it reports
dev scores of the best setting) and more seeds are run there; the score is the mean over the seeds. The table has one
column per task, the macro score (the unweighted mean over tasks), and each model's share of the first model's
(the teacher's) macro score. Noise is stated, not guessed: the bootstrap standard error over the dev examples
(distil_scale.scores) of each task score and of the macro, and of the difference between two models on the same
examples (paired).

DIR holds one sub-directory per task, in either of the forms a user's GLUE copy takes:
  files      train.{csv,tsv,jsonl,json} and dev / validation / dev_matched / validation_matched of the same kinds
  datasets   a DatasetDict saved by `save_to_disk`, with a train split and a validation (or validation_matched) one
The metric is `task.json`'s "metric" when the directory has one (the embedded suite writes it), else GLUE's for the
directory's name (cola: mcc; mrpc, qqp: f1), else accuracy. Text fields and labels are found as `finetune` finds
them. With --out: downstream.json, downstream.png (when matplotlib is installed) and the table in the model card of
every model that has one (distil_scale.card).
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from distil_scale import atomic
from distil_scale.config import ConfigError
from distil_scale.data.labelled import Split, load_task
from distil_scale.finetune import Recipe, check_fits, check_out, encode, fit, load_task_tokenizer
from distil_scale.scores import bootstrap, score, standard_error

RESULTS_FILE = "downstream.json"
# Sized for the embedded default's tiny models (hidden 128, a few minutes of CPU in all); BERT-base wants
# --lrs 2e-5 3e-5 5e-5.
DEFAULT_LRS = (5e-4, 1e-3)
GLUE_METRICS = {"cola": "mcc", "mrpc": "f1", "qqp": "f1"}
METRIC_NAMES = {"mcc": "MCC", "f1": "F1", "accuracy": "acc"}
_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")
_DEV_NAMES = ("dev", "validation", "dev_matched", "validation_matched")


@dataclass(frozen=True)
class Task:
    """One task of a suite: where its splits are and how it is scored."""

    name: str
    train: str  # a file, or the saved DatasetDict's directory
    dev: str
    metric: str  # "accuracy", "f1" or "mcc"
    dev_split: str = "validation"  # the DatasetDict split read as dev


def _first_file(directory: str, stems: tuple[str, ...]) -> str | None:
    for stem in stems:
        for ext in _EXTENSIONS:
            path = os.path.join(directory, stem + ext)
            if os.path.isfile(path):
                return path
    return None


def find_tasks(root: str) -> list[Task]:
    """The tasks under `root`, sorted by name; ConfigError when there is none or a split is missing."""
    if not os.path.isdir(root):
        raise ConfigError(f"downstream: --tasks {root} is not a directory")
    tasks = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or name.startswith("."):
            continue
        metric = GLUE_METRICS.get(name.lower().replace("-", ""), "accuracy")
        if os.path.isfile(os.path.join(path, "task.json")):
            with open(os.path.join(path, "task.json"), encoding="utf-8") as f:
                metric = json.load(f).get("metric", metric)
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
                splits = json.load(f).get("splits", [])
            dev_split = next((s for s in _DEV_NAMES if s in splits), None)
            if "train" not in splits or dev_split is None:
                raise ConfigError(f"downstream: {path} needs a train and a validation split (has {', '.join(splits)})")
            tasks.append(Task(name, path, path, metric, dev_split))
            continue
        train, dev = _first_file(path, ("train",)), _first_file(path, _DEV_NAMES)
        if train is None and dev is None:
            continue  # not a task: some other directory
        if train is None or dev is None:
            raise ConfigError(f"downstream: {path} needs a train file and a dev (or validation) file beside it")
        tasks.append(Task(name, train, dev, metric))
    if not tasks:
        raise ConfigError(f"downstream: --tasks {root} holds no task directory (train + dev files or a saved dataset)")
    for task in tasks:
        if task.metric not in METRIC_NAMES:
            raise ConfigError(f"downstream: {task.name}: unknown metric {task.metric!r} in task.json")
    return tasks


def _check(models: list[str], names: list[str] | None, seeds: int, lrs: tuple[float, ...], workers: int) -> list[str]:
    if seeds < 1 or not lrs or min(lrs) <= 0 or workers < 1:
        raise ConfigError("downstream: need --seeds >= 1, --workers >= 1 and positive learning rates in --lrs")
    names = names or [os.path.basename(os.path.normpath(m)) for m in models]
    if len(names) != len(models):
        raise ConfigError(f"downstream: --names gives {len(names)} names for {len(models)} models")
    if len(set(names)) != len(names):
        raise ConfigError(f"downstream: model names {', '.join(names)} collide; set --names")
    return names


def run_suite(
    tasks_dir: str,
    models: list[str],
    *,
    recipe: Recipe | None = None,
    seeds: int = 3,
    lrs: tuple[float, ...] | None = None,
    max_train: int | None = None,
    names: list[str] | None = None,
    out: str | None = None,
    workers: int = 1,
    device: str | None = None,
) -> dict:
    """Fine-tune every model on every task; print the table; return (and with `out` write) the results.

    The learning rate is chosen on seed 0: one run per rate, then seeds 1.. at the best one, so a grid of k rates
    and s seeds costs k + s - 1 runs per model and task, not k * s. `workers` > 1 runs that many fine-tunings at
    once in worker processes of one thread each (tiny models on a few CPU cores; a GPU wants 1).
    """
    start = time.perf_counter()
    lrs = tuple(lrs or DEFAULT_LRS)
    names = _check(models, names, seeds, lrs, workers)
    if max_train is not None and max_train < 1:
        raise ConfigError(f"downstream: --max-train must be at least 1, got {max_train}")
    recipe = replace(recipe or Recipe(), eval_every_epoch=False)
    recipe.check()
    out_path = check_out(out, models, marker=RESULTS_FILE, what="downstream") if out else None
    tasks = find_tasks(tasks_dir)
    data = {t.name: _load(t, max_train) for t in tasks}  # every task validated before any training
    for path in models:  # every model checked before any training
        check_fits(path, load_task_tokenizer(path), recipe)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pairs = [(name, path, task) for name, path in zip(names, models) for task in tasks]
    runs = len(pairs) * (len(lrs) + seeds - 1)
    print(f"downstream: {len(models)} models x {len(tasks)} tasks x ({len(lrs)} lrs + {seeds - 1} seeds) = {runs} runs")
    predictions: dict[str, dict[str, dict[float, list[list[int]]]]] = {name: {} for name in names}
    best: dict[tuple[str, str], float] = {}
    with _runner(workers) as run_jobs:
        jobs = [(path, task, max_train, replace(recipe, lr=lr), 0, device) for _, path, task in pairs for lr in lrs]
        first = iter(run_jobs(jobs))
        for name, _, task in pairs:
            by_lr = {lr: [next(first)] for lr in lrs}
            predictions[name][task.name] = by_lr
            seed0 = {lr: _score(task, data[task.name], preds[0]) for lr, preds in by_lr.items()}
            best[name, task.name] = max(seed0, key=seed0.get)
            shown = ", ".join(f"lr {lr:g}: {100 * v:.1f}" for lr, v in seed0.items())
            print(f"downstream: {name} {task.name} (seed 0) {shown}", flush=True)
        jobs = [
            (path, task, max_train, replace(recipe, lr=best[name, task.name]), seed, device)
            for name, path, task in pairs
            for seed in range(1, seeds)
        ]
        more = iter(run_jobs(jobs))
        for name, _, task in pairs:
            predictions[name][task.name][best[name, task.name]] += [next(more) for _ in range(1, seeds)]
    results = summarize(tasks, data, names, models, predictions, best, recipe=recipe, seeds=seeds, lrs=lrs)
    results["seconds"] = time.perf_counter() - start
    results["workers"] = workers
    print(format_table(results), flush=True)
    if out_path is not None:
        write_outputs(results, out_path, models)
    return results


def _load(task: Task, max_train: int | None):
    train, dev, labels, fields = load_task(task.train, task.dev, eval_split=task.dev_split)
    if max_train is not None:
        train = Split(tuple(column[:max_train] for column in train.texts), train.labels[:max_train])
    return train, dev, labels, fields


def _score(task: Task, data, predictions: list[int]) -> float:
    _, dev, labels, _ = data
    return score(task.metric, predictions, dev.labels, num_labels=len(labels))


@functools.lru_cache(maxsize=8)
def _encoded(model: str, task: Task, max_train: int | None, max_seq_length: int):
    # Tokenized once per process for every learning rate and seed of a (model, task).
    train, dev, labels, _ = _load(task, max_train)
    tokenizer = load_task_tokenizer(model)
    return encode(train, tokenizer, max_seq_length), encode(dev, tokenizer, max_seq_length), len(labels)


def _fine_tune(job: tuple) -> list[int]:
    """One run: the dev predictions of `model` fine-tuned on `task` with `recipe` from `seed`."""
    model, task, max_train, recipe, seed, device = job
    train, dev, num_labels = _encoded(model, task, max_train, recipe.max_seq_length)
    return fit(model, train, dev, num_labels, recipe, seed=seed, device=torch.device(device))[2]


def _one_thread() -> None:
    torch.set_num_threads(1)


@contextlib.contextmanager
def _runner(workers: int):
    """A function running a list of jobs, results in order: here, or over `workers` spawned processes."""
    if workers <= 1:
        yield lambda jobs: [_fine_tune(job) for job in jobs]
        return
    # spawn, not fork: a forked child would inherit torch's thread pools half set up.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
        yield lambda jobs: list(pool.map(_fine_tune, jobs))


def summarize(tasks, data, names, models, predictions, best, *, recipe: Recipe, seeds: int, lrs) -> dict:
    """Scores at the chosen learning rate per model and task, macro scores, bootstrap SEs, paired differences."""
    rows: dict[str, dict] = {}
    resampled: dict[str, np.ndarray] = {}  # model -> (tasks, samples) bootstrap values of the task scores
    for name, path in zip(names, models):
        row = {"path": path, "tasks": {}}
        per_task = []
        for task in tasks:
            _, dev, labels, _ = data[task.name]
            lr = best[name, task.name]
            runs = predictions[name][task.name][lr]
            by_seed = [_score(task, data[task.name], p) for p in runs]
            values = bootstrap(task.metric, np.array(runs), np.array(dev.labels), num_labels=len(labels))
            per_task.append(values)
            row["tasks"][task.name] = {
                "score": 100 * float(np.mean(by_seed)),
                "se": 100 * standard_error(values),
                "seed_std": 100 * float(np.std(by_seed, ddof=1)) if len(by_seed) > 1 else 0.0,
                "by_seed": [100 * s for s in by_seed],
                "lr": lr,
                "seed0_by_lr": {
                    str(k): 100 * _score(task, data[task.name], v[0]) for k, v in predictions[name][task.name].items()
                },
            }
        resampled[name] = np.stack(per_task)
        row["macro"] = float(np.mean([t["score"] for t in row["tasks"].values()]))
        row["macro_se"] = 100 * standard_error(resampled[name].mean(axis=0))
        rows[name] = row
    teacher = names[0]
    for name in names:
        rows[name]["share_of_teacher"] = rows[name]["macro"] / rows[teacher]["macro"]
    differences = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = resampled[a].mean(axis=0) - resampled[b].mean(axis=0)
            differences[f"{a} - {b}"] = {
                "points": rows[a]["macro"] - rows[b]["macro"],
                "se": 100 * standard_error(diff),
            }
    return {
        "tasks": {
            t.name: {"metric": t.metric, "train": len(data[t.name][0]), "dev": len(data[t.name][1])} for t in tasks
        },
        "recipe": asdict(recipe),
        "lrs": list(lrs),
        "seeds": seeds,
        "teacher": teacher,
        "models": rows,
        "macro_differences": differences,
    }


def format_table(results: dict) -> str:
    """The paper's Table 1 layout: a column per task, the macro score, the share of the teacher's macro."""
    tasks = results["tasks"]
    columns = [f"{name} ({METRIC_NAMES[t['metric']]})" for name, t in tasks.items()]
    width = max(len("model"), *(len(n) for n in results["models"]))
    cells = [max(len(c), 11) for c in columns]
    head = f"{'model':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, cells))
    head += f"  {'macro':>12}  {'of teacher':>10}"
    r = results["recipe"]
    lines = [
        f"downstream: dev scores x100, mean of {results['seeds']} seeds at the best of lr "
        f"{', '.join(f'{lr:g}' for lr in results['lrs'])}; {r['epochs']} epochs, batch {r['batch_size']}, "
        f"{r['pooling']} pooling; +- bootstrap SE over dev examples",
        "tasks: " + ", ".join(f"{n} {t['train']} train / {t['dev']} dev" for n, t in tasks.items()),
        head,
        "-" * len(head),
    ]
    for name, row in results["models"].items():
        scores = [f"{row['tasks'][t]['score']:.1f} +-{row['tasks'][t]['se']:.1f}" for t in tasks]
        line = f"{name:<{width}}  " + "  ".join(f"{s:>{w}}" for s, w in zip(scores, cells))
        line += f"  {row['macro']:>5.1f} +-{row['macro_se']:<4.1f}  {100 * row['share_of_teacher']:>9.1f}%"
        lines.append(line)
    for pair, d in results["macro_differences"].items():
        lines.append(f"macro difference {pair}: {d['points']:+.1f} +-{d['se']:.1f} points (paired bootstrap SE)")
    return "\n".join(lines)


def write_outputs(results: dict, out, models: list[str]) -> None:
    """downstream.json and downstream.png under `out` (temp file + rename each); the table into model cards."""
    from distil_scale.card import update_cards

    os.makedirs(out, exist_ok=True)
    atomic.write_json(os.path.join(out, RESULTS_FILE), results)
    plot(results, os.path.join(out, "downstream.png"))
    update_cards(models, "downstream", markdown_table(results))


def markdown_table(results: dict) -> str:
    tasks = results["tasks"]
    head = "| model | " + " | ".join(f"{n} ({METRIC_NAMES[t['metric']]})" for n, t in tasks.items())
    lines = [head + " | macro | of teacher |", "|" + " --- |" * (len(tasks) + 3)]
    for name, row in results["models"].items():
        scores = " | ".join(f"{row['tasks'][t]['score']:.1f} ± {row['tasks'][t]['se']:.1f}" for t in tasks)
        lines.append(
            f"| {name} | {scores} | {row['macro']:.1f} ± {row['macro_se']:.1f} | {100 * row['share_of_teacher']:.1f}% |"
        )
    r = results["recipe"]
    lines.append("")
    lines.append(
        f"Dev scores x100, mean of {results['seeds']} seeds at the best learning rate of "
        f"{', '.join(f'{lr:g}' for lr in results['lrs'])} ({r['epochs']} epochs, {r['pooling']} pooling); "
        "± is the bootstrap standard error over the dev examples (`distil-scale downstream`)."
    )
    return "\n".join(lines)


def plot(results: dict, out_png: str) -> None:
    """Grouped bars: one group per task and the macro, one bar per model, with the bootstrap SE."""
    try:
        import matplotlib
    except ImportError:
        print("downstream: matplotlib is not installed; no downstream.png", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*results["tasks"], "macro"]
    models = results["models"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, row) in enumerate(models.items()):
        values = [row["tasks"][t]["score"] for t in results["tasks"]] + [row["macro"]]
        errors = [row["tasks"][t]["se"] for t in results["tasks"]] + [row["macro_se"]]
        xs = [g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width=width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel="dev score x100", title="Downstream: fine-tuned on each task (mean of seeds, +- SE)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic.save_figure(fig, out_png)
    plt.close(fig)
