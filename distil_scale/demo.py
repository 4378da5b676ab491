"""The embedded default (`make demo`): offline corpus -> tokenizer -> shards -> teacher -> student vs scratch.

Three runs of the same engine share the prepared data under `<root>/data`:
  teacher   a BERT of configs/models/demo-teacher.json pretrained with MLM only
  student   the half-depth DistilBERT initialised from it and distilled with the triple loss (configs/demo.yaml)
  scratch   the same student architecture, random init, MLM only, for the same number of steps
Then the three exports are compared the way the paper's abstract compares DistilBERT with BERT: size, inference
speed-up at batch 1 and 32 (CPU), held-out MLM accuracy on identical masks, and the downstream suite (three
GLUE-like tasks from the corpus's world, fine-tuned with one recipe; distil_scale.downstream). The table goes to
stdout and into each export's model card, the numbers to `<root>/summary.json`, the loss curves to
`<root>/loss_curves.png`, the suite's to `<root>/downstream/`. A stage whose export exists and whose
resolved config is unchanged is reused; an interrupted stage resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from distil_scale import atomic
from distil_scale.card import update_cards
from distil_scale.config import Config, load_config
from distil_scale.downstream import METRIC_NAMES
from distil_scale.metrics import format_duration, read_jsonl

DEFAULT_CONFIG = "configs/demo.yaml"
TEACHER_ARCH = "configs/models/demo-teacher.json"
# The teacher gets more steps than the students: distillation needs a teacher worth imitating. About 5 of the
# demo's ~10 minutes on 2 CPU cores; 1000 more steps buy only ~1 point of held-out MLM accuracy.
TEACHER_STEPS = 2500
# The downstream suite (distil_scale.data.suite, distil_scale.downstream), sized for the ~5 minutes the demo has
# left for it on 2 CPU cores. 2,000 dev examples per task put the standard error of a task score near 1 point and
# of the macro near 0.6. The knob turned to fit is the number of runs: the learning rate is chosen on one seed and
# only the best rate gets a second one (3 runs per model and task), two runs at a time on one thread each. Small
# models need updates more than examples: batch 16 for 4 epochs (500 steps); at batch 32 for 3 epochs the lower two
# layers of a teacher stayed near chance on agreement (MCC 0-25), at batch 16 for 6 epochs they reached 89.
SUITE = {"train": 2000, "dev": 2000, "seed": 0}
SUITE_RECIPE = {"epochs": 4, "batch_size": 16, "max_seq_length": 64}
SUITE_PLAN = {"seeds": 2, "lrs": (5e-4, 1e-3)}
SPEED_BATCH_SIZES = (1, 32)


def stage_overrides(root: str) -> dict[str, list[str]]:
    teacher_export = os.path.join(root, "teacher", "export")
    mlm_only = ["--loss.alpha_kd=0", "--loss.alpha_cos=0"]
    return {
        "teacher": [
            f"--run.output_dir={root}/teacher",
            f"--student.arch_config={TEACHER_ARCH}",
            "--teacher.path=",
            f"--train.max_steps={TEACHER_STEPS}",
            "--loss.alpha_mlm=1.0",
            *mlm_only,
        ],
        "student": [f"--run.output_dir={root}/student", f"--teacher.path={teacher_export}"],
        "scratch": [
            f"--run.output_dir={root}/scratch",
            f"--teacher.path={teacher_export}",
            "--student.init=random",
            *mlm_only,
        ],
    }


def _stage_done(cfg: Config) -> bool:
    marker = os.path.join(cfg.run.output_dir, "stage.json")
    if not os.path.exists(os.path.join(cfg.run.output_dir, "export", "config.json")) or not os.path.exists(marker):
        return False
    with open(marker, encoding="utf-8") as f:
        return json.load(f) == cfg.to_dict()


def run_stage(name: str, cfg: Config, *, prefix: str = "demo") -> None:
    from distil_scale.train import train

    if _stage_done(cfg):
        print(f"{prefix}: {name}: reusing {cfg.run.output_dir}/export")
        return
    print(f"{prefix}: {name}: training {cfg.train.max_steps} steps into {cfg.run.output_dir}", flush=True)
    start = time.perf_counter()
    train(cfg)
    with open(os.path.join(cfg.run.output_dir, "stage.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f)
    print(f"{prefix}: {name}: done in {format_duration(time.perf_counter() - start)}", flush=True)


def run_demo(*, config_path: str | None = None, overrides: list[str] = (), fresh: bool = False) -> dict:
    base = load_config(config_path or DEFAULT_CONFIG, overrides)
    root = base.run.output_dir
    if fresh:
        shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    configs = {
        name: load_config(config_path or DEFAULT_CONFIG, [*overrides, *extra])
        for name, extra in stage_overrides(root).items()
    }
    for name, cfg in configs.items():
        run_stage(name, cfg)
    summary = summarize(root, configs)
    print(f"demo: finished in {format_duration(time.perf_counter() - start)}; summary in {root}/summary.json")
    return summary


def summarize(root: str, configs: dict[str, Config]) -> dict:
    """Held-out MLM, speed and the downstream suite for the three exports; the abstract's table and summary.json."""
    from distil_scale.evaluate import evaluate_models
    from distil_scale.speed import measure_speed

    exports = {name: os.path.join(cfg.run.output_dir, "export") for name, cfg in configs.items()}
    data = configs["student"].data.shards
    results = evaluate_models(list(exports.values()), data=data, split="heldout", batch_size=32, seed=0)
    summary = {name: results[path] for name, path in exports.items()}
    teacher_acc = summary["teacher"]["mlm_accuracy"]
    for name in ("student", "scratch"):
        summary[name]["accuracy_vs_teacher"] = summary[name]["mlm_accuracy"] / teacher_acc
    speed = measure_speed(list(exports.values()), batch_sizes=SPEED_BATCH_SIZES, devices=["cpu"])
    for row in speed["results"]:
        name = list(exports)[[m["name"] for m in speed["models"]].index(row["model"])]
        summary[name][f"speedup_batch{row['batch_size']}"] = row["speedup"]
        summary[name][f"latency_ms_batch{row['batch_size']}"] = row["latency_ms"]
    downstream = run_downstream(root, exports, configs)
    for name, row in downstream["models"].items():
        summary[name]["downstream"] = {
            "macro": row["macro"],
            "macro_se": row["macro_se"],
            "share_of_teacher": row["share_of_teacher"],
            "tasks": {task: {"score": t["score"], "se": t["se"]} for task, t in row["tasks"].items()},
        }
    table = abstract_table(summary, downstream)
    print(table, flush=True)
    summary["downstream_suite"] = downstream
    summary["speed"] = speed
    atomic.write_json(os.path.join(root, "summary.json"), summary)
    update_cards(exports.values(), "demo", "```\n" + table + "\n```")
    plot_loss_curves(
        {name: os.path.join(cfg.run.output_dir, "metrics.jsonl") for name, cfg in configs.items()},
        os.path.join(root, "loss_curves.png"),
    )
    return summary


