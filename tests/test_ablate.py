"""`distil-scale ablate` end to end on the debug config, a few steps per variant, in a real subprocess."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_distributed import ENV, ROOT, _free_port

from distil_scale.ablate import PAPER_DELTAS, VARIANTS

pytestmark = pytest.mark.slow  # see pyproject.toml: left out of `make test-fast`


def test_ablation_trains_five_variants_and_writes_the_table(tmp_path):
    inputs, out = tmp_path / "inputs", tmp_path / "ablation"
    cmd = [sys.executable, "-m", "distil_scale.cli", "ablate", "--config", os.path.join(ROOT, "configs", "debug.yaml")]
    cmd += ["--steps", "3", "--out", str(out), "--json", f"--run.output_dir={tmp_path / 'run'}"]
    cmd += [
        f"--data.shards={inputs}/shards",
        f"--data.tokenizer={inputs}/tokenizer",
        f"--teacher.path={inputs}/teacher",
    ]
    cmd += [f"--teacher.init_config={ROOT}/configs/models/tiny-bert.json", "--data.embedded_docs=400"]
    cmd += ["--data.samples_per_shard=60", "--train.sequences_per_step=8", "--train.micro_batch_size=4"]
    cmd += ["--log.tensorboard=false", "--checkpoint.every_steps=100"]
    env = dict(ENV, MASTER_PORT=str(_free_port()))
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "ablation.json").read_text())
    assert list(results["variants"]) == list(VARIANTS) and results["steps"] == 3
    assert (out / "ablation.png").stat().st_size > 0
    rows = results["variants"]
    assert rows["triple"]["delta_points"] == 0
    for name, row in rows.items():
        assert 0 <= row["mlm_accuracy"] <= 1
        expected = 100 * (row["mlm_accuracy"] - rows["triple"]["mlm_accuracy"])
        assert abs(row["delta_points"] - expected) < 1e-9
        assert row["paper_delta_glue_points"] == PAPER_DELTAS.get(name, 0.0)
        assert f"{row['mlm_accuracy']:.4f}" in proc.stdout  # the printed table
        assert json.loads((out / name / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    # Each variant trained what its name says: the resolved config of each run.
    configs = {name: yaml.safe_load((out / name / "config.yaml").read_text()) for name in VARIANTS}
    assert configs["no_kd"]["loss"]["alpha_kd"] == 0 and configs["triple"]["loss"]["alpha_kd"] == 5.0
    assert configs["no_cos"]["loss"]["alpha_cos"] == 0 and configs["no_mlm"]["loss"]["alpha_mlm"] == 0
    assert configs["random_init"]["student"]["init"] == "random" and configs["triple"]["student"]["init"] == "teacher"
    # And the training losses show it: a term with weight 0 is not computed at all.
    metrics = {n: [json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()] for n in VARIANTS}
    for name, term in (("no_kd", "kd"), ("no_cos", "cos"), ("no_mlm", "mlm")):
        assert all(r[term] == 0 for r in metrics[name]) and all(r[term] > 0 for r in metrics["triple"]), name

    # A second run reuses every finished variant.
    again = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("reusing") == len(VARIANTS), again.stdout[-2000:]
