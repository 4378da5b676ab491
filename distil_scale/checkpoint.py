"""Checkpoints: DeepSpeed's sharded save plus our training state, committed atomically, resumed from the newest.

Layout of `<output_dir>/checkpoints/<tag>/` (tag = `step00000100`):
  DeepSpeed's files (model states, optimizer / ZeRO shards per rank, scheduler inside the client state)
  rng_rank<r>.pt        python / numpy / torch RNG states of rank r (dropout)
  data_position.npz     the samples trained on in each unfinished epoch, union over ranks (data.position)
  data_origin.npz       the position the current data plan started from (its step and shape: training_state)
  model_config.json     the Hugging Face config of the student, so the export needs nothing else
  config.yaml           the resolved run config
  COMPLETE              written by rank 0 after a barrier, via tmp + rename: only then does the tag count

DeepSpeed's own `latest` pointer is written before every rank has finished, so resume never trusts it: it scans
for the newest tag carrying COMPLETE and warns about the others.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist

from distil_scale.config import Config, ConfigError, save_config
from distil_scale.data.position import DataOrigin, DataPosition

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


class CheckpointWriteError(RuntimeError):
    """A rank could not write its part of a checkpoint (a full disk, a quota, an I/O error): the run stops, the
    partial checkpoint is removed and the older ones are untouched."""


def save(
    engine,
    save_dir: str,
    *,
    step: int,
    state: dict,
    data: tuple[DataOrigin, DataPosition],
    cfg: Config,
    model_config,
    keep_last: int,
) -> str:
    """Collective: every rank calls it. Returns the tag once it is complete on every rank.

    `data` is (the current plan's origin, the position agreed over ranks): see distil_scale.data.position.
    Every rank fsyncs what it wrote before the barrier after which rank 0 writes the marker, so a node that
    dies later cannot take part of a complete checkpoint with it. If any rank fails to write, every rank
    raises CheckpointWriteError (no rank is left waiting in a collective) and the partial tag is removed.
    """
    tag = tag_for(step)
    rank = dist.get_rank()
    tag_dir = os.path.join(save_dir, tag)
    origin, position = data
    state = dict(
        state,
        world_size=dist.get_world_size(),
        zero_stage=engine.zero_optimization_stage(),
        data_origin={"step": origin.step, "plan": origin.plan},
    )
    # A failed write is kept as text: an exception object would tie this frame (and the data loader) to a cycle.
    failure = None
    if rank == 0:
        try:
            _remove_tag(tag_dir)  # left by an attempt that crashed, or a step saved again after an older resume
            os.makedirs(tag_dir)
        except Exception as exc:
            failure = _describe(exc)
    _raise_if_any_failed(failure, save_dir, tag_dir)
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state={"training_state": state}, save_latest=False)
    except Exception as exc:
        failure = _describe(exc)
        dist.barrier()  # DeepSpeed's save ends in a barrier, where the ranks that did write are waiting
    if failure is None:
        try:
            torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank{rank}.pt"))
            if rank == 0:
                model_config.to_json_file(os.path.join(tag_dir, "model_config.json"))
                save_config(cfg, os.path.join(tag_dir, "config.yaml"))
                position.save(os.path.join(tag_dir, "data_position.npz"))
                origin.position.save(os.path.join(tag_dir, "data_origin.npz"))
                _write_atomic(os.path.join(tag_dir, "training_state.json"), json.dumps(state, indent=1))
            _sync_own_files(tag_dir, rank)
        except Exception as exc:
            failure = _describe(exc)
    # Every rank's files are on disk before the marker makes the tag visible.
    _raise_if_any_failed(failure, save_dir, tag_dir)
    if rank == 0:
        try:
            _write_atomic(os.path.join(tag_dir, COMPLETE), f"{step}\n")
        except Exception as exc:
            failure = _describe(exc)
    _raise_if_any_failed(failure, save_dir, tag_dir)
    if rank == 0:
        with contextlib.suppress(OSError):  # DeepSpeed's pointer, for its own tools; resume never reads it
            _write_atomic(os.path.join(save_dir, "latest"), tag)
        prune(save_dir, keep_last=keep_last)
    return tag


# DeepSpeed names a rank's own files `..._pp_rank_<r>_...`; ours are rng_rank<r>.pt. The rest are rank 0's.
_PER_RANK_FILE = re.compile(r"(?:pp_rank_|rng_rank)(\d+)[._]")


def _sync_own_files(tag_dir: str, rank: int) -> None:
    """fsync the files of `tag_dir` that this rank wrote (rank 0 also the shared ones and the directory)."""
    for name in os.listdir(tag_dir):
        owner = _PER_RANK_FILE.search(name)
        if (int(owner.group(1)) if owner else 0) == rank:
            _fsync(os.path.join(tag_dir, name))
    if rank == 0:
        _fsync(tag_dir)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tag(tag_dir: str) -> None:
    """Delete a tag directory, its marker first: a crash midway must not leave a half-deleted tag looking complete."""
    marker = os.path.join(tag_dir, COMPLETE)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(tag_dir, ignore_errors=True)


def _describe(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def _first_failure(failure: str | None) -> tuple[int, str] | None:
    """Collective: (rank, what went wrong) of the lowest rank that reports a failure, the same on every rank."""
    reports: list[str | None] = [None] * dist.get_world_size()
    with warnings.catch_warnings():  # all_gather_object calls a collective that torch has renamed
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_gather_object(reports, failure)
    return next(((rank, report) for rank, report in enumerate(reports) if report), None)


def _raise_if_any_failed(failure: str | None, save_dir: str, tag_dir: str) -> None:
    """Collective: if any rank's write failed, remove the partial tag and raise the same error on every rank."""
    first = _first_failure(failure)
    if first is None:
        return
    if dist.get_rank() == 0:
        _remove_tag(tag_dir)
    dist.barrier()
    free_mb = shutil.disk_usage(save_dir).free / 2**20 if os.path.isdir(save_dir) else float("nan")
    previous = latest_tag(save_dir)
    raise CheckpointWriteError(
        f"could not write checkpoint {tag_dir} (rank {first[0]}: {first[1]}; {free_mb:.0f} MB free there), so it "
        f"was removed and the run stopped. The newest complete checkpoint, "
        f"{os.path.join(save_dir, previous) if previous else 'none'}, is intact: free space or fix the error, then "
        f"run the same command again to resume from it"
    )


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
            _remove_tag(os.path.join(save_dir, t))


def resolve(save_dir: str, resume: str) -> tuple[str, str] | None:
    """Collective: map `train.resume` to (save_dir, tag), or None for a fresh start.

    Rank 0 chooses and broadcasts, so every rank loads the same tag even where a shared filesystem shows the
    nodes different views for a moment (a tag completed just before a crash, say).
    """
    choice: list = [None]
    if dist.get_rank() == 0:
        try:
            choice[0] = ("ok", _resolve(save_dir, resume))
        except ConfigError as exc:
            choice[0] = ("error", str(exc))
    dist.broadcast_object_list(choice, src=0)
    outcome, value = choice[0]
    if outcome == "error":
        raise ConfigError(value)
    return None if value is None else tuple(value)


def _resolve(save_dir: str, resume: str) -> tuple[str, str] | None:
    if resume == "never":
        return None
    if resume == "auto":
        tag = latest_tag(save_dir, warn=True)
        return (save_dir, tag) if tag else None
    path = os.path.normpath(resume)
    if _TAG.match(os.path.basename(path)) and os.path.exists(os.path.join(path, COMPLETE)):
        return os.path.dirname(path), os.path.basename(path)
    tag = latest_tag(path)
    if tag is None:
        raise ConfigError(f"train.resume: no complete checkpoint in {resume}")
    return path, tag


def training_state(save_dir: str, tag: str) -> dict:
    """Our training state of a complete checkpoint (step, epoch, counters, world size, data origin)."""
    with open(os.path.join(save_dir, tag, "training_state.json"), encoding="utf-8") as f:
        return json.load(f)


# The subdirectory of a tag holding its DeepSpeed universal form, made on demand for a resume at another size.
UNIVERSAL = "universal"


def prepare_load(save_dir: str, tag: str, saved: dict, *, world_size: int, zero_stage: int) -> bool:
    """Collective, before the engine is built: whether `tag` must be loaded as a DeepSpeed universal checkpoint.

    At the world size it was written with, or under ZeRO-0 (whose optimizer state is not partitioned), a
    checkpoint loads as it is. Otherwise its ZeRO optimizer shards fit no rank of the new world: rank 0 converts
    it once into `<tag>/universal` (DeepSpeed's ds_to_universal: full fp32 weights and Adam moments per
    parameter, re-partitioned on load), under a temporary name that is renamed when done, so an interrupted
    conversion is simply done again.
    """
    tag_dir = os.path.join(save_dir, tag)
    if saved["zero_stage"] != zero_stage:
        raise ConfigError(
            f"train.zero_stage: checkpoint {tag_dir} was written under ZeRO-{saved['zero_stage']}; resume it with "
            f"train.zero_stage={saved['zero_stage']}"
        )
    if saved["world_size"] == world_size or zero_stage == 0:
        return False
    target = os.path.join(tag_dir, UNIVERSAL)
    failure = None
    if dist.get_rank() == 0 and not os.path.isdir(target):
        print(
            f"distil-scale: {tag} was written by {saved['world_size']} rank(s); converting it to a universal "
            f"checkpoint for {world_size}",
            flush=True,
        )
        try:
            _convert_to_universal(tag_dir, target)
        except Exception as exc:
            failure = _describe(exc)
    first = _first_failure(failure)
    if first is not None:
        raise CheckpointWriteError(f"could not convert {tag_dir} to a universal checkpoint: {first[1]}")
    return True


def _convert_to_universal(tag_dir: str, target: str) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = f"{target}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=tag_dir,
        output_folder=tmp,
        num_extract_workers=1,  # in this process: no pool forked from a trainer with a process group up
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # the version marker it wants; our checkpoints hold everything else
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its step-by-step narration
        ds_to_universal(args)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tag_dir, "latest_universal"))  # names the temporary folder; nothing reads it
    os.replace(tmp, target)


