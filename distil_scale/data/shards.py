"""`prepare`: raw text -> cleaned token sequences -> WebDataset shards + token counts + `dataset.json`.

Layout of a prepared dataset directory:

    train-000000.tar ...     one tar member per sequence: `<key>.ids.u16` (vocab < 65,536) or `<key>.ids.i32`,
    heldout-000000.tar ...   raw little-endian integers, [CLS] ... [SEP] included; never pickle
    token_counts.npy         per-vocab-id counts over the train split (masking probabilities)
    tokenizer/               a copy of the tokenizer, so the directory is self-contained on shared storage
    dataset.json             the manifest, written last and atomically: its presence means "complete"

Cleaning follows the recipe: every document becomes `[CLS] ids [SEP]`; a document longer than
`max_seq_length` is cut into chunks of `max_seq_length - 2` body tokens, each wrapped again; sequences of 11
tokens or fewer and sequences that are at least half [UNK] are dropped. Documents, not sequences, are
assigned to train/heldout by a seeded hash of their index, so chunks of one document never straddle the split.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from transformers import PreTrainedTokenizerFast

from distil_scale import atomic
from distil_scale.config import ConfigError
from distil_scale.data.corpus import load_texts
from distil_scale.data.tokenizer import load_tokenizer, tokenizer_fingerprint

if TYPE_CHECKING:  # both are imported where shards are written: reading prepared shards needs neither
    import datasets
    import webdataset as wds

FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
TOKEN_COUNTS_NAME = "token_counts.npy"
SPLITS = ("train", "heldout")
MIN_SEQ_TOKENS = 12  # the recipe drops sequences of 11 tokens or fewer
_WRITE_BATCH = 4096


def ids_entry(vocab_size: int) -> tuple[str, str]:
    """(tar member suffix, numpy dtype) for token ids of a vocabulary: uint16 whenever every id fits."""
    return ("ids.u16", "<u2") if vocab_size < 2**16 else ("ids.i32", "<i4")


def clean_sequences(body: list[int], *, cls_id: int, sep_id: int, unk_id: int, max_seq_length: int) -> list[list[int]]:
    """One document's token ids (no specials) -> the recipe's cleaned `[CLS] ... [SEP]` sequences."""
    step = max_seq_length - 2
    out = []
    for start in range(0, len(body), step):
        seq = [cls_id, *body[start : start + step], sep_id]
        if len(seq) < MIN_SEQ_TOKENS or 2 * seq.count(unk_id) >= len(seq):
            continue
        out.append(seq)
    return out


def _is_heldout(index: int, *, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def _tokenize_batch(
    batch: dict, indices: list[int], *, tok: PreTrainedTokenizerFast, max_seq_length: int, seed: int, fraction: float
) -> dict:
    docs = [(i, text.strip()) for i, text in zip(indices, batch["text"], strict=True) if text and text.strip()]
    encoded = tok([text for _, text in docs], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids, heldout = [], []
    for (index, _), body in zip(docs, encoded, strict=True):
        is_heldout = _is_heldout(index, seed=seed, fraction=fraction)
        for seq in clean_sequences(
            body,
            cls_id=tok.cls_token_id,
            sep_id=tok.sep_token_id,
            unk_id=tok.unk_token_id,
            max_seq_length=max_seq_length,
        ):
            ids.append(seq)
            heldout.append(is_heldout)
    return {"ids": ids, "heldout": heldout}


@dataclass(frozen=True)
class ShardEntry:
    url: str  # relative to the manifest directory
    samples: int
    tokens: int


class ShardSetWriter:
    """Writes one split's sequences to `<split>-%06d.tar` shards and records what each shard holds."""

    def __init__(self, out_dir: str, split: str, *, vocab_size: int, samples_per_shard: int, progress: bool = True):
        self.out_dir, self.split, self.samples_per_shard, self.progress = out_dir, split, samples_per_shard, progress
        self.suffix, self.dtype = ids_entry(vocab_size)
        self.entries: list[ShardEntry] = []
        self._writer: wds.ShardWriter | None = None
        self._count = 0
        self._shard_samples = 0
        self._shard_tokens = 0

    def write(self, ids: np.ndarray) -> None:
        if self._writer is None:
            import webdataset as wds

            pattern = os.path.join(self.out_dir, f"{self.split}-%06d.tar")
            # maxsize=inf: shards roll over on sample count only, so shard i holds samples [i*n, (i+1)*n).
            # encoder=False: bytes in, bytes out; mtime=0: the same input gives byte-identical shards.
            self._writer = wds.ShardWriter(
                pattern, maxcount=self.samples_per_shard, maxsize=float("inf"), verbose=0, encoder=False, mtime=0
            )
        if self._shard_samples == self.samples_per_shard:
            self._finish_shard()
        key = f"{self.split}{self._count:010d}"
        self._writer.write({"__key__": key, self.suffix: ids.astype(self.dtype, copy=False).tobytes()})
        self._count += 1
        self._shard_samples += 1
        self._shard_tokens += len(ids)

    def _finish_shard(self) -> None:
        name = f"{self.split}-{len(self.entries):06d}.tar"
        self.entries.append(ShardEntry(name, self._shard_samples, self._shard_tokens))
        if self.progress:
            print(f"prepare: wrote {name}  {self._shard_samples} samples  {self._shard_tokens} tokens", file=sys.stderr)
        self._shard_samples = self._shard_tokens = 0

    def close(self) -> list[ShardEntry]:
        if self._writer is not None:
            self._writer.close()
            self._finish_shard()
            self._writer = None
        return self.entries


