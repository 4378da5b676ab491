"""The reader: a deterministic, resumable stream of masked micro-batches for one rank.

Epoch plan (a pure function of seed, epoch, rank, world size, worker count and what was consumed before):

    shards --seeded permutation(seed, epoch)--> one sample order, concatenated across shards
           --minus the samples an earlier run of another shape already trained on in this epoch (if any)
           --cut into world_size contiguous blocks (sizes differ by at most one)--> rank r's block
           --cut into num_workers contiguous sub-blocks (sizes differ by at most one)--> worker w's sub-block

A rank whose block is one sample short adds one filler row (all padding: it trains nothing and is counted
nowhere), so every rank makes the same number of batches per epoch (no collective waits on a rank that ran out),
and the blocks partition the epoch: every sample is trained exactly once per epoch. A worker reads only the
shards overlapping its sub-block, skipping entries outside it in the boundary shards.

Inside a worker: seeded shuffle buffer -> length grouping (sort `group_batches * micro_batch_size` samples by
length, cut into micro-batches, shuffle their order) -> collate -> mask. The last partial batch of a sub-block
is kept, so batch counts depend only on sub-block sizes, which are equal across ranks.

Resume at the same shape: `skip_batches` is how many batches this rank's DataLoader already yielded. The
DataLoader takes batches from its workers round-robin (skipping exhausted ones), so each worker works out its own
share, skips whole epochs arithmetically and replays the shuffle/grouping of the partial epoch without collating
or masking. Masks are seeded per (seed, origin, epoch, rank, worker, batch index), so a replayed batch is
bit-identical and a sample met again in a later epoch gets a fresh mask.

Resume at another shape (world size, workers, batch size): every batch names its samples (`sample_ids`), the
trainer records them per epoch (distil_scale.data.position) and a checkpoint stores the union over ranks. The new
stream starts from that record, `consumed`: the unfinished epochs are planned over their untrained samples only,
then fresh epochs follow. That is exact about *which* samples remain, whatever order the old ranks drew them in.

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

import math
import re
import signal
import tarfile
import warnings
from collections.abc import Generator, Iterator, Mapping
from typing import IO

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from distil_scale.config import ConfigError
from distil_scale.data.masking import Masker, collate

# Our only tar members, decoded with np.frombuffer. Nothing else in a shard is ever read, let alone decoded: the
# tar reader skips past a `.pyd`/`.pth`/`.pickle`/`.npy` member without loading its bytes.
ID_ENTRIES = (("ids.u16", np.dtype("<u2")), ("ids.i32", np.dtype("<i4")))
_ID_DTYPES = dict(ID_ENTRIES)
# webdataset's metadata members (`__key__`-style names), which are not part of any sample.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
# Distinct streams of randomness drawn from the same (seed, epoch, ...) coordinates.
_SHARD_ORDER, _SHUFFLE, _GROUPING, _MASKING = range(4)

Sample = tuple[str, np.ndarray]
# A sample as the stream carries it: (key, ids, its index in the split, or -1 for a filler row).
Row = tuple[str, np.ndarray, int]
# The row a rank with one sample fewer than its peers adds to its epoch: all padding, trains nothing, skips nothing.
FILLER: Row = ("", np.zeros(0, dtype=np.int32), -1)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def resume_plan(skip_batches: int, per_worker_totals: list[float]) -> tuple[list[int], int]:
    """How many of the first `skip_batches` DataLoader batches each worker made, and whose turn comes next.

    The DataLoader asks its workers round-robin and drops a worker from the cycle once it is exhausted, so
    after R full rounds worker w has served min(total_w, R) batches. A fresh loader starts its cycle at worker
    0; the returned `rotation` is the worker whose turn it was, and fresh worker i plays worker
    (i + rotation) % num_workers so that the resumed interleaving continues the interrupted one exactly.
    """

    def served(rounds: int) -> float:
        return sum(min(total, rounds) for total in per_worker_totals)

    lo, hi = 0, skip_batches
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if served(mid) <= skip_batches else (lo, mid - 1)
    extra = skip_batches - served(lo)
    skips, rotation = [], 0
    for worker, total in enumerate(per_worker_totals):
        share = min(total, lo)
        if total > lo and extra > 0:
            share, extra, rotation = share + 1, extra - 1, (worker + 1) % len(per_worker_totals)
        skips.append(int(share))
    return skips, rotation


class BadShardWarning(UserWarning):
    """A shard could not be read as the manifest describes it; its unusable samples were skipped."""


def placeholder(key: str) -> Sample:
    """The stand-in for a planned sample that could not be read: `<key>` and no tokens (see the module docstring)."""
    return f"<{key}>", np.zeros(0, dtype=np.int32)


def is_placeholder(sample: Sample | Row) -> bool:
    """Whether `sample` stands in for one that could not be read: real samples are never empty."""
    return len(sample[1]) == 0


# One tar member as the reader sees it: (sample key, lower-case suffix, bytes for an ids member, None for any other).
_Member = tuple[str, str, bytes | None]
# One sample: its key and its members as (suffix, bytes or None).
_Group = tuple[str, list[tuple[str, bytes | None]]]


def _tar_members(stream: IO[bytes]) -> Iterator[_Member]:
    """The regular members of a tar stream (compressed or not), named the way webdataset names them.

    Only our ids members are read into memory; tarfile skips past any other member's bytes without handing them
    to anyone, so whatever a hostile shard packs there is never loaded, let alone unpickled.
    """
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            tar.members = []  # stream mode would otherwise keep every TarInfo of the shard
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            key, suffix = base_plus_ext(info.name)
            if key is None:
                continue
            suffix = suffix.lower()
            member = tar.extractfile(info) if suffix in _ID_DTYPES else None
            yield key, suffix, None if member is None else member.read()


def _tar_samples(stream: IO[bytes]) -> Generator[_Group, None, None]:
    """Consecutive members with the same key, grouped into samples; then whatever error stopped the tar.

    The sample being assembled when the tar breaks off is still yielded (before the error is re-raised): every
    member it holds was read in full, so if its ids member made it, so did the sample.
    """
    key: str | None = None
    members: list[tuple[str, bytes | None]] = []
    error: Exception | None = None
    try:
        for member_key, suffix, data in _tar_members(stream):
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, []
            members.append((suffix, data))
    except Exception as exc:  # the caller decides what a broken shard means; here it only must not lose a sample
        error = exc
    if key is not None:
        yield key, members
    if error is not None:
        raise error


def _decode(members: list[tuple[str, bytes | None]], vocab_size: int | None) -> np.ndarray | str:
    """The sample's token ids, or why it has none that can be trained on."""
    found = [(suffix, data) for suffix, data in members if suffix in _ID_DTYPES]
    if len(found) != 1:
        others = sorted({suffix for suffix, _ in members} - set(_ID_DTYPES))
        return f"{len(found)} ids members" if found else f"no ids member, only {others}"
    suffix, data = found[0]
    dtype = _ID_DTYPES[suffix]
    if data is None or len(data) == 0 or len(data) % dtype.itemsize:
        return f"{suffix} member of {0 if data is None else len(data)} bytes"
    ids = np.frombuffer(data, dtype=dtype)
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        return f"ids outside the vocabulary of {vocab_size}"
    return ids


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


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
    samples: Generator[_Group, None, None] | None = None
    ended = False  # read to the tar's own end (as opposed to stopping at `stop` or on an error)
    broken = False  # the tar could not be opened or broke off
    try:
        try:
            stream = wds.gopen(url)
            samples = _tar_samples(stream)
        except Exception as exc:
            problems.append(f"cannot be opened ({_one_line(exc)})")
            broken = True
        while samples is not None and (stop is None or position < stop):
            try:
                key, members = next(samples)
            except StopIteration:
                ended = True
                break
            except Exception as exc:
                problems.append(f"unreadable after {position} samples ({_one_line(exc)})")
                broken = True
                break
            position += 1
            if position <= start:
                continue
            ids = _decode(members, vocab_size)
            if isinstance(ids, str):
                bad.append((key, ids))
                if stop is not None:
                    yield placeholder(key)
                continue
            yield key, ids
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


