"""SLURM -> torch.distributed variables: hostlist parsing, the mapping, precedence, errors, and a real gloo group."""

import json
import os
import subprocess
import sys
import warnings

import pytest
from test_distributed import _free_port

from distil_scale.config import ConfigError
from distil_scale.launch_env import (
    PORT_BASE,
    PORT_SPAN,
    apply_launch_env,
    expand_hostlist,
    first_host,
    job_port,
    resolve_launch_env,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("127.0.0.1", ["127.0.0.1"]),
        ("gpu1.cluster.local", ["gpu1.cluster.local"]),
        ("a,b,c", ["a", "b", "c"]),
        ("node[01-04,07],gpu-a[1-2]", ["node01", "node02", "node03", "node04", "node07", "gpu-a1", "gpu-a2"]),
        ("node[08-11]", ["node08", "node09", "node10", "node11"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("n[7]", ["n7"]),
        ("n[007]", ["n007"]),
        ("n[3,1]", ["n3", "n1"]),  # SLURM's order is kept, not sorted
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("node[01-02].ib", ["node01.ib", "node02.ib"]),
        ("[1-2]x", ["1x", "2x"]),
        ("gpu_a[1-2],login", ["gpu_a1", "gpu_a2", "login"]),
        ("x9[0-1]y,z[10-11]", ["x90y", "x91y", "z10", "z11"]),
        (" node[1-2]\n", ["node1", "node2"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


def test_first_host_does_not_expand_huge_ranges():
    assert first_host("n[000000-999999],m[1-999999]") == "n000000"


@pytest.mark.parametrize(
    "nodelist",
    ["", "node[", "node]", "node[1-2", "node[[1-2]]", "node[]", "node[a-b]", "node[3-1]", "node[1-2-3]",
     "node[1,]", "a,,b", "a,", "node 1", "a,b[2-1]"],
)  # fmt: skip
def test_malformed_hostlists_raise(nodelist):
    with pytest.raises(ValueError):
        expand_hostlist(nodelist)
    with pytest.raises(ValueError):
        first_host(nodelist)


def _slurm_task5_of_8_on_2_nodes() -> dict[str, str]:
    """What srun sets for task 5 of `srun -N 2 --ntasks-per-node=4` (task 5 = the second task of the second node)."""
    return {
        "SLURM_JOB_ID": "734021",
        "SLURM_JOBID": "734021",
        "SLURM_JOB_NAME": "distil",
        "SLURM_JOB_NODELIST": "gpu-a[07-08]",
        "SLURM_NODELIST": "gpu-a[07-08]",
        "SLURM_STEP_NODELIST": "gpu-a[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_NTASKS": "8",
        "SLURM_NPROCS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_GTIDS": "4,5,6,7",
        "SLURMD_NODENAME": "gpu-a08",
        "SLURM_CPUS_PER_TASK": "16",
        "SLURM_JOB_CPUS_PER_NODE": "64(x2)",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        "PATH": "/usr/bin",
    }


def test_srun_task_is_mapped():
    env = _slurm_task5_of_8_on_2_nodes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = resolve_launch_env(env)
    assert got == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu-a07",
        "MASTER_PORT": str(20000 + 734021 % 12000),
    }


def test_step_variables_win_over_job_ones():
    # `srun -N 1 -n 2` inside a 2-node allocation of 8 tasks: the step is smaller and starts on the second node.
    env = dict(
        _slurm_task5_of_8_on_2_nodes(),
        SLURM_PROCID="1",
        SLURM_STEP_NUM_TASKS="2",
        SLURM_STEP_NODELIST="gpu-a08",
    )
    got = resolve_launch_env(env)
    assert (got["RANK"], got["WORLD_SIZE"], got["MASTER_ADDR"]) == ("1", "2", "gpu-a08")


def test_job_nodelist_is_the_last_resort():
    env = _slurm_task5_of_8_on_2_nodes()
    del env["SLURM_STEP_NODELIST"], env["SLURM_NODELIST"]
    env["SLURM_JOB_NODELIST"] = "rack[3-4]-n[09-10]"
    assert resolve_launch_env(env)["MASTER_ADDR"] == "rack3-n09"


@pytest.mark.parametrize("launcher_vars", [{"RANK": "3"}, {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "16"}])
def test_a_launchers_rank_wins(launcher_vars):
    # The `deepspeed` launcher (or torchrun) run once per node under srun: its children keep srun's SLURM_PROCID.
    env = dict(_slurm_task5_of_8_on_2_nodes(), **launcher_vars)
    assert resolve_launch_env(env) == {}


def test_variables_already_set_are_kept():
    env = dict(_slurm_task5_of_8_on_2_nodes(), MASTER_ADDR="10.0.0.7", MASTER_PORT="29555")
    got = resolve_launch_env(env)
    assert got == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    # With MASTER_ADDR set, neither a missing nor a broken nodelist matters.
    for name in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST"):
        env[name] = "gpu-a[07-"
    assert resolve_launch_env(env) == got


def test_nothing_outside_slurm_or_in_its_shell():
    assert resolve_launch_env({}) == {}
    assert resolve_launch_env({"PATH": "/usr/bin"}) == {}
    # salloc's shell has the allocation but no SLURM_PROCID: one plain process.
    assert resolve_launch_env({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "8", "SLURM_NODELIST": "n[1-2]"}) == {}


def test_port_from_job_id():
    assert job_port(0) == 20000
    assert job_port(734021) == 20000 + 734021 % 12000
    ports = {job_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 32768 for p in ports)  # consecutive jobs never share a port
    env = _slurm_task5_of_8_on_2_nodes()
    del env["SLURM_JOB_ID"]
    assert "MASTER_PORT" not in resolve_launch_env(env)  # no job id: the caller's default


def test_batch_script_itself_warns():
    # The batch shell has SLURM_PROCID=0 and the allocation's task count but no step: one process, not eight.
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8", "SLURM_NODELIST": "n1"}
    with pytest.warns(UserWarning, match="SLURM_STEP_ID"):
        assert resolve_launch_env(env)["WORLD_SIZE"] == "8"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_launch_env(dict(env, SLURM_NTASKS="1"))["WORLD_SIZE"] == "1"


@pytest.mark.parametrize(
    "change, line",
    [
        ({"SLURM_NTASKS": None, "SLURM_STEP_NUM_TASKS": None}, r"^SLURM_NTASKS: not set although SLURM_PROCID is"),
        ({"SLURM_LOCALID": None}, r"^SLURM_LOCALID: not set"),
        ({"SLURM_PROCID": "five"}, r"^SLURM_PROCID: expected an integer >= 0, got 'five'"),
        ({"SLURM_PROCID": "-1"}, r"^SLURM_PROCID: expected an integer"),
        ({"SLURM_PROCID": "8"}, r"^SLURM_PROCID: 8 is not below SLURM_STEP_NUM_TASKS=8"),
        ({"SLURM_STEP_NUM_TASKS": "0"}, r"^SLURM_STEP_NUM_TASKS: expected an integer >= 1"),
        ({"SLURM_JOB_ID": "12_3"}, r"^SLURM_JOB_ID: expected an integer"),
        ({"SLURM_STEP_NODELIST": "gpu-a[07-"}, r"^SLURM_STEP_NODELIST: cannot parse the hostlist 'gpu-a\[07-'"),
        (
            {"SLURM_STEP_NODELIST": None, "SLURM_NODELIST": None, "SLURM_JOB_NODELIST": None},
            r"^SLURM_NODELIST: not set although SLURM_PROCID is; set MASTER_ADDR",
        ),
    ],
)
def test_errors_name_the_variable(change, line):
    env = _slurm_task5_of_8_on_2_nodes()
    for key, value in change.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    with pytest.raises(ConfigError, match=line) as info:
        resolve_launch_env(env)
    assert "\n" not in str(info.value)


def test_apply_updates_the_mapping_and_returns_what_it_set():
    env = dict(_slurm_task5_of_8_on_2_nodes(), MASTER_PORT="29555")
    applied = apply_launch_env(env)
    assert applied == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu-a07"}
    assert env["RANK"] == "5" and env["MASTER_PORT"] == "29555"
    assert apply_launch_env(env) == {}  # now RANK is set: a second call changes nothing


_WORKER = """
import datetime, json
import torch, torch.distributed as dist
from distil_scale.launch_env import apply_launch_env
applied = apply_launch_env()
dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
print(json.dumps({"applied": applied, "rank": dist.get_rank(), "world": dist.get_world_size(), "sum": value.item()}))
dist.destroy_process_group()
"""


def _free_job_port() -> int:
    """A free port that job_port can produce (the job id below then maps to it)."""
    return _free_port(PORT_BASE, PORT_BASE + PORT_SPAN)


@pytest.mark.slow
def test_srun_like_tasks_form_a_working_group():
    """Two processes with only SLURM's variables (as `srun -n 2` gives them) join one gloo group."""
    port = _free_job_port()
    job_id = 5 * 12000 + port - 20000
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k not in (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    base.update(
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        SLURM_JOB_ID=str(job_id),
        SLURM_STEP_ID="0",
        SLURM_NTASKS="2",
        SLURM_STEP_NUM_TASKS="2",
        SLURM_NODELIST="localhost",
        SLURM_STEP_NODELIST="localhost",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            env=dict(base, SLURM_PROCID=str(task), SLURM_LOCALID=str(task)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for task in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for task, result in enumerate(results):
        assert result["rank"] == task and result["world"] == 2 and result["sum"] == 3.0
        assert result["applied"] == {
            "RANK": str(task),
            "LOCAL_RANK": str(task),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "localhost",
            "MASTER_PORT": str(port),
        }
