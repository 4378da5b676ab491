"""Checkpoints on their own: a checkpoint written by an older version resumes exactly; damage is found and named."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = os.path.join(ROOT, "tests", "fixtures", "checkpoint-60bcab8")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_PORT="29517")


def _run(workdir, *overrides: str) -> subprocess.CompletedProcess:
    """One process of the fixture's run, on the fixture's inputs."""
    if not (workdir / "in").exists():
        shutil.copytree(os.path.join(OLD, "in"), workdir / "in")
        shutil.copy(os.path.join(OLD, "teacher.json"), workdir / "teacher.json")
    cmd = [
        sys.executable, os.path.join(ROOT, "cluster", "launch.py"),
        "--config", os.path.join(ROOT, "configs", "debug.yaml"),
        "--data.shards=in/shards", "--data.tokenizer=in/tokenizer", "--teacher.path=in/teacher",
        "--teacher.init_config=teacher.json", "--data.embedded_docs=120", "--data.samples_per_shard=40",
        "--data.tokenizer_vocab_size=500", "--data.max_seq_length=64", "--train.sequences_per_step=8",
        "--train.micro_batch_size=4", "--train.max_steps=4", "--checkpoint.every_steps=2", "--log.every_steps=1",
        "--log.tensorboard=false", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=workdir, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_a_checkpoint_written_by_an_older_version_resumes_exactly(tmp_path):
    """The fixture predates manifests: it resumes (unverified, said once) and steps 3-4 equal the old run's."""
    fixture = tmp_path / "old" / "step00000002"
    shutil.copytree(os.path.join(OLD, "step00000002"), fixture)
    proc = _run(tmp_path, "--run.output_dir=run", f"--train.resume={fixture}")
    assert "resuming from" in proc.stdout
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(OLD, "expected_metrics.jsonl"), encoding="utf-8") as f:
        expected = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [3, 4]
    for row, want in zip(rows, expected):
        for key in ("loss", "kd", "mlm", "cos", "grad_norm", "tokens", "samples", "lr"):
            assert row[key] == want[key], (row["step"], key, row[key], want[key])
