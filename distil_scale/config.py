"""Typed run configuration: one YAML file per run, then `--section.key=value` overrides, validated before any work.

This is the only module that reads YAML or argv for a run. Every field has a one-line docstring (the comment
above it); `distil-scale config --explain` prints them. A mistake raises `ConfigError`, which the entry points
turn into one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from distil_scale import atomic


class ConfigError(ValueError):
    """A user mistake in the configuration or its inputs; the CLI prints it as one line and exits with code 2."""


@dataclass
class RunConfig:
    # Directory for config.yaml, metrics.jsonl, TensorBoard events, checkpoints/ and export/.
    output_dir: str = "runs/debug"
    # Seed for model init, data order and masking; 56 as in the original recipe.
    seed: int = 56


@dataclass
class DataConfig:
    # Prepared dataset: a directory holding dataset.json (written by `distil-scale prepare`) or that file.
    shards: str = ""
    # Optional template for remote shards, e.g. "pipe:aws s3 cp s3://bucket/corpus/{name} -"; None = local files.
    url_template: str | None = None
    # Raw text to prepare into `shards` when dataset.json is missing (.txt/.jsonl/.parquet or a `datasets` dir).
    prepare_from: list[str] = field(default_factory=list)
    # Tokenizer directory used when preparing from `prepare_from`; defaults to the teacher's directory.
    # When it does not exist either, a WordPiece tokenizer of `tokenizer_vocab_size` is trained on the corpus.
    tokenizer: str | None = None
    # Vocabulary size of a tokenizer trained by the run itself (see `tokenizer`).
    tokenizer_vocab_size: int = 4000
    # Documents in the offline synthetic corpus, used when `prepare_from` is ["embedded"].
    embedded_docs: int = 20000
    # Sequences per shard written when preparing.
    samples_per_shard: int = 10000
    # Longest sequence in tokens, [CLS] and [SEP] included; longer documents are split at prepare time.
    max_seq_length: int = 512
    # Fraction of real tokens picked for MLM targets per batch.
    mlm_probability: float = 0.15
    # Exponent of count**-s used to mask rare tokens more often (0 = uniform).
    mlm_smoothing: float = 0.7
    # Samples held in the per-worker shuffle buffer.
    shuffle_buffer: int = 2000
    # Micro-batches sorted together for length grouping (less padding with more).
    group_batches: int = 64
    # DataLoader worker processes per rank (0 = load in the training process).
    num_workers: int = 1
    # Batches each worker prepares ahead.
    prefetch_factor: int = 4
    # Write audit/rank<r>.jsonl with the sample keys trained in each optimizer step.
    audit: bool = False


@dataclass
class TeacherConfig:
    # Local Hugging Face masked-LM directory (BERT, RoBERTa / XLM-R, ModernBERT or DeBERTa-v2/v3). Empty only for
    # MLM-only runs.
    path: str = ""
    # Teacher compute dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16.
    dtype: str = "auto"
    # A Hugging Face config.json: when `path` does not exist, a randomly initialised teacher of this
    # architecture is saved there first (smoke runs only; a real run points `path` at a trained model).
    init_config: str | None = None
    # Run the teacher as a ZeRO-3 inference engine whose weights are partitioned over the ranks (each layer is
    # gathered when it runs) instead of a full copy per rank: for teachers that do not fit one accelerator.
    partition: bool = False
    # With `partition`: keep the teacher's partitions in CPU memory and fetch each layer when it runs
    # (slower; for teachers bigger than the accelerators' memory together).
    offload: bool = False


@dataclass
class StudentConfig:
    # Transformer layers of the student; None = half the teacher's.
    num_layers: int | None = None
    # "teacher": copy embeddings, evenly spaced layers and the LM head from the teacher; "random": fresh init.
    init: str = "teacher"
    # "auto": a DistilBERT for BERT / RoBERTa / XLM-R teachers (the paper's), the teacher's family at reduced depth
    # for the others (ModernBERT, DeBERTa-v2/v3); "same": the teacher's family for every teacher; "distilbert".
    architecture: str = "auto"
    # Build this architecture (a Hugging Face config.json) instead of a half-depth DistilBERT: used to
    # pretrain a teacher with the same engine. Implies random init.
    arch_config: str | None = None


@dataclass
class LossConfig:
    # "eager": the reference torch loss. "fused": the kernels package (Triton on GPU, chunked torch on CPU),
    # with both LM heads fused in, so no (batch, seq, vocab) logits tensor is ever made.
    impl: str = "eager"
    # Softmax temperature T of the distillation term; kd is multiplied by T**2.
    temperature: float = 2.0
    # Weight of the temperature KL to the teacher.
    alpha_kd: float = 5.0
    # Weight of the masked-LM cross-entropy.
    alpha_mlm: float = 2.0
    # Weight of the cosine loss between last hidden states.
    alpha_cos: float = 1.0
    # Compute kd on MLM-labelled positions only instead of every real token.
    restrict_kd_to_mlm: bool = False


@dataclass
class OptimConfig:
    # Peak learning rate reached at the end of warmup.
    peak_lr: float = 5e-4
    # AdamW betas.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    # AdamW epsilon.
    eps: float = 1e-6
    # Decoupled weight decay (never applied to biases and LayerNorm weights).
    weight_decay: float = 0.0
    # Gradient-norm clipping threshold (0 = off).
    grad_clip: float = 5.0
    # Fraction of max_steps spent in linear warmup before the linear decay to zero.
    warmup_fraction: float = 0.05


@dataclass
class TrainConfig:
    # Optimizer steps to train for.
    max_steps: int = 100
    # Sequences per optimizer step over all ranks; gradient accumulation makes up the difference.
    sequences_per_step: int = 4096
    # Sequences per rank per forward/backward.
    micro_batch_size: int = 8
    # DeepSpeed ZeRO stage of the student: 0, 1, 2 or 3.
    zero_stage: int = 1
    # Student precision: auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16.
    precision: str = "auto"
    # "auto" continues from the newest checkpoint in the output directory, "never" starts fresh,
    # anything else is a checkpoint directory to continue from.
    resume: str = "auto"
    # Stop the run after this many optimizer steps in a row with a non-finite loss (each such micro-batch is
    # left out of its step, and no checkpoint is written while it lasts).
    max_nonfinite_steps: int = 3
    # Recompute the student's transformer layers in backward instead of keeping their activations: about one
    # more student forward per step for much less activation memory (larger micro-batches).
    activation_checkpointing: bool = False


@dataclass
class CheckpointConfig:
    # Save every this many optimizer steps (and always at the end).
    every_steps: int = 1000
    # Complete checkpoints to keep; older ones are deleted.
    keep_last: int = 3
    # Export the student to <output_dir>/export when training ends.
    export: bool = True


@dataclass
class LogConfig:
    # Write a metrics row and a progress line every this many optimizer steps.
    every_steps: int = 10
    # Write TensorBoard events under <output_dir>/tensorboard.
    tensorboard: bool = True
    # Dense peak TFLOP/s of one accelerator in the compute dtype, for MFU; null looks it up (H100/H200/A100/L40S/...).
    peak_tflops: float | None = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Expert passthrough merged last into the generated DeepSpeed config.
    deepspeed: dict = field(default_factory=dict)

    @property
    def needs_teacher(self) -> bool:
        """Whether the teacher must run (a distillation term is on) or be read (student init / architecture)."""
        return self.uses_teacher_outputs or self.student.arch_config is None

    @property
    def uses_teacher_outputs(self) -> bool:
        return self.loss.alpha_kd > 0 or self.loss.alpha_cos > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

_CHOICES = {
    ("teacher", "dtype"): ("auto", "fp32", "bf16", "fp16"),
    ("train", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("student", "init"): ("teacher", "random"),
    ("student", "architecture"): ("auto", "same", "distilbert"),
    ("loss", "impl"): ("eager", "fused"),
    ("train", "zero_stage"): (0, 1, 2, 3),
}
_POSITIVE = {
    ("data", "max_seq_length"),
    ("data", "shuffle_buffer"),
    ("data", "group_batches"),
    ("data", "prefetch_factor"),
    ("data", "tokenizer_vocab_size"),
    ("data", "embedded_docs"),
    ("data", "samples_per_shard"),
    ("loss", "temperature"),
    ("optim", "peak_lr"),
    ("optim", "eps"),
    ("train", "max_steps"),
    ("train", "max_nonfinite_steps"),
    ("train", "sequences_per_step"),
    ("train", "micro_batch_size"),
    ("checkpoint", "every_steps"),
    ("checkpoint", "keep_last"),
    ("log", "every_steps"),
}
_NON_NEGATIVE = {
    ("data", "num_workers"),
    ("loss", "alpha_kd"),
    ("loss", "alpha_mlm"),
    ("loss", "alpha_cos"),
    ("optim", "weight_decay"),
    ("optim", "grad_clip"),
    ("student", "num_layers"),
}
_FRACTIONS = {("data", "mlm_probability"), ("optim", "warmup_fraction")}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; YAML scalars from overrides arrive already typed by yaml."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(annotation) or (Any,)
        return [_coerce(v, inner, key) for v in value]
    if annotation is Any or annotation is dict:
        if annotation is dict and not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string; it is plainly a number.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build_section(cls: type, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown key {section}.{key} (known: {', '.join(sorted(known))})")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from a nested mapping (the YAML file with overrides applied)."""
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a mapping of sections")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r} (known: {', '.join(SECTIONS)})")
    hints = typing.get_type_hints(Config)
    parts = {}
    for name in SECTIONS:
        values = raw.get(name) or {}
        parts[name] = _coerce(values, dict, name) if name == "deepspeed" else _build_section(hints[name], values, name)
    cfg = Config(**parts)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject impossible values with one line naming the key."""
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    for section, key in _POSITIVE | _NON_NEGATIVE | _FRACTIONS:
        value = getattr(getattr(cfg, section), key)
        if value is None:
            continue
        if (section, key) in _POSITIVE and value <= 0:
            raise ConfigError(f"{section}.{key}: must be > 0, got {value}")
        if (section, key) in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{section}.{key}: must be >= 0, got {value}")
        if (section, key) in _FRACTIONS and not 0 <= value < 1:
            raise ConfigError(f"{section}.{key}: must be in [0, 1), got {value}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two values in [0, 1), got {cfg.optim.betas}")
    if cfg.loss.alpha_kd + cfg.loss.alpha_mlm + cfg.loss.alpha_cos <= 0:
        raise ConfigError("loss: alpha_kd, alpha_mlm and alpha_cos are all 0, nothing to train")
    if cfg.student.num_layers == 0:
        raise ConfigError("student.num_layers: must be >= 1 (or null for half the teacher's)")
    if cfg.train.sequences_per_step % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.sequences_per_step: {cfg.train.sequences_per_step} is not a multiple of "
            f"train.micro_batch_size {cfg.train.micro_batch_size}"
        )
    if cfg.data.tokenizer_vocab_size <= 5:  # the five special tokens need room for at least one more
        raise ConfigError(f"data.tokenizer_vocab_size: must be > 5, got {cfg.data.tokenizer_vocab_size}")
    if cfg.data.url_template is not None and "{name}" not in cfg.data.url_template:
        raise ConfigError(f"data.url_template: {cfg.data.url_template!r} must contain {{name}}")
    if cfg.student.arch_config and cfg.student.architecture != "auto":
        raise ConfigError("student.architecture: has no effect with student.arch_config (which builds that config)")
    if cfg.teacher.offload and not cfg.teacher.partition:
        raise ConfigError("teacher.offload: offloading needs a partitioned teacher (set teacher.partition: true)")
    if not cfg.run.output_dir:
        raise ConfigError("run.output_dir: must not be empty")
    if not cfg.data.shards:
        raise ConfigError("data.shards: set the prepared dataset directory (see `distil-scale prepare`)")
    if cfg.needs_teacher and not cfg.teacher.path:
        raise ConfigError("teacher.path: set the local Hugging Face teacher directory")


def check_paths(cfg: Config) -> None:
    """Fail before any work when an input path is missing (separate from `validate` so configs load anywhere)."""
    # init_config is read only to make a teacher that is missing: an existing teacher.path makes it irrelevant.
    if cfg.needs_teacher and not os.path.isdir(cfg.teacher.path):
        if not cfg.teacher.init_config:
            raise ConfigError(f"teacher.path: directory not found: {cfg.teacher.path}")
        if not os.path.isfile(cfg.teacher.init_config):
            raise ConfigError(f"teacher.init_config: file not found: {cfg.teacher.init_config}")
    if cfg.student.arch_config and not os.path.isfile(cfg.student.arch_config):
        raise ConfigError(f"student.arch_config: file not found: {cfg.student.arch_config}")
    manifest = os.path.join(cfg.data.shards, "dataset.json") if not cfg.data.shards.endswith(".json") else ""
    if not (os.path.isfile(cfg.data.shards) or os.path.isfile(manifest)) and not cfg.data.prepare_from:
        raise ConfigError(f"data.shards: no dataset.json in {cfg.data.shards} (run `distil-scale prepare` first)")
    for path in cfg.data.prepare_from:
        if path != "embedded" and not os.path.exists(path):
            raise ConfigError(f"data.prepare_from: not found: {path}")


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--section.key=value` -> (["section", "key"], value parsed as a YAML scalar or list)."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"override {arg!r}: expected --section.key=value")
    dotted, text = body.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return dotted.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for arg in overrides:
        path, value = parse_override(arg)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {arg!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read the YAML file (if any), apply dotted overrides, build and validate the typed tree."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                line = getattr(getattr(e, "problem_mark", None), "line", None)
                where = f" line {line + 1}" if line is not None else ""
                raise ConfigError(f"{path}{where}: not valid YAML") from None
    return from_dict(apply_overrides(raw, list(overrides)))


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config atomically (it is what `train.resume` and the export read back)."""
    atomic.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def explain() -> str:
    """Every key with its type, default and the comment above it in this file (for `distil-scale config`)."""
    import inspect

    lines = []
    for name in SECTIONS:
        if name == "deepspeed":
            lines.append("deepspeed: {}  # expert keys merged last into the generated DeepSpeed config")
            continue
        cls = typing.get_type_hints(Config)[name]
        source = inspect.getsource(cls).splitlines()
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            idx = next(i for i, s in enumerate(source) if s.strip().startswith(f"{f.name}:"))
            comment = []
            while source[idx - 1 - len(comment)].strip().startswith("#"):
                comment.insert(0, source[idx - 1 - len(comment)].strip().lstrip("# "))
            doc = " ".join(comment)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name}: {default!r}  # {doc}")
    return "\n".join(lines)
