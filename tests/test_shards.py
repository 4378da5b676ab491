"""Corpus ingest, tokenizer, shard writer and manifest."""

from __future__ import annotations

import json
import os
import tarfile

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from distil_scale.config import ConfigError
from distil_scale.data.corpus import load_texts, write_synthetic_corpus
from distil_scale.data.reader import read_shard
from distil_scale.data.shards import ShardSetWriter, clean_sequences, prepare, read_manifest
from distil_scale.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_wordpiece


def _all_samples(manifest, split: str) -> dict[str, np.ndarray]:
    return {key: ids for url in manifest.urls(split) for key, ids in read_shard(url)}


def test_synthetic_corpus_is_deterministic_and_consistent(tmp_path):
    a = write_synthetic_corpus(str(tmp_path / "a.txt"), num_docs=200, seed=3)
    b = write_synthetic_corpus(str(tmp_path / "b.txt"), num_docs=200, seed=3)
    c = write_synthetic_corpus(str(tmp_path / "c.txt"), num_docs=200, seed=4)
    text_a, text_c = open(a).read(), open(c).read()
    assert text_a == open(b).read() and text_a != text_c
    lengths = [len(line.split()) for line in text_a.splitlines()]
    assert len(lengths) == 200 and min(lengths) >= 15 and max(lengths) <= 200
    # Facts hold across seeds: every "X lives in Y" sentence names the same city for X in both corpora.
    homes: dict[str, set[str]] = {}
    for line in (text_a + text_c).splitlines():
        words = line.split()
        for i in range(1, len(words) - 2):
            if words[i : i + 2] == ["lives", "in"]:
                homes.setdefault(words[i - 1], set()).add(words[i + 2])
    assert homes and all(len(cities) == 1 for cities in homes.values())
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_tokenizer_loads_offline_with_bert_specials(tiny_tokenizer, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer, local_files_only=True)
    assert tok.is_fast
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0,
        1,
        2,
        3,
        4,
    ]
    ids = tok("Anna lives in Paris")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["anna", "lives", "in"]
    assert tok.decode(ids, skip_special_tokens=True) == "anna lives in paris"
    other = train_wordpiece(["a b c d e f g"] * 10, vocab_size=50, out_dir=str(tmp_path / "other"))
    fingerprint = tokenizer_fingerprint(load_tokenizer(tiny_tokenizer))
    assert fingerprint == tokenizer_fingerprint(tok)
    assert fingerprint != tokenizer_fingerprint(load_tokenizer(other))
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))


def test_clean_sequences_recipe_rules():
    kwargs = {"cls_id": 2, "sep_id": 3, "unk_id": 1, "max_seq_length": 16}
    assert clean_sequences(list(range(10, 19)), **kwargs) == []  # 9 + 2 = 11 tokens: dropped
    assert clean_sequences(list(range(10, 20)), **kwargs) == [[2, *range(10, 20), 3]]  # 12 tokens: kept
    long = clean_sequences(list(range(10, 50)), **kwargs)  # 40 body tokens -> chunks of 14, 14, 12
    assert [len(s) for s in long] == [16, 16, 14]
    assert all(s[0] == 2 and s[-1] == 3 for s in long)
    assert [t for s in long for t in s[1:-1]] == list(range(10, 50))
    assert clean_sequences([1] * 6 + list(range(10, 14)), **kwargs) == []  # 6 [UNK] of 12 = 50%: dropped
    assert len(clean_sequences([1] * 5 + list(range(10, 15)), **kwargs)) == 1  # 5 of 12: kept


def test_round_trip_equals_tokenizing_the_text(tiny_corpus, tiny_tokenizer, tiny_dataset):
    manifest = read_manifest(tiny_dataset)
    assert manifest.ids_entry == "ids.u16"
    tok = load_tokenizer(tiny_tokenizer)
    expected = []
    for line in open(tiny_corpus, encoding="utf-8").read().splitlines():
        body = tok(line, add_special_tokens=False)["input_ids"]
        expected += clean_sequences(body, cls_id=2, sep_id=3, unk_id=1, max_seq_length=manifest.max_seq_length)
    train, heldout = _all_samples(manifest, "train"), _all_samples(manifest, "heldout")
    assert train and heldout and not set(train) & set(heldout)
    got = [ids.tolist() for ids in [*train.values(), *heldout.values()]]
    assert sorted(got) == sorted(expected)
    assert all(ids.dtype == np.dtype("<u2") for ids in train.values())
    with tarfile.open(manifest.urls("train")[0]) as tar:
        assert all(name.endswith(".ids.u16") for name in tar.getnames())


