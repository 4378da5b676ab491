"""Checkpoints: the Checkpointer saves and restores everything a run needs to continue, and proves it intact.

The loop hands the Checkpointer its stateful parts (TrainState, DataState) and calls `load(engine)` once and
`save(step)` when due; resolving the tag, converting to DeepSpeed's universal form for another world size,
the RNG, keep-last-k and the COMPLETE marker stay in here. The schema of `<output_dir>/checkpoints/<tag>/`
(tag = `step00000100`), written in this one place:

  DeepSpeed's files     model states, optimizer / ZeRO shards per rank (`*pp_rank_<r>*`), scheduler; the client
                        state holds the training state again
  training_state.json   TrainState (step, epoch, samples, tokens, elapsed_s) + world_size, zero_stage and the
                        data plan's origin {step, plan}
  data_position.npz     DataState.position: the samples trained on in each unfinished epoch, union over ranks
  data_origin.npz       DataState.origin.position: the position the current data plan started from
  rng_rank<r>.pt        python / numpy / torch RNG states of rank r (dropout)
  model_config.json     the Hugging Face config of the student, so the export needs nothing else
  config.yaml           the resolved run config
  COMPLETE              written by rank 0, via tmp + rename, once every rank has written and fsynced its files:
                        only then does the tag count. Its content is the manifest (distil_scale.integrity): every
                        file above with its size and checksum. A plain-text marker is from before manifests.
  universal/            made on demand: the tag in DeepSpeed's universal form, for a resume at another size

DeepSpeed's own `latest` pointer is written before every rank has finished, so resume never trusts it: it takes
the newest tag whose marker exists and whose files verify, and names in one line each one it passes over.
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
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from distil_scale import atomic, integrity
from distil_scale.config import Config, ConfigError, save_config
from distil_scale.data.position import DataPosition, DataState
from kernels.measure import one_line

COMPLETE = "COMPLETE"
TRAINING_STATE = "training_state.json"
UNIVERSAL = "universal"
_TAG = re.compile(r"^step(\d{8})$")
# DeepSpeed names a rank's own files `..._pp_rank_<r>_...`; ours are rng_rank<r>.pt. The rest are rank 0's.
_PER_RANK_FILE = re.compile(r"(?:pp_rank_|rng_rank)(\d+)[._]")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


class CheckpointWriteError(RuntimeError):
    """A rank could not write its part of a checkpoint (a full disk, a quota, an I/O error): the run stops, the
    partial checkpoint is removed and the older ones are untouched."""


class Checkpointer:
    """Resume and save one run. Built before the engine (a resume at another world size changes how DeepSpeed
    must load: `universal`), then `load(engine)` once and `save(step)` when due; all three are collective."""

    def __init__(self, cfg: Config, placement, *, train, data: DataState):
        self.cfg, self.placement, self.train, self.data = cfg, placement, train, data
        self.save_dir = os.path.join(cfg.run.output_dir, "checkpoints")
        self.engine = None
        self.resumed = _choose(self.save_dir, cfg.train.resume)
        self._saved = _read_state(*self.resumed) if self.resumed else None
        self.universal = self.resumed is not None and _prepare_universal(
            *self.resumed, self._saved, world_size=placement.world_size, zero_stage=cfg.train.zero_stage
        )

    def load(self, engine) -> None:
        """Restore the engine (weights, optimizer, scheduler), the RNG, TrainState and DataState; or seed afresh."""
        self.engine = engine
        seed, rank = self.cfg.run.seed, self.placement.rank
        if self.resumed is None:
            torch.manual_seed(seed + 1 + rank)  # dropout differs across ranks; checkpoints carry each rank's RNG
            return
        save_dir, tag = self.resumed
        saved = self._saved
        same_world = saved["world_size"] == self.placement.world_size
        _load_engine(engine, save_dir, tag, universal=self.universal)
        self.train.load_state_dict(saved)
        if same_world:
            set_rng_state(torch.load(os.path.join(save_dir, tag, f"rng_rank{rank}.pt"), weights_only=False))
        else:  # the saved RNG states belong to other ranks: a fresh stream per (step, rank)
            torch.manual_seed(seed + 1 + rank + self.train.step * 7919)
        tag_dir = os.path.join(save_dir, tag)
        data = {
            "origin": saved["data_origin"],
            "origin_position": DataPosition.load(os.path.join(tag_dir, "data_origin.npz")),
            "position": DataPosition.load(os.path.join(tag_dir, "data_position.npz")),
        }
        self.data.load_state_dict(data, step=self.train.step, source=tag_dir)

    def save(self, step: int) -> Saved:
        """Write tag `step` on every rank, then its manifest as the COMPLETE marker; keep the newest k."""
        self.data.agree(self.placement.cpu_group)
        data = self.data.state_dict()
        state = dict(
            self.train.state_dict(),
            world_size=self.placement.world_size,
            zero_stage=self.engine.zero_optimization_stage(),
            data_origin=data["origin"],
        )
        files = {
            "data_position.npz": data["position"].save,
            "data_origin.npz": data["origin_position"].save,
            "model_config.json": self.engine.module.config.to_json_file,
            "config.yaml": lambda path: save_config(self.cfg, path),
            TRAINING_STATE: lambda path: atomic.write_text(path, json.dumps(state, indent=1), sync=True),
        }
        return _save(
            self.engine, self.save_dir, step=step, state=state, files=files, keep=self.cfg.checkpoint.keep_last
        )

    def latest(self) -> str | None:
        return latest_tag(self.save_dir)


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


# ------------------------------------------------------------------------------------------------------------- save


class Saved(NamedTuple):
    """What one save wrote: the tag, its size over all ranks, and the seconds it took (those spent checksumming
    the files for the manifest among them, on rank 0)."""

    tag: str
    bytes: int
    seconds: float
    checksum_seconds: float


def _save(engine, save_dir: str, *, step: int, state: dict, files: dict, keep: int) -> Saved:
    """Collective: every rank calls it. Returns once the tag is complete on every rank.

    `files` maps the names rank 0 writes to functions that write them. Every rank fsyncs and records what it
    wrote before rank 0 writes the marker, so a node that dies later cannot take part of a complete checkpoint
    with it. If any rank fails to write, every rank raises CheckpointWriteError (no rank is left waiting in a
    collective) and the partial tag is removed.
    """
    start = time.perf_counter()
    tag = tag_for(step)
    rank = dist.get_rank()
    tag_dir = os.path.join(save_dir, tag)
    # A failed write is kept as text: an exception object would tie this frame (and the data loader) to a cycle.
    failure = None
    if rank == 0:
        try:
            _remove_tag(tag_dir)  # left by an attempt that crashed, or a step saved again after an older resume
            os.makedirs(tag_dir)
        except Exception as exc:
            failure = one_line(exc)
    _raise_if_any_failed(failure, save_dir, tag_dir)
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state={"training_state": state}, save_latest=False)
    except Exception as exc:
        failure = one_line(exc)
        dist.barrier()  # DeepSpeed's save ends in a barrier, where the ranks that did write are waiting
    own: dict = {}
    if failure is None:
        try:
            torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank{rank}.pt"))
            if rank == 0:
                for name, write in files.items():
                    write(os.path.join(tag_dir, name))
            names = _own_files(tag_dir, rank, dist.get_world_size())
            _sync(tag_dir, names, directory=rank == 0)
            checksum_start = time.perf_counter()
            own = integrity.records(tag_dir, names)
            checksum_seconds = time.perf_counter() - checksum_start
        except Exception as exc:
            failure = one_line(exc)
    # Every rank's files are on disk before the marker makes the tag visible.
    _raise_if_any_failed(failure, save_dir, tag_dir)
    manifest = _gather_records(own)
    if rank == 0:
        try:
            atomic.write_text(os.path.join(tag_dir, COMPLETE), integrity.marker_text(step, manifest), sync=True)
        except Exception as exc:
            failure = one_line(exc)
    _raise_if_any_failed(failure, save_dir, tag_dir)
    if rank == 0:
        with contextlib.suppress(OSError):  # DeepSpeed's pointer, for its own tools; resume never reads it
            atomic.write_text(os.path.join(save_dir, "latest"), tag, sync=True)
        prune(save_dir, keep_last=keep)
    size = sum(record[0] for record in manifest.values())
    return Saved(tag, size, time.perf_counter() - start, checksum_seconds)


def _own_files(tag_dir: str, rank: int, world_size: int) -> list[str]:
    """The files of `tag_dir` this rank answers for: its per-rank files (by index modulo the world), and rank 0
    the shared ones. Subdirectories (a universal form) are not part of the tag's manifest."""
    names = []
    for name in sorted(os.listdir(tag_dir)):
        if name == COMPLETE or not os.path.isfile(os.path.join(tag_dir, name)):
            continue
        owner = _PER_RANK_FILE.search(name)
        if (int(owner.group(1)) % world_size if owner else 0) == rank:
            names.append(name)
    return names


