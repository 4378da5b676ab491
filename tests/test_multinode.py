"""Two nodes, one job: one `deepspeed --no_ssh --node_rank i` launcher per node and a two-host hostfile, as on a
cluster without ssh between nodes. They train, checkpoint, resume and export together: first with both "nodes"
on this machine's loopback, then in two network namespaces joined by a veth pair, each node with its own
address, so that anything that reaches the other node through 127.0.0.1 or the machine's hostname fails."""

import json
import shlex
import shutil
import subprocess

import pytest
from test_distributed import DEEPSPEED, ENV, _free_port, _train_args, _wait_all

pytestmark = pytest.mark.slow  # see pyproject.toml: left out of `make test-fast`

HOSTFILE = "node-a slots=1\nnode-b slots=1\n"
ADDRESSES = ("10.77.0.1", "10.77.0.2")  # node-a, node-b on the veth pair


def _node_command(tmp_path, node_rank: int, master_addr: str, port: int, *overrides: str) -> list[str]:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    return [
        DEEPSPEED,
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        str(node_rank),
        "--master_addr",
        master_addr,
        "--master_port",
        str(port),
        *_train_args(
            tmp_path / "run", tmp_path / "inputs", "--data.audit=true", "--checkpoint.every_steps=2", *overrides
        ),
    ]


def _check_logs(logs: list[str], returncodes: list[int]) -> None:
    for node, (log, rc) in enumerate(zip(logs, returncodes, strict=True)):
        assert rc == 0, f"node {node} exited {rc}:\n{log[-4000:]}"
    assert "node_rank=1" in logs[1] and "dist_world_size=2" in logs[1]
    # Rank 0 (on node-a) speaks for the job; node-b's launcher started rank 1 and it printed nothing of its own.
    assert "distil-scale: 2 rank(s)" in logs[0]
    assert "distil-scale:" not in logs[1].replace("distil-scale: error", "")


def _check_run(tmp_path, *, steps: int) -> None:
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    latest = out / "checkpoints" / f"step{steps:08d}"
    assert (latest / "COMPLETE").exists()
    assert (latest / "rng_rank0.pt").exists() and (latest / "rng_rank1.pt").exists()
    state = json.loads((latest / "training_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == steps
    keys = [{}, {}]  # rank -> step -> the samples it trained on (a step that ends an epoch has two audit rows)
    for rank in (0, 1):
        for line in (out / "audit" / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            keys[rank].setdefault(row["step"], set()).update(row["keys"])
    assert sorted(keys[0]) == sorted(keys[1]) == list(range(1, steps + 1))
    for step in keys[0]:  # the two nodes trained on different samples in every step
        assert keys[0][step] and keys[1][step] and not keys[0][step] & keys[1][step]
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(out / "export"), local_files_only=True)
    assert type(model).__name__ == "DistilBertForMaskedLM"


def _loopback_job(tmp_path, *overrides: str) -> list[str]:
    port = _free_port()
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as f:  # files, not pipes: a full pipe would stall one node and the job with it
            cmd = _node_command(tmp_path, i, "127.0.0.1", port, *overrides)
            procs.append(subprocess.Popen(cmd, cwd=str(tmp_path), env=ENV, stdout=f, stderr=subprocess.STDOUT))
    returncodes = _wait_all(procs)
    texts = [log.read_text() for log in logs]
    _check_logs(texts, returncodes)
    return texts


def test_two_node_launchers_train_checkpoint_resume_and_export(tmp_path):
    _loopback_job(tmp_path, "--train.max_steps=4")
    _check_run(tmp_path, steps=4)
    logs = _loopback_job(tmp_path, "--train.max_steps=6")
    assert "resuming from" in logs[0] and "step00000004" in logs[0]
    _check_run(tmp_path, steps=6)


# Runs inside a new user + network namespace (root there): node-a here, node-b in a further network namespace
# that receives the other end of the veth pair. $1 $2: node-a's and node-b's commands, shell-quoted.
_TWO_NAMESPACES = """
set -eu
ip link set lo up
ip link add veth-a type veth peer name veth-b
ip addr add {a}/24 dev veth-a
ip link set veth-a up
unshare --net sh -c '
    touch ns-ready
    until ip link show veth-b >/dev/null 2>&1; do sleep 0.05; done
    ip link set lo up && ip addr add {b}/24 dev veth-b && ip link set veth-b up
    GLOO_SOCKET_IFNAME=veth-b exec sh -c "$0" > node1.log 2>&1' "$2" &
node_b=$!
until [ -e ns-ready ]; do sleep 0.05; done
ip link set veth-b netns "$node_b"
GLOO_SOCKET_IFNAME=veth-a sh -c "$1" > node0.log 2>&1 &
node_a=$!
rc_a=0; rc_b=0
wait "$node_a" || rc_a=$?
wait "$node_b" || rc_b=$?
echo "$rc_a $rc_b" > returncodes
"""


def _namespaces_unavailable() -> str | None:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return "needs the unshare and ip commands"
    probe = "ip link add veth-a type veth peer name veth-b && unshare --net true"
    try:
        proc = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", probe],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"network namespaces cannot be created here ({err})"
    if proc.returncode != 0:
        return f"network namespaces cannot be created here: {(proc.stderr or proc.stdout).strip()[:200]}"
    return None


def _namespaced_job(tmp_path, *overrides: str) -> list[str]:
    port = _free_port()
    commands = [shlex.join(_node_command(tmp_path, i, ADDRESSES[0], port, *overrides)) for i in (0, 1)]
    for name in ("ns-ready", "returncodes"):
        (tmp_path / name).unlink(missing_ok=True)
    script = _TWO_NAMESPACES.format(a=ADDRESSES[0], b=ADDRESSES[1])
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", script, "sh", *commands],
        cwd=str(tmp_path),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    returncodes = [int(x) for x in (tmp_path / "returncodes").read_text().split()]
    texts = [(tmp_path / f"node{i}.log").read_text() for i in (0, 1)]
    _check_logs(texts, returncodes)
    return texts


def test_two_nodes_in_separate_network_namespaces(tmp_path):
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    logs = _namespaced_job(tmp_path, "--train.max_steps=2")
    assert f"--master_addr={ADDRESSES[0]}" in logs[1]
    _check_run(tmp_path, steps=2)
    logs = _namespaced_job(tmp_path, "--train.max_steps=4")
    assert "resuming from" in logs[0]
    _check_run(tmp_path, steps=4)
