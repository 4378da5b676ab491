"""The DataLoader around a BatchStream: worker processes, batches sent as numpy arrays, clean shutdown."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from distil_scale.data.stream import BatchStream


class _ArrayBatch:
    """A batch on its way from a DataLoader worker: the stream's batch with numpy arrays in place of its tensors.

    A numpy array pickles as plain bytes, while a tensor goes through torch's shared-memory handover (a shared
    file, a descriptor sent over a socket, a mapping on each side), which costs more than making the batch.
    The arrays share memory with the tensors they replace, and `tensors()` turns them back (again without
    copying) in the trainer's process. With pinned memory the DataLoader's pin thread calls `pin_memory()`,
    which does both there.
    """

    def __init__(self, batch: dict):
        self.fields = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def tensors(self) -> dict:
        """The batch as the stream made it: the same keys, tensors of the same dtypes and shapes."""
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in self.fields.items()}

    def pin_memory(self, device: str | None = None) -> dict:
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.tensors().items()}


class _ArrayStream(IterableDataset):
    """What make_loader's DataLoader iterates: `stream`'s batches as `_ArrayBatch`es."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self) -> Iterator[_ArrayBatch]:
        return map(_ArrayBatch, self.stream)


def _as_is(batch: _ArrayBatch) -> _ArrayBatch:
    """The DataLoader's collate_fn: without it, batch_size=None would convert numpy arrays to tensors in the
    worker, undoing the point of `_ArrayBatch`."""
    return batch


class _TensorBatches(Iterator[dict]):
    """An iterator of make_loader's DataLoader: its batches with tensors again, as BatchStream yields them."""

    def __init__(self, loader_iter: Iterator):
        self.loader_iter = loader_iter  # the DataLoader's own iterator (see close_loader)

    def __next__(self) -> dict:
        batch = next(self.loader_iter)
        return batch.tensors() if isinstance(batch, _ArrayBatch) else batch  # pinned ones come as tensors already


class BatchLoader(DataLoader):
    """make_loader's DataLoader: iterating it gives BatchStream's batches (tensors), however they travelled."""

    def __iter__(self) -> Iterator[dict]:
        return _TensorBatches(super().__iter__())


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 to the trainer, which checkpoints before it stops them."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def close_loader(batches: Iterator[dict]) -> None:
    """Stop the workers of a DataLoader iterator now, not at interpreter exit.

    They ignore SIGTERM (see _ignore_stop_signals), so the terminate() that multiprocessing sends its children at
    exit would not stop them and its join would wait forever: a run that ends in an exception must close them.
    """
    batches = getattr(batches, "loader_iter", batches)  # make_loader's iterators wrap the DataLoader's
    shutdown = getattr(batches, "_shutdown_workers", None)  # a single-process iterator has no workers
    if shutdown is not None:
        shutdown()


def make_loader(
    stream: BatchStream, *, num_workers: int, prefetch_factor: int = 2, multiprocessing_context: str | None = None
) -> BatchLoader:
    """A DataLoader over `stream` (batch_size=None: the stream batches itself) that yields the stream's batches.

    Workers send their batches as numpy arrays (see `_ArrayBatch`); the loader's iterator turns them back into
    tensors in this process, so a consumer sees exactly what iterating `stream` gives.

    Workers start by `forkserver` unless told otherwise: forking a trainer that already runs CUDA, NCCL or
    tokenizer threads can deadlock a child. The forkserver preloads the stream's module (torch, numpy, the reader),
    so a worker starts in milliseconds plus whatever else the entry script imports (workers are persistent,
    so that is paid once per run). As with any non-fork start method, the entry script needs an
    `if __name__ == "__main__":` guard.
    """
    kwargs: dict = {}
    if num_workers > 0:
        context = multiprocessing_context or "forkserver"
        if context == "forkserver":
            preload = ["__main__", type(stream).__module__]  # the stream's module imports the reader and masking
            torch.multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
        kwargs = {
            "prefetch_factor": prefetch_factor,
            # The stream never ends on its own, so persistence only matters for finite (max_epochs) streams that
            # are iterated again; it saves restarting the workers there.
            "persistent_workers": True,
            "multiprocessing_context": context,
            "worker_init_fn": _ignore_stop_signals,
        }
    # Its own generator: a DataLoader iterator draws a base seed, and drawing it from the global RNG would shift
    # the dropout stream of a resumed run against an uninterrupted one. (The stream seeds itself from coordinates.)
    generator = torch.Generator().manual_seed(stream.seed)
    return BatchLoader(
        _ArrayStream(stream),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        **kwargs,
    )
