"""The `distil-scale` command: train, prepare, export, eval, finetune, downstream, ablate, demo, config.

Every user mistake (bad config, missing path, mismatched vocabulary) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from distil_scale.config import ConfigError, explain, load_config

USAGE_ERROR = 2


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from distil_scale.config import check_paths

    cfg = load_config(args.config, overrides)
    check_paths(cfg)
    from distil_scale.checkpoint import CheckpointWriteError
    from distil_scale.train import Diverged, train

    try:
        train(cfg)
    except (Diverged, CheckpointWriteError) as err:  # every rank raises it; one says why
        if os.environ.get("RANK", "0") == "0":
            print(f"distil-scale: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


def _config(args: argparse.Namespace, overrides: list[str]) -> int:
    import yaml

    if args.explain or args.config is None and not overrides:
        print(explain())
        return 0
    print(yaml.safe_dump(load_config(args.config, overrides).to_dict(), sort_keys=False), end="")
    return 0


def _prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides(overrides)
    from distil_scale.data.shards import prepare

    manifest = prepare(
        args.inputs,
        tokenizer_dir=args.tokenizer,
        out_dir=args.out,
        max_seq_length=args.max_seq_length,
        samples_per_shard=args.samples_per_shard,
        heldout_fraction=args.heldout_fraction,
        num_proc=args.num_proc,
        text_field=args.text_field,
        seed=args.seed,
    )
    totals = {split: manifest.totals(split) for split in manifest.splits}
    summary = ", ".join(f"{split}: {t['samples']} sequences / {t['tokens']} tokens" for split, t in totals.items())
    print(f"distil-scale: prepared {args.out} ({summary})")
    return 0


def _export(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides(overrides)
    from distil_scale.export import export_student

    out = export_student(args.checkpoint, args.out, tokenizer_dir=args.tokenizer)
    print(f"distil-scale: exported {args.checkpoint} to {out}")
    return 0


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides(overrides)
    # Options of --speed alone; unset ones are left to distil_scale.speed's defaults.
    speed_only = ("batch_sizes", "seq_len", "iters", "warmup", "threads", "dtype", "forward")
    speed_settings = {name: getattr(args, name) for name in speed_only if getattr(args, name) is not None}
    if args.speed:
        if args.data is not None:
            raise ConfigError("eval --speed times random inputs; --data is not used with it")
        from distil_scale.speed import run_speed

        report = run_speed(args.models, out=args.out, seed=args.seed, **speed_settings)
        if args.out:
            from distil_scale.speed import format_speed_table

            _update_cards(
                args.models,
                "speed",
                "Size and inference speed (`distil-scale eval --speed`):",
                format_speed_table(report),
            )
        _print_json(args, report)
        return 0
    given = ["--" + name.replace("_", "-") for name in speed_settings]
    if given:  # silently ignoring them would leave the user thinking they took effect
        raise ConfigError(f"eval: {', '.join(given)} only apply with --speed")
    if args.data is None:
        raise ConfigError("eval: --data (a prepared dataset directory) is required unless --speed is given")
    from distil_scale.evaluate import evaluate_models, format_table

    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise ConfigError(f"eval: --out {args.out}: its directory does not exist")
    results = evaluate_models(
        args.models,
        data=args.data,
        split=args.split,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        seed=args.seed,
    )
    if args.out:
        from distil_scale import atomic

        atomic.write_json(args.out, results)
        _update_cards(args.models, "mlm", f"Held-out MLM on `{args.data}` ({args.split}):", format_table(results))
    _print_json(args, results)
    return 0


def _update_cards(models: list[str], section: str, title: str, table: str) -> None:
    """The table into the card of every model directory that has a distil-scale card (as export writes one)."""
    from distil_scale.card import update_cards

    update_cards(models, section, f"{title}\n\n```\n{table}\n```")


def _demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from distil_scale.demo import run_demo

    run_demo(config_path=args.config, overrides=overrides, fresh=args.fresh)
    return 0


def _ablate(args: argparse.Namespace, overrides: list[str]) -> int:
    from distil_scale.ablate import run_ablation

    results = run_ablation(args.config, overrides, out=args.out, steps=args.steps)
    _print_json(args, results)
    return 0


def _recipe(args: argparse.Namespace, **changes):
    from distil_scale.finetune import Recipe

    names = ("epochs", "lr", "batch_size", "max_seq_length", "weight_decay", "pooling")
    return Recipe(**{name: getattr(args, name) for name in names if getattr(args, name, None) is not None}, **changes)


def _finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides(overrides)
    from distil_scale.finetune import finetune

    results = finetune(
        args.model,
        train_data=args.train,
        eval_data=args.eval,
        recipe=_recipe(args),
        text_fields=args.text_fields,
        label_field=args.label_field,
        tokenizer_dir=args.tokenizer,
        train_split=args.train_split,
        eval_split=args.eval_split,
        seed=args.seed,
        out=args.out,
    )
    _print_json(args, results)
    return 0


def _downstream(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides(overrides)
    from distil_scale.downstream import run_suite

    plan = {"seeds": args.seeds, "lrs": args.lrs, "max_train": args.max_train, "names": args.names}
    plan["workers"] = args.workers
    results = run_suite(args.tasks, args.models, recipe=_recipe(args), out=args.out, **plan)
    _print_json(args, results)
    return 0


def _print_json(args: argparse.Namespace, results: dict) -> None:
    if args.json:
        print(json.dumps(results, indent=1))


def _no_overrides(overrides: list[str]) -> None:
    if overrides:
        raise ConfigError(f"unexpected arguments: {' '.join(overrides)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distil-scale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run: the same as cluster/launch.py")
    p.add_argument("--config", required=True, help="YAML file under configs/; --section.key=value overrides follow")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(fn=_train)

    p = sub.add_parser("config", help="print the resolved config, or every key with its meaning")
    p.add_argument("--config", default=None)
    p.add_argument("--explain", action="store_true", help="list every key, its default and what it does")
    p.set_defaults(fn=_config)

    p = sub.add_parser("prepare", help="tokenize local text into WebDataset shards + dataset.json")
    p.add_argument("inputs", nargs="+", help=".txt (one document per line), .jsonl, .parquet or a `datasets` dir")
    p.add_argument("--tokenizer", required=True, help="local Hugging Face (fast) tokenizer directory")
    p.add_argument("--out", required=True, help="output directory for shards and dataset.json")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--heldout-fraction", type=float, default=0.01)
    p.add_argument("--num-proc", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets inputs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_prepare)

    p = sub.add_parser("export", help="turn a (ZeRO-sharded) checkpoint into a Hugging Face model directory")
    p.add_argument("checkpoint", help="<output_dir>/checkpoints (newest complete) or one checkpoint tag directory")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to ship with the model")
    p.set_defaults(fn=_export)

    p = sub.add_parser("eval", help="MLM accuracy and perplexity on held-out shards; --speed: size and speed")
    p.add_argument(
        "models",
        nargs="+",
        help="Hugging Face masked-LM directories (teacher, exported students); with --speed also config.json files",
    )
    p.add_argument("--data", default=None, help="prepared dataset directory (dataset.json); required without --speed")
    p.add_argument("--split", default="heldout")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="masking seed (--speed: token-id seed): same for every model")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    speed = p.add_argument_group("--speed", "size and inference speed (the paper's Table 3); see distil_scale/speed.py")
    speed.add_argument("--speed", action="store_true", help="time forward passes on random inputs instead")
    speed.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 32")
    speed.add_argument("--seq-len", type=int, default=None, help="tokens per sequence, no padding (default: 128)")
    speed.add_argument(
        "--iters", type=int, default=None, help="timed passes per model (default: CPU 20 / batch, >= 5; GPU 100)"
    )
    speed.add_argument(
        "--warmup", type=int, default=None, help="untimed passes per model (default: CPU 3 / batch, >= 1; GPU 10)"
    )
    speed.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    speed.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="GPU precision (CPU: fp32)")
    speed.add_argument(
        "--forward", choices=["encoder", "mlm"], default=None, help="encoder (default, as Table 3) or the full MLM"
    )
    p.add_argument("--out", default=None, help="also write the results as JSON here and into the models' cards")
    p.set_defaults(fn=_eval)

    p = sub.add_parser("ablate", help="the paper's ablation (Table 4): each loss term and the init, on any config")
    p.add_argument("--config", required=True, help="run config; --section.key=value overrides follow")
    p.add_argument("--steps", type=int, default=None, help="steps per variant (default: the config's max_steps)")
    p.add_argument("--out", default=None, help="directory for the five runs and the table (<output_dir>/ablation)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.set_defaults(fn=_ablate)

    p = sub.add_parser("demo", help="the embedded default: corpus -> tokenizer -> teacher -> student, offline")
    p.add_argument("--config", default=None, help="defaults to configs/demo.yaml")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("finetune", help="fine-tune a teacher or student on a classification task: accuracy and F1")
    p.add_argument("model", help="Hugging Face masked-LM directory (teacher or exported student)")
    p.add_argument("--train", required=True, help=".csv, .tsv, .jsonl or a `datasets` directory of labelled examples")
    p.add_argument("--eval", required=True, help="the same for the evaluation split")
    p.add_argument("--train-split", default="train", help="split of a saved DatasetDict given as --train")
    p.add_argument("--eval-split", default="validation", help="split of a saved DatasetDict given as --eval")
    p.add_argument("--text-fields", nargs="+", default=None, help="one or two text columns (default: by usual names)")
    p.add_argument("--label-field", default="label", help="label column: ints or strings (ids = sorted order)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    _recipe_options(p, lr=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the fine-tuned model, tokenizer and results.json here")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.set_defaults(fn=_finetune)

    p = sub.add_parser("downstream", help="fine-tune every model on every task of a suite: the paper's Table 1")
    p.add_argument("models", nargs="+", help="masked-LM directories; the first is the teacher (the 100%% reference)")
    p.add_argument("--tasks", required=True, help="suite directory: one sub-directory (files or `datasets`) per task")
    p.add_argument("--names", nargs="+", default=None, help="row names of the models (default: directory names)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per model, task and learning rate")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="learning-rate grid, best mean on dev kept")
    p.add_argument("--max-train", type=int, default=None, help="use at most this many training examples per task")
    p.add_argument("--workers", type=int, default=1, help="fine-tunings at once, one CPU thread each (small models)")
    _recipe_options(p, lr=None)
    p.add_argument("--out", default=None, help="write downstream.json and downstream.png here; update model cards")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.set_defaults(fn=_downstream)
    return parser


def _recipe_options(p: argparse.ArgumentParser, *, lr: float | None) -> None:
    """The fine-tuning recipe's options; unset ones keep distil_scale.finetune.Recipe's defaults."""
    if lr is not None:
        p.add_argument("--lr", type=float, default=lr, help="peak learning rate: 10%% warmup, then linear decay")
    p.add_argument("--epochs", type=int, default=None, help="default: 3")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32")
    p.add_argument("--max-seq-length", type=int, default=None, help="default: 128")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 0.01")
    p.add_argument("--pooling", choices=["mean", "cls"], default=None, help="mean over real tokens (default) or [CLS]")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like --section.key=value)")
    try:
        return args.fn(args, rest)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"distil-scale: error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
