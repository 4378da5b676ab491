"""The resumable stream: rank x worker splits, determinism, resume, pipe: URLs, safe decoding."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distil_scale.config import ConfigError
from distil_scale.data import stream as stream_module
from distil_scale.data.loader import make_loader
from distil_scale.data.masking import Masker
from distil_scale.data.reader import read_shard
from distil_scale.data.shards import read_manifest
from distil_scale.data.stream import BatchStream, buffer_shuffled, resume_plan


def _make(dataset: str, split: str = "train", **overrides) -> BatchStream:
    manifest = read_manifest(dataset)
    masker = Masker(
        manifest.token_probs(),
        mask_id=manifest.special_ids["mask"],
        vocab_size=manifest.vocab_size,
        special_ids=manifest.all_special_ids,
    )
    kwargs = {
        "rank": 0,
        "world_size": 1,
        "seed": 7,
        "micro_batch_size": 8,
        "masker": masker,
        "pad_id": 0,
        "shuffle_buffer": 50,
        "group_batches": 4,
        "max_epochs": 1,
    }
    kwargs.update(overrides)
    urls = manifest.urls(split, url_template=kwargs.pop("url_template", None))
    num_shards = kwargs.pop("num_shards", len(urls))
    return BatchStream(urls[:num_shards], manifest.samples(split)[:num_shards], **kwargs)


def _as_worker(monkeypatch, worker: int, num_workers: int) -> None:
    info = SimpleNamespace(id=worker, num_workers=num_workers)
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: info)


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a["keys"] == b["keys"] and a["epoch"] == b["epoch"]
        for name in ("input_ids", "attention_mask", "labels"):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_rank_worker_blocks_are_disjoint_complete_and_equal(tiny_dataset, monkeypatch, world_size, num_workers):
    all_keys = {key for url in read_manifest(tiny_dataset).urls("train") for key, _ in read_shard(url)}
    seen: list[str] = []
    for rank in range(world_size):
        stream = _make(tiny_dataset, rank=rank, world_size=world_size)
        rank_batches = 0
        for worker in range(num_workers):
            _as_worker(monkeypatch, worker, num_workers)
            batches = list(stream)
            rank_batches += len(batches)
            seen += [key for batch in batches for key in batch["keys"]]
        assert rank_batches == stream.batches_per_epoch(num_workers)  # equal on every rank: nobody waits forever
    # Every sample exactly once: a rank one sample short pads with a filler row instead of dropping a remainder.
    assert len(seen) == len(set(seen)) == len(all_keys) and set(seen) == all_keys


def _split_keys(dataset: str) -> list[str]:
    """The keys of the train split in manifest order: position i is the sample `sample_ids` calls i."""
    return [key for url in read_manifest(dataset).urls("train") for key, _ in read_shard(url)]


def test_sample_ids_name_the_rows(tiny_dataset):
    split = _split_keys(tiny_dataset)
    stream = _make(tiny_dataset, rank=1, world_size=2)  # 451 samples: rank 1 has the filler row
    batches = list(stream)
    ids = [int(i) for b in batches for i in b["sample_ids"]]
    assert ids.count(-1) == 1 and len(set(ids)) == len(ids)
    for batch in batches:
        real = [int(i) for i in batch["sample_ids"] if i >= 0]
        assert [split[i] for i in real] == batch["keys"] and batch["skipped"] == 0
        assert batch["input_ids"].shape[0] == len(batch["sample_ids"])


def _consumed_by(dataset: str, world_size: int, batches_per_rank: int, **kwargs) -> np.ndarray:
    """The mask of the samples a run of `world_size` ranks trained on in its first batches (epoch 0)."""
    mask = np.zeros(len(_split_keys(dataset)), dtype=bool)
    for rank in range(world_size):
        stream = _make(dataset, rank=rank, world_size=world_size, **kwargs)
        for batch in list(stream)[:batches_per_rank]:
            ids = batch["sample_ids"].numpy()
            assert not mask[ids[ids >= 0]].any()
            mask[ids[ids >= 0]] = True
    return mask


@pytest.mark.parametrize(("old_world", "new_world", "num_workers"), [(2, 1, 1), (1, 3, 2), (3, 2, 2)])
def test_a_resplit_epoch_trains_exactly_the_samples_left(tiny_dataset, monkeypatch, old_world, new_world, num_workers):
    split = _split_keys(tiny_dataset)
    consumed = _consumed_by(tiny_dataset, old_world, 9, shuffle_buffer=20, micro_batch_size=5)
    assert 0 < consumed.sum() < len(split)
    per_epoch: dict[int, list[str]] = {0: [], 1: []}
    for rank in range(new_world):
        stream = _make(tiny_dataset, rank=rank, world_size=new_world, consumed={0: consumed}, origin=7, max_epochs=2)
        counts = {0: 0, 1: 0}
        for worker in range(num_workers):
            _as_worker(monkeypatch, worker, num_workers)
            for batch in stream:
                per_epoch[batch["epoch"]] += batch["keys"]
                counts[batch["epoch"]] += 1
        # Every rank makes the same number of batches in the short epoch and in the full one after it.
        assert counts == {0: stream.batches_per_epoch(num_workers, 0), 1: stream.batches_per_epoch(num_workers)}
    left = [key for key, done in zip(split, consumed, strict=True) if not done]
    assert sorted(per_epoch[0]) == sorted(left)
    assert sorted(per_epoch[1]) == sorted(split)


def test_skip_batches_resumes_a_resplit_stream_exactly(tiny_dataset):
    consumed = _consumed_by(tiny_dataset, 2, 4)
    kwargs = {"consumed": {1: consumed}, "start_epoch": 1, "max_epochs": 3, "origin": 3}
    full = list(make_loader(_make(tiny_dataset, **kwargs), num_workers=2))
    short = _make(tiny_dataset, **kwargs).batches_per_epoch(2, 1)
    assert [b["epoch"] for b in full].count(1) == short < len(full) // 2
    for skip in (2, short, short + 3):
        resumed = list(make_loader(_make(tiny_dataset, skip_batches=skip, **kwargs), num_workers=2))
        _assert_same_batches(resumed, full[skip:])


def test_epochs_reshuffle_and_runs_repeat(tiny_dataset):
    first = list(_make(tiny_dataset, max_epochs=2))
    again = list(_make(tiny_dataset, max_epochs=2))
    _assert_same_batches(again, first)
    epoch0 = [k for b in first if b["epoch"] == 0 for k in b["keys"]]
    epoch1 = [k for b in first if b["epoch"] == 1 for k in b["keys"]]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    other_seed = [k for b in _make(tiny_dataset, seed=8) for k in b["keys"]]
    assert other_seed != epoch0


def test_batch_layout(tiny_dataset):
    batches = list(_make(tiny_dataset))
    samples = {key: ids for url in read_manifest(tiny_dataset).urls("train") for key, ids in read_shard(url)}
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == mask.dtype == labels.dtype == torch.int64
        assert ids.shape == mask.shape == labels.shape and ids.shape[1] % 8 == 0 and ids.shape[0] == len(batch["keys"])
        lengths = [len(samples[key]) for key in batch["keys"]]
        assert ids.shape[1] == -(-max(lengths) // 8) * 8
        torch.testing.assert_close(mask.sum(1), torch.tensor(lengths))
        assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == 0).all()
        original = torch.where(labels == -100, ids, labels)
        for row, key in enumerate(batch["keys"]):
            torch.testing.assert_close(original[row, : lengths[row]], torch.from_numpy(samples[key].astype(np.int64)))
    assert [len(b["keys"]) for b in batches].count(8) >= len(batches) - 1
    # Length grouping: far less padding than batches drawn at random from the same samples.
    padded = sum(b["attention_mask"].numel() for b in batches)
    assert padded < 1.25 * sum(len(v) for v in samples.values())


def test_loader_batches_are_the_stream_batches(tiny_dataset, monkeypatch):
    # Workers send numpy arrays; the loader's iterator must hand out what the stream yields in-process: the same
    # keys in the same order, tensors of the same dtypes and values, the same plain values.
    stream = _make(tiny_dataset, max_epochs=2)
    per_worker = []
    for worker in range(2):
        _as_worker(monkeypatch, worker, 2)
        per_worker.append(list(stream))
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: None)
    want = [b for pair in zip(*per_worker, strict=True) for b in pair]  # round-robin; equal counts here
    got = list(make_loader(_make(tiny_dataset, max_epochs=2), num_workers=2))
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert list(a) == list(b)
        for key, value in b.items():
            if isinstance(value, torch.Tensor):
                assert type(a[key]) is torch.Tensor and a[key].dtype == value.dtype and a[key].is_contiguous()
                torch.testing.assert_close(a[key], value, rtol=0, atol=0)
            else:
                assert a[key] == value and type(a[key]) is type(value)
    # Through make_loader in-process too, and its batches are writable tensors of their own.
    in_process = list(make_loader(_make(tiny_dataset), num_workers=0))
    _assert_same_batches(in_process, list(_make(tiny_dataset)))
    in_process[0]["labels"].fill_(0)


def test_pinned_batches_become_tensors_in_the_pin_thread(tiny_dataset, monkeypatch):
    # With CUDA the DataLoader's pin thread hands each worker batch to torch's pin_memory(), which must give
    # tensors (pinned) back; without CUDA here, pinning is replaced by a plain copy.
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = next(iter(_make(tiny_dataset)))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: self.clone())
    from distil_scale.data.loader import _ArrayBatch

    pinned = pin_memory(_ArrayBatch(batch))
    assert type(pinned) is dict and list(pinned) == list(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert pinned[key].dtype == value.dtype
            torch.testing.assert_close(pinned[key], value, rtol=0, atol=0)
        else:
            assert pinned[key] == value


def _one_draw_per_sample(samples, *, size, rng):
    """The reference shuffle: one scalar draw per sample past the first `size`, then a shuffle of the rest."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(size))
        buffer[j], sample = sample, buffer[j]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


