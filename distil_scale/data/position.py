"""Where a run is in its data: which samples of which epochs it has trained on, and the plan it draws them by.

The stream's plan (distil_scale.data.stream) is a pure function of its shape: world size, workers, micro-batch
size, shuffle buffer, grouping and seed. A checkpoint stores two things about data:

  position  every sample trained on so far, per unfinished epoch (one bit per sample of the split), the union
            over ranks; epochs before `start_epoch` are finished.
  origin    the step the current plan started at, its shape, and the position it started from (a fresh run:
            step 0, nothing consumed).

A resume with the same shape rebuilds the plan from the origin and skips the batches made since, which replays
the interrupted run bit for bit. A resume with another shape (2 ranks -> 3, another micro-batch size) starts a
new plan at the checkpoint's step from its position: the unfinished epochs go on over their untrained samples
only, so no sample is repeated or skipped, whatever order the old ranks drew theirs in.

On disk (`data_position.npz`, `data_origin.npz` in a checkpoint tag) the masks are bit-packed: a split of 26M
samples costs 3.3 MB per unfinished epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from distil_scale import atomic
from distil_scale.config import ConfigError


@dataclass
class DataPosition:
    """The samples trained on in each unfinished epoch, as boolean masks over the split's sample ids."""

    num_samples: int
    start_epoch: int = 0
    consumed: dict[int, np.ndarray] = field(default_factory=dict)

    def mark(self, epoch: int, sample_ids) -> None:
        """Record a batch: `sample_ids` as the stream gives them (-1 for a filler row, which is not a sample)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        ids = ids[ids >= 0]
        if epoch < self.start_epoch or not len(ids):
            return
        if epoch not in self.consumed:
            self.consumed[epoch] = np.zeros(self.num_samples, dtype=bool)
        self.consumed[epoch][ids] = True

    def agree(self, group=None) -> None:
        """Collective: merge every rank's record (a union), then drop the epochs that are finished.

        Ranks may be in different epochs at a step boundary (a worker that starts the next epoch while another
        ends this one), so the epochs are agreed first. One all-reduce of one byte per sample per epoch.
        """
        last = torch.tensor([max(self.consumed, default=self.start_epoch)], dtype=torch.int64)
        dist.all_reduce(last, op=dist.ReduceOp.MAX, group=group)
        for epoch in range(self.start_epoch, int(last.item()) + 1):
            mask = self.consumed.get(epoch, np.zeros(self.num_samples, dtype=bool))
            merged = torch.from_numpy(mask.astype(np.uint8))
            dist.all_reduce(merged, op=dist.ReduceOp.MAX, group=group)
            self.consumed[epoch] = merged.numpy().astype(bool)
        self._normalise()

    def _normalise(self) -> None:
        while self.start_epoch in self.consumed and self.consumed[self.start_epoch].all():
            del self.consumed[self.start_epoch]
            self.start_epoch += 1
        self.consumed = {e: m for e, m in sorted(self.consumed.items()) if e >= self.start_epoch and m.any()}

    def copy(self) -> DataPosition:
        return DataPosition(self.num_samples, self.start_epoch, {e: m.copy() for e, m in self.consumed.items()})

    def save(self, path: str) -> None:
        """Write atomically (tmp + rename): a crash leaves the old file or the new one, never half of one."""
        arrays = {f"epoch{e}": np.packbits(m) for e, m in self.consumed.items()}
        with atomic.replacing(path, suffix=".npz") as tmp:
            np.savez(tmp, num_samples=self.num_samples, start_epoch=self.start_epoch, **arrays)

    @classmethod
    def load(cls, path: str) -> DataPosition:
        with np.load(path, allow_pickle=False) as f:
            num_samples, start_epoch = int(f["num_samples"]), int(f["start_epoch"])
            consumed = {
                int(name[len("epoch") :]): np.unpackbits(f[name], count=num_samples).astype(bool)
                for name in f.files
                if name.startswith("epoch")
            }
        return cls(num_samples, start_epoch, consumed)


@dataclass
class DataOrigin:
    """The step a stream plan started at, its shape (`plan`) and the position it started from."""

    step: int
    plan: dict
    position: DataPosition


class DataState:
    """Where this run is in its data, and the plan it draws by: the part of a checkpoint that is about data.

    `plan` is the shape of this run's stream (world size, workers, micro-batch size, shuffle, grouping, seed),
    `origin` the step, shape and position the current plan started from, `position` every sample trained on so
    far. After a resume with the same plan the stream replays the plan from its origin and skips
    `skip_batches(step, accum)` batches; with another plan, a new one starts at the resumed step from the saved
    position (the unfinished epochs are re-split over the samples not yet trained on).
    """

    def __init__(self, num_samples: int, plan: dict):
        self.plan = plan
        self.position = DataPosition(num_samples)
        self.origin = DataOrigin(0, plan, self.position.copy())
        self.resplit: str | None = None  # what changed, when a resume re-split the data (for the start line)

    def mark(self, epoch: int, sample_ids) -> None:
        self.position.mark(epoch, sample_ids)

    def agree(self, group=None) -> None:
        """Collective: every rank's record merged (before a save)."""
        self.position.agree(group)

    def skip_batches(self, step: int, accum: int) -> int:
        """Micro-batches this rank's stream made between the plan's origin and optimizer step `step`."""
        return (step - self.origin.step) * accum

    def state_dict(self) -> dict:
        return {
            "origin": {"step": self.origin.step, "plan": self.origin.plan},
            "origin_position": self.origin.position,
            "position": self.position,
        }

    def load_state_dict(self, state: dict, *, step: int, source: str) -> None:
        """Restore a checkpoint's data state (`source` names it in errors); `step` is the step it was saved at."""
        position = state["position"]
        if position.num_samples != self.position.num_samples:
            raise ConfigError(
                f"data.shards: checkpoint {source} was trained on a train split of {position.num_samples} samples, "
                f"the configured one has {self.position.num_samples}; resume with the data it was trained on, or "
                f"start afresh (a new run.output_dir, or train.resume=never)"
            )
        self.position = position
        self.origin = DataOrigin(state["origin"]["step"], state["origin"]["plan"], state["origin_position"])
        if self.origin.plan != self.plan:
            self.resplit = self._describe_resplit(self.origin.plan)
            self.origin = DataOrigin(step, self.plan, position.copy())

    def _describe_resplit(self, old: dict) -> str:
        changed = ", ".join(
            f"{key} {old.get(key)} -> {value}" for key, value in self.plan.items() if old.get(key) != value
        )
        left = ", ".join(
            f"epoch {epoch}: {self.position.num_samples - int(mask.sum())} of {self.position.num_samples}"
            for epoch, mask in self.position.consumed.items()
        )
        return (
            f"the data plan changed ({changed}); re-splitting from epoch {self.position.start_epoch} over the "
            f"samples not yet trained on ({left or 'a fresh epoch'})"
        )
