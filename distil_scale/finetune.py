"""Fine-tune a teacher or an exported student on a GLUE-style classification task; report accuracy and F1.

MLM accuracy and perplexity (distil_scale.evaluate) say how well a student imitates its teacher; what users
want to know is how much of the teacher's downstream quality the student keeps. `finetune` answers that the
usual way: put a fresh classification head on the masked LM's encoder (AutoModelForSequenceClassification),
train everything on a labelled task and score the held-out split. The same settings for teacher and student
make their numbers comparable.

Everything is local: the task comes as .csv/.tsv/.jsonl files or a `datasets.save_to_disk` directory, the model
and its tokenizer as Hugging Face directories. The training loop is plain torch (AdamW, linear warmup then
linear decay, gradient clipping at 1.0, batches padded to their own longest sequence) with an evaluation after
every epoch. The reported result is the last epoch's: choosing the best epoch on the evaluation split would
tune on the data the score is read from.

Metrics are computed here rather than with sklearn: accuracy, and F1 of the positive class (label id 1) for
two labels, macro F1 (the unweighted mean of per-class F1) for more, as GLUE reports them.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distil_scale.config import ConfigError
from distil_scale.models import check_vocab, max_positions, quiet_transformers
from kernels.measure import one_line

RESULTS_FILE = "results.json"

# Column names GLUE and similar datasets use for their text, tried in this order when --text-fields is not given.
# A pair that is present wins over a single field: QNLI's (question, sentence) also has a "sentence" column.
_TEXT_PAIRS = (
    ("sentence1", "sentence2"),  # MRPC, RTE, WNLI, STS-B
    ("question", "sentence"),  # QNLI
    ("question1", "question2"),  # QQP
    ("premise", "hypothesis"),  # MNLI, SNLI
    ("question", "passage"),  # BoolQ
)
_TEXT_SINGLES = ("text", "sentence", "content", "review")  # IMDb, SST-2 / CoLA, ...

# Parameters a freshly initialised classification head is made of; any other missing weight means the
# directory is not the pretrained encoder it claims to be.
_HEAD_PARTS = ("classifier", "pre_classifier", "pooler")

_INT_LITERAL = re.compile(r"^[+-]?\d+$")


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _f1(tp: int, fp: int, fn: int) -> float:
    # 2PR / (P + R) written with counts; 0 when the class is neither predicted nor present (as sklearn does).
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], *, num_labels: int) -> dict:
    """{"accuracy", "f1", "f1_average"} of predicted label ids against the true ones.

    Two labels: binary F1 of the positive class, label id 1. More: macro F1, the unweighted mean of the
    per-class F1 over the classes that occur in `labels` or `predictions` (sklearn's average="macro").
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no examples to score")
    correct = sum(p == y for p, y in zip(predictions, labels, strict=True))
    tp = [0] * num_labels
    fp = [0] * num_labels
    fn = [0] * num_labels
    for p, y in zip(predictions, labels, strict=True):
        if p == y:
            tp[y] += 1
        else:
            fp[p] += 1
            fn[y] += 1
    if num_labels == 2:
        f1, average = _f1(tp[1], fp[1], fn[1]), "binary"
    else:
        seen = [c for c in range(num_labels) if tp[c] + fp[c] + fn[c] > 0]
        f1, average = sum(_f1(tp[c], fp[c], fn[c]) for c in seen) / len(seen), "macro"
    return {"accuracy": correct / len(labels), "f1": f1, "f1_average": average}


# ---------------------------------------------------------------------------------------------------------------
# The task: tables, text fields, labels
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """One split of a task, held as columns in memory."""

    what: str  # "--train" or "--eval": which option to fix when something is wrong
    path: str
    columns: dict[str, list]  # column name -> values, in file order; missing cells are None
    text_cells: bool = False  # read from .csv/.tsv, where every cell is a string ("1" may mean the integer 1)
    label_names: list[str] | None = None  # names of a `datasets` ClassLabel label column

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def column(self, name: str, *, option: str) -> list:
        if name not in self.columns:
            raise ConfigError(
                f"{self.what}: {self.path} has no column {name!r} (columns: {', '.join(self.columns)}); set {option}"
            )
        return self.columns[name]


def _read_table(path: str, *, what: str, split: str) -> _Table:
    """A .csv/.tsv/.jsonl/.json file or a `datasets` directory as a _Table; ConfigError when empty or unreadable."""
    if not os.path.exists(path):
        raise ConfigError(f"{what}: {path} does not exist")
    if os.path.isdir(path):
        table = _read_saved(path, what=what, split=split)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext in (".csv", ".tsv"):
            table = _read_delimited(path, what=what, tsv=ext == ".tsv")
        elif ext in (".jsonl", ".json"):
            table = _read_json_lines(path, what=what)
        else:
            raise ConfigError(f"{what}: {path} has extension {ext!r}; use .csv, .tsv, .jsonl or a `datasets` dir")
    if len(table) == 0:
        raise ConfigError(f"{what}: {path} holds no examples")
    return table


def _read_delimited(path: str, *, what: str, tsv: bool) -> _Table:
    # GLUE's .tsv files contain stray quote characters, so tabs alone separate their fields.
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f, **dialect)
        if not reader.fieldnames:
            raise ConfigError(f"{what}: {path} is empty (no header row)")
        columns: dict[str, list] = {name: [] for name in reader.fieldnames}
        for row in reader:
            for name in columns:
                columns[name].append(row.get(name))
    return _Table(what, path, columns, text_cells=True)


