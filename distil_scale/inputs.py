"""What a run reads, made ready: prepared shards, tokenizer, teacher, the student built from it, the batch stream.

`ensure_inputs` runs on rank 0 before anything else and creates what a self-contained config (debug, demo) asks
for when it is missing: the synthetic corpus, a WordPiece tokenizer, the shards, a randomly initialised teacher.
A real run points at prepared shards and a trained teacher, and this does nothing.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForMaskedLM

from distil_scale import atomic
from distil_scale.config import Config, ConfigError
from distil_scale.data.corpus import write_synthetic_corpus
from distil_scale.data.position import DataState
from distil_scale.data.shards import Manifest, prepare, read_manifest
from distil_scale.data.tokenizer import load_tokenizer, train_wordpiece
from distil_scale.engine import Placement, partition_teacher, resolve_dtype

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def _manifest_path(cfg: Config) -> str:
    shards = cfg.data.shards
    return shards if shards.endswith(".json") else os.path.join(shards, "dataset.json")


def tokenizer_dir(cfg: Config, manifest: Manifest | None = None) -> str:
    """The tokenizer shipped with exports: data.tokenizer, else the copy kept with the shards, else the teacher's."""
    for path in (cfg.data.tokenizer, manifest.tokenizer_dir if manifest else None, cfg.teacher.path):
        if _has_tokenizer(path):
            return path
    raise ConfigError("data.tokenizer: no tokenizer found (set data.tokenizer or use a teacher dir with one)")


def _corpus_files(cfg: Config) -> list[str]:
    files = []
    for item in cfg.data.prepare_from:
        if item == "embedded":
            path = os.path.join(os.path.dirname(os.path.abspath(cfg.data.shards)), "corpus.txt")
            if not os.path.exists(path):
                print(f"distil-scale: writing the synthetic corpus ({cfg.data.embedded_docs} documents) to {path}")
                write_synthetic_corpus(path, num_docs=cfg.data.embedded_docs, seed=cfg.run.seed)
            item = path
        files.append(item)
    return files


def _iter_lines(files: list[str]):
    for path in files:
        with open(path, encoding="utf-8") as f:
            yield from (line.strip() for line in f if line.strip())


def _ensure_tokenizer(cfg: Config, files: list[str]) -> str:
    path = cfg.data.tokenizer or cfg.teacher.path
    if _has_tokenizer(path):
        return path
    if not cfg.data.tokenizer or not all(f.endswith(".txt") for f in files):
        raise ConfigError(f"data.tokenizer: no tokenizer in {path!r} and none can be trained here")
    print(f"distil-scale: training a WordPiece tokenizer ({cfg.data.tokenizer_vocab_size} tokens) into {path}")
    return train_wordpiece(_iter_lines(files), vocab_size=cfg.data.tokenizer_vocab_size, out_dir=path)


def _ensure_random_teacher(cfg: Config, tok_dir: str) -> None:
    """Save a randomly initialised teacher of `teacher.init_config` (vocabulary sized to the tokenizer)."""
    tokenizer = load_tokenizer(tok_dir)
    config = AutoConfig.from_pretrained(cfg.teacher.init_config, local_files_only=True)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForMaskedLM.from_config(config)
    with atomic.replacing_dir(cfg.teacher.path.rstrip("/")) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"distil-scale: saved a randomly initialised teacher ({cfg.teacher.init_config}) to {cfg.teacher.path}")


def ensure_inputs(cfg: Config) -> None:
    """Rank 0 only: make missing inputs that the config says how to make."""
    needs_data = not os.path.exists(_manifest_path(cfg)) and cfg.data.prepare_from
    needs_teacher = cfg.needs_teacher and not os.path.isdir(cfg.teacher.path) and cfg.teacher.init_config
    if not (needs_data or needs_teacher):
        return
    files = _corpus_files(cfg) if cfg.data.prepare_from else []
    tok_dir = _ensure_tokenizer(cfg, files)
    if needs_data:
        prepare(
            files,
            tokenizer_dir=tok_dir,
            out_dir=cfg.data.shards,
            max_seq_length=cfg.data.max_seq_length,
            samples_per_shard=cfg.data.samples_per_shard,
            seed=cfg.run.seed,
        )
    if needs_teacher:
        _ensure_random_teacher(cfg, tok_dir)


def build_models(cfg: Config, placement: Placement):
    """(teacher or None, student, manifest). The student is built identically on every rank (same seed)."""
    from distil_scale.models import build_student, check_vocab, load_teacher

    manifest = read_manifest(cfg.data.shards)
    teacher = None
    if cfg.needs_teacher:
        # A teacher to be partitioned is read into CPU memory only: no device ever holds all of it.
        teacher = load_teacher(
            cfg.teacher.path,
            dtype=resolve_dtype(cfg.teacher.dtype, placement.device),
            device="cpu" if cfg.teacher.partition else placement.device,
        )
    torch.manual_seed(cfg.run.seed)
    if cfg.student.arch_config:
        config = AutoConfig.from_pretrained(cfg.student.arch_config, local_files_only=True)
        config.vocab_size = manifest.vocab_size
        student = AutoModelForMaskedLM.from_config(config)
    else:
        student = build_student(
            teacher, num_layers=cfg.student.num_layers, init=cfg.student.init, architecture=cfg.student.architecture
        )
    check_vocab(
        teacher_vocab=teacher.config.vocab_size if teacher is not None else student.config.vocab_size,
        student_vocab=student.config.vocab_size,
        tokenizer_vocab=manifest.vocab_size,
        what=f"teacher {cfg.teacher.path} / data {cfg.data.shards}",
    )
    if cfg.train.activation_checkpointing:
        student.activation_checkpointing_enable({"use_reentrant": False})
    if not cfg.uses_teacher_outputs:
        teacher = None  # only its architecture and weights were needed: free it
    elif cfg.teacher.partition:
        teacher = partition_teacher(teacher, cfg, placement)
    return teacher, student.to(placement.device), manifest


def make_batches(cfg: Config, manifest: Manifest, placement: Placement, data: DataState, *, step: int, accum: int):
    """This rank's endless, deterministic, resumable stream of masked micro-batches: the plan that started at
    `data.origin`, less the batches it already made up to optimizer step `step`."""
    from distil_scale.data.loader import make_loader
    from distil_scale.data.masking import Masker
    from distil_scale.data.stream import BatchStream

    masker = Masker.for_manifest(manifest, smoothing=cfg.data.mlm_smoothing, mlm_probability=cfg.data.mlm_probability)
    stream = BatchStream(
        manifest.urls("train", url_template=cfg.data.url_template),
        manifest.samples("train"),
        rank=placement.rank,
        world_size=placement.world_size,
        seed=cfg.run.seed,
        micro_batch_size=cfg.train.micro_batch_size,
        masker=masker,
        pad_id=manifest.special_ids["pad"],
        start_epoch=data.origin.position.start_epoch,
        consumed=data.origin.position.consumed,
        origin=data.origin.step,
        skip_batches=data.skip_batches(step, accum),
        shuffle_buffer=cfg.data.shuffle_buffer,
        group_batches=cfg.data.group_batches,
    )
    return make_loader(stream, num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor)
