"""Reading one shard: exactly the planned samples, whatever state the shard is in.

Bad input: a missing, truncated, corrupt or hostile shard neither stops the run nor puts the ranks out of step.
`read_shard` always yields exactly the planned number of samples for each piece of a shard. A sample it cannot use
(no ids member, two of them, a member of impossible length, ids outside the vocabulary) becomes a placeholder, and
so does every planned sample after the point where the tar stops reading (truncated, garbled, unreadable, or just
shorter than the manifest says). A placeholder is `("<key>", zero ids)`: the sample's own key in angle brackets,
or `<url#position>` where its key is lost, and no tokens; a real sample is never empty (prepare keeps sequences of
12 tokens or more, and an empty ids member counts as unusable), so zero length is what marks one. Each damaged
piece emits one `BadShardWarning` naming the shard, the problem and how many samples were skipped. Placeholders
are shuffled and length-grouped like any sample, so every worker still yields the plan's batch count and every
collective still meets its peers; `collate` makes them rows of padding (attention_mask 0, hence no labels and no
part in any loss), and each batch counts them in `skipped` while its `keys` lists only the samples it trains on.
A damaged sample costs the compute of a padding row, nothing else. Only `ids.u16` / `ids.i32` members are ever
read, and only with np.frombuffer: any other member (`.pyd`, `.pth`, `.pickle`, `.npy`, ...) is skipped unread.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator, Iterator
from typing import IO

import numpy as np

from distil_scale.data.tar import Group, tar_samples
from kernels.measure import one_line

# Our only tar members, decoded with np.frombuffer. Nothing else in a shard is ever read, let alone decoded: the
# tar reader skips past a `.pyd`/`.pth`/`.pickle`/`.npy` member without loading its bytes.
ID_ENTRIES = (("ids.u16", np.dtype("<u2")), ("ids.i32", np.dtype("<i4")))
_ID_DTYPES = dict(ID_ENTRIES)
_VOCAB_CHECK_SAMPLES = 64  # read_shard checks the ids of this many samples against the vocabulary at once

Sample = tuple[str, np.ndarray]


class BadShardWarning(UserWarning):
    """A shard could not be read as the manifest describes it; its unusable samples were skipped."""


def placeholder(key: str) -> Sample:
    """The stand-in for a planned sample that could not be read: `<key>` and no tokens (see the module docstring)."""
    return f"<{key}>", np.zeros(0, dtype=np.int32)


def is_placeholder(sample: tuple) -> bool:
    """Whether `sample` stands in for one that could not be read: real samples are never empty."""
    return len(sample[1]) == 0


def _decode(members: list[tuple[str, bytes | None]]) -> np.ndarray | str:
    """The sample's token ids (the vocabulary is checked later, see `_outside_vocabulary`), or why it has none
    that can be trained on."""
    if len(members) == 1 and members[0][1] is not None:  # the usual sample: one member, an ids member
        suffix, data = members[0]
    else:
        found = [(suffix, data) for suffix, data in members if suffix in _ID_DTYPES]
        if len(found) != 1:
            others = sorted({suffix for suffix, _ in members} - set(_ID_DTYPES))
            return f"{len(found)} ids members" if found else f"no ids member, only {others}"
        suffix, data = found[0]
    dtype = _ID_DTYPES[suffix]
    if data is None or len(data) == 0 or len(data) % dtype.itemsize:
        return f"{suffix} member of {0 if data is None else len(data)} bytes"
    return np.frombuffer(data, dtype=dtype)


def _outside_vocabulary(arrays: list[np.ndarray], vocab_size: int | None) -> set[int]:
    """Indices of the arrays holding an id outside [0, vocab_size): one vectorised check over all of them, and a
    look at each only when that fails (a damaged shard), instead of two reductions per sample."""
    if vocab_size is None or not arrays:
        return set()
    ids = np.concatenate(arrays)
    if int(ids.min()) >= 0 and int(ids.max()) < vocab_size:
        return set()
    return {i for i, ids in enumerate(arrays) if int(ids.min()) < 0 or int(ids.max()) >= vocab_size}


def read_shard(url: str, *, start: int = 0, stop: int | None = None, vocab_size: int | None = None) -> Iterator[Sample]:
    """(key, ids) for the samples at positions [start, stop) of one shard; any URL `webdataset.gopen` opens.

    With `stop`, exactly `stop - start` samples, whatever the shard holds: the plan of every rank counts on it.
    An unusable sample (see `_decode`; with `vocab_size`, ids must lie in [0, vocab_size)) becomes a placeholder
    under its own key, and if the shard cannot be opened, breaks off or simply ends early, the rest of the range
    becomes placeholders keyed `url#position`. Without `stop` the shard is read to its end, unusable samples are
    dropped, and a shard that breaks off just ends there. Either way no error of the shard's escapes (only
    KeyboardInterrupt, SystemExit and their kind do); the damage is reported as one BadShardWarning once the
    shard is done.
    """
    bad: list[tuple[str, str]] = []  # (key, why) of unusable samples in the range
    problems: list[str] = []  # what went wrong with the shard as a whole
    position = 0  # samples of the shard seen so far
    stream: IO[bytes] | None = None
    samples: Generator[Group, None, None] | None = None
    ended = False  # read to the tar's own end (as opposed to stopping at `stop` or on an error)
    broken = False  # the tar could not be opened or broke off
    pending: list[Sample] = []  # decoded samples, in shard order, whose ids still await the vocabulary check

    def checked() -> Iterator[Sample]:
        """The pending samples after one vectorised vocabulary check: placeholders for those that fail it."""
        outside = _outside_vocabulary([ids for _, ids in pending], vocab_size)
        for index, (key, ids) in enumerate(pending):
            if index not in outside:
                yield key, ids
                continue
            bad.append((key, f"ids outside the vocabulary of {vocab_size}"))
            if stop is not None:
                yield placeholder(key)
        pending.clear()

    try:
        try:
            import webdataset as wds  # its URL opener (files, pipe:, http): needed only where shards are read

            stream = wds.gopen(url)
            samples = tar_samples(stream)
        except Exception as exc:
            problems.append(f"cannot be opened ({one_line(exc)})")
            broken = True
        while samples is not None and (stop is None or position < stop):
            try:
                key, members = next(samples)
            except StopIteration:
                ended = True
                break
            except Exception as exc:
                problems.append(f"unreadable after {position} samples ({one_line(exc)})")
                broken = True
                break
            position += 1
            if position <= start:
                continue
            ids = _decode(members)
            if isinstance(ids, str):
                yield from checked()  # the samples before this one go first, and are the first in `bad`
                bad.append((key, ids))
                if stop is not None:
                    yield placeholder(key)
                continue
            pending.append((key, ids))
            if len(pending) == _VOCAB_CHECK_SAMPLES:
                yield from checked()
        yield from checked()
        if ended and stop is not None and position < stop:
            problems.append(f"holds {position} samples, the manifest promised at least {stop}")
        closed = _close(samples, stream)
        samples = stream = None
        if closed is not None and ended:
            # A `pipe:` reader stopped early kills its producer with SIGPIPE, a non-zero exit that means nothing;
            # a pipe that fails although we read its tar to the end is worth a word (its samples are fine).
            problems.append(f"closing it failed ({closed})")
        missing = range(0) if stop is None else range(max(position, start), stop)
        if bad:
            key, why = bad[0]
            problems.insert(0, f"{len(bad)} unusable sample(s), the first: {key!r} has no valid ids entry ({why})")
        if problems:
            if stop is not None:
                fate = f"{len(bad) + len(missing)} of {stop - start} samples replaced by placeholders"
            else:
                fate = f"{len(bad)} sample(s) dropped" + (", and whatever followed" if broken else "")
            warnings.warn(f"{url}: {'; '.join(problems)}; {fate}", BadShardWarning, stacklevel=2)
        for missing_position in missing:
            yield placeholder(f"{url}#{missing_position}")
    finally:
        _close(samples, stream)


def _close(samples: Generator[Group, None, None] | None, stream: IO[bytes] | None) -> str | None:
    """Close the tar reader and its stream; what closing the stream raised, as one line, if it did."""
    if samples is not None:
        samples.close()
    if stream is None:
        return None
    try:
        stream.close()
    except Exception as exc:
        return one_line(exc)
    return None