@pytest.mark.parametrize("count", [0, 3, 50, 1073, 1074, 3000])
@pytest.mark.parametrize("size", [1, 50, 2000])
def test_buffer_shuffled_draws_as_one_draw_per_sample(count, size):
    # buffer_shuffled draws its slots in blocks; the order (and the rng's final state) must not show it.
    got_rng, want_rng = np.random.default_rng(count + size), np.random.default_rng(count + size)
    got = list(buffer_shuffled(iter(range(count)), size=size, rng=got_rng))
    assert got == list(_one_draw_per_sample(iter(range(count)), size=size, rng=want_rng))
    assert got_rng.bit_generator.state == want_rng.bit_generator.state


def _service_order(totals: list[int]) -> list[int]:
    """The DataLoader's order: round-robin over workers, an exhausted worker dropped from the cycle."""
    return [w for r in range(max(totals, default=0)) for w in range(len(totals)) if r < totals[w]]


def test_resume_plan_continues_the_round_robin():
    totals = [5, 3, 4]
    order = _service_order(totals)
    for k in range(len(order) + 3):
        skips, rotation = resume_plan(k, totals)
        assert skips == [order[:k].count(w) for w in range(3)]
        # A fresh loader serves its worker i, which plays worker (i + rotation) % 3, from the start of its cycle.
        remaining = [totals[(i + rotation) % 3] - skips[(i + rotation) % 3] for i in range(3)]
        assert [(i + rotation) % 3 for i in _service_order(remaining)] == order[k:]
    assert resume_plan(10, [float("inf")] * 3) == ([4, 3, 3], 1)


