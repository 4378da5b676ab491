"""Real processes through the real `deepspeed` launcher on gloo: train, checkpoint, resume, export."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # see pyproject.toml: left out of `make test-fast`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSPEED = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")


def _free_port(low: int | None = None, high: int | None = None) -> int:
    """A port nothing listens on, drawn from [low, high): by default from the 16K ports below the kernel's
    ephemeral range. A port from bind(("", 0)) is an ephemeral one: before the master binds it, another run's
    connection may take it as its source port, and the master then fails with EADDRINUSE while the other rank
    waits for it.
    """
    if high is None:
        try:
            with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
                high = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            high = 32768
    low = max(1024, high - 16384) if low is None else low
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {low}-{high - 1}")


def _wait_all(procs: list[subprocess.Popen], timeout: float = 900, grace: float = 60) -> list[int]:
    """Exit codes of the processes of one job. Once one has failed, the others get `grace` seconds and are then
    stopped: a rank whose peer died can wait for it until the collective's own timeout."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + grace)
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.terminate()  # the deepspeed launcher passes SIGTERM on to its ranks
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return [p.wait() for p in procs]


def _command(out_dir, inputs, *overrides: str, num_procs: int = 2) -> list[str]:
    return [
        DEEPSPEED,
        "--num_gpus",
        str(num_procs),
        "--master_port",
        str(_free_port()),
        *_train_args(out_dir, inputs, *overrides),
    ]


