"""The embedded downstream suite: three GLUE-like classification tasks generated from the demo corpus's world.

The demo's students are judged the way DistilBERT is, by fine-tuning on labelled tasks; these are written offline
from the same synthetic world as the pretraining corpus (distil_scale.data.corpus), in the spirit of GLUE's mix:

  agreement   CoLA-like, one sentence: is the main verb's number that of the head noun, across a relative clause
              whose own noun usually has the other number (the attractor)? Acceptable or not; Matthews correlation.
  inference   RTE/MNLI-like, a pair: a premise of two true facts about two people, a hypothesis about one of them
              that the premise entails (possibly through the world's geography: a city lies in one country),
              contradicts, or leaves unknown. Half of the unknown hypotheses are true in the world, so world
              knowledge alone cannot tell unknown from the rest; the premise has to be read. Accuracy.
  paraphrase  MRPC-like, a pair: do two sentences in different templates state the same fact? A non-paraphrase
              differs in exactly one slot (the person, the value, the object). Values are drawn at random, not
              from the world, so only the comparison decides. F1 of the paraphrase class (label 1).

Every task has balanced labels, no dev sentence (or pair) among the training ones, and a `task.json` naming its
metric. The files are ordinary `train.csv` / `dev.csv` with GLUE's column names (sentence; sentence1, sentence2;
premise, hypothesis; label), so the suite runner reads them exactly as it reads a user's own GLUE copy.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable

from distil_scale import atomic
from distil_scale.config import ConfigError
from distil_scale.data.corpus import (
    _ADJECTIVES,
    _ANIMALS,
    _CITIES,
    _COLOURS,
    _JOBS,
    _NAMES,
    _OBJECTS,
    _VERBS,
    _make_world,
    _Person,
)

TASK_FILE = "task.json"
# Fields of each task, in column order, and its metric: the names GLUE uses.
TASKS = {
    "agreement": {"columns": ["sentence", "label"], "metric": "mcc", "like": "CoLA"},
    "inference": {"columns": ["premise", "hypothesis", "label"], "metric": "accuracy", "like": "RTE/MNLI"},
    "paraphrase": {"columns": ["sentence1", "sentence2", "label"], "metric": "f1", "like": "MRPC"},
}
INFERENCE_LABELS = ("entailment", "contradiction", "unknown")


# ---------------------------------------------------------------------------------------------------------------
# agreement
# ---------------------------------------------------------------------------------------------------------------


def _noun(rng: random.Random, animal: str, plural: bool) -> str:
    adjective = rng.choice(_ADJECTIVES) + " " if rng.random() < 0.3 else ""
    return f"the {adjective}{_ANIMALS[animal] if plural else animal}"


def _agreement(rng: random.Random, world, label: int) -> dict:
    # The head noun's verb and object are its habit in the world, as in the corpus; only the verb's number varies.
    animal = rng.choice(list(_ANIMALS))
    verb, target = world.habits[animal]
    plural = rng.random() < 0.5
    subject = _noun(rng, animal, plural)
    if rng.random() < 0.8:  # a relative clause between subject and verb, its noun of the other number mostly
        inner_plural = not plural if rng.random() < 0.75 else plural
        inner_verb = rng.choice(list(_VERBS))
        inner = _noun(rng, rng.choice(list(_ANIMALS)), inner_plural)
        subject += f" that {inner} {_VERBS[inner_verb] if inner_plural else inner_verb}"
    verb_plural = plural if label == 1 else not plural
    obj = _noun(rng, target, rng.random() < 0.5)
    return {"sentence": f"{subject} {_VERBS[verb] if verb_plural else verb} {obj} .", "label": label}


# ---------------------------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------------------------

# attribute -> (the statement of a value, the values it can take)
_ATTRIBUTES: dict[str, tuple[Callable[[str, str], str], tuple[str, ...]]] = {
    "city": (lambda n, v: f"{n} lives in {v} .", tuple(_CITIES)),
    "job": (lambda n, v: f"{n} works as a {v} .", tuple(_JOBS)),
    "pet": (lambda n, v: f"the pet of {n} is a {v} .", tuple(_ANIMALS)),
}
_COUNTRIES = tuple(sorted(set(_CITIES.values())))


def _value(p: _Person, attribute: str) -> str:
    return getattr(p, attribute)


def _other(rng: random.Random, values: tuple[str, ...], not_this: str) -> str:
    return rng.choice([v for v in values if v != not_this])


def _inference(rng: random.Random, world, label: int) -> dict:
    first, second = rng.sample(world.people, 2)
    attrs = rng.sample(list(_ATTRIBUTES), 2)
    premise = [_ATTRIBUTES[a][0](p.name, _value(p, a)) for p, a in zip((first, second), attrs)]
    rng.shuffle(premise)
    person, attribute = (first, attrs[0]) if rng.random() < 0.5 else (second, attrs[1])
    state, values = _ATTRIBUTES[attribute]
    truth = _value(person, attribute)
    if INFERENCE_LABELS[label] == "unknown":
        said = attrs[0] if person is first else attrs[1]
        attribute = rng.choice([a for a in _ATTRIBUTES if a != said])
        state, values = _ATTRIBUTES[attribute]
        truth = _value(person, attribute)
        hypothesis = state(person.name, truth if rng.random() < 0.5 else _other(rng, values, truth))
    elif attribute == "city" and rng.random() < 0.5:  # through the geography: a city lies in one country
        country = _CITIES[truth]
        if INFERENCE_LABELS[label] == "contradiction":
            country = _other(rng, _COUNTRIES, country)
        hypothesis = f"{person.name} lives in {country} ."
    else:
        value = truth if INFERENCE_LABELS[label] == "entailment" else _other(rng, values, truth)
        hypothesis = state(person.name, value)
    return {"premise": " ".join(premise), "hypothesis": hypothesis, "label": INFERENCE_LABELS[label]}


# ---------------------------------------------------------------------------------------------------------------
# paraphrase
# ---------------------------------------------------------------------------------------------------------------

# kind -> templates of one fact (name, value, object); a paraphrase pair uses two different ones of a kind.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": ("{n} lives in {v} .", "where does {n} live ? in {v} .", "the home of {n} is in {v} ."),
    "job": ("{n} works as a {v} .", "what does {n} do ? {n} is a {v} .", "the job of {n} is {v} ."),
    "pet": ("the pet of {n} is a {v} .", "{n} has a {v} as a pet .", "{n} keeps a {v} ."),
    "thing": ("the {o} of {n} is {v} .", "{n} has a {v} {o} .", "the {v} {o} belongs to {n} ."),
}
_VALUES = {"city": tuple(_CITIES), "job": tuple(_JOBS), "pet": tuple(_ANIMALS), "thing": tuple(_COLOURS)}


def _paraphrase(rng: random.Random, world, label: int) -> dict:
    kind = rng.choice(list(_TEMPLATES))
    first, second = rng.sample(_TEMPLATES[kind], 2)
    slots = {"n": rng.choice(_NAMES), "v": rng.choice(_VALUES[kind]), "o": rng.choice(_OBJECTS)}
    other = dict(slots)
    if label == 0:  # exactly one slot differs
        slot = rng.choice(["n", "v", "o"] if kind == "thing" else ["n", "v"])
        pool = {"n": _NAMES, "v": _VALUES[kind], "o": _OBJECTS}[slot]
        other[slot] = _other(rng, tuple(pool), slots[slot])
    return {"sentence1": first.format(**slots), "sentence2": second.format(**other), "label": label}


_GENERATORS = {"agreement": (_agreement, 2), "inference": (_inference, 3), "paraphrase": (_paraphrase, 2)}


# ---------------------------------------------------------------------------------------------------------------
# Writing the suite
# ---------------------------------------------------------------------------------------------------------------


def generate(task: str, *, train: int, dev: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, dev rows) of `task`: labels balanced (round-robin), every example distinct, dev unseen in train.

    Examples are drawn until the quotas are met; a duplicate of an earlier example is drawn again, so no dev text
    is a training text. ConfigError when the task's space cannot supply that many distinct examples.
    """
    make, num_labels = _GENERATORS[task]
    world = _make_world()
    rng = random.Random(f"{task}:{seed}")
    seen: set[tuple] = set()
    splits: list[list[dict]] = []
    for size in (train, dev):
        rows: list[dict] = []
        misses = 0
        while len(rows) < size:
            row = make(rng, world, len(rows) % num_labels)
            key = tuple(v for k, v in row.items() if k != "label")
            if key in seen:
                misses += 1
                if misses > 20 * (train + dev):
                    raise ConfigError(f"suite: {task} cannot make {train} + {dev} distinct examples; ask for fewer")
                continue
            seen.add(key)
            rows.append(row)
        rng.shuffle(rows)
        splits.append(rows)
    return splits[0], splits[1]