@dataclass
class Manifest:
    """The contents of `dataset.json`, plus the directory it was read from (`root`)."""

    root: str
    tokenizer_path: str  # relative to root (a copy saved by prepare) or absolute
    tokenizer_fingerprint: str
    vocab_size: int
    ids_entry: str  # tar member suffix: "ids.u16" or "ids.i32"
    special_ids: dict[str, int]  # pad, cls, sep, mask, unk
    all_special_ids: list[int]
    max_seq_length: int
    splits: dict[str, list[ShardEntry]]
    token_counts_file: str
    created: str
    format_version: int = FORMAT_VERSION

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.root, self.tokenizer_path)

    def _split(self, split: str) -> list[ShardEntry]:
        if split not in self.splits:
            raise ConfigError(f"dataset {self.root!r} has no split {split!r} (splits: {sorted(self.splits)})")
        return self.splits[split]

    def urls(self, split: str, *, url_template: str | None = None) -> list[str]:
        """Shard URLs; `url_template` such as "pipe:cat /data/x/{name}" reads them from elsewhere."""
        names = [entry.url for entry in self._split(split)]
        if url_template is None:
            return [os.path.join(self.root, name) for name in names]
        if "{name}" not in url_template:
            raise ConfigError(f"data.url_template {url_template!r} must contain {{name}}")
        return [url_template.format(name=name) for name in names]

    def samples(self, split: str) -> list[int]:
        return [entry.samples for entry in self._split(split)]

    def totals(self, split: str) -> dict[str, int]:
        entries = self._split(split)
        return {
            "shards": len(entries),
            "samples": sum(e.samples for e in entries),
            "tokens": sum(e.tokens for e in entries),
        }

    def token_probs(self, smoothing: float = 0.7) -> np.ndarray:
        """Masking weights max(count, 1) ** -smoothing per vocab id; 0 for special tokens (never masked)."""
        path = os.path.join(self.root, self.token_counts_file)
        if not os.path.exists(path):
            raise ConfigError(f"dataset {self.root!r} lacks {self.token_counts_file}; rerun prepare")
        counts = np.load(path, allow_pickle=False)
        probs = np.maximum(counts, 1).astype(np.float64) ** -smoothing
        probs[self.all_special_ids] = 0.0
        return probs

    def to_json(self) -> dict:
        data = {"format_version": self.format_version}
        data.update((k, v) for k, v in asdict(self).items() if k not in ("root", "format_version"))
        data["totals"] = {split: self.totals(split) for split in self.splits}
        return data


