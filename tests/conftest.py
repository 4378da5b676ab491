"""Shared fixtures: a tiny offline corpus, tokenizer and prepared dataset, built once per test session."""

from __future__ import annotations

import os

import torch

# Before anything imports triton. Without a GPU the Triton kernels run on CPU tensors through the interpreter; with
# one they stay compiled (the interpreter would replace them), and `python -m kernels.verify` checks them on CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from distil_scale.data.corpus import write_synthetic_corpus  # noqa: E402
from distil_scale.data.shards import prepare  # noqa: E402
from distil_scale.data.tokenizer import train_wordpiece  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: their matrices gain nothing from threads, and on a busy
    two-core machine two spinning OpenMP workers made a training step of the tiny model ~100x slower (3 s instead
    of 0.04 s). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Odd on purpose: shard boundaries then fall inside rank and worker blocks, the case the stream must get right.
TINY_SAMPLES_PER_SHARD = 37
TINY_MAX_SEQ_LENGTH = 64


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a 300-document synthetic corpus (.txt, one document per line)."""
    return write_synthetic_corpus(str(tmp_path_factory.mktemp("corpus") / "corpus.txt"), num_docs=300, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a 400-token WordPiece tokenizer trained on `tiny_corpus`."""
    with open(tiny_corpus, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return train_wordpiece(lines, vocab_size=400, out_dir=str(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.fixture(scope="session")
def tiny_dataset(tiny_corpus: str, tiny_tokenizer: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of `tiny_corpus` prepared into shards of 37 sequences of at most 64 tokens (~15 train shards)."""
    out_dir = str(tmp_path_factory.mktemp("dataset"))
    prepare(
        [tiny_corpus],
        tokenizer_dir=tiny_tokenizer,
        out_dir=out_dir,
        max_seq_length=TINY_MAX_SEQ_LENGTH,
        samples_per_shard=TINY_SAMPLES_PER_SHARD,
        heldout_fraction=0.1,
        num_proc=2,
        seed=0,
        progress=False,
    )
    assert os.path.exists(os.path.join(out_dir, "dataset.json"))
    return out_dir