def _close(samples: Generator[_Group, None, None] | None, stream: IO[bytes] | None) -> str | None:
    """Close the tar reader and its stream; what closing the stream raised, as one line, if it did."""
    if samples is not None:
        samples.close()
    if stream is None:
        return None
    try:
        stream.close()
    except Exception as exc:
        return _one_line(exc)
    return None


def buffer_shuffled(samples: Iterator[Row], *, size: int, rng: np.random.Generator) -> Iterator[Row]:
    """Reservoir-style shuffle with bounded memory: a seeded rng makes the order a pure function of the input."""
    buffer: list[Row] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(size))
        buffer[j], sample = sample, buffer[j]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def length_grouped(
    samples: Iterator[Row], *, micro_batch_size: int, group_batches: int, rng: np.random.Generator
) -> Iterator[list[Row]]:
    """Batches of similar length (less padding) in a shuffled order; the final batch may be short."""
    group_size = micro_batch_size * group_batches
    group: list[Row] = []
    for sample in samples:
        group.append(sample)
        if len(group) == group_size:
            yield from _cut_group(group, micro_batch_size, rng)
            group = []
    if group:
        yield from _cut_group(group, micro_batch_size, rng)


def _cut_group(group: list[Row], micro_batch_size: int, rng: np.random.Generator) -> Iterator[list[Row]]:
    by_length = sorted(group, key=lambda sample: len(sample[1]))  # stable: ties keep their shuffled order
    batches = [by_length[i : i + micro_batch_size] for i in range(0, len(by_length), micro_batch_size)]
    for index in rng.permutation(len(batches)):
        yield batches[index]


