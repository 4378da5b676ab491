"""Process group, devices and precision, and the DeepSpeed config generated from our typed Config.

The DeepSpeed JSON is never written by hand: `deepspeed_config` derives it from the run config (one source of
truth), then merges the `deepspeed:` passthrough section last for expert keys.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import torch

from distil_scale.config import Config, ConfigError
from kernels.contract import DTYPES


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # The group small CPU tensors reduce over (stop signals, the data position): None is the default group under
    # gloo; next to NCCL it is a gloo side group, made once here since making a group is itself collective.
    cpu_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_accelerator() -> None:
    """DeepSpeed picks its accelerator at import time: choose the CPU one when no CUDA device is present."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def init_distributed() -> Placement:
    """Join (or create) the process group; works under deepspeed, torchrun, srun and plain python (one process)."""
    select_accelerator()
    import deepspeed

    from distil_scale.launch_env import apply_launch_env

    apply_launch_env()  # a task srun started directly: RANK & co. from SLURM's variables
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = "29500"
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    if not on_gpu:
        _unlink_shm_buffer(rank)
    if on_gpu:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    cpu_group = torch.distributed.new_group(backend="gloo") if on_gpu else None
    return Placement(rank=rank, world_size=world, local_rank=local_rank, device=device, cpu_group=cpu_group)


def _unlink_shm_buffer(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer, which DeepSpeed never removes.

    When every rank is on one host, DeepSpeed's CPU backend gives each rank a 66 MB shared-memory file in
    /dev/shm and maps every other rank's; left behind, they fill a CPU machine's memory launch after launch.
    Every rank has mapped all of them once `deepspeed.init_distributed` has returned everywhere (the barrier), and
    a mapping outlives its file's name.
    """
    torch.distributed.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    with contextlib.suppress(OSError):
        os.unlink(os.path.join("/dev/shm", name))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" means bf16 on GPU (the recipe's fp16 without loss-scaling trouble) and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def accumulation_steps(cfg: Config, world_size: int) -> int:
    per_pass = cfg.train.micro_batch_size * world_size
    if cfg.train.sequences_per_step % per_pass:
        raise ConfigError(
            f"train.sequences_per_step: {cfg.train.sequences_per_step} is not a multiple of micro_batch_size "
            f"{cfg.train.micro_batch_size} x world size {world_size}"
        )
    return cfg.train.sequences_per_step // per_pass


def warmup_steps(cfg: Config) -> int:
    return int(cfg.optim.warmup_fraction * cfg.train.max_steps)


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def deepspeed_config(cfg: Config, *, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config of the student engine: batch geometry, AdamW, warmup + linear decay, ZeRO, precision."""
    precision = resolve_dtype(cfg.train.precision, device)
    if device.type == "cpu" and precision == torch.float16:
        raise ConfigError("train.precision: fp16 is not supported on CPU (use fp32 or bf16)")
    ds = {
        "train_batch_size": cfg.train.sequences_per_step,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.peak_lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
                # DeepSpeed's fused Adam is a CUDA kernel; on CPU use torch's AdamW.
                "torch_adam": device.type != "cuda",
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": cfg.optim.peak_lr,
                "warmup_num_steps": max(1, warmup_steps(cfg)),
                "total_num_steps": cfg.train.max_steps,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": precision == torch.bfloat16},
        "fp16": {"enabled": precision == torch.float16},
        # We print our own progress line; silence DeepSpeed's periodic one.
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, copy.deepcopy(cfg.deepspeed))


def teacher_deepspeed_config(cfg: Config, *, world_size: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config of a partitioned teacher: ZeRO-3 inference (no optimizer), optionally CPU-offloaded.

    The batch keys only satisfy DeepSpeed's checks (the teacher never steps); the `deepspeed:` passthrough is
    the student's and does not apply here.
    """
    zero: dict = {"stage": 3}
    if cfg.teacher.offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": cfg.train.sequences_per_step,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, world_size),
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def partition_teacher(teacher: torch.nn.Module, cfg: Config, placement: Placement):
    """The teacher as a ZeRO-3 inference engine: each rank keeps 1/world of every weight (on the accelerator, or
    in CPU memory with `teacher.offload`) and gathers a layer's weights only while the layer runs.

    `teacher` is the full model loaded on the CPU (the student was initialised from it). A same-architecture
    shell is built under zero.Init, so no device ever holds the whole teacher, then filled one parameter at a
    time from rank 0's copy; every rank must call this, and later call the engine equally often (each forward
    gathers layer by layer over all ranks).
    """
    import deepspeed
    from transformers import AutoModelForMaskedLM
    from transformers.initialization import no_init_weights

    dtype = next(teacher.parameters()).dtype
    ds_config = teacher_deepspeed_config(cfg, world_size=placement.world_size, dtype=dtype)
    # The partitions' dtype comes from the config's bf16 / fp16 flags: an explicit `dtype=` is ignored on
    # accelerators without fp16 (DeepSpeed 0.19 then picks bf16, the CPU included). mem_efficient_linear would
    # replace torch.nn.functional.linear process-wide, the student's included.
    with deepspeed.zero.Init(
        config_dict_or_path=ds_config, remote_device="cpu" if cfg.teacher.offload else None, mem_efficient_linear=False
    ):
        # No random init: it would index into empty partitions, and every weight is overwritten below anyway.
        with no_init_weights():
            shell = AutoModelForMaskedLM.from_config(teacher.config, dtype=dtype)
        shell.tie_weights()  # init_weights, skipped above, is also what ties the projection to the embeddings
    if next(shell.parameters()).dtype != dtype:
        raise RuntimeError(f"the partitioned teacher was built in {next(shell.parameters()).dtype}, not {dtype}")
    source = teacher.state_dict()
    for name, param in shell.named_parameters():  # tied weights are listed once
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if placement.is_main:
                param.data.copy_(source[name])
    buffers = dict(teacher.named_buffers())
    for name, buffer in shell.named_buffers():
        buffer.data = buffers[name].to(placement.device)
    shell.requires_grad_(False)
    shell.eval()
    engine, _, _, _ = deepspeed.initialize(model=shell, config=ds_config)
    engine.eval()
    return engine


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and normalisation weights (the BERT recipe), for training and
    fine-tuning alike.

    The rule is the parameter's shape, not its name: every 1-d parameter is a bias or a norm's scale in every
    family we build (LayerNorm, RMSNorm, bias-free norms), whatever the family calls it, while a name test misses
    norms not called "norm" (BERT's "LayerNorm" only matches after lower-casing; some families say "ln").
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, cfg: Config, placement: Placement, *, load_universal: bool = False):
    """Wrap the student in a DeepSpeed engine; returns (engine, ds_config). `load_universal`: the engine will
    load a universal checkpoint (a resume at another world size; see checkpoint.prepare_load)."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size=placement.world_size, device=placement.device)
    if load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config
    )
    return engine, ds_config
