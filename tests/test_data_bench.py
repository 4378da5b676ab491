"""distil_scale.bench end to end at a tiny size: the data table's rows, the step table's rows and its CSV."""

import csv
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distil_scale import bench

pytestmark = pytest.mark.slow  # see pyproject.toml: left out of `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def test_data_bench_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "--workdir", str(tmp_path), "--docs", "300", "--seq-len", "64", "--micro-batch-size", "4"]
    args += ["--shuffle-buffer", "16", "--group-batches", "2", "--batches", "6", "--workers", "0", "1"]
    results = bench.main(args)
    out = capsys.readouterr().out
    assert out.startswith("command: python -m distil_scale.bench data --workdir") and "\nmachine: CPU " in out
    assert [(r.seq_len, r.mode, r.workers, r.batches) for r in results] == [
        (64, "stream", 0, 6),
        (64, "loader", 0, 6),
        (64, "loader", 1, 6),
    ]
    for r in results:
        assert 0 < r.real_tokens <= r.padded_tokens, r
        assert r.padded_tokens % 8 == 0 and r.padded_tokens <= 6 * 4 * 64, r  # padded to a multiple of 8, <= 64
        assert r.seconds > 0 and r.cpu_seconds > 0 and r.per_core > 0, r
    assert results[2].cpu_seconds > 0  # the worker's CPU time is read from /proc
    table = [line.split() for line in out.splitlines() if line.lstrip().startswith("64 ")]
    assert [row[1:4] for row in table] == [["stream", "0", "6"], ["loader", "0", "6"], ["loader", "1", "6"]]
    assert all(row[-1] in ("yes", "no") for row in table)

    # A second run reuses the prepared dataset instead of preparing it again.
    manifest = os.path.join(bench.prepare_dataset(str(tmp_path), 64, docs=300), "dataset.json")
    before = os.stat(manifest).st_mtime_ns
    assert bench.prepare_dataset(str(tmp_path), 64, docs=300) == os.path.dirname(manifest)
    assert os.stat(manifest).st_mtime_ns == before


def test_step_bench_rows_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["step", "--teacher-config", str(ROOT / "configs/models/tiny-bert.json"), "--micro-batch-size", "2", "3"]
    args += ["--seq-len", "16", "--warmup", "1", "--iters", "1", "--peak-tflops", "0.5"]
    args += ["--out", str(tmp_path), "--tag", "test"]
    results = bench.main(args)
    out = capsys.readouterr().out
    assert "\nmachine: " in out and "MFU" in out
    assert [(r.impl, r.micro_batch_size, r.seq_len, r.status) for r in results] == [
        ("eager", 2, 16, "ok"),
        ("eager", 3, 16, "ok"),
        ("fused", 2, 16, "ok"),
        ("fused", 3, 16, "ok"),
    ]
    for r in results:
        assert r.step_ms > 0 and r.peak_mb > 0, r
        assert r.tokens_per_s == pytest.approx(r.micro_batch_size * 16 / (r.step_ms / 1e3))
        assert r.mfu == pytest.approx(r.model_tflops / 0.5)  # against the --peak-tflops override
    with open(tmp_path / "step-test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["impl"], row["micro_batch_size"], row["status"]) for row in rows] == [
        ("eager", "2", "ok"),
        ("eager", "3", "ok"),
        ("fused", "2", "ok"),
        ("fused", "3", "ok"),
    ]
    assert all(math.isfinite(float(row["model_tflops"])) for row in rows)


def test_step_bench_writes_no_csv_without_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["step", "--teacher-config", str(ROOT / "configs/models/tiny-bert.json"), "--impls", "eager"]
    args += ["--micro-batch-size", "1", "--seq-len", "8", "--warmup", "0", "--iters", "1"]
    (result,) = bench.main(args)
    assert result.status == "ok" and math.isnan(result.mfu)  # no peak on CPU: MFU n/a
    assert not any(tmp_path.rglob("*.csv"))