def load(engine, save_dir: str, tag: str, *, universal: bool = False, restore_rng: bool = True) -> None:
    """Restore engine (weights, optimizer, scheduler) and, with `restore_rng`, this rank's RNG (our training
    state is `training_state`). `universal`: load `<tag>/universal` (see prepare_load)."""
    if universal:
        weight_decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
        engine.load_checkpoint(os.path.join(save_dir, tag), tag=UNIVERSAL)
        _repair_universal_load(engine, weight_decay)
    else:
        engine.load_checkpoint(save_dir, tag=tag)
    if restore_rng:
        set_rng_state(torch.load(os.path.join(save_dir, tag, f"rng_rank{dist.get_rank()}.pt"), weights_only=False))


def _repair_universal_load(engine, weight_decay: list[float]) -> None:
    """Undo two slips of DeepSpeed's universal load under ZeRO-3 (0.19): every param group gets group 0's
    settings (the no-decay group would decay), and all sub-groups share one Adam `step` tensor (each optimizer
    step would count once per sub-group). Harmless elsewhere."""
    for group, decay in zip(engine.optimizer.param_groups, weight_decay, strict=True):
        group["weight_decay"] = decay
    for flat in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []):
        state = engine.optimizer.optimizer.state.get(flat, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load_data(save_dir: str, tag: str, state: dict, *, num_samples: int) -> tuple[DataOrigin, DataPosition]:
    """(the origin of the checkpoint's data plan, its position); the split must still have `num_samples`."""
    tag_dir = os.path.join(save_dir, tag)
    position = DataPosition.load(os.path.join(tag_dir, "data_position.npz"))
    if position.num_samples != num_samples:
        raise ConfigError(
            f"data.shards: checkpoint {tag_dir} was trained on a train split of {position.num_samples} samples, "
            f"the configured one has {num_samples}; resume with the data it was trained on, or start afresh "
            f"(a new run.output_dir, or train.resume=never)"
        )
    started = DataPosition.load(os.path.join(tag_dir, "data_origin.npz"))
    return DataOrigin(state["data_origin"]["step"], state["data_origin"]["plan"], started), position