def _sync(tag_dir: str, names: list[str], *, directory: bool) -> None:
    for name in names:
        _fsync(os.path.join(tag_dir, name))
    if directory:
        _fsync(tag_dir)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gather_records(own: dict) -> dict:
    """Collective: the union of every rank's file records."""
    parts: list = [None] * dist.get_world_size()
    with warnings.catch_warnings():  # all_gather_object calls a collective that torch has renamed
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_gather_object(parts, own)
    return {name: record for part in parts for name, record in part.items()}


def _remove_tag(tag_dir: str) -> None:
    """Delete a tag directory, its marker first: a crash midway must not leave a half-deleted tag looking complete."""
    marker = os.path.join(tag_dir, COMPLETE)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(tag_dir, ignore_errors=True)


def _first_failure(failure: str | None) -> tuple[int, str] | None:
    """Collective: (rank, what went wrong) of the lowest rank that reports a failure, the same on every rank."""
    reports: list[str | None] = [None] * dist.get_world_size()
    with warnings.catch_warnings():
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


# ----------------------------------------------------------------------------------------------------------- choose


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


def damage(tag_dir: str, *, rank: int = 0, world_size: int = 1) -> str | None:
    """What is wrong with a complete tag, in one line naming the file, or None; with a world of several ranks each
    checks its share of the files (every rank's call together covers the tag)."""
    files = integrity.manifest(os.path.join(tag_dir, COMPLETE))
    if files is None:
        return None  # written before checkpoints carried a manifest
    mine = {}
    for name, record in files.items():
        owner = _PER_RANK_FILE.search(name)
        if (int(owner.group(1)) % world_size if owner else 0) == rank:
            mine[name] = record
    return integrity.damage(tag_dir, mine)


