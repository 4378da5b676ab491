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

Damaged shards are the reader's business (distil_scale.data.reader): it always yields the planned number of samples,
placeholders where a sample could not be read, so every worker still yields the plan's batch count. The tar
parsing is distil_scale.data.tar, the DataLoader around a stream distil_scale.data.loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distil_scale.config import ConfigError
from distil_scale.data.masking import Masker, collate
from distil_scale.data.reader import is_placeholder, read_shard

# Distinct streams of randomness drawn from the same (seed, epoch, ...) coordinates.
_SHARD_ORDER, _SHUFFLE, _GROUPING, _MASKING = range(4)

# A sample as the stream carries it: (key, ids, its index in the split, or -1 for a filler row).
Row = tuple[str, np.ndarray, int]
# The row a rank with one sample fewer than its peers adds to its epoch: all padding, trains nothing, skips nothing.
FILLER: Row = ("", np.zeros(0, dtype=np.int32), -1)


_SHUFFLE_DRAWS = 1024  # buffer_shuffled draws this many swap slots at once


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


def buffer_shuffled(samples: Iterator[Row], *, size: int, rng: np.random.Generator) -> Iterator[Row]:
    """Reservoir-style shuffle with bounded memory: a seeded rng makes the order a pure function of the input.

    Each sample past the first `size` swaps with slot `rng.integers(size)`. Those draws are made in blocks of
    `_SHUFFLE_DRAWS` (one numpy call instead of one per sample): numpy's vectorised `integers` gives the same
    numbers as that many scalar calls, and the draws made ahead but never used are given back before the final
    shuffle of the buffer, so the result is the one of drawing one slot per sample.
    """
    buffer: list[Row] = []
    slots: list[int] = []  # drawn ahead
    used = 0  # of them
    state = None  # rng's state before `slots` were drawn
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        if used == len(slots):
            state = rng.bit_generator.state
            slots, used = rng.integers(size, size=_SHUFFLE_DRAWS).tolist(), 0
        j = slots[used]
        used += 1
        buffer[j], sample = sample, buffer[j]
        yield sample
    if state is not None:
        rng.bit_generator.state = state  # undo the block, then redraw only the part that was used
        rng.integers(size, size=used)
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
