"""The embedded default (`make demo`): offline corpus -> tokenizer -> shards -> teacher -> student vs scratch.

Three runs of the same engine share the prepared data under `<root>/data`:
  teacher   a BERT of configs/models/demo-teacher.json pretrained with MLM only
  student   the half-depth DistilBERT initialised from it and distilled with the triple loss (configs/demo.yaml)
  scratch   the same student architecture, random init, MLM only, for the same number of steps
Then all three are evaluated on the held-out shards with identical masks; the table goes to stdout, the numbers
to `<root>/summary.json`, the loss curves to `<root>/loss_curves.png`. A stage whose export exists and whose
resolved config is unchanged is reused; an interrupted stage resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from distil_scale.config import Config, load_config
from distil_scale.metrics import format_duration, read_jsonl

DEFAULT_CONFIG = "configs/demo.yaml"
TEACHER_ARCH = "configs/models/demo-teacher.json"
# The teacher gets more steps than the students: distillation needs a teacher worth imitating. About 5 of the
# demo's ~10 minutes on 2 CPU cores; 1000 more steps buy only ~1 point of held-out MLM accuracy.
TEACHER_STEPS = 2500


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
    from distil_scale.evaluate import evaluate_models

    exports = {name: os.path.join(cfg.run.output_dir, "export") for name, cfg in configs.items()}
    data = configs["student"].data.shards
    results = evaluate_models(list(exports.values()), data=data, split="heldout", batch_size=32, seed=0)
    summary = {name: results[path] for name, path in exports.items()}
    teacher_acc = summary["teacher"]["mlm_accuracy"]
    for name in ("student", "scratch"):
        summary[name]["accuracy_vs_teacher"] = summary[name]["mlm_accuracy"] / teacher_acc
    with open(os.path.join(root, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    plot_loss_curves(
        {name: os.path.join(cfg.run.output_dir, "metrics.jsonl") for name, cfg in configs.items()},
        os.path.join(root, "loss_curves.png"),
    )
    return summary


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
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
