"""Fine-tune a teacher or an exported student on a GLUE-style classification task; report accuracy, F1 and MCC.

MLM accuracy (distil_scale.evaluate) says how well a student imitates its teacher; what users want to know is how
much of the teacher's downstream quality the student keeps. `finetune` answers that the usual way: put a fresh
classification head on the masked LM's encoder, train everything on a labelled task and score the held-out split.
One `Recipe` for teacher and students makes their numbers comparable (distil_scale.downstream runs a whole suite).

The model is the encoder (AutoModel of the masked-LM directory, the MLM head dropped), a pooling of its last hidden
states, dropout and one linear layer (init N(0, 0.02), bias 0). Pooling is the mean over real tokens by default.
That is the fix for small students that stayed at chance: a masked LM trained without next-sentence prediction
never trains its [CLS] vector (the token is never masked and no loss reads it), so a [CLS] head on a 2-layer model
starts from a vector that carries next to nothing about the sentence, and BERT's pooler on top of it is random;
the mean of the token vectors carries what the MLM taught every position. `pooling="cls"` keeps BERT's choice.

Training is plain torch: AdamW (no decay on 1-d parameters, distil_scale.engine.param_groups), linear warmup then
linear decay, gradient clipping, batches padded to their own longest sequence, the task tokenized once. The
reported result is the last epoch's: choosing the best epoch on the evaluation split would tune on the data the
score is read from. Everything is local: tasks as files or `datasets` directories (distil_scale.data.labelled).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distil_scale import atomic
from distil_scale.config import ConfigError
from distil_scale.data.labelled import Split, load_task
from distil_scale.engine import param_groups
from distil_scale.models import check_vocab, max_positions, quiet_transformers
from distil_scale.scores import classification_metrics
from kernels.measure import one_line

RESULTS_FILE = "results.json"
HEAD_FILE = "head.pt"
POOLINGS = ("mean", "cls")
# Encoder parameters a masked-LM directory may lack without being a different model: BERT's pooler, which a
# masked LM trained without next-sentence prediction does not have (nor use here).
_OPTIONAL = ("pooler",)


@dataclass
class Recipe:
    """How a model is fine-tuned; the same for a teacher and its students, so that their scores compare."""

    epochs: int = 3
    lr: float = 5e-5  # peak learning rate, reached after the warmup
    batch_size: int = 32
    max_seq_length: int = 128  # tokens per example (a pair: both sentences), truncated longest-first
    weight_decay: float = 0.01  # on matrices only
    warmup_ratio: float = 0.1  # fraction of the steps with a linear warmup; linear decay to 0 after
    dropout: float = 0.1  # on the pooled vector, before the head
    pooling: str = "mean"  # "mean" over real tokens, or "cls" (the first token's vector)
    clip_norm: float = 1.0  # gradient norm clipping
    eval_every_epoch: bool = True  # False: evaluate after the last epoch only (the suite runner's choice)

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("finetune: need --epochs >= 1, --batch-size >= 1 and --lr > 0")
        if not 0 <= self.warmup_ratio < 1 or self.weight_decay < 0 or not 0 <= self.dropout < 1:
            raise ConfigError("finetune: need 0 <= warmup ratio < 1, weight decay >= 0 and 0 <= dropout < 1")
        if self.max_seq_length < 2:
            raise ConfigError(f"finetune: --max-seq-length must be at least 2, got {self.max_seq_length}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"finetune: --pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")


# ---------------------------------------------------------------------------------------------------------------
# The model: encoder, pooling, head
# ---------------------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A masked LM's encoder with a pooled linear head: logits (B, num_labels) from tokenized inputs."""

    def __init__(self, encoder: PreTrainedModel, num_labels: int, *, pooling: str, dropout: float):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.inputs = {"input_ids", "attention_mask", "token_type_ids"} & set(
            inspect.signature(encoder.forward).parameters
        )  # BERT takes token_type_ids (segment B of a pair is type 1), DistilBERT has none

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(**{k: v for k, v in inputs.items() if k in self.inputs}).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled.float()))


