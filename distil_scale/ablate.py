"""`distil-scale ablate --config X`: the DistilBERT paper's Table 4 on any run config.

Five runs of the same config, each for the same number of steps from the same seed, differ in one thing:

  triple        the config as it is: kd + mlm + cos, the student initialised from the teacher
  no_kd         without the distillation term (alpha_kd = 0)
  no_cos        without the cosine term (alpha_cos = 0)
  no_mlm        without the masked-LM term (alpha_mlm = 0)
  random_init   the triple loss, the student initialised at random

Each run's export is then evaluated on the held-out split with identical masks, and the table reports held-out MLM
accuracy and its difference from `triple` in points (the paper reports GLUE macro-score differences: without kd
-2.96, without cos -1.46, without mlm -0.31, random init -3.69). The numbers go to `<out>/ablation.json`, a bar
chart of the differences to `<out>/ablation.png`. A variant whose export exists from the same resolved config is
reused, and an interrupted one resumes from its newest checkpoint, as the demo's stages do.

The embedded default's teacher is pretrained by the demo; when the config is the demo's and that teacher is
missing, its stage runs first.
"""

from __future__ import annotations

import os
import time

from distil_scale import atomic
from distil_scale.config import Config, ConfigError, load_config

# name -> (the overrides that make it, what the row is called in the table)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "triple": ([], "triple loss, teacher init"),
    "no_kd": (["--loss.alpha_kd=0"], "without kd"),
    "no_cos": (["--loss.alpha_cos=0"], "without cos"),
    "no_mlm": (["--loss.alpha_mlm=0"], "without mlm"),
    "random_init": (["--student.init=random"], "triple loss, random init"),
}
# The paper's Table 4: change of the GLUE macro score against the triple loss with teacher init.
PAPER_DELTAS = {"no_kd": -2.96, "no_cos": -1.46, "no_mlm": -0.31, "random_init": -3.69}


def variant_configs(config_path: str, overrides: list[str], *, out: str, steps: int | None) -> dict[str, Config]:
    """The five configs: the base config with each variant's overrides, output under `out/<name>`."""
    base = list(overrides) + ([] if steps is None else [f"--train.max_steps={steps}"])
    configs = {}
    for name, (extra, _) in VARIANTS.items():
        cfg = load_config(config_path, [*base, f"--run.output_dir={os.path.join(out, name)}", *extra])
        configs[name] = cfg
    if not configs["triple"].uses_teacher_outputs:
        raise ConfigError("loss: the config distils nothing (alpha_kd and alpha_cos are 0); ablate needs a teacher")
    return configs


def _ensure_demo_teacher(config_path: str, overrides: list[str], cfg: Config) -> None:
    """Pretrain the embedded default's teacher when the config expects it where the demo puts it."""
    from distil_scale import demo

    root = load_config(config_path, overrides).run.output_dir
    stages = demo.stage_overrides(root)
    teacher = load_config(config_path, [*overrides, *stages["teacher"]])
    if os.path.isdir(cfg.teacher.path) or os.path.join(teacher.run.output_dir, "export") != cfg.teacher.path:
        return
    print(f"ablate: the teacher {cfg.teacher.path} is missing; pretraining it as the demo does", flush=True)
    demo.run_stage("teacher", teacher, prefix="ablate")


def run_ablation(
    config_path: str, overrides: list[str] = (), *, out: str | None = None, steps: int | None = None
) -> dict:
    """Train the five variants (reusing finished ones), evaluate them alike, print and save the table."""
    from distil_scale import demo

    overrides = list(overrides)
    base = load_config(config_path, overrides)
    out = out or os.path.join(base.run.output_dir, "ablation")
    configs = variant_configs(config_path, overrides, out=out, steps=steps)
    _ensure_demo_teacher(config_path, overrides, configs["triple"])
    start = time.perf_counter()
    for name, cfg in configs.items():
        demo.run_stage(name, cfg, prefix="ablate")
    results = summarize(configs, out)
    from distil_scale.metrics import format_duration

    print(f"ablate: finished in {format_duration(time.perf_counter() - start)}; {out}/ablation.json, ablation.png")
    return results


def summarize(configs: dict[str, Config], out: str) -> dict:
    """Evaluate every variant's export on the same held-out masks; write ablation.json and ablation.png."""
    from distil_scale.evaluate import evaluate_models

    exports = {name: os.path.join(cfg.run.output_dir, "export") for name, cfg in configs.items()}
    triple = configs["triple"]
    metrics = evaluate_models(list(exports.values()), data=triple.data.shards, split="heldout", seed=0)
    reference = metrics[exports["triple"]]["mlm_accuracy"]
    rows = {}
    for name, path in exports.items():
        m = metrics[path]
        rows[name] = {
            "variant": VARIANTS[name][1],
            "mlm_accuracy": m["mlm_accuracy"],
            "perplexity": m["perplexity"],
            "delta_points": 100 * (m["mlm_accuracy"] - reference),
            "paper_delta_glue_points": PAPER_DELTAS.get(name, 0.0),
        }
    results = {
        "steps": triple.train.max_steps,
        "heldout_tokens": metrics[exports["triple"]]["tokens"],
        "teacher": triple.teacher.path,
        "variants": rows,
    }
    print(format_table(results))
    os.makedirs(out, exist_ok=True)
    atomic.write_json(os.path.join(out, "ablation.json"), results)
    plot(results, os.path.join(out, "ablation.png"))
    return results


def format_table(results: dict) -> str:
    head = f"{'variant':<27}{'held-out MLM acc':>17}{'ppl':>9}{'diff (points)':>15}{'paper (GLUE)':>14}"
    lines = [f"ablation: {results['steps']} steps each, {results['heldout_tokens']} held-out MLM targets", head]
    lines.append("-" * len(head))
    for name, row in results["variants"].items():
        paper = f"{row['paper_delta_glue_points']:+.2f}" if name != "triple" else "-"
        diff = f"{row['delta_points']:+.2f}" if name != "triple" else "-"
        lines.append(f"{row['variant']:<27}{row['mlm_accuracy']:>17.4f}{row['perplexity']:>9.2f}{diff:>15}{paper:>14}")
    return "\n".join(lines)


def plot(results: dict, out_png: str) -> None:
    """Bars of each variant's difference from the triple loss: ours (held-out MLM accuracy) beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results["variants"] if n != "triple"]
    ours = [results["variants"][n]["delta_points"] for n in names]
    paper = [results["variants"][n]["paper_delta_glue_points"] for n in names]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="this run: held-out MLM accuracy")
    ax.bar([x + 0.2 for x in xs], paper, width=0.4, label="DistilBERT paper: GLUE macro score")
    ax.set_xticks(list(xs), [results["variants"][n]["variant"] for n in names])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel="difference from the triple loss (points)", title=f"Ablation, {results['steps']} steps each")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic.save_figure(fig, out_png)
    plt.close(fig)