def _write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_suite(out_dir: str, *, train: int, dev: int, seed: int = 0) -> str:
    """Write every task as `<out_dir>/<task>/{train,dev}.csv` + task.json, atomically (temp dir, then rename).

    An existing suite with the same settings is kept as it is (the demo reruns cheaply); another is replaced.
    """
    settings = {"train": train, "dev": dev, "seed": seed}
    stamp = os.path.join(out_dir, "suite.json")
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == settings:
                return out_dir
    with atomic.replacing_dir(out_dir) as tmp:
        for task, spec in TASKS.items():
            os.makedirs(os.path.join(tmp, task))
            train_rows, dev_rows = generate(task, train=train, dev=dev, seed=seed)
            _write_csv(os.path.join(tmp, task, "train.csv"), train_rows, spec["columns"])
            _write_csv(os.path.join(tmp, task, "dev.csv"), dev_rows, spec["columns"])
            meta = {"metric": spec["metric"], "like": spec["like"], "description": _describe(task)}
            with open(os.path.join(tmp, task, TASK_FILE), "w", encoding="utf-8") as f:
                json.dump(meta, f)
        with open(os.path.join(tmp, "suite.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f)
    return out_dir


def _describe(task: str) -> str:
    doc = __doc__.split(f"  {task}", 1)[1].split("\n\n", 1)[0]
    return " ".join(doc.split())