def test_manifest_counts_match_shards(tiny_dataset):
    manifest = read_manifest(os.path.join(tiny_dataset, "dataset.json"))
    for split in ("train", "heldout"):
        for entry, url in zip(manifest.splits[split], manifest.urls(split), strict=True):
            samples = list(read_shard(url))
            assert entry.samples == len(samples) <= 37  # the tiny_dataset fixture's samples_per_shard
            assert entry.tokens == sum(len(ids) for _, ids in samples)
    assert all(entry.samples == 37 for entry in manifest.splits["train"][:-1])
    counts = np.load(os.path.join(tiny_dataset, manifest.token_counts_file))
    train = _all_samples(manifest, "train")
    np.testing.assert_array_equal(counts, np.bincount(np.concatenate(list(train.values())), minlength=400))
    totals = json.load(open(os.path.join(tiny_dataset, "dataset.json")))["totals"]
    assert totals["train"] == manifest.totals("train") and totals["train"]["samples"] == len(train)
    assert manifest.tokenizer_fingerprint == tokenizer_fingerprint(load_tokenizer(manifest.tokenizer_dir))


def test_token_probs_smoothing_and_specials(tiny_dataset):
    manifest = read_manifest(tiny_dataset)
    counts = np.load(os.path.join(tiny_dataset, manifest.token_counts_file))
    probs = manifest.token_probs(smoothing=0.7)
    assert (probs[manifest.all_special_ids] == 0).all()
    seen = [i for i in np.argsort(counts) if counts[i] > 0 and i not in manifest.all_special_ids]
    rare, frequent = seen[0], seen[-1]
    assert probs[rare] > probs[frequent]
    np.testing.assert_allclose(probs[frequent], counts[frequent] ** -0.7)
    unseen = [i for i in range(len(counts)) if counts[i] == 0 and i not in manifest.all_special_ids]
    assert all(probs[i] == 1.0 for i in unseen)  # max(count, 1): never-seen ids keep a finite weight


def test_urls_template_and_unknown_split(tiny_dataset):
    manifest = read_manifest(tiny_dataset)
    assert manifest.urls("train", url_template="pipe:cat /data/{name}")[0] == "pipe:cat /data/train-000000.tar"
    assert manifest.urls("train")[0] == os.path.join(os.path.abspath(tiny_dataset), "train-000000.tar")
    with pytest.raises(ConfigError, match="no split 'valid'"):
        manifest.urls("valid")


def test_cleaning_end_to_end(tiny_tokenizer, tmp_path):
    lines = [
        "",
        "anna lives in paris .",  # 7 tokens with [CLS]/[SEP]: dropped
        "§ ¤ ¶ © ® ± § ¤ ¶ © ® ± anna lives in paris .",  # half [UNK]: dropped
        " ".join(["the dog sees the cat ."] * 40),  # 240 body tokens: chunks of 62, 62, 62, 54
        "the big dog that anna sees chases the small cat .",
    ]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    manifest = prepare(
        [str(tmp_path / "in.txt")],
        tokenizer_dir=tiny_tokenizer,
        out_dir=str(tmp_path / "out"),
        max_seq_length=64,
        heldout_fraction=0.0,
        num_proc=1,
        progress=False,
    )
    samples = [ids for _, ids in read_shard(manifest.urls("train")[0])]
    assert [len(s) for s in samples] == [64, 64, 64, 56, 13]
    assert all(s[0] == 2 and s[-1] == 3 and 1 not in s for s in samples)
    assert manifest.splits["heldout"] == []


