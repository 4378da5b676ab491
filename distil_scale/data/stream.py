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

import io
import math
import re
import signal
import struct
import tarfile
import warnings
import zlib
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

_BLOCK = 512  # tar headers and member data come in blocks of this size
_ZERO_BLOCK = bytes(_BLOCK)  # the end-of-archive marker
_READ_SIZE = 1 << 20  # bytes per read from a shard: a few reads per shard, not one per member
_SHUFFLE_DRAWS = 1024  # buffer_shuffled draws this many swap slots at once
_VOCAB_CHECK_SAMPLES = 64  # read_shard checks the ids of this many samples against the vocabulary at once
_REGULAR_TYPES = (b"0", b"\0", b"7")  # regular file, its pre-POSIX spelling, contiguous file (as tarfile counts)
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: headers only
# Headers that rename or resize the member that follows them (pax, GNU long names, GNU sparse files). Our writer
# never emits them; read blindly, the next member would get a wrong name or size, so they end the shard instead.
_EXTENSION_TYPES = (b"x", b"g", b"L", b"K", b"S")


def _tar_members(stream: IO[bytes]) -> Iterator[_Member]:
    """The regular members of a tar stream (compressed or not), named the way webdataset names them.

    Only our ids members are read into memory; any other member's bytes are skipped without being handed to
    anyone, so whatever a hostile shard packs there is never loaded, let alone unpickled. An uncompressed ustar
    stream, which is what `prepare` writes, goes through `_ustar_members`; anything else (a compressed tar,
    another tar dialect, not a tar at all) goes to the standard library's tarfile, which also explains why it
    cannot read it.
    """
    head = _read_at_least(stream, b"", _BLOCK)
    if len(head) >= _BLOCK and head[257:262] == b"ustar":
        yield from _ustar_members(stream, head)
        return
    with tarfile.open(fileobj=_Prefixed(head, stream), mode="r|*") as tar:
        for info in tar:
            tar.members = []  # stream mode would otherwise keep every TarInfo of the shard
            if not info.isreg():
                continue
            name = _member_name(info.name)
            if name is None:
                continue
            key, suffix = name
            member = tar.extractfile(info) if suffix in _ID_DTYPES else None
            yield key, suffix, None if member is None else member.read()


def _member_name(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case suffix) of a regular member, or None for webdataset metadata and suffix-less names."""
    if _META_MEMBER.match(name):
        return None
    key, suffix = base_plus_ext(name)
    return None if key is None else (key, suffix.lower())


def _ustar_members(stream: IO[bytes], buf: bytes) -> Iterator[_Member]:
    """`_tar_members` of an uncompressed ustar stream, `buf` holding its first bytes (at least one block).

    A minimal, strict reader for the plain headers our writer (Python's tarfile through webdataset) produces:
    every header must carry the ustar magic, a valid checksum and an octal size; anything else raises
    tarfile.ReadError naming the byte offset, so the shard counts as broken from there on. Parsing the header
    fields we need by slicing costs a few microseconds a member, where tarfile's TarInfo costs tens.
    """
    pos = 0  # where the next header starts in buf
    base = 0  # offset of buf[0] in the tar, for messages
    while True:
        if len(buf) - pos < _BLOCK:
            buf, base, pos = _read_at_least(stream, buf[pos:], _BLOCK), base + pos, 0
            if not buf:
                return  # the tar ends at a member boundary without its end-of-archive blocks: so does tarfile
            if len(buf) < _BLOCK:
                raise tarfile.ReadError(f"truncated header at byte {base}")
        header = buf[pos : pos + _BLOCK]
        if header == _ZERO_BLOCK:
            return  # end of archive
        name, kind, size = _parse_header(header, base + pos)
        data = pos + _BLOCK  # where the member's data starts in buf
        if kind in _EXTENSION_TYPES:
            raise tarfile.ReadError(
                f"header at byte {base + pos} is of type {kind!r}, a pax/GNU extension that distil-scale shards "
                "never hold"
            )
        if kind in _NO_DATA_TYPES:
            pos = data
            continue
        member = _member_name(name) if kind in _REGULAR_TYPES else None
        if member is not None and member[1] in _ID_DTYPES:
            if len(buf) - data < size:
                buf, base, data = _read_at_least(stream, buf[pos:], _BLOCK + size), base + pos, _BLOCK
                pos = 0
                if len(buf) - data < size:
                    raise tarfile.ReadError(f"unexpected end of data in the member at byte {base}")
            yield member[0], member[1], buf[data : data + size]
        elif member is not None:
            yield member[0], member[1], None
        # Skip the data and its padding to the next block boundary, reading (and dropping) what buf lacks.
        pos = data + -(-size // _BLOCK) * _BLOCK
        if pos > len(buf):
            _skip(stream, pos - len(buf), base + len(buf))
            buf, base, pos = b"", base + pos, 0


def _parse_header(header: bytes, offset: int) -> tuple[str, bytes, int]:
    """(name, type flag, data size) of a 512-byte ustar header found at byte `offset`; ReadError if malformed."""
    if header[257:262] != b"ustar":
        raise tarfile.ReadError(f"no ustar header at byte {offset}")
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        size = -1
    if size < 0:  # int() would also take a sign; base-256 sizes (members of 8 GiB and more) are not ours either
        raise tarfile.ReadError(f"header at byte {offset} has a malformed checksum or size field")
    # The checksum is the sum of the header's bytes with its own 8-byte field counted as spaces. adler32's low 16
    # bits are 1 + the byte sum modulo 65521, which is the exact sum for 256 bytes (at most 255 * 256 = 65280):
    # two C calls instead of a Python loop over 512 bytes.
    total = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    if stored != total - sum(header[148:156]) + 8 * 32 and stored != _signed_checksum(header):
        raise tarfile.ReadError(f"bad header checksum at byte {offset}")
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]  # ustar keeps long paths as prefix / name
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), header[156:157], size


def _signed_checksum(header: bytes) -> int:
    """The checksum some old tars wrote: bytes summed as signed chars (tarfile accepts it too)."""
    return 8 * 32 + sum(struct.unpack_from("148b8x356b", header))


def _read_at_least(stream: IO[bytes], buf: bytes, size: int) -> bytes:
    """`buf` followed by what `stream` gives until it holds `size` bytes or the stream ends."""
    parts, have = [buf], len(buf)
    while have < size:
        chunk = stream.read(max(_READ_SIZE, size - have))
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts) if len(parts) > 1 else buf


def _skip(stream: IO[bytes], size: int, offset: int) -> None:
    """Read and drop `size` bytes of `stream` (a pipe cannot seek); ReadError if it ends first."""
    while size > 0:
        chunk = stream.read(min(size, _READ_SIZE))
        if not chunk:
            raise tarfile.ReadError(f"unexpected end of data at byte {offset}")
        size -= len(chunk)
        offset += len(chunk)


class _Prefixed(io.RawIOBase):
    """A read-only stream of `head` followed by the rest of `stream`: the bytes `_tar_members` already looked at."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self._head, self._stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            size = min(len(buffer), len(self._head))
            buffer[:size], self._head = self._head[:size], self._head[size:]
            return size
        chunk = self._stream.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


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


class _ArrayBatch:
    """A batch on its way from a DataLoader worker: the stream's batch with numpy arrays in place of its tensors.

    A numpy array pickles as plain bytes, while a tensor goes through torch's shared-memory handover (a shared
    file, a descriptor sent over a socket, a mapping on each side), which costs more than making the batch.
    The arrays share memory with the tensors they replace, and `tensors()` turns them back (again without
    copying) in the trainer's process. With pinned memory the DataLoader's pin thread calls `pin_memory()`,
    which does both there.
    """

    def __init__(self, batch: dict):
        self.fields = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def tensors(self) -> dict:
        """The batch as the stream made it: the same keys, tensors of the same dtypes and shapes."""
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in self.fields.items()}

    def pin_memory(self, device: str | None = None) -> dict:
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.tensors().items()}


