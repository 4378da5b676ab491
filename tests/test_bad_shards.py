"""Damaged shards: truncated, garbled, replaced, empty, missing or hostile input never stops the run or the ranks.

Each case copies the tiny dataset's train shards, damages one of them and checks, against the undamaged run, that
every (rank, worker) yields exactly its planned batches, that the samples trained on are the undamaged ones minus
exactly the destroyed ones, that `skipped` counts the rest, and that a warning names the shard.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import shutil
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

from distil_scale.data import stream as stream_module
from distil_scale.data.loader import make_loader
from distil_scale.data.masking import Masker, collate
from distil_scale.data.reader import BadShardWarning, is_placeholder, read_shard
from distil_scale.data.shards import Manifest, read_manifest
from distil_scale.data.stream import BatchStream
from distil_scale.losses import triple_loss

DAMAGED = 3  # index of the train shard each case damages: a full one (37 samples), split across blocks
WORLD_SIZE, NUM_WORKERS = 2, 2


class _Payload:
    """Unpickling this opens (creates) a marker file: proof that something in the shard was deserialised."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass(frozen=True)
class _Member:
    """One member of the pristine shard: its name, its bytes and where they sit in the tar file."""

    name: str
    data: bytes
    header: int  # offset of the 512-byte header
    start: int  # offset of the data

    @property
    def key(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def end(self) -> int:
        return self.start + len(self.data)


def _members(path: str) -> list[_Member]:
    with tarfile.open(path) as tar:
        return [
            _Member(info.name, tar.extractfile(info).read(), info.offset, info.offset_data) for info in tar.getmembers()
        ]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# A damage takes the pristine shard's bytes, its members and a scratch directory; it returns the damaged bytes (None:
# the file is gone) and the keys of the samples it destroyed.
Damage = Callable[[bytes, list[_Member], str], tuple[bytes | None, set[str]]]


def _truncated(raw: bytes, members: list[_Member], scratch: str) -> tuple[bytes | None, set[str]]:
    cut = len(raw) // 2  # a sample survives only if its ids member lies wholly before the cut
    return raw[:cut], {m.key for m in members if m.end > cut}


def _truncated_after_data(raw: bytes, members: list[_Member], scratch: str) -> tuple[bytes | None, set[str]]:
    # Cut right after the middle member's data, in its padding: tar fails there, but that sample is whole.
    middle = len(members) // 2
    return raw[: members[middle].end], {m.key for m in members[middle + 1 :]}


def _garbled_header(raw: bytes, members: list[_Member], scratch: str) -> tuple[bytes | None, set[str]]:
    # Garbage over the middle member (header and data): tar stops reading there, so it and all later samples go.
    middle = len(members) // 2
    damaged = bytearray(raw)
    damaged[members[middle].header : members[middle].header + 1024] = np.random.default_rng(0).bytes(1024)
    return bytes(damaged), {m.key for m in members[middle:]}


def _garbled_data(raw: bytes, members: list[_Member], scratch: str) -> tuple[bytes | None, set[str]]:
    # Garbage over the middle member's data only: the tar reads on, the garbled ids fall outside the vocabulary.
    victim = members[len(members) // 2]
    garbage = np.random.default_rng(0).bytes(len(victim.data))
    assert np.frombuffer(garbage, dtype="<u2").max() >= 400  # the tiny tokenizer's vocabulary
    damaged = bytearray(raw)
    damaged[victim.start : victim.end] = garbage
    return bytes(damaged), {victim.key}


def _random(raw: bytes, members: list[_Member], scratch: str) -> tuple[bytes | None, set[str]]:
    return np.random.default_rng(1).bytes(len(raw)), {m.key for m in members}


def _empty(raw: bytes, members: list[_Member], scratch: str) -> tuple[bytes | None, set[str]]:
    return b"", {m.key for m in members}


def _missing(raw: bytes, members: list[_Member], scratch: str) -> tuple[bytes | None, set[str]]:
    return None, {m.key for m in members}


def _malicious(raw: bytes, members: list[_Member], scratch: str) -> tuple[bytes | None, set[str]]:
    # The middle sample's ids are replaced by pickles under every name a careless reader might load; the next
    # sample's ids member itself holds a pickle (np.frombuffer reads it as numbers, outside the vocabulary).
    payload = pickle.dumps(_Payload(os.path.join(scratch, "pwned")))
    npy = io.BytesIO()
    np.save(npy, np.array([_Payload(os.path.join(scratch, "pwned-npy"))], dtype=object), allow_pickle=True)
    middle = len(members) // 2
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index, member in enumerate(members):
            if index == middle:
                for suffix, data in (("pyd", payload), ("pth", payload), ("pickle", payload), ("npy", npy.getvalue())):
                    _add(tar, f"{member.key}.{suffix}", data)
            elif index == middle + 1:
                _add(tar, member.name, payload + b"\x00" * (len(payload) % 2))
            else:
                _add(tar, member.name, member.data)
    return buffer.getvalue(), {members[middle].key, members[middle + 1].key}


DAMAGES: dict[str, Damage] = {
    "truncated": _truncated,
    "truncated_after_data": _truncated_after_data,
    "garbled_header": _garbled_header,
    "garbled_data": _garbled_data,
    "random": _random,
    "empty": _empty,
    "missing": _missing,
    "malicious": _malicious,
}


@pytest.fixture(scope="module")
def manifest(tiny_dataset: str) -> Manifest:
    return read_manifest(tiny_dataset)


@pytest.fixture(scope="module")
def originals(manifest: Manifest) -> dict[str, np.ndarray]:
    """Every train sample of the undamaged dataset, by key."""
    return {key: ids for url in manifest.urls("train") for key, ids in read_shard(url)}


def _damaged_copy(manifest: Manifest, tmp_path, damage: str) -> tuple[list[str], str, set[str]]:
    """(train urls with shard DAMAGED damaged, that shard's url, keys of the samples the damage destroyed)."""
    urls = []
    for url in manifest.urls("train"):
        urls.append(str(tmp_path / os.path.basename(url)))
        shutil.copyfile(url, urls[-1])
    raw = open(urls[DAMAGED], "rb").read()
    data, destroyed = DAMAGES[damage](raw, _members(urls[DAMAGED]), str(tmp_path))
    os.remove(urls[DAMAGED])
    if data is not None:
        with open(urls[DAMAGED], "wb") as f:
            f.write(data)
    return urls, urls[DAMAGED], destroyed


def _stream(manifest: Manifest, urls: list[str], **overrides) -> BatchStream:
    kwargs = {
        "rank": 0,
        "world_size": WORLD_SIZE,
        "seed": 7,
        "micro_batch_size": 8,
        "masker": Masker.for_manifest(manifest),
        "pad_id": manifest.special_ids["pad"],
        "shuffle_buffer": 50,
        "group_batches": 4,
        "max_epochs": 1,
    }
    kwargs.update(overrides)
    return BatchStream(urls, manifest.samples("train"), **kwargs)


def _epoch(manifest: Manifest, urls: list[str], monkeypatch) -> dict[tuple[int, int], list[dict]]:
    """One epoch's batches of every (rank, DataLoader worker), the workers simulated in-process."""
    out = {}
    for rank in range(WORLD_SIZE):
        stream = _stream(manifest, urls, rank=rank)
        for worker in range(NUM_WORKERS):
            info = SimpleNamespace(id=worker, num_workers=NUM_WORKERS)
            monkeypatch.setattr(stream_module, "get_worker_info", lambda info=info: info)
            out[rank, worker] = list(stream)
        assert sum(len(out[rank, w]) for w in range(NUM_WORKERS)) == stream.batches_per_epoch(NUM_WORKERS)
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: None)
    return out


@pytest.fixture(scope="module")
def pristine(manifest: Manifest) -> dict[tuple[int, int], list[dict]]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _epoch(manifest, manifest.urls("train"), monkeypatch)


def _recorded(samples: Iterator) -> tuple[list, list[str]]:
    """The samples of an iterator and the BadShardWarning messages it emitted, every one of them."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = list(samples)
    return out, [str(w.message) for w in record if issubclass(w.category, BadShardWarning)]


def _check_rows(batch: dict, originals: dict[str, np.ndarray]) -> None:
    """Real rows carry their sample in `keys` order; placeholder and filler rows are padding without labels."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    real, fillers = mask.sum(1) > 0, int((batch["sample_ids"] < 0).sum())
    assert len(batch["keys"]) == int(real.sum()) and batch["skipped"] == int((~real).sum()) - fillers
    assert (labels[~real] == -100).all() and (ids[~real] == 0).all()
    restored = torch.where(labels == -100, ids, labels)[real]
    for row, length, key in zip(restored, mask[real].sum(1).tolist(), batch["keys"], strict=True):
        assert length == len(originals[key])
        torch.testing.assert_close(row[:length], torch.from_numpy(originals[key].astype(np.int64)), rtol=0, atol=0)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_shard_keeps_every_rank_in_step(manifest, originals, pristine, tmp_path, monkeypatch, damage):
    urls, bad_url, destroyed = _damaged_copy(manifest, tmp_path, damage)
    with pytest.warns(BadShardWarning) as record:
        got = _epoch(manifest, urls, monkeypatch)
    assert record and all(bad_url in str(w.message) for w in record if issubclass(w.category, BadShardWarning))
    total_skipped = 0
    for coords, want in pristine.items():
        batches = got[coords]
        assert len(batches) == len(want)  # the plan's batch count, damage or not
        want_keys = {key for batch in want for key in batch["keys"]}
        got_keys = [key for batch in batches for key in batch["keys"]]
        assert sorted(got_keys) == sorted(want_keys - destroyed)
        skipped = sum(batch["skipped"] for batch in batches)
        assert skipped == len(want_keys & destroyed)
        assert sum(len(batch["input_ids"]) for batch in batches) == sum(len(batch["input_ids"]) for batch in want)
        for batch in batches:
            _check_rows(batch, originals)
        total_skipped += skipped
    planned = {key for batches in pristine.values() for batch in batches for key in batch["keys"]}
    assert total_skipped == len(planned & destroyed) > 0
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned-npy").exists()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_read_shard_fills_every_window(manifest, tmp_path, damage):
    _, bad_url, destroyed = _damaged_copy(manifest, tmp_path, damage)
    pristine = list(read_shard(manifest.urls("train")[DAMAGED]))
    for start, stop in ((0, 37), (0, 10), (10, 30), (30, 37), (20, 21)):
        got, warned = _recorded(read_shard(bad_url, start=start, stop=stop, vocab_size=400))
        assert len(got) == stop - start
        for position, (sample, (key, ids)) in enumerate(zip(got, pristine[start:stop], strict=True), start=start):
            if key in destroyed:  # in place: the sample's own key where the tar gave it, else its position
                assert is_placeholder(sample) and sample[0] in (f"<{key}>", f"<{bad_url}#{position}>")
            else:
                assert sample[0] == key and np.array_equal(sample[1], ids)
        damaged = len(destroyed & {key for key, _ in pristine[start:stop]})
        assert len(warned) == (damaged > 0)  # one line per damaged read, none for a window the damage misses
        if damaged:
            assert re.fullmatch(
                rf"{re.escape(bad_url)}: .+; {damaged} of {stop - start} samples replaced by placeholders", warned[0]
            )
    # Read to the end without a plan: the usable samples, unusable ones dropped, never an exception.
    rest, _ = _recorded(read_shard(bad_url, vocab_size=400))
    assert [key for key, _ in rest] == [key for key, _ in pristine if key not in destroyed]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned-npy").exists()


def test_malicious_members_are_skipped_unread(manifest, tmp_path):
    _, bad_url, destroyed = _damaged_copy(manifest, tmp_path, "malicious")
    got, warned = _recorded(read_shard(bad_url, start=0, stop=37, vocab_size=400))
    first, second = sorted(destroyed)
    assert warned == [
        f"{bad_url}: 2 unusable sample(s), the first: {first!r} has no valid ids entry "
        "(no ids member, only ['npy', 'pickle', 'pth', 'pyd']); 2 of 37 samples replaced by placeholders"
    ]
    assert [sample[0] for sample in got if is_placeholder(sample)] == [f"<{first}>", f"<{second}>"]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned-npy").exists()


def test_real_workers_and_resume_see_the_same_placeholders(manifest, tmp_path):
    urls, _, _ = _damaged_copy(manifest, tmp_path, "truncated")
    in_process = []
    for rank in range(WORLD_SIZE):
        full, _ = _recorded(_stream(manifest, urls, rank=rank))
        in_process.append(full)
        for skip in (1, len(full) // 2):  # a resumed run replays the same damage into the same batches
            resumed, _ = _recorded(_stream(manifest, urls, rank=rank, skip_batches=skip))
            assert [(b["keys"], b["skipped"]) for b in resumed] == [(b["keys"], b["skipped"]) for b in full[skip:]]
            for a, b in zip(resumed, full[skip:], strict=True):
                torch.testing.assert_close(a["labels"], b["labels"], rtol=0, atol=0)
    assert sum(b["skipped"] for batches in in_process for b in batches) > 0
    # Real DataLoader workers: the plan's batch count, and the same samples trained on or skipped.
    for rank in range(WORLD_SIZE):
        stream = _stream(manifest, urls, rank=rank)
        batches = list(make_loader(stream, num_workers=NUM_WORKERS))
        assert len(batches) == stream.batches_per_epoch(NUM_WORKERS)
        assert sorted(k for b in batches for k in b["keys"]) == sorted(k for b in in_process[rank] for k in b["keys"])
        assert sum(b["skipped"] for b in batches) == sum(b["skipped"] for b in in_process[rank])


def test_interrupts_are_not_swallowed(monkeypatch):
    class Interrupting(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            raise KeyboardInterrupt

    import webdataset

    monkeypatch.setattr(webdataset, "gopen", lambda url: Interrupting())
    with pytest.raises(KeyboardInterrupt):
        list(read_shard("interrupted.tar", stop=3))


def test_placeholder_rows_are_padding_without_labels(manifest):
    empty = np.zeros(0, dtype=np.int32)
    for multiple_of, width in ((8, 8), (1, 1)):
        ids, mask = collate([empty, empty, empty], pad_id=0, multiple_of=multiple_of)
        assert ids.shape == mask.shape == (3, width) and not mask.any() and not ids.any()
    masker = Masker.for_manifest(manifest)
    generator = torch.Generator().manual_seed(0)
    masked, labels = masker(ids, mask, generator=generator)
    assert (labels == -100).all() and torch.equal(masked, ids)
    real = np.arange(5, 60, dtype=np.uint16)
    ids, mask = collate([empty, real, empty, real[::-1]], pad_id=0)
    masked, labels = masker(ids, mask, generator=generator)
    assert (labels[[0, 2]] == -100).all() and (masked[[0, 2]] == 0).all() and (labels[[1, 3]] != -100).any()


def test_placeholder_rows_cost_nothing_in_the_loss():
    """A tiny student and teacher: placeholder rows change neither the loss nor its gradient; all of them is 0."""
    torch.manual_seed(0)
    small = {"vocab_size": 50, "max_position_embeddings": 32}
    teacher = BertForMaskedLM(
        BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, **small)
    ).eval()
    student = DistilBertForMaskedLM(DistilBertConfig(dim=32, n_heads=4, hidden_dim=64, n_layers=1, **small)).eval()
    real = [np.arange(5, 17, dtype=np.uint16), np.arange(20, 44, dtype=np.uint16)]
    empty = np.zeros(0, dtype=np.int32)

    def loss_and_grads(seqs: list[np.ndarray]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ids, mask = collate(seqs, pad_id=0)
        labels = torch.where(mask.bool() & (ids % 3 == 0), ids, -100)
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        student.zero_grad()
        s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        loss = triple_loss(s.logits, t.logits, labels, mask, s.hidden_states[-1], t.hidden_states[-1]).total
        loss.backward()
        return loss.detach(), [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in student.parameters()
        ]

    loss, grads = loss_and_grads(real)
    mixed_loss, mixed_grads = loss_and_grads([empty, real[0], empty, real[1], empty])
    torch.testing.assert_close(mixed_loss, loss)
    for a, b in zip(mixed_grads, grads, strict=True):
        torch.testing.assert_close(a, b)
    none_loss, none_grads = loss_and_grads([empty] * 4)
    assert float(none_loss) == 0.0 and all(torch.isfinite(g).all() and not g.any() for g in none_grads)


def _flip_name_byte(raw: bytes, members: list[_Member]) -> tuple[bytes, _Member]:
    """The shard with one byte of the middle member's name changed and its header checksum left as it was."""
    victim = members[len(members) // 2]
    damaged = bytearray(raw)
    damaged[victim.header] ^= 0x01
    return bytes(damaged), victim


def test_tar_reader_is_strict_and_says_where(manifest, tmp_path):
    url = manifest.urls("train")[DAMAGED]
    raw, members = open(url, "rb").read(), _members(url)
    pristine = list(read_shard(url))
    middle = len(members) // 2
    cases = {}
    cases["checksum"], victim = _flip_name_byte(raw, members)
    cut = members[middle].header + 100  # inside a header
    cases["cut header"] = raw[:cut]
    buffer = io.BytesIO()  # a pax extended header (a name longer than ustar's 100 bytes) in the middle
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for index, member in enumerate(members):
            _add(tar, "x" * 120 + ".ids.u16" if index == middle else member.name, member.data)
    cases["pax"] = buffer.getvalue()
    expected = {
        "checksum": f"bad header checksum at byte {victim.header}",
        "cut header": f"truncated header at byte {members[middle].header}",
        "pax": "a pax/GNU extension that distil-scale shards never hold",
    }
    for name, data in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.tar"
        path.write_bytes(data)
        got, warned = _recorded(read_shard(str(path), start=0, stop=len(members), vocab_size=400))
        assert [key for key, _ in got[:middle]] == [key for key, _ in pristine[:middle]]
        assert all(is_placeholder(sample) for sample in got[middle:]) and len(got) == len(members)
        assert len(warned) == 1 and f"unreadable after {middle} samples (ReadError: " in warned[0], warned
        assert expected[name] in warned[0], (name, warned)


def test_compressed_shards_read_like_plain_ones(manifest, tmp_path):
    # Not what prepare writes, but a tar the standard library reads: it goes through tarfile instead.
    url = manifest.urls("train")[DAMAGED]
    path = tmp_path / "shard.tar.gz"
    with open(url, "rb") as f_in, gzip.open(path, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
    got, warned = _recorded(read_shard(str(path), start=3, stop=30, vocab_size=400))
    want = list(read_shard(url, start=3, stop=30, vocab_size=400))
    assert not warned and [key for key, _ in got] == [key for key, _ in want]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))


def test_bad_samples_are_reported_in_shard_order(manifest, tmp_path):
    # Ids outside the vocabulary are checked a block of samples at a time; the first one named must still be the
    # first bad sample of the shard, and every sample keeps its place.
    url = manifest.urls("train")[DAMAGED]
    members = _members(url)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index, member in enumerate(members):
            if index == 5:
                _add(tar, member.name, np.full(7, 999, dtype="<u2").tobytes())  # outside the 400-token vocabulary
            elif index == 9:
                _add(tar, f"{member.key}.txt", b"no ids here")
            else:
                _add(tar, member.name, member.data)
    path = tmp_path / "shard.tar"
    path.write_bytes(buffer.getvalue())
    got, warned = _recorded(read_shard(str(path), start=0, stop=len(members), vocab_size=400))
    assert [sample[0] for sample in got] == [
        f"<{m.key}>" if index in (5, 9) else m.key for index, m in enumerate(members)
    ]
    assert warned == [
        f"{path}: 2 unusable sample(s), the first: {members[5].key!r} has no valid ids entry (ids outside the "
        f"vocabulary of 400); 2 of {len(members)} samples replaced by placeholders"
    ]