def test_int32_entries_for_large_vocab(tmp_path):
    writer = ShardSetWriter(str(tmp_path), "train", vocab_size=120_000, samples_per_shard=3, progress=False)
    rows = [np.array([2, 70_000, 119_999, 5, 3]), np.array([2, 65_536, 3]), np.array([2, 7, 3]), np.array([2, 3])]
    for row in rows:
        writer.write(row)
    entries = writer.close()
    assert [(e.url, e.samples, e.tokens) for e in entries] == [("train-000000.tar", 3, 11), ("train-000001.tar", 1, 2)]
    got = [ids for e in entries for _, ids in read_shard(str(tmp_path / e.url))]
    assert all(ids.dtype == np.dtype("<i4") for ids in got)
    assert [ids.tolist() for ids in got] == [row.tolist() for row in rows]
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        assert tar.getnames() == [f"train{i:010d}.ids.i32" for i in range(3)]


def test_manifest_written_last_and_absent_after_failure(tiny_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen_at_commit: list[set[str]] = []
    real_replace = os.replace

    def spy(src, dst):
        if str(dst).endswith("dataset.json"):
            seen_at_commit.append(set(os.listdir(out)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    manifest = prepare(
        [tiny_corpus],
        tokenizer_dir=tiny_tokenizer,
        out_dir=str(out),
        max_seq_length=64,
        samples_per_shard=100,
        num_proc=1,
        progress=False,
    )
    shard_names = {e.url for split in manifest.splits.values() for e in split}
    assert len(seen_at_commit) == 1 and shard_names | {"token_counts.npy"} <= seen_at_commit[0]
    assert "dataset.json" not in seen_at_commit[0]

    calls = {"n": 0}
    real_write = ShardSetWriter.write

    def failing_write(self, ids):
        calls["n"] += 1
        if calls["n"] == 150:
            raise OSError("disk full")
        real_write(self, ids)

    monkeypatch.setattr(ShardSetWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        prepare([tiny_corpus], tokenizer_dir=tiny_tokenizer, out_dir=str(out), num_proc=1, progress=False)
    assert not (out / "dataset.json").exists()
    with pytest.raises(ConfigError, match="dataset.json"):
        read_manifest(str(out))


def test_read_manifest_rejects_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="no dataset.json"):
        read_manifest(str(tmp_path))
    (tmp_path / "dataset.json").write_text('{"format_version": 1, "splits": {}}')
    with pytest.raises(ConfigError, match="not a valid distil-scale manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / "dataset.json").write_text("{truncated")
    with pytest.raises(ConfigError, match="not a valid"):
        read_manifest(str(tmp_path / "dataset.json"))


def test_load_texts_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.jsonl").write_text('{"body": "three", "id": 1}\n{"body": "four", "id": 2}\n')
    pq.write_table(pa.table({"body": ["five"]}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"body": ["six", "seven"]}).save_to_disk(str(tmp_path / "saved"))
    inputs = [str(tmp_path / name) for name in ("a.txt", "b.jsonl", "c.parquet", "saved")]
    ds = load_texts(inputs, text_field="body", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["text"]
    assert ds["text"] == ["one", "two", "three", "four", "five", "six", "seven"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_texts([str(tmp_path / "nope.txt")])
    (tmp_path / "d.csv").write_text("x\n")
    with pytest.raises(ConfigError, match="unknown extension '.csv'"):
        load_texts([str(tmp_path / "d.csv")])
    with pytest.raises(ConfigError, match="no field 'text'"):
        load_texts([str(tmp_path / "b.jsonl")], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="not text"):
        load_texts([str(tmp_path / "b.jsonl")], text_field="id", cache_dir=str(tmp_path / "cache"))


def test_prepare_rejects_bad_arguments(tiny_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="max_seq_length"):
        prepare(["x.txt"], tokenizer_dir=tiny_tokenizer, out_dir=str(tmp_path), max_seq_length=8)
    with pytest.raises(ConfigError, match="heldout_fraction"):
        prepare(["x.txt"], tokenizer_dir=tiny_tokenizer, out_dir=str(tmp_path), heldout_fraction=1.0)
    with pytest.raises(ConfigError, match="'x.txt' does not exist"):
        prepare(["x.txt"], tokenizer_dir=tiny_tokenizer, out_dir=str(tmp_path))
