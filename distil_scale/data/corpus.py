"""Raw text in: local files or saved `datasets` directories, and the embedded offline corpus.

`load_texts` turns any mix of `.txt` (one document per line), `.jsonl`, `.parquet` and `save_to_disk`
directories into one `datasets.Dataset` with a single "text" column.

`write_synthetic_corpus` writes the embedded default's corpus: English-like documents generated from a small
grammar over a few hundred words. It holds three kinds of signal so that MLM accuracy means something:
facts to memorise (where each person lives, their job, pet and the colours of their things: fixed across the
whole corpus), syntax to learn (subject-verb agreement across relative clauses and adjectives), and arithmetic
(tables of small sums, differences and products in number words). A deeper teacher learns more of it than a
small student trained from scratch in the same few minutes, which is what distillation has to show. Held-out
documents come from the same generator and the same world, so evaluation measures what was learnt about the
world, on documents never trained on.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distil_scale import atomic
from distil_scale.config import ConfigError

if TYPE_CHECKING:  # imported where a corpus is loaded: training from prepared shards never needs `datasets`
    import datasets

_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_texts(inputs: list[str], *, text_field: str = "text", cache_dir: str | None = None) -> datasets.Dataset:
    """Load and concatenate every input into one Dataset with a single "text" column.

    `cache_dir` holds the Arrow files `datasets` builds from raw files; without it a fresh temporary directory
    is used, so nothing lands in the user's home cache.
    """
    import datasets

    if not inputs:
        raise ConfigError("data.inputs is empty: give at least one .txt/.jsonl/.parquet file or saved dataset dir")
    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="distil-scale-datasets-")
        # The returned Dataset memory-maps files in there, so the directory lives until the process ends.
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    parts = [_load_one(path, text_field=text_field, cache_dir=cache_dir) for path in inputs]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_one(path: str, *, text_field: str, cache_dir: str) -> datasets.Dataset:
    import datasets

    if not os.path.exists(path):
        raise ConfigError(f"data input {path!r} does not exist")
    if os.path.isdir(path):
        ds = _load_saved(path)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext not in _LOADERS:
            raise ConfigError(f"data input {path!r}: unknown extension {ext!r} (use .txt, .jsonl, .parquet or a dir)")
        ds = datasets.load_dataset(_LOADERS[ext], data_files=path, split="train", cache_dir=cache_dir)
        if ext == ".txt":
            # the text builder always names its column "text", whatever data.text_field says
            return ds
    if text_field not in ds.column_names:
        raise ConfigError(
            f"data input {path!r} has no field {text_field!r} (fields: {ds.column_names}); set data.text_field"
        )
    feature = ds.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ConfigError(f"data input {path!r}: field {text_field!r} is {feature}, not text; set data.text_field")
    ds = ds.select_columns([text_field])
    return ds if text_field == "text" else ds.rename_column(text_field, "text")


def _load_saved(path: str) -> datasets.Dataset:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"data input {path!r} is a directory but not one saved by datasets.save_to_disk") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"data input {path!r} holds splits {list(ds)}; point at one split's directory instead")
        ds = ds["train"]
    return ds


# ---------------------------------------------------------------------------------------------------------------
# The embedded corpus
# ---------------------------------------------------------------------------------------------------------------

# The facts come from this constant, not from the corpus seed: corpora written with different seeds (train and
# a held-out evaluation corpus, say) then agree on every fact, and only the documents differ.
_WORLD_SEED = 1910_01108
_MIN_WORDS, _MAX_WORDS = 15, 200

_NAMES = (
    "anna ben carla david emma felix greta hugo iris jonas kira leo maria nico olga paul rosa sam tara umar vera "
    "walter xenia yuri zoe adam bella chris dora erik fiona gabe helen ivan julia karl lena max nora oscar"
).split()
_CITIES = {
    "paris": "france", "london": "england", "berlin": "germany", "rome": "italy", "madrid": "spain",
    "vienna": "austria", "oslo": "norway", "lisbon": "portugal", "dublin": "ireland", "prague": "czechia",
    "athens": "greece", "warsaw": "poland", "cairo": "egypt", "tokyo": "japan", "lima": "peru", "delhi": "india",
    "sydney": "australia", "boston": "america", "munich": "germany", "milan": "italy",
}  # fmt: skip
_JOBS = "teacher doctor farmer baker painter pilot driver singer writer nurse cook judge sailor miner tailor".split()
_ANIMALS = {
    "dog": "dogs", "cat": "cats", "horse": "horses", "bird": "birds", "fish": "fish", "rabbit": "rabbits",
    "mouse": "mice", "goat": "goats", "sheep": "sheep", "cow": "cows", "duck": "ducks", "frog": "frogs",
    "bear": "bears", "wolf": "wolves", "fox": "foxes", "owl": "owls",
}  # fmt: skip
_OBJECTS = "car house boat bike hat coat lamp chair table door cup book kite ball bag box pen clock bed shoe".split()
_COLOURS = "red blue green yellow black white brown pink purple orange grey".split()
_VERBS = {
    "chases": "chase", "sees": "see", "likes": "like", "follows": "follow", "watches": "watch", "finds": "find",
    "helps": "help", "carries": "carry", "feeds": "feed", "hears": "hear", "knows": "know", "loves": "love",
    "pushes": "push", "visits": "visit", "calls": "call",
}  # fmt: skip
_ADJECTIVES = "big small old young happy quiet fast slow tall clever lazy brave".split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
_MONTHS = "january february march april may june july august september october november december".split()
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number(n: int) -> str:
    if n < 20:
        return _UNITS[n]
    tens, unit = divmod(n, 10)
    return _TENS[tens - 2] + ("" if unit == 0 else " " + _UNITS[unit])


@dataclass(frozen=True)
class _Person:
    name: str
    city: str
    job: str
    pet: str
    things: tuple[tuple[str, str], ...]  # (object, colour): the colour of each owned object never changes


@dataclass(frozen=True)
class _World:
    people: list[_Person]
    habits: dict[str, tuple[str, str]]  # animal -> (verb, animal): what every animal of that kind does, to whom


def _make_world() -> _World:
    rng = random.Random(_WORLD_SEED)
    people = []
    for name in _NAMES:
        things = tuple((obj, rng.choice(_COLOURS)) for obj in rng.sample(_OBJECTS, 3))
        people.append(_Person(name, rng.choice(list(_CITIES)), rng.choice(_JOBS), rng.choice(list(_ANIMALS)), things))
    habits = {animal: (rng.choice(list(_VERBS)), rng.choice(list(_ANIMALS))) for animal in _ANIMALS}
    return _World(people, habits)


def _fact(rng: random.Random, p: _Person) -> str:
    obj, colour = rng.choice(p.things)
    return rng.choice(
        [
            f"{p.name} lives in {p.city} .",
            f"{p.name} lives in {p.city} , a city in {_CITIES[p.city]} .",
            f"{p.city} is a city in {_CITIES[p.city]} .",
            f"{p.name} works as a {p.job} .",
            f"the {p.job} {p.name} lives in {p.city} .",
            f"the {p.job} {p.name} has a {p.pet} .",
            f"the pet of {p.name} is a {p.pet} .",
            f"the {obj} of {p.name} is {colour} .",
            f"{p.name} has a {colour} {obj} .",
            f"where does {p.name} live ? in {p.city} .",
            f"what does {p.name} do ? {p.name} is a {p.job} .",
        ]
    )


def _noun_phrase(rng: random.Random, animal: str, *, plural: bool) -> str:
    adjective = rng.choice(_ADJECTIVES) + " " if rng.random() < 0.4 else ""
    return f"the {adjective}{_ANIMALS[animal] if plural else animal}"


def _agreement(rng: random.Random, habits: dict[str, tuple[str, str]]) -> str:
    # The verb agrees with the head noun, never with the noun inside the relative clause between them: the
    # long-range dependency that extra depth helps with. The verb and its object are the head noun's habit, so
    # they can be learnt; the adjectives and the relative clause are noise.
    animal = rng.choice(list(_ANIMALS))
    plural = rng.random() < 0.5
    verb, target = habits[animal]
    subject = _noun_phrase(rng, animal, plural=plural)
    if rng.random() < 0.5:
        inner_plural = rng.random() < 0.5
        inner_verb = rng.choice(list(_VERBS))
        if rng.random() < 0.5:
            inner = _noun_phrase(rng, rng.choice(list(_ANIMALS)), plural=inner_plural)
        else:
            inner, inner_plural = rng.choice(_NAMES), False
        subject += f" that {inner} {_VERBS[inner_verb] if inner_plural else inner_verb}"
    obj = _noun_phrase(rng, target, plural=rng.random() < 0.5)
    return f"{subject} {_VERBS[verb] if plural else verb} {obj} ."


def _arithmetic(rng: random.Random) -> str:
    # Small operands: a table of a few hundred facts that a deeper model memorises faster, not long addition.
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{_number(a)} plus {_number(b)} is {_number(a + b)} ."
    if kind == 1:
        a = rng.randrange(20)
        b = rng.randrange(a + 1)
        return f"{_number(a)} minus {_number(b)} is {_number(a - b)} ."
    a, b = rng.randrange(1, 10), rng.randrange(1, 10)
    return f"{_number(a)} times {_number(b)} is {_number(a * b)} ."


def _sequence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        i = rng.randrange(len(_DAYS))
        return f"after {_DAYS[i]} comes {_DAYS[(i + 1) % len(_DAYS)]} ."
    i = rng.randrange(len(_MONTHS))
    return f"the month after {_MONTHS[i]} is {_MONTHS[(i + 1) % len(_MONTHS)]} ."


def _document(rng: random.Random, world: _World) -> str:
    # Log-uniform lengths: many short documents, some long ones that exercise padding and length grouping.
    target = int(_MIN_WORDS * (_MAX_WORDS / _MIN_WORDS) ** rng.random())
    topic = rng.choice(world.people)
    generators: list[Callable[[], str]] = [
        lambda: _fact(rng, topic),
        lambda: _fact(rng, rng.choice(world.people)),
        lambda: _agreement(rng, world.habits),
        lambda: _arithmetic(rng),
        lambda: _sequence(rng),
    ]
    # Facts about anyone outweigh the topic's: they have to be memorised, where the topic's facts, repeated
    # within a document, can also be copied from context.
    weights = [2, 4, 3, 2, 1]
    words: list[str] = []
    while len(words) < target:
        sentence = rng.choices(generators, weights)[0]().split()
        if len(words) + len(sentence) > _MAX_WORDS:
            break
        words += sentence
    return " ".join(words)


def write_synthetic_corpus(path: str, *, num_docs: int, seed: int) -> str:
    """Write `num_docs` synthetic documents, one per line, to `path` (atomically) and return the path."""
    if num_docs < 1:
        raise ConfigError(f"num_docs must be >= 1 for the synthetic corpus, got {num_docs}")
    world = _make_world()
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            f.write(_document(rng, world) + "\n")
    return path