def newest_intact(save_dir: str) -> tuple[str | None, list[str]]:
    """(the newest complete tag that verifies, or None; one line for each newer one that did not). One process."""
    passed = []
    for tag in reversed(complete_tags(save_dir)):
        problem = damage(os.path.join(save_dir, tag))
        if problem is None:
            return tag, passed
        passed.append(problem)
    return None, passed


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


def _choose(save_dir: str, resume: str) -> tuple[str, str] | None:
    """Collective: map `train.resume` to the (save_dir, tag) to resume from, or None for a fresh start.

    Rank 0 lists the candidates, newest first, and broadcasts them, so every rank loads the same tag even where a
    shared filesystem shows the nodes different views for a moment. Every rank verifies its share of each
    candidate's files; a damaged one is named in one line and the next older one is tried.
    """
    listing: list = [None]
    if dist.get_rank() == 0:
        try:
            listing[0] = ("ok", _candidates(save_dir, resume))
        except ConfigError as exc:
            listing[0] = ("error", str(exc))
    dist.broadcast_object_list(listing, src=0)
    outcome, value = listing[0]
    if outcome == "error":
        raise ConfigError(value)
    explicit, candidates = value
    for directory, tag in candidates:
        start = time.perf_counter()
        problem = damage(os.path.join(directory, tag), rank=dist.get_rank(), world_size=dist.get_world_size())
        first = _first_failure(problem)
        if first is None:
            if dist.get_rank() == 0:
                size = sum(r[0] for r in (integrity.manifest(os.path.join(directory, tag, COMPLETE)) or {}).values())
                print(
                    f"distil-scale: checkpoint {tag} verified: {size / 2**20:.0f} MB in "
                    f"{time.perf_counter() - start:.2f} s",
                    flush=True,
                )
            return directory, tag
        if explicit:
            raise ConfigError(f"train.resume: checkpoint {os.path.join(directory, tag)} is damaged: {first[1]}")
        if dist.get_rank() == 0:
            print(f"distil-scale: passing over a damaged checkpoint: {first[1]}", flush=True)
    if candidates:
        raise ConfigError(
            f"train.resume: every complete checkpoint in {candidates[0][0]} is damaged (see above); move them away "
            f"to start afresh, or point train.resume at an intact copy"
        )
    return None


def _candidates(save_dir: str, resume: str) -> tuple[bool, list[tuple[str, str]]]:
    """(whether one tag was named explicitly, the complete tags to try, newest first)."""
    if resume == "never":
        return False, []
    if resume == "auto":
        complete_tags(save_dir, warn=True)
        return False, [(save_dir, t) for t in reversed(complete_tags(save_dir))]
    path = os.path.normpath(resume)
    if _TAG.match(os.path.basename(path)) and os.path.exists(os.path.join(path, COMPLETE)):
        return True, [(os.path.dirname(path), os.path.basename(path))]
    tags = complete_tags(path)
    if not tags:
        raise ConfigError(f"train.resume: no complete checkpoint in {resume}")
    return False, [(path, t) for t in reversed(tags)]


# ------------------------------------------------------------------------------------------------------------- load


def _read_state(save_dir: str, tag: str) -> dict:
    """The training state a complete checkpoint was saved with (see the schema above)."""
    with open(os.path.join(save_dir, tag, TRAINING_STATE), encoding="utf-8") as f:
        return json.load(f)


def _prepare_universal(save_dir: str, tag: str, saved: dict, *, world_size: int, zero_stage: int) -> bool:
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
            failure = one_line(exc)
    first = _first_failure(failure)
    if first is not None:
        raise CheckpointWriteError(f"could not convert {tag_dir} to a universal checkpoint: {first[1]}")
    return True


def _convert_to_universal(tag_dir: str, target: str) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    with atomic.replacing_dir(target) as tmp:
        args = argparse.Namespace(
            input_folder=tag_dir,
            output_folder=str(tmp),
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


def _load_engine(engine, save_dir: str, tag: str, *, universal: bool) -> None:
    """Weights, optimizer and scheduler; `universal`: from `<tag>/universal` (see _prepare_universal)."""
    if universal:
        weight_decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
        engine.load_checkpoint(os.path.join(save_dir, tag), tag=UNIVERSAL)
        _repair_universal_load(engine, weight_decay)
    else:
        engine.load_checkpoint(save_dir, tag=tag)


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
