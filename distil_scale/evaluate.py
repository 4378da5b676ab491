"""Quality and size of masked LMs: MLM accuracy and perplexity on held-out batches, parameter count, speed.

Metrics are pooled over labelled tokens, not averaged per batch, so batches of different sizes weigh by
their token count: perplexity = exp(sum CE / tokens). `evaluate_models` compares several models (teacher,
students) on literally the same masked batches, read once from a prepared dataset.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from distil_scale.config import ConfigError
from distil_scale.models import load_masked_lm_dir
from kernels.contract import IGNORE_INDEX
from kernels.measure import timed


def load_masked_lm(path: str, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A masked LM from a local Hugging Face directory, in eval mode (fp32 unless told otherwise)."""
    return load_masked_lm_dir(path, dtype=dtype, what="eval").eval()


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (a tied projector counts once); full sizes even when ZeRO-3 has partitioned them."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _batch_sums(model: nn.Module, batch: dict, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    rows = labels != IGNORE_INDEX
    selected, targets = logits[rows].float(), labels[rows]
    ce = F.cross_entropy(selected, targets, reduction="sum").double()
    correct = (selected.argmax(dim=-1) == targets).sum()
    return ce, correct, rows.sum()


def mlm_metrics(
    model: nn.Module, batches: Iterable[dict], *, device: torch.device | str = "cpu", max_batches: int | None = None
) -> dict:
    """{"mlm_accuracy", "perplexity", "loss", "tokens"} over the labelled tokens of `batches`.

    Batches are dicts with input_ids, attention_mask and labels (-100 = not a target); other keys are
    ignored. The model runs in eval mode under no_grad; its train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                batch_ce, batch_correct, batch_tokens = _batch_sums(model, batch, device)
                ce_sum += batch_ce
                correct += batch_correct
                tokens += batch_tokens
    finally:
        model.train(was_training)
    n = int(tokens)  # the one host sync of the evaluation
    if n == 0:
        raise ConfigError("evaluation batches hold no MLM-labelled token; give the evaluation more data")
    loss = float(ce_sum) / n
    return {"mlm_accuracy": int(correct) / n, "perplexity": math.exp(loss), "loss": loss, "tokens": n}


def forward_seconds(
    model: nn.Module, batches: Iterable[dict], *, device: torch.device | str = "cpu", max_batches: int | None = None
) -> float:
    """Wall-clock seconds of the forward passes alone over `batches` (eval, no_grad), for speed comparisons."""
    was_training = model.training
    model.eval()
    elapsed = 0.0
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
                elapsed += timed(functools.partial(model, **inputs), device)
    finally:
        model.train(was_training)
    return elapsed


def heldout_batches(
    data: str, *, split: str = "heldout", batch_size: int = 32, seed: int = 0, max_batches: int | None = None
) -> list[dict]:
    """One pass over `split` of a prepared dataset, masked deterministically from `seed`.

    Held in memory so every model sees the same tensors and the timing excludes reading and masking;
    bound it with `max_batches` on a large held-out split.
    """
    from distil_scale.data.masking import Masker
    from distil_scale.data.shards import read_manifest
    from distil_scale.data.stream import BatchStream

    manifest = read_manifest(data)
    masker = Masker.for_manifest(manifest)
    stream = BatchStream(
        manifest.urls(split),
        manifest.samples(split),
        rank=0,
        world_size=1,
        seed=seed,
        micro_batch_size=batch_size,
        masker=masker,
        pad_id=manifest.special_ids["pad"],
        max_epochs=1,
    )
    batches = []
    for batch in stream:
        if max_batches is not None and len(batches) >= max_batches:
            break
        batches.append({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    return batches


def evaluate_models(
    models: list[str],
    *,
    data: str,
    split: str = "heldout",
    batch_size: int = 32,
    max_batches: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, dict]:
    """{model dir: metrics + parameters + eval_seconds} on the same masked batches; prints a table."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = heldout_batches(data, split=split, batch_size=batch_size, seed=seed, max_batches=max_batches)
    results = {}
    for path in models:
        model = load_masked_lm(path).to(device)
        forward_seconds(model, batches[:1], device=device)  # warm-up, so the first model is not charged for it
        start = time.perf_counter()
        metrics = mlm_metrics(model, batches, device=device)
        metrics["eval_seconds"] = time.perf_counter() - start  # mlm_metrics ends in a host sync
        metrics["parameters"] = parameter_count(model)
        results[path] = metrics
        del model
    print(format_table(results))
    return results


def format_table(results: dict[str, dict]) -> str:
    """Fixed-width comparison table, one row per model."""
    width = max(len("model"), *(len(name) for name in results))
    lines = [f"{'model':<{width}}  {'params':>9}  {'mlm acc':>7}  {'ppl':>9}  {'tokens':>9}  {'eval s':>7}"]
    for name, m in results.items():
        lines.append(
            f"{name:<{width}}  {m['parameters'] / 1e6:>8.2f}M  {m['mlm_accuracy']:>7.4f}  {m['perplexity']:>9.2f}  "
            f"{m['tokens']:>9d}  {m['eval_seconds']:>7.2f}"
        )
    return "\n".join(lines)