def _check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"finetune: no model directory at {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"finetune: {path} is not a Hugging Face masked-LM directory (no config.json)")


def load_encoder(path: str) -> PreTrainedModel:
    """The encoder (fp32) of a local masked-LM directory; ConfigError when it lacks encoder weights."""
    _check_model_dir(path)
    try:
        with quiet_transformers():
            model, info = AutoModel.from_pretrained(
                path, local_files_only=True, dtype=torch.float32, output_loading_info=True
            )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"finetune: {path} does not hold a loadable masked LM ({one_line(err)})") from err
    missing = sorted(k for k in info["missing_keys"] if not any(part in k.split(".") for part in _OPTIONAL))
    if missing:
        # Without its encoder weights the "pretrained" model is a random one, and its score would mean nothing.
        raise ConfigError(f"finetune: {path} lacks encoder weights ({len(missing)} missing, e.g. {missing[0]})")
    return model


def load_task_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer in `path`: the model's directory unless --tokenizer."""
    if not os.path.isdir(path):
        raise ConfigError(f"finetune: no tokenizer directory at {path}; set --tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"finetune: {path} holds no loadable tokenizer ({one_line(err)}); set --tokenizer") from err
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"finetune: the tokenizer in {path} has no pad token; batches need one")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Data: tokenized once, padded per batch
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """A split tokenized once (no padding): token lists per input name, and the label ids."""

    features: dict[str, list[list[int]]]
    labels: list[int]
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)