def read_manifest(path: str) -> Manifest:
    """Read `dataset.json` from a prepared directory (or the file itself); ConfigError if absent or incomplete."""
    file = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"no {MANIFEST_NAME} at {path!r}: run `distil-scale prepare` (or it did not finish)")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        data.pop("totals", None)
        splits = {name: [ShardEntry(**entry) for entry in entries] for name, entries in data.pop("splits").items()}
        manifest = Manifest(root=os.path.dirname(os.path.abspath(file)), splits=splits, **data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{file!r} is not a valid distil-scale manifest ({exc}); rerun prepare") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ConfigError(f"{file!r} has format_version {manifest.format_version}, expected {FORMAT_VERSION}")
    return manifest


def _check_args(inputs: list[str], max_seq_length: int, samples_per_shard: int, heldout_fraction: float) -> None:
    if max_seq_length < MIN_SEQ_TOKENS:
        raise ConfigError(f"data.max_seq_length must be >= {MIN_SEQ_TOKENS}, got {max_seq_length}")
    if samples_per_shard < 1:
        raise ConfigError(f"data.samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction must be in [0, 1), got {heldout_fraction}")
    for path in inputs:
        if not os.path.exists(path):
            raise ConfigError(f"data input {path!r} does not exist")


def _clear_previous(out_dir: str) -> None:
    # The manifest goes first: from here on the directory never looks complete until the new one lands.
    for name in (MANIFEST_NAME, TOKEN_COUNTS_NAME):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for split in SPLITS:
        for stale in glob.glob(os.path.join(out_dir, f"{split}-*.tar")):
            os.remove(stale)


def _tokenize(
    texts: datasets.Dataset, tok: PreTrainedTokenizerFast, *, cache_dir: str, num_proc: int, **kwargs
) -> datasets.Dataset:
    import datasets

    fn = functools.partial(_tokenize_batch, tok=tok, **kwargs)
    # An explicit fingerprint: hashing a tokenizer object is slow and, for some, impossible.
    fingerprint = hashlib.sha256(f"{texts._fingerprint}:{tokenizer_fingerprint(tok)}:{kwargs}".encode()).hexdigest()
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32")), "heldout": datasets.Value("bool")})
    return texts.map(
        fn,
        batched=True,
        with_indices=True,
        remove_columns=texts.column_names,
        features=features,
        num_proc=num_proc if num_proc > 1 and len(texts) >= num_proc else None,
        cache_file_name=os.path.join(cache_dir, "tokenized.arrow"),
        new_fingerprint=fingerprint[:32],
        load_from_cache_file=False,
        desc="tokenize",
    )


def _arrow_batches(seqs: datasets.Dataset) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(flat ids, offsets, heldout flags) per batch, straight from Arrow without per-row Python objects."""
    for table in seqs.with_format("arrow").iter(batch_size=_WRITE_BATCH):
        ids = table.column("ids").combine_chunks()
        heldout = table.column("heldout").to_numpy(zero_copy_only=False)
        yield ids.values.to_numpy(), ids.offsets.to_numpy(), heldout


def _write_shards(
    seqs: datasets.Dataset, out_dir: str, *, vocab_size: int, samples_per_shard: int, progress: bool
) -> tuple[dict[str, list[ShardEntry]], np.ndarray]:
    writers = {
        split: ShardSetWriter(
            out_dir, split, vocab_size=vocab_size, samples_per_shard=samples_per_shard, progress=progress
        )
        for split in SPLITS
    }
    counts = np.zeros(vocab_size, dtype=np.int64)
    for values, offsets, heldout in _arrow_batches(seqs):
        lengths = np.diff(offsets)
        flat = values[offsets[0] : offsets[-1]]
        counts += np.bincount(flat[~np.repeat(heldout, lengths)], minlength=vocab_size)[:vocab_size]
        for i, is_heldout in enumerate(heldout):
            writers["heldout" if is_heldout else "train"].write(values[offsets[i] : offsets[i + 1]])
    return {split: writer.close() for split, writer in writers.items()}, counts


def _new_manifest(
    tok: PreTrainedTokenizerFast, out_dir: str, *, max_seq_length: int, splits: dict[str, list[ShardEntry]]
) -> Manifest:
    return Manifest(
        root=os.path.abspath(out_dir),
        tokenizer_path="tokenizer",
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        vocab_size=len(tok),
        ids_entry=ids_entry(len(tok))[0],
        special_ids={name: getattr(tok, f"{name}_token_id") for name in ("pad", "cls", "sep", "mask", "unk")},
        all_special_ids=sorted(tok.all_special_ids),
        max_seq_length=max_seq_length,
        splits=splits,
        token_counts_file=TOKEN_COUNTS_NAME,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def prepare(
    inputs: list[str],
    *,
    tokenizer_dir: str,
    out_dir: str,
    max_seq_length: int = 512,
    samples_per_shard: int = 10000,
    heldout_fraction: float = 0.01,
    num_proc: int = 2,
    text_field: str = "text",
    seed: int = 0,
    progress: bool = True,
) -> Manifest:
    """Tokenize, clean and shard `inputs` into `out_dir`; return the manifest written there last."""
    import datasets

    _check_args(inputs, max_seq_length, samples_per_shard, heldout_fraction)
    tok = load_tokenizer(tokenizer_dir)
    os.makedirs(out_dir, exist_ok=True)
    cache_dir = os.path.join(out_dir, ".prepare-cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    bars_were_on = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        try:
            texts = load_texts(inputs, text_field=text_field, cache_dir=cache_dir)
        except BaseException:
            shutil.rmtree(cache_dir, ignore_errors=True)
            raise
        # Only once the inputs are readable: a rejected input leaves an existing dataset in `out_dir` as it was.
        _clear_previous(out_dir)
        seqs = _tokenize(
            texts,
            tok,
            cache_dir=cache_dir,
            num_proc=num_proc,
            max_seq_length=max_seq_length,
            seed=seed,
            fraction=heldout_fraction,
        )
        splits, counts = _write_shards(
            seqs, out_dir, vocab_size=len(tok), samples_per_shard=samples_per_shard, progress=progress
        )
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    tok.save_pretrained(os.path.join(out_dir, "tokenizer"))
    with atomic.replacing(os.path.join(out_dir, TOKEN_COUNTS_NAME), sync=True) as tmp, open(tmp, "wb") as f:
        np.save(f, counts, allow_pickle=False)
    manifest = _new_manifest(tok, out_dir, max_seq_length=max_seq_length, splits=splits)
    if heldout_fraction > 0 and not splits["heldout"]:
        warnings.warn(
            f"prepare: no document fell in the heldout split (heldout_fraction={heldout_fraction})", stacklevel=2
        )
    text = json.dumps(manifest.to_json(), indent=2)
    atomic.write_text(os.path.join(out_dir, MANIFEST_NAME), text, sync=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return manifest
