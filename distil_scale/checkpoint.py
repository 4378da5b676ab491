"""Checkpoints: DeepSpeed's sharded save plus our training state, committed atomically, resumed from the newest.

Layout of `<output_dir>/checkpoints/<tag>/` (tag = `step00000100`):
  DeepSpeed's files (model states, optimizer / ZeRO shards per rank, scheduler inside the client state)
  rng_rank<r>.pt        python / numpy / torch RNG states of rank r (dropout)
  model_config.json     the Hugging Face config of the student, so the export needs nothing else
  config.yaml           the resolved run config
  COMPLETE              written by rank 0 after a barrier, via tmp + rename: only then does the tag count

DeepSpeed's own `latest` pointer is written before every rank has finished, so resume never trusts it: it scans
for the newest tag carrying COMPLETE and warns about the others.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist

from distil_scale.config import Config, save_config

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, save_dir: str, *, step: int, state: dict, cfg: Config, model_config, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag once it is complete on every rank."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(save_dir, tag=tag, client_state={"training_state": state}, save_latest=False)
    tag_dir = os.path.join(save_dir, tag)
    torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        model_config.to_json_file(os.path.join(tag_dir, "model_config.json"))
        save_config(cfg, os.path.join(tag_dir, "config.yaml"))
        _write_atomic(os.path.join(tag_dir, "training_state.json"), json.dumps(state, indent=1))
    # Every rank's shards are on disk before the marker makes the tag visible.
    dist.barrier()
    if rank == 0:
        _write_atomic(os.path.join(tag_dir, COMPLETE), f"{step}\n")
        _write_atomic(os.path.join(save_dir, "latest"), tag)
        prune(save_dir, keep_last=keep_last)
    dist.barrier()
    return tag


def complete_tags(save_dir: str, *, warn: bool = False) -> list[str]:
    """Complete tags, oldest first; partial ones (a crash during save) are skipped with a warning."""
    if not os.path.isdir(save_dir):
        return []
    tags = sorted(t for t in os.listdir(save_dir) if _TAG.match(t) and os.path.isdir(os.path.join(save_dir, t)))
    done = [t for t in tags if os.path.exists(os.path.join(save_dir, t, COMPLETE))]
    if warn:
        for t in sorted(set(tags) - set(done)):
            warnings.warn(
                f"ignoring incomplete checkpoint {os.path.join(save_dir, t)} (no {COMPLETE} marker)", stacklevel=2
            )
    return done


def latest_tag(save_dir: str, *, warn: bool = False) -> str | None:
    tags = complete_tags(save_dir, warn=warn)
    return tags[-1] if tags else None


def prune(save_dir: str, *, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (and partial ones older than those)."""
    done = complete_tags(save_dir)
    if not done:
        return
    keep = set(done[-keep_last:])
    oldest_kept = min(keep)
    for t in os.listdir(save_dir):
        if _TAG.match(t) and t not in keep and t < oldest_kept:
            # Remove the marker first: a crash mid-delete must not leave a half-deleted tag looking complete.
            marker = os.path.join(save_dir, t, COMPLETE)
            if os.path.exists(marker):
                os.remove(marker)
            shutil.rmtree(os.path.join(save_dir, t), ignore_errors=True)


def resolve(save_dir: str, resume: str) -> tuple[str, str] | None:
    """Map `train.resume` to (save_dir, tag) or None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = latest_tag(save_dir, warn=dist.get_rank() == 0)
        return (save_dir, tag) if tag else None
    path = os.path.normpath(resume)
    if _TAG.match(os.path.basename(path)) and os.path.exists(os.path.join(path, COMPLETE)):
        return os.path.dirname(path), os.path.basename(path)
    tag = latest_tag(path)
    if tag is None:
        from distil_scale.config import ConfigError

        raise ConfigError(f"train.resume: no complete checkpoint in {resume}")
    return path, tag


def load(engine, save_dir: str, tag: str) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns our training state."""
    _, client_state = engine.load_checkpoint(save_dir, tag=tag)
    rng_path = os.path.join(save_dir, tag, f"rng_rank{dist.get_rank()}.pt")
    if os.path.exists(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    if client_state and "training_state" in client_state:
        return client_state["training_state"]
    with open(os.path.join(save_dir, tag, "training_state.json"), encoding="utf-8") as f:
        return json.load(f)