def encode(split: Split, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> Encoded:
    encoded = tokenizer(*split.texts, truncation=True, max_length=max_seq_length)  # pairs: longest-first
    names = {"input_ids", "attention_mask", "token_type_ids"} & set(encoded)
    return Encoded({k: encoded[k] for k in names}, split.labels, tokenizer.pad_token_id)


def batches(
    data: Encoded, order: Sequence[int], batch_size: int, device: torch.device
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(inputs, labels) per batch of `order`, each padded to its own longest sequence."""
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(data.features["input_ids"][i]) for i in rows)
        inputs = {}
        for name, column in data.features.items():
            fill = data.pad_id if name == "input_ids" else 0
            inputs[name] = torch.tensor([column[i] + [fill] * (width - len(column[i])) for i in rows], device=device)
        yield inputs, torch.tensor([data.labels[i] for i in rows], device=device)


# ---------------------------------------------------------------------------------------------------------------
# Steps of a fine-tuning run
# ---------------------------------------------------------------------------------------------------------------


def build(model_dir: str, num_labels: int, recipe: Recipe, *, seed: int, device: torch.device) -> Classifier:
    torch.manual_seed(seed)  # the new head's init and dropout
    model = Classifier(load_encoder(model_dir), num_labels, pooling=recipe.pooling, dropout=recipe.dropout)
    return model.to(device).train()


def optimizer_for(model: nn.Module, recipe: Recipe, total_steps: int):
    """AdamW over engine.param_groups, with a LambdaLR for linear warmup then linear decay to 0."""
    warmup = max(1, math.ceil(recipe.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), warmup


def train_epoch(model, data: Encoded, order: list[int], optimizer, scheduler, recipe: Recipe, device) -> float:
    """One pass over `data` in `order`; the mean training loss."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, labels in batches(data, order, recipe.batch_size, device):
        loss = F.cross_entropy(model(**inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_norm)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().double() * len(labels)  # no host sync per step
    return float(loss_sum) / len(data)  # the epoch's one sync


def predict(model: Classifier, data: Encoded, *, batch_size: int, device) -> tuple[list[int], float]:
    """(predicted label ids, mean eval loss) in eval mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    predictions = []
    try:
        with torch.no_grad():
            for inputs, labels in batches(data, range(len(data)), batch_size, device):
                logits = model(**inputs)
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
                predictions.append(logits.argmax(dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(predictions).tolist(), float(loss_sum) / len(data)


def fit(
    model_dir: str, train: Encoded, dev: Encoded, num_labels: int, recipe: Recipe, *, seed: int, device, log=None
) -> tuple[Classifier, list[dict], list[int]]:
    """Fine-tune `model_dir` on `train`: (model, one dict per epoch, the last epoch's predictions on `dev`)."""
    model = build(model_dir, num_labels, recipe, seed=seed, device=device)
    total_steps = math.ceil(len(train) / recipe.batch_size) * recipe.epochs
    optimizer, scheduler, warmup = optimizer_for(model, recipe, total_steps)
    generator = torch.Generator().manual_seed(seed)  # the order of the training examples
    history: list[dict] = []
    for epoch in range(1, recipe.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(len(train), generator=generator).tolist()
        train_loss = train_epoch(model, train, order, optimizer, scheduler, recipe, device)
        if not math.isfinite(train_loss):
            raise ConfigError(f"finetune: the training loss is {train_loss} in epoch {epoch}; lower --lr")
        row = {"epoch": epoch, "train_loss": train_loss, "total_steps": total_steps, "warmup_steps": warmup}
        if recipe.eval_every_epoch or epoch == recipe.epochs:
            predictions, eval_loss = predict(model, dev, batch_size=2 * recipe.batch_size, device=device)
            metrics = classification_metrics(predictions, dev.labels, num_labels=num_labels)
            row.update(eval_loss=eval_loss, **{k: metrics[k] for k in ("accuracy", "f1", "mcc")})
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        if log is not None:
            log(row)
    return model, history, predictions


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def check_out(out: str, protected: Sequence[str], *, marker: str = RESULTS_FILE, what: str = "finetune") -> Path:
    """Refuse an --out that would overwrite the inputs or a directory this command did not write."""
    path = Path(out).absolute()
    if any(os.path.exists(p) and path.resolve() == Path(p).resolve() for p in protected):
        raise ConfigError(f"{what}: --out {out} is an input directory; choose a new one")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}: --out {out} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise ConfigError(f"{what}: --out {out} is a non-empty directory not written by {what}; choose another")
    return path


def save(model: Classifier, tokenizer: PreTrainedTokenizerBase, results: dict, out: Path) -> None:
    """The encoder (a Hugging Face directory), the head, the tokenizer and results.json, atomically: a crash never
    leaves a complete-looking `out`, and a previous output there stays until the new one is whole."""
    with atomic.replacing_dir(out) as tmp:
        with quiet_transformers():
            model.encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"head": model.head.state_dict(), "pooling": model.pooling}, tmp / HEAD_FILE)
        with open(tmp / RESULTS_FILE, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


def load_finetuned(path: str) -> tuple[Classifier, PreTrainedTokenizerBase, list[str]]:
    """(model in eval mode, tokenizer, class names) of a directory written by `finetune --out`."""
    with open(os.path.join(path, RESULTS_FILE), encoding="utf-8") as f:
        names = json.load(f)["labels"]
    head = torch.load(os.path.join(path, HEAD_FILE), map_location="cpu", weights_only=True)
    model = Classifier(load_encoder(path), len(names), pooling=head["pooling"], dropout=0.0)
    model.head.load_state_dict(head["head"])
    return model.eval(), load_task_tokenizer(path), names


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


def finetune(
    model_dir: str,
    *,
    train_data: str,
    eval_data: str,
    recipe: Recipe | None = None,
    text_fields: Sequence[str] | None = None,
    label_field: str = "label",
    tokenizer_dir: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    seed: int = 0,
    out: str | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Fine-tune the masked LM in `model_dir` on (train_data, eval_data); print progress and return the results.

    The results dict holds the task, the recipe, metrics per epoch and the final (last epoch) metrics; with `out`
    it is also written as results.json next to the fine-tuned encoder, its head and tokenizer.
    """
    start = time.perf_counter()
    recipe = recipe or Recipe()
    recipe.check()
    tokenizer_dir = tokenizer_dir or model_dir
    out_path = check_out(out, [model_dir, tokenizer_dir, train_data, eval_data]) if out else None
    # The task, validated before the model is loaded: data mistakes are the common ones.
    task = dict(text_fields=text_fields, label_field=label_field, train_split=train_split, eval_split=eval_split)
    train, dev, names, fields = load_task(train_data, eval_data, **task)
    _check_model_dir(model_dir)
    tokenizer = load_task_tokenizer(tokenizer_dir)  # before the model: it is the quicker one to find wrong
    check_fits(model_dir, tokenizer, recipe)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_enc, dev_enc = (encode(s, tokenizer, recipe.max_seq_length) for s in (train, dev))
    steps = math.ceil(len(train) / recipe.batch_size) * recipe.epochs
    described = f"{len(train)} train / {len(dev)} eval examples, {len(names)} classes, text {'+'.join(fields)}"
    print(f"distil-scale: fine-tuning {model_dir} on {described}, {steps} steps on {device}", flush=True)
    model, history, _ = fit(
        model_dir, train_enc, dev_enc, len(names), recipe, seed=seed, device=device, log=_print_epoch(recipe.epochs)
    )
    final = {k: history[-1][k] for k in ("accuracy", "f1", "mcc", "eval_loss")}
    results = {
        "model": model_dir,
        "train": train_data,
        "eval": eval_data,
        "text_fields": list(fields),
        "label_field": label_field,
        "labels": names,
        "num_train": len(train),
        "num_eval": len(dev),
        "f1_average": "binary" if len(names) == 2 else "macro",
        "positive_label": names[1] if len(names) == 2 else None,
        "final": final,
        "epochs": history,
        "recipe": asdict(recipe),
        "settings": {
            "tokenizer": tokenizer_dir,
            "seed": seed,
            "device": str(device),
            "train_split": train_split if os.path.isdir(train_data) else None,
            "eval_split": eval_split if os.path.isdir(eval_data) else None,
        },
        "seconds": time.perf_counter() - start,
        "out": str(out_path) if out_path else None,
    }
    if out_path is not None:
        save(model, tokenizer, results, out_path)
    _print_final(results)
    return results


def check_fits(model_dir: str, tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> None:
    """ConfigError unless the tokenizer's vocabulary and the recipe's sequence length fit the model."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    check_vocab(
        teacher_vocab=config.vocab_size,
        student_vocab=config.vocab_size,
        tokenizer_vocab=len(tokenizer),
        what="finetune",
    )
    limit = max_positions(config)
    if limit is not None and recipe.max_seq_length > limit:
        raise ConfigError(f"finetune: --max-seq-length {recipe.max_seq_length} exceeds the model's {limit} positions")


def _print_epoch(epochs: int):
    def log(row: dict) -> None:
        shown = ""
        if "accuracy" in row:  # rows of epochs without an evaluation have no scores
            shown = f", eval loss {row['eval_loss']:.4f}, accuracy {row['accuracy']:.4f}, F1 {row['f1']:.4f}, "
            shown += f"MCC {row['mcc']:.4f}"
        print(f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}{shown} ({row['seconds']:.1f}s)")

    return log


def _print_final(results: dict) -> None:
    final = results["final"]
    if results["f1_average"] == "binary":
        average = f"binary, positive class {results['positive_label']!r} = label id 1"
    else:
        average = f"macro over {len(results['labels'])} classes"
    saved = f"; saved to {results['out']}" if results["out"] else ""
    print(
        f"distil-scale: {results['model']}: accuracy {final['accuracy']:.4f}, F1 {final['f1']:.4f} ({average}), "
        f"MCC {final['mcc']:.4f} on {results['num_eval']} eval examples after {results['recipe']['epochs']} epochs "
        f"in {results['seconds']:.1f}s{saved}",
        flush=True,
    )