def _train_args(out_dir, inputs, *overrides: str) -> list[str]:
    """cluster/launch.py and its arguments: the debug config, shrunk, with its inputs made in `inputs`."""
    return [
        os.path.join(ROOT, "cluster", "launch.py"),
        "--config",
        os.path.join(ROOT, "configs", "debug.yaml"),
        f"--run.output_dir={out_dir}",
        f"--data.shards={inputs}/shards",
        f"--data.tokenizer={inputs}/tokenizer",
        f"--teacher.path={inputs}/teacher",
        f"--teacher.init_config={ROOT}/configs/models/tiny-bert.json",
        "--data.embedded_docs=400",
        "--data.samples_per_shard=60",
        "--train.sequences_per_step=16",
        "--train.micro_batch_size=4",
        "--log.every_steps=1",
        "--log.tensorboard=false",
        *overrides,
    ]


ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _launch(out_dir, inputs, *overrides: str, num_procs: int = 2) -> subprocess.CompletedProcess:
    cmd = _command(out_dir, inputs, *overrides, num_procs=num_procs)
    proc = subprocess.run(cmd, cwd=str(out_dir.parent), env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("zero_stage", [3])
def test_two_ranks_train_checkpoint_resume_export(tmp_path, zero_stage):
    out, inputs = tmp_path / "run", tmp_path / "inputs"
    common = [
        f"--train.zero_stage={zero_stage}",
        "--loss.impl=fused",  # the BERT family's run of tests/test_distributed_families.py
        "--checkpoint.every_steps=2",
        "--checkpoint.keep_last=2",
        "--data.audit=true",
    ]
    _launch(out, inputs, *common, "--train.max_steps=3")
    tags = sorted(os.listdir(out / "checkpoints"))
    assert [t for t in tags if t.startswith("step")] == ["step00000002", "step00000003"]
    assert all((out / "checkpoints" / t / "COMPLETE").exists() for t in ("step00000002", "step00000003"))
    assert (out / "checkpoints" / "step00000003" / "rng_rank1.pt").exists()

    proc = _launch(out, inputs, *common, "--train.max_steps=5")
    assert "resuming from" in proc.stdout and "step00000003" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("samples", "tokens", "loss", "kd", "mlm", "cos", "lr", "grad_norm", "tokens_per_s", "elapsed_s"):
        assert all(key in r for r in rows), key
    assert rows[-1]["samples"] == 5 * 16
    assert all(r["tokens"] > 0 and r["loss"] > 0 for r in rows)
    assert rows[4]["tokens"] > rows[2]["tokens"]
    # keep_last=2: step 2 pruned once steps 4 and 5 were complete.
    assert sorted(t for t in os.listdir(out / "checkpoints") if t.startswith("step")) == [
        "step00000004",
        "step00000005",
    ]

    # The audit says what each step trained on: 8 sequences per rank, no sample twice, the resumed run
    # rewrote steps 4-5 after the checkpoint of step 3 without duplicating rows.
    audits = [[json.loads(x) for x in (out / "audit" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [[a["step"] for a in rows] for rows in audits] == [[1, 2, 3, 4, 5]] * 2
    keys = [k for rows in audits for a in rows for k in a["keys"]]
    assert all(len(a["keys"]) == 8 for rows in audits for a in rows)
    assert len(keys) == len(set(keys)) == 80

    from transformers import AutoModelForMaskedLM, pipeline

    export = out / "export"
    model = AutoModelForMaskedLM.from_pretrained(str(export), local_files_only=True)
    assert type(model).__name__ == "DistilBertForMaskedLM"
    assert model.config.n_layers == 2
    fill = pipeline("fill-mask", model=str(export), tokenizer=str(export), device="cpu")
    predictions = fill(f"the cat sat on the {fill.tokenizer.mask_token} .")
    assert len(predictions) == 5 and all("token_str" in p for p in predictions)


def test_fused_loss_under_zero3_matches_eager_stage0(tmp_path):
    """ZeRO-3 partitions the (tied) LM-head weight: the fused head loss must still train it exactly as stage 0."""
    import torch
    from safetensors.torch import load_file

    inputs = tmp_path / "inputs"
    runs = {
        "eager0": ["--loss.impl=eager", "--train.zero_stage=0"],
        "fused3": ["--loss.impl=fused", "--train.zero_stage=3"],
    }
    for name, overrides in runs.items():
        _launch(tmp_path / name, inputs, *overrides, "--train.max_steps=3", "--checkpoint.every_steps=100")
    rows = {
        name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in runs
    }
    for eager, fused in zip(rows["eager0"], rows["fused3"], strict=True):
        for key in ("loss", "kd", "mlm", "cos"):  # (stage 0 reports no grad norm)
            assert fused[key] == pytest.approx(eager[key], rel=1e-4), (eager["step"], key)
    weights = {name: load_file(str(tmp_path / name / "export" / "model.safetensors")) for name in runs}
    embedding = "distilbert.embeddings.word_embeddings.weight"  # tied to the vocabulary projection
    initial = load_file(str(inputs / "teacher" / "model.safetensors"))["bert.embeddings.word_embeddings.weight"]
    moved = weights["eager0"][embedding] - initial
    assert moved.abs().max() > 0
    torch.testing.assert_close(weights["fused3"][embedding] - initial, moved, rtol=1e-3, atol=1e-6)
    for key, value in weights["eager0"].items():
        torch.testing.assert_close(weights["fused3"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def _kill_after_checkpoint(out, inputs, step: int, *overrides: str, num_procs: int = 2) -> str:
    """Run until checkpoint `step` is complete, then SIGKILL the launcher and every rank, wherever they are
    (usually a step or two further on). Returns the run's output."""
    out.mkdir(exist_ok=True)
    log = out.parent / f"{out.name}-until-{step}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            _command(out, inputs, *overrides, num_procs=num_procs), cwd=str(out.parent), env=ENV,
            start_new_session=True, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
        marker = out / "checkpoints" / f"step{step:08d}" / "COMPLETE"
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = log.read_text()
    assert marker.exists(), output[-4000:]
    return output


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Kill every process mid-run, plant a half-written checkpoint, resume: same losses, same weights, bit for bit."""
    import torch
    from safetensors.torch import load_file

    inputs = tmp_path / "inputs"
    common = ["--train.max_steps=24", "--checkpoint.every_steps=4", "--train.zero_stage=2", "--data.audit=true"]
    _launch(tmp_path / "straight", inputs, *common)

    out = tmp_path / "killed"
    _kill_after_checkpoint(out, inputs, 8, *common)
    assert not (out / "export").exists(), "the run was not killed mid-way"
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert 8 <= len(rows) < 24
    # A checkpoint a crash interrupted: shards on disk, no COMPLETE marker. Resume must pass over it.
    shutil.copytree(out / "checkpoints" / "step00000008", out / "checkpoints" / "step00000012")
    (out / "checkpoints" / "step00000012" / "COMPLETE").unlink()

    resumed = _launch(out, inputs, *common)
    assert "step00000008" in resumed.stdout and "step00000012" in resumed.stdout + resumed.stderr
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == list(range(1, 25))
    for a, b in zip(straight, again, strict=True):
        for key in ("loss", "kd", "mlm", "cos", "lr", "grad_norm", "samples", "tokens", "epoch"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    for r in (0, 1):
        audit = f"audit/rank{r}.jsonl"
        assert (tmp_path / "straight" / audit).read_text() == (out / audit).read_text()
    weights = [load_file(str(d / "export" / "model.safetensors")) for d in (tmp_path / "straight", out)]
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key


def test_sigterm_checkpoints_the_current_step_and_resumes(tmp_path):
    """A preemption notice (SIGTERM to every process, as a scheduler sends it) saves the step reached, then stops."""
    inputs, out = tmp_path / "inputs", tmp_path / "run"
    out.mkdir()
    common = ["--train.max_steps=30", "--checkpoint.every_steps=1000"]
    proc = subprocess.Popen(
        _command(out, inputs, *common), cwd=str(tmp_path), env=ENV, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    tags = [t for t in os.listdir(out / "checkpoints") if t.startswith("step")]
    assert len(tags) == 1, output[-3000:]
    step = int(tags[0][4:])
    assert 3 <= step < 30 and (out / "checkpoints" / tags[0] / "COMPLETE").exists()
    assert "SIGTERM received: saved a checkpoint at step" in output
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert rows[-1]["step"] == step and not (out / "export").exists()

    resumed = _launch(out, inputs, *common)
    assert f"step{step:08d}" in resumed.stdout
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert (out / "export" / "model.safetensors").exists()


def test_nonfinite_loss_stops_the_run_and_leaves_finite_checkpoints(tmp_path):
    """A diverging run (absurd learning rate) stops after k non-finite steps; no checkpoint holds NaN weights."""
    from distil_scale.export import export_student

    inputs, out = tmp_path / "inputs", tmp_path / "run"
    out.mkdir()
    overrides = ["--train.max_steps=20", "--checkpoint.every_steps=1", "--checkpoint.keep_last=20"]
    overrides += ["--optim.peak_lr=1e30", "--optim.warmup_fraction=0", "--train.max_nonfinite_steps=2"]
    cmd = _command(out, inputs, *overrides, num_procs=1)
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "the loss was not finite for 2 steps in a row" in proc.stdout + proc.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] < 20 and rows[-1]["nonfinite_micro_batches"] > 0
    assert not (out / "export").exists()
    import torch
    from safetensors.torch import load_file

    export_student(str(out / "checkpoints"), str(tmp_path / "last_good"), tokenizer_dir=str(inputs / "tokenizer"))
    weights = load_file(str(tmp_path / "last_good" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def _can_mount_tmpfs() -> bool:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d; rmdir $d"
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a user + mount namespace (unshare -rm) for a small tmpfs")
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """The checkpoint directory is a real 64 MB filesystem, filled up after step 4: the step-8 save fails on the
    ranks, which agree, remove the partial tag and stop with a message; with space freed, the run resumes."""
    import shlex

    inputs, out = tmp_path / "inputs", tmp_path / "run"
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    common = ["--train.max_steps=12", "--checkpoint.every_steps=4", "--checkpoint.keep_last=3"]
    run = shlex.join(_command(out, inputs, *common))
    marker = checkpoints / "step00000004" / "COMPLETE"
    fill = f"while [ ! -e {marker} ]; do sleep 0.05; done; cat /dev/zero > {checkpoints}/fill"
    script = (
        f"mount -t tmpfs -o size=64m tmpfs {checkpoints} || exit 99\n"
        f"({fill}) 2>/dev/null &\n"
        f"{run} > {tmp_path}/first.log 2>&1; echo $? > {tmp_path}/first.rc\n"
        f"ls {checkpoints} > {tmp_path}/after.ls\n"
        f"rm -f {checkpoints}/fill\n"
        f"{run} > {tmp_path}/second.log 2>&1; echo $? > {tmp_path}/second.rc\n"
    )
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=str(tmp_path), env=ENV, timeout=900, check=True)
    first = (tmp_path / "first.log").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "1", first[-4000:]
    assert f"could not write checkpoint {checkpoints}/step00000008" in first, first[-4000:]
    assert f"{checkpoints}/step00000004, is intact" in first
    # The partial tag is gone, the previous one untouched; no rank hung (the launcher returned).
    listing = (tmp_path / "after.ls").read_text().split()
    assert "fill" in listing and [name for name in listing if name.startswith("step")] == ["step00000004"]
    second = (tmp_path / "second.log").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", second[-4000:]
    assert f"resuming from {checkpoints}/step00000004" in second
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert (out / "export" / "model.safetensors").exists()


def _audit_by_epoch(out) -> dict[int, list[str]]:
    """{epoch: every key the audit logs of all ranks list for it}."""
    by_epoch: dict[int, list[str]] = {}
    for log in sorted((out / "audit").iterdir()):
        for row in map(json.loads, log.read_text().splitlines()):
            by_epoch.setdefault(row["epoch"], []).extend(row["keys"])
    return by_epoch


def test_elastic_resume_2_then_1_then_2_ranks_trains_every_sample_once_per_epoch(tmp_path):
    """Crash at 2 ranks, resume on 1 (through the end of epoch 0), crash, resume on 2 (through the end of epoch 1):
    the optimizer state is carried (DeepSpeed universal checkpoints, made automatically) and the audit logs show
    every sample exactly once in each finished epoch and none twice in the unfinished one."""
    import torch

    from distil_scale.data.reader import read_shard
    from distil_scale.data.shards import read_manifest

    inputs, out = tmp_path / "inputs", tmp_path / "run"
    common = ["--train.max_steps=34", "--checkpoint.every_steps=6", "--checkpoint.keep_last=3"]
    common += ["--train.zero_stage=2", "--data.audit=true", "--data.embedded_docs=200"]
    _kill_after_checkpoint(out, inputs, 6, *common)
    one = _kill_after_checkpoint(out, inputs, 18, *common, num_procs=1)
    assert "written by 2 rank(s); converting it to a universal checkpoint for 1" in one, one[-4000:]
    assert "the data plan changed (world_size 2 -> 1)" in one
    two = _launch(out, inputs, *common).stdout
    assert "written by 1 rank(s); converting it to a universal checkpoint for 2" in two
    assert "resuming from" in two and "step00000018" in two

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 35))
    assert rows[-1]["epoch"] == 2 and (out / "export" / "model.safetensors").exists()
    # Rank 1's log: its steps of the first run up to the checkpoint (the crash's extra steps undone), then the
    # last run's. Rank 0 logged every step.
    steps = {r: sorted({json.loads(x)["step"] for x in (out / "audit" / f"rank{r}.jsonl").read_text().splitlines()})
             for r in (0, 1)}  # fmt: skip
    assert steps == {0: list(range(1, 35)), 1: list(range(1, 7)) + list(range(19, 35))}

    split = [key for url in read_manifest(str(inputs / "shards")).urls("train") for key, _ in read_shard(url)]
    by_epoch = _audit_by_epoch(out)
    assert sorted(by_epoch) == [0, 1, 2]
    for epoch in (0, 1):  # finished: every sample exactly once
        assert sorted(by_epoch[epoch]) == sorted(split), epoch
    assert 0 < len(by_epoch[2]) == len(set(by_epoch[2])) < len(split)

    # Adam's step count went on from the 2-rank run: the optimizer state came through the universal checkpoint.
    optim = torch.load(
        out / "checkpoints" / "step00000030" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False
    )
    adam = optim["optimizer_state_dict"]["base_optimizer_state"]["state"]
    assert {int(s["step"]) for s in adam.values()} == {30}


def _kill_during_a_save(out, inputs, *overrides: str) -> str | None:
    """Run with a checkpoint every step and SIGKILL everything the moment a checkpoint directory (past step 2, so
    that complete ones exist) has files but no COMPLETE marker; returns that tag if the kill landed before the
    marker, None if the save won the race."""
    out.mkdir(exist_ok=True)
    checkpoints = out / "checkpoints"
    proc = subprocess.Popen(
        _command(out, inputs, *overrides), cwd=str(out.parent), env=ENV, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline, caught = time.monotonic() + 600, None
    while caught is None and proc.poll() is None and time.monotonic() < deadline:
        tags = sorted(t for t in os.listdir(checkpoints) if t.startswith("step")) if checkpoints.exists() else []
        newest = checkpoints / tags[-1] if tags else None
        if newest and int(tags[-1][4:]) > 2 and any(newest.iterdir()) and not (newest / "COMPLETE").exists():
            caught = tags[-1]
        else:
            time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return caught if caught and not (checkpoints / caught / "COMPLETE").exists() else None


def test_sigkill_during_a_save_leaves_a_resumable_run(tmp_path):
    """Killed while the ranks are writing a checkpoint: resume passes over the partial one and finishes the run."""
    inputs, out = tmp_path / "inputs", tmp_path / "run"
    common = ["--train.max_steps=20", "--checkpoint.every_steps=1", "--checkpoint.keep_last=2", "--train.zero_stage=2"]
    partial = None
    for _ in range(3):  # a save takes tens of milliseconds: the kill can miss the window, then it tries again
        partial = _kill_during_a_save(out, inputs, *common)
        if partial:
            break
    assert partial, "never caught a save in progress"
    completed = int(partial[4:]) - 1
    assert (out / "checkpoints" / f"step{completed:08d}" / "COMPLETE").exists()
    resumed = _launch(out, inputs, *common)
    assert f"step{completed:08d}" in resumed.stdout and "ignoring incomplete checkpoint" in resumed.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert (out / "export" / "model.safetensors").exists()


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_partitioned_teacher_and_activation_checkpointing_give_the_same_losses(tmp_path):
    """A ZeRO-3 teacher (gathered layer by layer, or offloaded) computes what a replicated one does, and
    recomputing the student's layers in backward changes no number: every loss term and gradient norm is equal."""
    inputs = tmp_path / "inputs"
    pairs = {  # run -> (its overrides, the run it must equal)
        "replicated": (["--loss.impl=eager"], None),
        "partitioned": (["--loss.impl=eager", "--teacher.partition=true"], "replicated"),
        "checkpointed": (["--loss.impl=eager", "--train.activation_checkpointing=true"], "replicated"),
        "replicated_fused": (["--loss.impl=fused", "--train.zero_stage=3"], None),
        "offloaded_fused": (
            ["--loss.impl=fused", "--train.zero_stage=3", "--teacher.partition=true", "--teacher.offload=true"],
            "replicated_fused",
        ),
    }
    starts = {}
    for name, (overrides, _) in pairs.items():
        proc = _launch(tmp_path / name, inputs, *overrides, "--train.max_steps=3", "--checkpoint.every_steps=100")
        starts[name] = next(line for line in proc.stdout.splitlines() if "student params" in line)
    assert "teacher partitioned (ZeRO-3)" in starts["partitioned"]
    assert "teacher partitioned (ZeRO-3, offloaded to CPU)" in starts["offloaded_fused"]
    assert "activation checkpointing" in starts["checkpointed"] and "partitioned" not in starts["replicated"]
    for name, (_, reference) in pairs.items():
        if reference is None:
            continue
        got, want = _rows(tmp_path / name), _rows(tmp_path / reference)
        assert len(got) == len(want) == 3
        for g, w in zip(got, want, strict=True):
            for key in ("loss", "kd", "mlm", "cos", "grad_norm"):
                assert g[key] == w[key], (name, g["step"], key)