def test_bf16_weights_step_through_fp32_masters() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(7, 5).bfloat16())
    reference = torch.nn.Parameter(weight.detach().float())
    optimizer = bench._AdamW([weight], lr=1e-2)
    expected = torch.optim.AdamW([reference], lr=1e-2)
    for _ in range(3):
        (weight.float() ** 2).sum().backward()
        (reference**2).sum().backward()
        optimizer.step()
        expected.step()
        expected.zero_grad()
    assert weight.dtype == torch.bfloat16 and weight.grad is None
    torch.testing.assert_close(optimizer.master[0], reference, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weight, optimizer.master[0].bfloat16(), rtol=0, atol=0)  # the masters' bf16 copy


def test_gpu_search_doubles_until_out_of_memory(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # The GPU path cannot run here: fake the device, the models and the step, keep the search and the table.
    config = SimpleNamespace(num_hidden_layers=12, hidden_size=768, vocab_size=30522, n_layers=6)
    models = (SimpleNamespace(config=config), SimpleNamespace(config=config), None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(bench, "build_step_models", lambda *a, **k: models)

    def fake_case(models, impl, size, seq_len, args, device):
        fits = size <= (32 if impl == "eager" else 128)
        return bench.StepResult(impl, size, seq_len, device.type, "bfloat16", "ok" if fits else "OOM", step_ms=1.0)

    monkeypatch.setattr(bench, "run_step_case", fake_case)
    results = bench.main(["step"])
    sizes = [(r.impl, r.micro_batch_size, r.seq_len, r.status) for r in results]
    assert sizes == [("eager", s, 512, "ok") for s in (8, 16, 32)] + [("eager", 64, 512, "OOM")] + [
        ("fused", s, 512, "ok") for s in (8, 16, 32, 64, 128)
    ] + [("fused", 256, 512, "OOM")]
    assert "machine: CPU" in capsys.readouterr().out


def test_step_bench_with_activation_checkpointing(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["step", "--teacher-config", str(ROOT / "configs/models/tiny-bert.json"), "--micro-batch-size", "2"]
    args += ["--seq-len", "16", "--warmup", "1", "--iters", "1", "--impls", "fused", "--activation-checkpointing"]
    (result,) = bench.main(args)
    assert result.status == "ok" and result.step_ms > 0
    assert "backward with activation checkpointing" in capsys.readouterr().out
    _, student, _ = bench.build_step_models(
        str(ROOT / "configs/models/tiny-bert.json"), torch.device("cpu"), torch.float32, activation_checkpointing=True
    )
    assert student.is_activation_checkpointing


def test_a_failing_step_row_is_recorded_and_the_next_rows_run(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    real = bench._time_steps

    def flaky(models, impl, batch, **kw):
        if impl == "eager":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return real(models, impl, batch, **kw)

    monkeypatch.setattr(bench, "_time_steps", flaky)
    args = ["step", "--teacher-config", str(ROOT / "configs/models/tiny-bert.json"), "--micro-batch-size", "1"]
    results = bench.main([*args, "--seq-len", "8", "--warmup", "0", "--iters", "1"])
    assert [(r.impl, r.status) for r in results] == [("eager", "error"), ("fused", "ok")]
    assert results[0].note == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert math.isnan(results[0].tokens_per_s) and results[1].tokens_per_s > 0
    assert "eager micro-batch 1: error, RuntimeError: CUDA error" in capsys.readouterr().out


def test_step_csv_is_written_after_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped part way (a time limit) keeps the rows it measured."""
    config = SimpleNamespace(num_hidden_layers=2, hidden_size=64, vocab_size=100, n_layers=1)
    monkeypatch.setattr(bench, "build_step_models", lambda *a, **k: (SimpleNamespace(config=config),) * 2 + (None,))
    calls = []

    def case(models, impl, size, seq_len, args, device):
        calls.append(size)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a stop looks like from here
        return bench.StepResult(impl, size, seq_len, device.type, "float32", step_ms=1.0)

    monkeypatch.setattr(bench, "run_step_case", case)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["step", "--impls", "fused", "--micro-batch-size", "2", "4", "--out", str(tmp_path), "--tag", "t"])
    with open(tmp_path / "step-t.csv", newline="") as f:
        assert [(r["impl"], r["micro_batch_size"]) for r in csv.DictReader(f)] == [("fused", "2")]