def run_downstream(root: str, exports: dict[str, str], configs: dict[str, Config]) -> dict:
    """The embedded suite for the three exports; reused when the suite, the plan and every stage are unchanged."""
    from distil_scale.data.suite import write_suite
    from distil_scale.downstream import RESULTS_FILE, run_suite
    from distil_scale.finetune import Recipe

    suite = write_suite(os.path.join(root, "data", "suite"), **SUITE)
    recipe = Recipe(**SUITE_RECIPE)
    out = os.path.join(root, "downstream")
    key = {
        "suite": SUITE,
        "recipe": SUITE_RECIPE,
        "plan": SUITE_PLAN,
        "stages": {n: c.to_dict() for n, c in configs.items()},
    }
    key_file = os.path.join(out, "key.json")
    if os.path.isfile(key_file) and os.path.isfile(os.path.join(out, RESULTS_FILE)):
        with open(key_file, encoding="utf-8") as f:
            if json.load(f) == json.loads(json.dumps(key)):
                print(f"demo: downstream: reusing {out}/{RESULTS_FILE}")
                with open(os.path.join(out, RESULTS_FILE), encoding="utf-8") as f:
                    return json.load(f)
    # Hidden size 128: two runs on one thread each beat one run on two threads, which mostly spin.
    workers = min(2, len(os.sched_getaffinity(0)))
    results = run_suite(
        suite, list(exports.values()), names=list(exports), recipe=recipe, out=out, workers=workers, **SUITE_PLAN
    )
    atomic.write_json(key_file, key)
    return results


def abstract_table(summary: dict, downstream: dict) -> str:
    """The paper's abstract as one table: size, speed-up, held-out MLM accuracy, downstream scores per task."""
    tasks = list(downstream["tasks"])
    metric = {t: METRIC_NAMES[downstream["tasks"][t]["metric"]] for t in tasks}
    teacher = summary["teacher"]
    head = (
        f"{'model':<8} {'params':>9} {'of T':>5} {'speed b1':>8} {'b32':>6} {'MLM acc':>8} {'of T':>6} "
        + " ".join(f"{t[:10] + ' ' + metric[t]:>14}" for t in tasks)
        + f" {'macro':>11} {'of T':>6}"
    )
    lines = [
        "demo: the paper's abstract on the embedded default (speed: exported encoders, CPU fp32, seq 128; "
        "downstream: dev x100 +- bootstrap SE)",
        head,
        "-" * len(head),
    ]
    for name, m in summary.items():
        d = m["downstream"]
        cells = " ".join(f"{d['tasks'][t]['score']:>8.1f} +-{d['tasks'][t]['se']:<3.1f}" for t in tasks)
        lines.append(
            f"{name:<8} {m['parameters']:>9,} {m['parameters'] / teacher['parameters']:>5.0%} "
            f"{m['speedup_batch1']:>7.2f}x {m['speedup_batch32']:>5.2f}x {m['mlm_accuracy']:>8.4f} "
            f"{m['mlm_accuracy'] / teacher['mlm_accuracy']:>6.1%} {cells} "
            f"{d['macro']:>5.1f} +-{d['macro_se']:<3.1f} {d['share_of_teacher']:>6.1%}"
        )
    diff = downstream["macro_differences"].get("student - scratch")
    if diff:
        lines.append(f"distilled - scratch, downstream macro: {diff['points']:+.1f} +-{diff['se']:.1f} points (paired)")
    return "\n".join(lines)


def plot_loss_curves(metrics: dict[str, str], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, path in metrics.items():
        rows = read_jsonl(path)
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["mlm"] for r in rows], label=name)
        if name == "student":
            for key in ("kd", "cos", "loss"):
                axes[1].plot(steps, [r[key] for r in rows], label=f"student {key}")
    axes[0].set(title="MLM cross-entropy (train)", xlabel="optimizer step", ylabel="loss")
    axes[1].set(title="Distillation terms of the student", xlabel="optimizer step", yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic.save_figure(fig, out_png)
    plt.close(fig)