class _ArrayStream(IterableDataset):
    """What make_loader's DataLoader iterates: `stream`'s batches as `_ArrayBatch`es."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self) -> Iterator[_ArrayBatch]:
        return map(_ArrayBatch, self.stream)


def _as_is(batch: _ArrayBatch) -> _ArrayBatch:
    """The DataLoader's collate_fn: without it, batch_size=None would convert numpy arrays to tensors in the
    worker, undoing the point of `_ArrayBatch`."""
    return batch


class _TensorBatches(Iterator[dict]):
    """An iterator of make_loader's DataLoader: its batches with tensors again, as BatchStream yields them."""

    def __init__(self, loader_iter: Iterator):
        self.loader_iter = loader_iter  # the DataLoader's own iterator (see close_loader)

    def __next__(self) -> dict:
        batch = next(self.loader_iter)
        return batch.tensors() if isinstance(batch, _ArrayBatch) else batch  # pinned ones come as tensors already


class BatchLoader(DataLoader):
    """make_loader's DataLoader: iterating it gives BatchStream's batches (tensors), however they travelled."""

    def __iter__(self) -> Iterator[dict]:
        return _TensorBatches(super().__iter__())


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 to the trainer, which checkpoints before it stops them."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def close_loader(batches: Iterator[dict]) -> None:
    """Stop the workers of a DataLoader iterator now, not at interpreter exit.

    They ignore SIGTERM (see _ignore_stop_signals), so the terminate() that multiprocessing sends its children at
    exit would not stop them and its join would wait forever: a run that ends in an exception must close them.
    """
    batches = getattr(batches, "loader_iter", batches)  # make_loader's iterators wrap the DataLoader's
    shutdown = getattr(batches, "_shutdown_workers", None)  # a single-process iterator has no workers
    if shutdown is not None:
        shutdown()


def make_loader(
    stream: BatchStream, *, num_workers: int, prefetch_factor: int = 2, multiprocessing_context: str | None = None
) -> BatchLoader:
    """A DataLoader over `stream` (batch_size=None: the stream batches itself) that yields the stream's batches.

    Workers send their batches as numpy arrays (see `_ArrayBatch`); the loader's iterator turns them back into
    tensors in this process, so a consumer sees exactly what iterating `stream` gives.

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
    return BatchLoader(
        _ArrayStream(stream),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        **kwargs,
    )
