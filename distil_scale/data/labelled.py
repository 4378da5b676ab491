"""Labelled classification examples from local files: the task half of `finetune` and `downstream`.

A split comes as a .csv/.tsv/.jsonl/.json file or a `datasets.save_to_disk` directory (a Dataset, or a
DatasetDict and a split name). The text column(s) are found by GLUE's usual names unless given; labels are ints or
strings, their classes the training labels sorted (a `datasets` ClassLabel keeps its own ids and names). Every
mistake is a ConfigError naming the option to fix (`--train`, `--eval`, `--text-fields`, `--label-field`).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from distil_scale.config import ConfigError

# A pair that is present wins over a single field: QNLI's (question, sentence) also has a "sentence" column.
_TEXT_PAIRS = (
    ("sentence1", "sentence2"),  # MRPC, RTE, WNLI, STS-B
    ("question", "sentence"),  # QNLI
    ("question1", "question2"),  # QQP
    ("premise", "hypothesis"),  # MNLI, SNLI
    ("question", "passage"),  # BoolQ
)
_TEXT_SINGLES = ("text", "sentence", "content", "review")  # IMDb, SST-2 / CoLA, ...


_INT_LITERAL = re.compile(r"^[+-]?\d+$")


@dataclass
class Table:
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


def read_table(path: str, *, what: str, split: str) -> Table:
    """A .csv/.tsv/.jsonl/.json file or a `datasets` directory as a Table; ConfigError when empty or unreadable."""
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


def _read_delimited(path: str, *, what: str, tsv: bool) -> Table:
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
    return Table(what, path, columns, text_cells=True)


def _read_json_lines(path: str, *, what: str) -> Table:
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
    return Table(what, path, {name: [r.get(name) for r in records] for name in names})


def _read_saved(path: str, *, what: str, split: str) -> Table:
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
    return Table(what, path, ds.to_dict(), label_names=label_names)


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


def _texts(table: Table, name: str) -> list[str]:
    values = table.column(name, option="--text-fields")
    for i, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise ConfigError(
                f"{table.what}: {table.path} row {i + 1}: field {name!r} holds {type(value).__name__} "
                f"{value!r}, not text; set --text-fields"
            )
    return ["" if v is None else v for v in values]  # a missing sentence reads as an empty one


def _raw_labels(table: Table, field: str) -> list[int | str]:
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


def label_ids(train: Table, eval_: Table, field: str) -> tuple[list[int], list[int], list[str]]:
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
class Split:
    texts: tuple[list[str], ...]  # one list per text field
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def load_task(
    train_data: str,
    eval_data: str,
    *,
    text_fields: Sequence[str] | None = None,
    label_field: str = "label",
    train_split: str = "train",
    eval_split: str = "validation",
) -> tuple[Split, Split, list[str], tuple[str, ...]]:
    """(train split, eval split, class names by id, text fields) of a task, validated before any model loads."""
    train = read_table(train_data, what="--train", split=train_split)
    eval_ = read_table(eval_data, what="--eval", split=eval_split)
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
    train_split_ = Split(tuple(_texts(train, f) for f in fields), train_ids)
    eval_split_ = Split(tuple(_texts(eval_, f) for f in fields), eval_ids)
    return train_split_, eval_split_, names, fields