def test_skip_batches_resumes_exactly_with_two_workers(tiny_dataset):
    # Three shards and a micro-batch size that give the two workers different batch counts: one of them runs
    # out first in every epoch, the case where the DataLoader's round-robin is hardest to replay.
    kwargs = {"num_shards": 3, "max_epochs": 2}
    uneven = [
        b for b in range(3, 16) if len(set(_make(tiny_dataset, micro_batch_size=b, **kwargs)._worker_batches(2))) == 2
    ]
    assert uneven
    kwargs["micro_batch_size"] = uneven[0]
    per_epoch = _make(tiny_dataset, **kwargs).batches_per_epoch(2)
    full = list(make_loader(_make(tiny_dataset, **kwargs), num_workers=2))
    assert len(full) == 2 * per_epoch
    for skip in (3, per_epoch - 1, per_epoch + 2):
        resumed = list(make_loader(_make(tiny_dataset, skip_batches=skip, **kwargs), num_workers=2))
        _assert_same_batches(resumed, full[skip:])


def test_skip_batches_in_process_across_epochs(tiny_dataset):
    full = list(_make(tiny_dataset, max_epochs=3))
    per_epoch = len(full) // 3
    for skip in (1, per_epoch, 2 * per_epoch + 2):
        _assert_same_batches(list(_make(tiny_dataset, max_epochs=3, skip_batches=skip)), full[skip:])


def test_pipe_urls_read_the_same_samples(tiny_dataset):
    template = "pipe:cat " + os.path.join(os.path.abspath(tiny_dataset), "{name}")
    _assert_same_batches(list(_make(tiny_dataset, url_template=template)), list(_make(tiny_dataset)))


class _Payload:
    """Unpickling this runs code that creates a marker file: proof that something was deserialised."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_malicious_entries_are_never_decoded(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)))
    good = np.arange(2, 20, dtype="<u2")
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        _add(tar, "a.ids.u16", good.tobytes())
        _add(tar, "a.pyd", payload)
        _add(tar, "b.pth", payload)
        _add(tar, "b.pickle", payload)
        _add(tar, "c.ids.u16", good[::-1].tobytes())
    with pytest.warns(UserWarning, match="'b' has no valid ids entry"):
        got = list(read_shard(str(tmp_path / "evil.tar")))
    assert [key for key, _ in got] == ["a", "c"]
    np.testing.assert_array_equal(got[0][1], good)
    assert not marker.exists()


def test_constructor_rejects_impossible_splits(tiny_dataset):
    with pytest.raises(ConfigError, match="rank 2 is outside world_size 2"):
        _make(tiny_dataset, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="fewer than world_size"):
        _make(tiny_dataset, world_size=10**6)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        _make(tiny_dataset, micro_batch_size=0)
    with pytest.raises(ConfigError, match="the consumed mask of epoch 0 has shape"):
        _make(tiny_dataset, consumed={0: np.zeros(5, dtype=bool)})