def _read_json_lines(path: str, *, what: str) -> _Table:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if text.lstrip().startswith("["):  # a .json file holding one array of objects
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what}: {path} is not JSON lines ({err})") from err
    if not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{what}: {path} must hold one JSON object per line")
    names = list(dict.fromkeys(key for r in records for key in r))  # every key, in order of first appearance
    return _Table(what, path, {name: [r.get(name) for r in records] for name in names})


def _read_saved(path: str, *, what: str, split: str) -> _Table:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise ConfigError(f"{what}: {path} is a directory but not one saved by datasets.save_to_disk") from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            option = "--train-split" if what == "--train" else "--eval-split"
            raise ConfigError(f"{what}: {path} has no split {split!r} (splits: {', '.join(ds)}); set {option}")
        ds = ds[split]
    label_names = None
    for feature in ds.features.values():
        if isinstance(feature, datasets.ClassLabel):
            label_names = list(feature.names)  # there is normally only one ClassLabel column: the label
    return _Table(what, path, ds.to_dict(), label_names=label_names)


def detect_text_fields(columns: Sequence[str]) -> tuple[str, ...]:
    """The text column(s) among `columns` by their usual names; ConfigError when none or several match."""
    for candidates in (_TEXT_PAIRS, tuple((name,) for name in _TEXT_SINGLES)):
        found = [c for c in candidates if all(name in columns for name in c)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            options = " or ".join("'" + " ".join(c) + "'" for c in found)
            raise ConfigError(
                f"ambiguous text fields: could be {options} (columns: {', '.join(columns)}); set --text-fields"
            )
    raise ConfigError(f"no usual text field among columns {', '.join(columns)}; set --text-fields NAME [NAME2]")


def _texts(table: _Table, name: str) -> list[str]:
    values = table.column(name, option="--text-fields")
    for i, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise ConfigError(
                f"{table.what}: {table.path} row {i + 1}: field {name!r} holds {type(value).__name__} "
                f"{value!r}, not text; set --text-fields"
            )
    return ["" if v is None else v for v in values]  # a missing sentence reads as an empty one


def _raw_labels(table: _Table, field: str) -> list[int | str]:
    values = table.column(field, option="--label-field")
    out: list[int | str] = []
    for i, value in enumerate(values):
        if value is None or value == "":
            raise ConfigError(f"{table.what}: {table.path} row {i + 1} has no {field!r} label")
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, float):
            raise ConfigError(
                f"{table.what}: {table.path} row {i + 1}: label {value!r} is a number with a fraction; "
                "finetune does classification (int or string labels), not regression"
            )
        if not isinstance(value, int | str):
            raise ConfigError(f"{table.what}: {table.path} row {i + 1}: label {value!r} is not an int or a string")
        out.append(value)
    if table.text_cells and all(_INT_LITERAL.match(v) for v in out):  # type: ignore[arg-type]
        out = [int(v) for v in out]  # a CSV column of integers: "0"/"1" are the ints GLUE uses, sorted as ints
    if len({type(v) for v in out}) > 1:
        raise ConfigError(f"{table.what}: {table.path}: label field {field!r} mixes numbers and strings")
    return out


