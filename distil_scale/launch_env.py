"""The process-group variables for a task that SLURM started: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.

`deepspeed`, `torchrun` and `python -m torch.distributed.run` set these for every process they start. A task that
`srun` starts directly (`srun python cluster/launch.py ...`, one task per GPU) has only SLURM's variables, which
`resolve_launch_env` maps:

    SLURM_PROCID                                               -> RANK
    SLURM_LOCALID                                              -> LOCAL_RANK
    SLURM_STEP_NUM_TASKS, else SLURM_NTASKS                    -> WORLD_SIZE
    first host of SLURM_STEP_NODELIST, else SLURM_NODELIST,
        else SLURM_JOB_NODELIST                                -> MASTER_ADDR
    SLURM_JOB_ID                                               -> MASTER_PORT = 20000 + job_id % 12000

Precedence: a launcher's RANK always wins. When RANK is set (deepspeed, torchrun, or the `deepspeed` launcher run
once per node under srun, whose children still carry srun's SLURM_PROCID) nothing is mapped. Under srun, a
variable that is already set (say MASTER_ADDR exported by the batch script) is never overridden; only the missing
ones are filled in. Task 0 runs on the first node of the step in SLURM's block and cyclic distributions, hence
MASTER_ADDR. The port is derived from the job id so that two jobs sharing a node do not collide; it stays below
32768, where Linux's default ephemeral port range begins. Without SLURM_JOB_ID the caller's default applies.

SLURM's compressed hostlist syntax, parsed here in pure Python (scontrol may not exist on a compute node):
    "node[01-04,07],gpu-a[1-2]"  -> node01 node02 node03 node04 node07 gpu-a1 gpu-a2
    "rack[1-2]-node[01-02]"      -> rack1-node01 rack1-node02 rack2-node01 rack2-node02
Commas inside brackets separate ranges, outside them hosts; a range keeps the zero padding of its lower bound
("08-10" -> 08 09 10, "8-10" -> 8 9 10).
"""

from __future__ import annotations

import itertools
import os
import re
import warnings
from collections.abc import Iterator, Mapping, MutableMapping

from distil_scale.config import ConfigError

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
PORT_BASE, PORT_SPAN = 20000, 12000

_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_LITERAL = re.compile(r"[\w.-]*")

# A bracket group: (low, high, width) ranges, in order. A host name: literal text and bracket groups, in order.
_Ranges = list[tuple[int, int, int]]


def _split_hosts(nodelist: str) -> list[str]:
    """Split at the commas outside brackets; reject nested, unclosed or stray brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            if depth:
                raise ValueError("nested '['")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ValueError("']' without '['")
            depth = 0
        elif ch == "," and not depth:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError("unclosed '['")
    items.append(nodelist[start:])
    if any(not item for item in items):
        raise ValueError("empty host name")
    return items


def _parse_ranges(body: str) -> _Ranges:
    ranges = []
    for part in body.split(","):
        match = _RANGE.fullmatch(part)
        if match is None:
            raise ValueError(f"bad range {part!r} (expected N or N-M)")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"range {part!r} runs backwards")
        ranges.append((int(low), int(high), len(low)))
    return ranges


def _parse_host(item: str) -> list[str | _Ranges]:
    parts: list[str | _Ranges] = []
    pos = 0
    for match in [*_BRACKET.finditer(item), None]:
        literal = item[pos : match.start() if match else len(item)]
        if not _LITERAL.fullmatch(literal):
            raise ValueError(f"unexpected character in {literal!r}")
        parts.append(literal)
        if match:
            parts.append(_parse_ranges(match.group(1)))
            pos = match.end()
    return parts


def _values(ranges: _Ranges) -> Iterator[str]:
    for low, high, width in ranges:
        yield from (f"{n:0{width}d}" for n in range(low, high + 1))


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a SLURM hostlist, in SLURM's order (later bracket groups vary fastest). ValueError if malformed."""
    hosts = []
    for item in _split_hosts(nodelist.strip()):
        parts = [[p] if isinstance(p, str) else list(_values(p)) for p in _parse_host(item)]
        hosts.extend("".join(combo) for combo in itertools.product(*parts))
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist, without expanding the rest. ValueError if malformed."""
    items = _split_hosts(nodelist.strip())
    for item in items[1:]:
        _parse_host(item)  # the whole list must parse, not just its head
    return "".join(p if isinstance(p, str) else next(_values(p)) for p in _parse_host(items[0]))


def job_port(job_id: int) -> int:
    """A MASTER_PORT that differs between jobs sharing a node (unless their ids are a multiple of 12000 apart)."""
    return PORT_BASE + job_id % PORT_SPAN


def _int(environ: Mapping[str, str], name: str, *, minimum: int = 0) -> int:
    value = environ.get(name)
    if value is None:
        raise ConfigError(
            f"{name}: not set although SLURM_PROCID is; start the trainer with srun, or set RANK, LOCAL_RANK, "
            f"WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself"
        )
    # Digits only: int() would also take "1_000" or " +5 ".
    if not re.fullmatch(r"[0-9]+", value) or int(value) < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _master_addr(environ: Mapping[str, str]) -> str:
    name = next((n for n in NODELIST_VARS if n in environ), None)
    if name is None:
        raise ConfigError(
            "SLURM_NODELIST: not set although SLURM_PROCID is; set MASTER_ADDR to the host of task 0 instead"
        )
    try:
        return first_host(environ[name])
    except ValueError as err:
        raise ConfigError(f"{name}: cannot parse the hostlist {environ[name]!r} ({err}); set MASTER_ADDR") from None


def resolve_launch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The launch variables to set for a task that srun started; {} under any launcher that sets RANK.

    Never returns a variable that `environ` already has. Raises ConfigError (one line naming the variable) when a
    SLURM variable the mapping needs is missing or malformed.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    rank = _int(environ, "SLURM_PROCID")
    tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    world_size = _int(environ, tasks, minimum=1)
    if rank >= world_size:
        raise ConfigError(f"SLURM_PROCID: {rank} is not below {tasks}={world_size}")
    if world_size > 1 and "SLURM_STEP_ID" not in environ:
        # The batch script itself has SLURM_PROCID=0 and the allocation's task count, but it is one process:
        # the group would wait for ranks that never start.
        warnings.warn(
            f"SLURM_PROCID is set but SLURM_STEP_ID is not: this looks like the batch script, not an srun task, "
            f"and the process group will wait for {world_size} ranks; start the trainer with srun",
            stacklevel=2,
        )
    wanted = {"RANK": str(rank), "LOCAL_RANK": str(_int(environ, "SLURM_LOCALID")), "WORLD_SIZE": str(world_size)}
    if "MASTER_ADDR" not in environ:
        wanted["MASTER_ADDR"] = _master_addr(environ)
    if "MASTER_PORT" not in environ and "SLURM_JOB_ID" in environ:
        wanted["MASTER_PORT"] = str(job_port(_int(environ, "SLURM_JOB_ID")))
    return {key: value for key, value in wanted.items() if key not in environ}


def apply_launch_env(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set what `resolve_launch_env` returns in `environ` (the process environment by default); returns it."""
    applied = resolve_launch_env(environ)
    environ.update(applied)
    return applied