class BatchStream(IterableDataset):
    """Masked, collated micro-batches for one rank: a pure function of the constructor arguments.

    Yields dicts with `input_ids`, `attention_mask`, `labels` (int64, (B, L), L padded to a multiple of
    `pad_multiple`, labels -100 off target), `keys` (keys of the samples trained on, for audits), `sample_ids`
    (int64, (B,): each row's index in the split, placeholders included, -1 for a filler row), `skipped` (how many
    rows stand in for unreadable samples: all padding, never in `keys`) and `epoch`. Epochs run from
    `start_epoch` forever, or up to (excluding) `max_epochs`.

    `consumed` maps an epoch to a boolean mask over the split's samples (see `sample_ids`) of those already
    trained on, by an earlier run of another shape; that epoch's plan covers only the others. `origin` (the step
    such a plan starts at) seeds the shuffles, so a re-split epoch does not replay the old one's random choices.
    """

    def __init__(
        self,
        urls: list[str],
        samples_per_shard: list[int],
        *,
        rank: int,
        world_size: int,
        seed: int,
        micro_batch_size: int,
        masker: Masker,
        pad_id: int,
        start_epoch: int = 0,
        consumed: Mapping[int, np.ndarray] | None = None,
        origin: int = 0,
        skip_batches: int = 0,
        shuffle_buffer: int = 2000,
        group_batches: int = 64,
        max_epochs: int | None = None,
        pad_multiple: int = 8,
    ):
        if len(urls) != len(samples_per_shard):
            raise ConfigError(f"got {len(urls)} shard urls but {len(samples_per_shard)} sample counts")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        if sum(samples_per_shard) < world_size:
            raise ConfigError(f"the split has {sum(samples_per_shard)} samples, fewer than world_size {world_size}")
        for name, value in (("micro_batch_size", micro_batch_size), ("group_batches", group_batches)):
            if value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        for name, value in (("seed", seed), ("start_epoch", start_epoch), ("skip_batches", skip_batches)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        self.urls, self.samples_per_shard = list(urls), list(samples_per_shard)
        self.num_samples = sum(self.samples_per_shard)
        self._first_id = np.concatenate([[0], np.cumsum(self.samples_per_shard)]).astype(np.int64)
        self.consumed = {}
        for epoch, mask in (consumed or {}).items():
            mask = np.asarray(mask)
            if mask.dtype != bool or mask.shape != (self.num_samples,):
                raise ConfigError(
                    f"the consumed mask of epoch {epoch} has shape {mask.shape} and dtype {mask.dtype}; the split "
                    f"has {self.num_samples} samples"
                )
            if epoch >= start_epoch:
                self.consumed[epoch] = mask
        self.rank, self.world_size, self.seed, self.origin = rank, world_size, seed, origin
        self.micro_batch_size, self.group_batches, self.shuffle_buffer = micro_batch_size, group_batches, shuffle_buffer
        self.masker, self.pad_id, self.pad_multiple = masker, pad_id, pad_multiple
        self.start_epoch, self.skip_batches, self.max_epochs = start_epoch, skip_batches, max_epochs
        self._remaining_cache: dict[int, np.ndarray] = {}

    def _remaining(self, epoch: int | None) -> np.ndarray:
        """Samples of each shard (in shard index order) that `epoch` still has to train on."""
        mask = self.consumed.get(epoch) if epoch is not None else None
        if mask is None:
            return np.asarray(self.samples_per_shard, dtype=np.int64)
        if epoch not in self._remaining_cache:
            done = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
            self._remaining_cache[epoch] = np.diff(self._first_id) - np.diff(done[self._first_id])
        return self._remaining_cache[epoch]

    def _sub_block(self, epoch: int | None, num_workers: int, worker: int) -> tuple[int, int, bool]:
        """[begin, end) of the worker's share of the epoch's remaining samples, and whether a filler row follows.

        Rank r takes the r-th of world_size contiguous blocks of the remaining samples (in epoch order), their
        sizes differing by at most one; a rank with the smaller block gets one filler row so that every rank
        makes the same number of batches. The block (filler included) is cut into num_workers sub-blocks.
        """
        total = int(self._remaining(epoch).sum())
        base, extra = divmod(total, self.world_size)
        block = base + (extra > 0)
        real = base + (self.rank < extra)
        rank_begin = self.rank * base + min(self.rank, extra)
        size, rest = divmod(block, num_workers)
        lo = worker * size + min(worker, rest)
        hi = lo + size + (worker < rest)
        return rank_begin + min(lo, real), rank_begin + min(hi, real), hi > real

    def _worker_batches(self, num_workers: int, epoch: int | None = None) -> list[int]:
        shares = (self._sub_block(epoch, num_workers, w) for w in range(num_workers))
        return [math.ceil((end - begin + filler) / self.micro_batch_size) for begin, end, filler in shares]

    def batches_per_epoch(self, num_workers: int, epoch: int | None = None) -> int:
        """Batches this rank's loader yields in `epoch` (default: an epoch nothing was consumed of); equal on
        every rank."""
        return sum(self._worker_batches(max(num_workers, 1), epoch))

    def shard_order(self, epoch: int) -> list[int]:
        # Seeded by (seed, epoch) only: every rank must agree on it for the blocks to partition the epoch.
        return np.random.default_rng(_seed(_SHARD_ORDER, self.seed, epoch)).permutation(len(self.urls)).tolist()

    def _pieces(self, epoch: int, num_workers: int, worker: int) -> list[tuple[int, int, int, np.ndarray | None]]:
        """(shard index, first, stop, which of them to keep or None for all) ranges of the worker's sub-block."""
        begin, end, _ = self._sub_block(epoch, num_workers, worker)
        consumed, remaining = self.consumed.get(epoch), self._remaining(epoch)
        pieces, position = [], 0  # position: remaining samples of the shards walked so far
        for shard in self.shard_order(epoch):
            count = int(remaining[shard])
            lo, hi = max(begin - position, 0), min(end - position, count)
            if lo < hi and count == self.samples_per_shard[shard]:
                pieces.append((shard, lo, hi, None))
            elif lo < hi:
                first = self._first_id[shard]
                free = np.flatnonzero(~consumed[first : first + self.samples_per_shard[shard]])
                start, stop = int(free[lo]), int(free[hi - 1]) + 1
                pieces.append((shard, start, stop, ~consumed[first + start : first + stop]))
            position += count
            if position >= end:
                break
        return pieces

    def _samples(self, epoch: int, num_workers: int, worker: int) -> Iterator[Row]:
        for shard, start, stop, keep in self._pieces(epoch, num_workers, worker):
            first = int(self._first_id[shard]) + start
            samples = read_shard(self.urls[shard], start=start, stop=stop, vocab_size=self.masker.vocab_size)
            for offset, (key, ids) in enumerate(samples):
                if keep is None or keep[offset]:
                    yield key, ids, first + offset
        if self._sub_block(epoch, num_workers, worker)[2]:
            yield FILLER

    def _epoch(self, epoch: int, num_workers: int, worker: int, *, skip: int) -> Iterator[dict]:
        coords = (self.seed, self.origin, epoch, self.rank, worker)
        samples = self._samples(epoch, num_workers, worker)
        if self.shuffle_buffer > 1:
            rng = np.random.default_rng(_seed(_SHUFFLE, *coords))
            samples = buffer_shuffled(samples, size=self.shuffle_buffer, rng=rng)
        batches = length_grouped(
            samples,
            micro_batch_size=self.micro_batch_size,
            group_batches=self.group_batches,
            rng=np.random.default_rng(_seed(_GROUPING, *coords)),
        )
        for index, batch in enumerate(batches):
            if index >= skip:  # skipped batches replay the order decisions but are never collated or masked
                yield self._make_batch(batch, coords, index)

    def _make_batch(self, batch: list[Row], coords: tuple[int, ...], index: int) -> dict:
        input_ids, attention_mask = collate(
            [ids for _, ids, _ in batch], pad_id=self.pad_id, multiple_of=self.pad_multiple
        )
        generator = torch.Generator().manual_seed(_seed(_MASKING, *coords, index))
        masked, labels = self.masker(input_ids, attention_mask, generator=generator)
        keys = [row[0] for row in batch if not is_placeholder(row)]
        fillers = sum(sample_id < 0 for _, _, sample_id in batch)
        return {
            "input_ids": masked,
            "attention_mask": attention_mask,
            "labels": labels,
            "keys": keys,
            "sample_ids": torch.tensor([sample_id for _, _, sample_id in batch], dtype=torch.int64),
            "skipped": len(batch) - len(keys) - fillers,
            "epoch": coords[2],
        }

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        fresh = self._worker_batches(num_workers)
        last_partial = max(self.consumed, default=self.start_epoch - 1)

        def counts(epoch: int) -> list[int]:
            return self._worker_batches(num_workers, epoch) if epoch in self.consumed else fresh

        partial = range(self.start_epoch, last_partial + 1)
        if self.max_epochs is None:
            totals = [math.inf if fresh[w] else sum(counts(e)[w] for e in partial) for w in range(num_workers)]
        else:
            epochs = range(self.start_epoch, self.max_epochs)
            totals = [sum(counts(e)[w] for e in epochs) for w in range(num_workers)]
        skips, rotation = resume_plan(self.skip_batches, totals)
        worker = (loader_worker + rotation) % num_workers
        epoch, skip = self.start_epoch, skips[worker]
        while self.max_epochs is None or epoch < self.max_epochs:
            if epoch > last_partial and fresh[worker] == 0:
                return
            count = counts(epoch)[worker]
            if epoch > last_partial and skip >= count:  # whole fresh epochs skipped arithmetically
                epoch, skip = epoch + skip // count, skip % count
                continue
            if skip < count:
                yield from self._epoch(epoch, num_workers, worker, skip=skip)
            epoch, skip = epoch + 1, max(skip - count, 0)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 to the trainer, which checkpoints before it stops them."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def close_loader(batches: Iterator[dict]) -> None:
    """Stop the workers of a DataLoader iterator now, not at interpreter exit.

    They ignore SIGTERM (see _ignore_stop_signals), so the terminate() that multiprocessing sends its children at
    exit would not stop them and its join would wait forever: a run that ends in an exception must close them.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # a single-process iterator has no workers
    if shutdown is not None:
        shutdown()


def make_loader(
    stream: BatchStream, *, num_workers: int, prefetch_factor: int = 2, multiprocessing_context: str | None = None
) -> DataLoader:
    """A DataLoader over `stream` (batch_size=None: the stream batches itself).

    Workers start by `forkserver` unless told otherwise: forking a trainer that already runs CUDA, NCCL or
    tokenizer threads can deadlock a child. The forkserver preloads this module (torch, numpy, webdataset),
    so a worker starts in milliseconds plus whatever else the entry script imports (workers are persistent,
    so that is paid once per run). As with any non-fork start method, the entry script needs an
    `if __name__ == "__main__":` guard.
    """
    kwargs: dict = {}
    if num_workers > 0:
        context = multiprocessing_context or "forkserver"
        if context == "forkserver":
            torch.multiprocessing.get_context("forkserver").set_forkserver_preload(["__main__", __name__])
        kwargs = {
            "prefetch_factor": prefetch_factor,
            # The stream never ends on its own, so persistence only matters for finite (max_epochs) streams that
            # are iterated again; it saves restarting the workers there.
            "persistent_workers": True,
            "multiprocessing_context": context,
            "worker_init_fn": _ignore_stop_signals,
        }
    # Its own generator: a DataLoader iterator draws a base seed, and drawing it from the global RNG would shift
    # the dropout stream of a resumed run against an uninterrupted one. (The stream seeds itself from coordinates.)
    generator = torch.Generator().manual_seed(stream.seed)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        **kwargs,
    )