def label_ids(train: _Table, eval_: _Table, field: str) -> tuple[list[int], list[int], list[str]]:
    """(train ids, eval ids, class names by id). Classes are the train labels sorted (ints as ints).

    A `datasets` ClassLabel column keeps its own ids and names, so "label id 1" stays what the dataset says.
    """
    train_raw, eval_raw = _raw_labels(train, field), _raw_labels(eval_, field)
    if train.label_names is not None:
        classes: list = list(range(len(train.label_names)))
        names = train.label_names
    else:
        classes = sorted(set(train_raw))
        names = [str(c) for c in classes]
    if len(set(train_raw)) < 2:
        raise ConfigError(
            f"--train: {train.path} has a single class ({train_raw[0]!r}) in {field!r}; "
            "classification needs examples of at least two"
        )
    index = {c: i for i, c in enumerate(classes)}
    for table, raw in ((train, train_raw), (eval_, eval_raw)):
        unseen = sorted({v for v in raw if v not in index}, key=repr)
        if unseen:
            shown = ", ".join(repr(v) for v in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
            raise ConfigError(
                f"{table.what}: {table.path} has labels {shown} that are not train classes "
                f"({', '.join(repr(c) for c in classes)}); fix the data or --label-field"
            )
    return [index[v] for v in train_raw], [index[v] for v in eval_raw], names


@dataclass
class _Split:
    texts: tuple[list[str], ...]  # one list per text field
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------------------------------
# Model, tokenizer, batches
# ---------------------------------------------------------------------------------------------------------------


def _check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"finetune: no model directory at {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"finetune: {path} is not a Hugging Face masked-LM directory (no config.json)")


def load_classifier(path: str, names: list[str]) -> PreTrainedModel:
    """A sequence classifier (fp32) from a local masked-LM directory: its encoder, and a new head for `names`."""
    _check_model_dir(path)
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                local_files_only=True,
                dtype=torch.float32,
                id2label=dict(enumerate(names)),
                label2id={name: i for i, name in enumerate(names)},
                output_loading_info=True,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"finetune: {path} does not hold a loadable masked LM ({one_line(err)})") from err
    missing = sorted(k for k in info["missing_keys"] if not any(part in k.split(".") for part in _HEAD_PARTS))
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


