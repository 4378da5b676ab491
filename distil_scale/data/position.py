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

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist


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
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, num_samples=self.num_samples, start_epoch=self.start_epoch, **arrays)
        os.replace(tmp, path)

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
