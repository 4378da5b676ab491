"""The data position: what a run trained on, merged over ranks, saved bit-packed, re-split on an elastic resume."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from distil_scale.data.position import DataPosition


def test_mark_records_samples_per_epoch_and_ignores_fillers():
    position = DataPosition(10, start_epoch=1)
    position.mark(1, [3, -1, 4])
    position.mark(2, [0])
    position.mark(0, [5])  # an epoch before start_epoch is finished: nothing to record
    position.mark(2, [-1])
    assert sorted(position.consumed) == [1, 2]
    assert np.flatnonzero(position.consumed[1]).tolist() == [3, 4]
    assert np.flatnonzero(position.consumed[2]).tolist() == [0]


def test_save_and_load_round_trip_bit_packed(tmp_path):
    position = DataPosition(13, start_epoch=4)  # 13 bits: packing pads the last byte, loading must cut it off
    position.mark(4, [0, 7, 8, 12])
    position.mark(5, [1])
    path = str(tmp_path / "data_position.npz")
    position.save(path)
    loaded = DataPosition.load(path)
    assert (loaded.num_samples, loaded.start_epoch) == (13, 4)
    assert {e: m.tolist() for e, m in loaded.consumed.items()} == {e: m.tolist() for e, m in position.consumed.items()}
    assert os.listdir(tmp_path) == ["data_position.npz"]  # no temporary file left behind
    big = DataPosition(80_000)
    big.mark(0, range(0, 80_000, 3))
    big.save(path)
    assert os.path.getsize(path) < 80_000 / 8 + 2_000  # one bit per sample


def _agree_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        position = DataPosition(6, start_epoch=2)
        # Rank 0 finishes its half of epoch 2; rank 1 finishes its half and has begun epoch 3.
        if rank == 0:
            position.mark(2, [0, 1, 2])
        else:
            position.mark(2, [3, 4, 5])
            position.mark(3, [4])
        position.agree()
        position.save(os.path.join(out_dir, f"rank{rank}.npz"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_agree_merges_ranks_and_drops_finished_epochs(tmp_path):
    mp.spawn(_agree_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        position = DataPosition.load(str(tmp_path / f"rank{rank}.npz"))
        # Epoch 2 is finished once both halves are merged; epoch 3 carries rank 1's sample on every rank.
        assert position.start_epoch == 3
        assert {e: np.flatnonzero(m).tolist() for e, m in position.consumed.items()} == {3: [4]}