def _input_names(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[str]:
    # BERT takes token_type_ids (segment B of a pair is type 1), DistilBERT has none: pass what the model accepts.
    accepted = set(inspect.signature(model.forward).parameters)
    return {"input_ids", "attention_mask", "token_type_ids"} & accepted & set(tokenizer.model_input_names)


def _batches(
    split: _Split, order: Sequence[int], *, tokenizer, batch_size: int, max_seq_length: int, inputs: set[str], device
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(model inputs, labels) per batch of `order`, each padded to its own longest sequence."""
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        texts = [[column[i] for i in rows] for column in split.texts]
        encoded = tokenizer(
            *texts, padding="longest", truncation=True, max_length=max_seq_length, return_tensors="pt"
        )  # pairs are truncated longest-first
        features = {k: v.to(device) for k, v in encoded.items() if k in inputs}
        yield features, torch.tensor([split.labels[i] for i in rows], device=device)


def _evaluate(model: PreTrainedModel, split: _Split, *, num_labels: int, **batching) -> dict:
    """Eval-mode loss, accuracy and F1 on `split`; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=batching["device"])
    predictions: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for features, labels in _batches(split, range(len(split)), **batching):
                logits = model(**features).logits.float()
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
                predictions.append(logits.argmax(dim=-1))
    finally:
        model.train(was_training)
    metrics = classification_metrics(torch.cat(predictions).tolist(), split.labels, num_labels=num_labels)
    return {"eval_loss": float(loss_sum) / len(split), **metrics}


def _linear_schedule(total_steps: int, warmup_steps: int):
    # Multiplier of the peak learning rate: 0 -> 1 over the warmup, then linearly down to 0 at the last step.
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _param_groups(model: PreTrainedModel, weight_decay: float) -> list[dict]:
    # The BERT recipe: no weight decay on biases and normalisation weights (all the 1-d parameters).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def _check_out(out: str, protected: Sequence[str]) -> Path:
    """Refuse an --out that would overwrite the inputs or a directory this command did not write."""
    path = Path(out).absolute()
    if any(os.path.exists(p) and path.resolve() == Path(p).resolve() for p in protected):
        raise ConfigError(f"finetune: --out {out} is an input directory; choose a new one")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"finetune: --out {out} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / RESULTS_FILE).is_file():
        raise ConfigError(f"finetune: --out {out} is a non-empty directory not written by finetune; choose another")
    return path


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, results: dict, out: Path) -> None:
    """Model, tokenizer and results.json into a temp dir next to `out`, then renamed into place.

    A crash leaves the temp dir (removed on the way out when possible) and never a complete-looking `out`.
    A previous finetune output at `out` is moved aside first: rename(2) cannot replace a non-empty directory.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with quiet_transformers():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(tmp / RESULTS_FILE, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _f1_description(results: dict) -> str:
    if results["f1_average"] == "binary":
        return f"binary, positive class {results['positive_label']!r} = label id 1"
    return f"macro over {len(results['labels'])} classes"


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


def finetune(
    model_dir: str,
    *,
    train_data: str,
    eval_data: str,
    text_fields: Sequence[str] | None = None,
    label_field: str = "label",
    tokenizer_dir: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    epochs: int = 3,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_seq_length: int = 128,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    seed: int = 0,
    out: str | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Fine-tune the masked LM in `model_dir` on (train_data, eval_data); print progress and return the results.

    The results dict holds the task, the settings, metrics per epoch and the final (last epoch) metrics; with
    `out` it is also written as results.json next to the fine-tuned model and its tokenizer.
    """
    start = time.perf_counter()
    if epochs < 1 or batch_size < 1 or not lr > 0 or not 0 <= warmup_ratio < 1 or weight_decay < 0:
        raise ConfigError(
            "finetune: need --epochs >= 1, --batch-size >= 1, --lr > 0, 0 <= warmup ratio < 1, weight decay >= 0"
        )
    if max_seq_length < 2:
        raise ConfigError(f"finetune: --max-seq-length must be at least 2, got {max_seq_length}")
    tokenizer_dir = tokenizer_dir or model_dir
    out_path = _check_out(out, [model_dir, tokenizer_dir, train_data, eval_data]) if out else None

    # The task, validated before the model is loaded: data mistakes are the common ones.
    train = _read_table(train_data, what="--train", split=train_split)
    eval_ = _read_table(eval_data, what="--eval", split=eval_split)
    if text_fields:
        if len(text_fields) > 2:
            raise ConfigError(f"--text-fields takes one or two names, got {len(text_fields)}")
        fields = tuple(text_fields)
    else:
        try:
            fields = detect_text_fields(list(train.columns))
        except ConfigError as err:
            raise ConfigError(f"--train: {train.path}: {err}") from None
    train_ids, eval_ids, names = label_ids(train, eval_, label_field)
    train_split_ = _Split(tuple(_texts(train, f) for f in fields), train_ids)
    eval_split_ = _Split(tuple(_texts(eval_, f) for f in fields), eval_ids)

    torch.manual_seed(seed)  # the new head's init, dropout, and (below) the order of the training examples
    _check_model_dir(model_dir)
    tokenizer = load_task_tokenizer(tokenizer_dir)  # before the model: it is the quicker one to find wrong
    model = load_classifier(model_dir, names)
    vocab = model.config.vocab_size
    check_vocab(teacher_vocab=vocab, student_vocab=vocab, tokenizer_vocab=len(tokenizer), what="finetune")
    limit = max_positions(model.config)
    if limit is not None and max_seq_length > limit:
        raise ConfigError(f"finetune: --max-seq-length {max_seq_length} exceeds the model's {limit} positions")

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    model.train()
    batching = {
        "tokenizer": tokenizer,
        "batch_size": batch_size,
        "max_seq_length": max_seq_length,
        "inputs": _input_names(model, tokenizer),
        "device": device,
    }
    steps_per_epoch = math.ceil(len(train_split_) / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup_steps = max(1, math.ceil(warmup_ratio * total_steps))
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(total_steps, warmup_steps))
    generator = torch.Generator().manual_seed(seed)

    task = (
        f"{len(train_split_)} train / {len(eval_split_)} eval examples, {len(names)} classes, text {'+'.join(fields)}"
    )
    print(f"distil-scale: fine-tuning {model_dir} on {task}, {total_steps} steps on {device}", flush=True)
    history = []
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        order = torch.randperm(len(train_split_), generator=generator).tolist()
        for features, labels in _batches(train_split_, order, **batching):
            loss = F.cross_entropy(model(**features).logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().double() * len(labels)  # no host sync per step
        train_loss = float(loss_sum) / len(train_split_)
        if not math.isfinite(train_loss):
            raise ConfigError(f"finetune: the training loss is {train_loss} in epoch {epoch}; lower --lr")
        metrics = _evaluate(model, eval_split_, num_labels=len(names), **batching)
        seconds = time.perf_counter() - epoch_start
        scores = {k: metrics[k] for k in ("eval_loss", "accuracy", "f1")}
        history.append({"epoch": epoch, "train_loss": train_loss, **scores, "seconds": seconds})
        print(
            f"epoch {epoch}/{epochs}: train loss {train_loss:.4f}, eval loss {metrics['eval_loss']:.4f}, "
            f"accuracy {metrics['accuracy']:.4f}, F1 {metrics['f1']:.4f} ({seconds:.1f}s)",
            flush=True,
        )

    final = {k: history[-1][k] for k in ("accuracy", "f1", "eval_loss")}
    results = {
        "model": model_dir,
        "train": train_data,
        "eval": eval_data,
        "text_fields": list(fields),
        "label_field": label_field,
        "labels": names,
        "num_train": len(train_split_),
        "num_eval": len(eval_split_),
        "f1_average": metrics["f1_average"],
        "positive_label": names[1] if len(names) == 2 else None,
        "final": final,
        "epochs": history,
        "settings": {
            "tokenizer": tokenizer_dir,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "max_seq_length": max_seq_length,
            "weight_decay": weight_decay,
            "warmup_ratio": warmup_ratio,
            "warmup_steps": warmup_steps,
            "total_steps": total_steps,
            "seed": seed,
            "device": str(device),
            "train_split": train_split if os.path.isdir(train_data) else None,
            "eval_split": eval_split if os.path.isdir(eval_data) else None,
        },
        "seconds": time.perf_counter() - start,
        "out": str(out_path) if out_path else None,
    }
    if out_path is not None:
        _save(model, tokenizer, results, out_path)
    saved = f"; saved to {out_path}" if out_path else ""
    scores = f"accuracy {final['accuracy']:.4f}, F1 {final['f1']:.4f} ({_f1_description(results)})"
    print(
        f"distil-scale: {model_dir}: {scores} "
        f"on {len(eval_split_)} eval examples after {epochs} epochs in {results['seconds']:.1f}s{saved}",
        flush=True,
    )
    return results
