"""The training loop, top to bottom: batch -> teacher (no grad) -> student -> triple loss -> backward -> step.

`train(cfg)` is what `deepspeed cluster/launch.py --config X.yaml`, `python cluster/launch.py ...` and
`distil-scale train ...` run on every rank. `setup` builds the run and resumes it (the Checkpointer restores the
engine, TrainState and DataState); each step is `train_step`, then `log_interval` and `save` when due. Device
syncs happen at the log interval, plus one small flag per micro-batch (whether its loss was finite).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import transformers

from distil_scale.checkpoint import Checkpointer
from distil_scale.config import Config, save_config
from distil_scale.data.loader import close_loader
from distil_scale.data.position import DataState
from distil_scale.engine import Placement, build_engine, init_distributed, resolve_dtype, unwrapped
from distil_scale.flops import mfu, peak_flops, step_flops
from distil_scale.inputs import build_models, ensure_inputs, make_batches, tokenizer_dir
from distil_scale.losses import eager_terms, fused_terms
from distil_scale.metrics import AuditLog, Clock, open_sinks


@dataclass
class TrainState:
    """The loop's counters: what `training_state.json` holds besides the world and the data origin."""

    step: int = 0
    epoch: int = 0
    samples: int = 0
    tokens: int = 0  # real (non-padding) tokens, summed over ranks
    elapsed_s: float = 0.0  # training time over every run of this output_dir

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, type(f.default)(state[f.name]))


class StopSignals:
    """Records SIGTERM / SIGUSR1 (a preemption notice) so that the loop checkpoints at the next step and stops.

    `agreed()` is one all-reduce of one integer over the CPU group, so every rank stops after the same step even
    when only some of them got the signal.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, group) -> None:
        self.received = 0
        self.group = group
        self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def agreed(self, *flags: int) -> list[int]:
        """[the signal some rank received (0 if none), *the max of each flag over ranks], the same on every rank."""
        values = torch.tensor([self.received, *flags], dtype=torch.int64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values.tolist()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class IntervalSums:
    """What the loop adds up between two log rows, on the device: reduced over ranks once, at the log step.

    The loss terms are summed in fp32 (as they come), the counts in fp64 so that token counts stay exact.
    """

    TERMS = ("loss", "kd", "mlm", "cos")
    COUNTS = ("tokens", "good", "skipped", "flops")

    def __init__(self, device: torch.device):
        self.terms = torch.zeros(len(self.TERMS), dtype=torch.float32, device=device)
        self.counts = torch.zeros(len(self.COUNTS), dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.terms.zero_()
        self.counts.zero_()
        self.micro_batches, self.flops, self.start = 0, 0.0, time.perf_counter()

    def add(self, terms: torch.Tensor, mask: torch.Tensor, *, good: bool, skipped: int, flops: float) -> None:
        """One micro-batch: its (loss, kd, mlm, cos) (zeros if not finite), its attention mask and counts."""
        self.terms += terms
        self.counts[0] += mask.sum()
        self.counts[1] += float(good)
        self.counts[2] += skipped
        self.micro_batches += 1
        self.flops += flops  # counted on the host

    def reduce(self) -> dict[str, float]:
        """Collective: the interval's sums over every rank, by field name (the loop's one per-interval sync)."""
        self.counts[3] = self.flops
        dist.all_reduce(self.terms)
        dist.all_reduce(self.counts)
        return dict(zip(self.TERMS + self.COUNTS, self.terms.tolist() + self.counts.tolist()))


class Diverged(RuntimeError):
    """The loss stayed non-finite for train.max_nonfinite_steps steps in a row."""


@dataclass
class Run:
    """Everything one training run holds while it runs."""

    cfg: Config
    placement: Placement
    engine: object
    teacher: object
    checkpointer: Checkpointer
    state: TrainState
    data: DataState
    batches: object
    accum: int
    sums: IntervalSums
    signals: StopSignals
    clock: Clock
    manifest: object
    peak_flops: float | None
    sink: object = None
    audit: AuditLog | None = None
    lr: float = 0.0

    def close(self) -> None:
        close_loader(self.batches)
        self.signals.restore()
        for log in (self.sink, self.audit):
            if log is not None:
                log.close()


def train(cfg: Config) -> dict:
    """Run (or resume) one training run; returns the last metrics row (on every rank)."""
    run = setup(cfg)
    row, stop, nonfinite, start_step = {}, 0, 0, run.state.step
    run.engine.train()
    try:
        while run.state.step < cfg.train.max_steps and not stop:
            bad = train_step(run)
            stop, bad = run.signals.agreed(int(bad))
            nonfinite = nonfinite + 1 if bad else 0
            step, diverged = run.state.step, nonfinite >= cfg.train.max_nonfinite_steps
            last = step == cfg.train.max_steps or stop or diverged
            if step % cfg.log.every_steps == 0 or last:
                row = log_interval(run, steps_this_run=step - start_step)
            if diverged:
                break
            if (step % cfg.checkpoint.every_steps == 0 or last) and not bad:
                save(run)
    finally:
        run.close()
    if nonfinite >= cfg.train.max_nonfinite_steps:
        raise Diverged(
            f"the loss was not finite for {nonfinite} steps in a row (steps {run.state.step - nonfinite + 1}-"
            f"{run.state.step}); stopped without saving them. The newest complete checkpoint is "
            f"{run.checkpointer.latest() or 'none'}: lower optim.peak_lr or check the data, then run again to resume"
        )
    if stop:
        _say(run, f"{signal.Signals(stop).name} received: saved a checkpoint at step {run.state.step} in "
                  f"{run.checkpointer.save_dir} and stopped; run the same command again to resume")  # fmt: skip
    elif cfg.checkpoint.export:
        export(run)
    return row


def setup(cfg: Config) -> Run:
    """Join the process group, make missing inputs, build teacher, student and engine, and resume."""
    placement = init_distributed()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars on every rank drown the progress line
    if placement.is_main:
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        ensure_inputs(cfg)
    dist.barrier()
    teacher, student, manifest = build_models(cfg, placement)
    state = TrainState()
    data = DataState(sum(manifest.samples("train")), _data_plan(cfg, placement))
    checkpointer = Checkpointer(cfg, placement, train=state, data=data)
    engine, ds_config = build_engine(student, cfg, placement, load_universal=checkpointer.universal)
    checkpointer.load(engine)
    accum = ds_config["gradient_accumulation_steps"]
    if placement.is_main:
        save_config(cfg, os.path.join(cfg.run.output_dir, "config.yaml"))
    _announce(cfg, placement, engine, accum, checkpointer, data)
    batches = iter(make_batches(cfg, manifest, placement, data, step=state.step, accum=accum))
    run = Run(cfg, placement, engine, teacher, checkpointer, state, data, batches, accum,
              IntervalSums(placement.device), StopSignals(placement.cpu_group), Clock(state.elapsed_s), manifest,
              _peak(cfg, placement))  # fmt: skip
    if placement.is_main:
        run.sink = open_sinks(cfg.run.output_dir, max_steps=cfg.train.max_steps, tensorboard=cfg.log.tensorboard,
                              resumed_step=state.step)  # fmt: skip
    if cfg.data.audit:
        run.audit = AuditLog(cfg.run.output_dir, placement.rank, world_size=placement.world_size,
                             keep_until_step=state.step)  # fmt: skip
    return run


def train_step(run: Run) -> bool:
    """One optimizer step of `accum` micro-batches; returns whether any of their losses was not finite."""
    cfg, device = run.cfg, run.placement.device
    # The rate this step's update uses (the scheduler advances inside the boundary engine.step()).
    run.lr = run.engine.optimizer.param_groups[0]["lr"]
    keys: dict[int, list[str]] = {}  # epoch -> the keys trained on; a step may straddle two epochs
    bad = False
    for _ in range(run.accum):
        batch = next(run.batches)
        ids, mask, labels = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
        terms, good = micro_step(run.engine, run.teacher, ids, mask, labels, cfg)
        flops = step_flops(_config(run.teacher), run.engine.module.config, ids.numel(), ids.shape[1])
        run.sums.add(terms, mask, good=good, skipped=batch.get("skipped", 0), flops=flops)
        bad |= not good
        run.state.epoch = batch["epoch"]
        run.data.mark(batch["epoch"], batch["sample_ids"])
        keys.setdefault(batch["epoch"], []).extend(batch["keys"])
    run.state.step += 1
    run.state.samples += cfg.train.sequences_per_step
    if run.audit is not None:
        run.audit.write(run.state.step, keys)
    return bad


def micro_step(engine, teacher, ids, mask, labels, cfg: Config) -> tuple[torch.Tensor, bool]:
    """Forward + backward of one micro-batch: (detached (loss, kd, mlm, cos), whether its loss was finite).

    A micro-batch whose loss is not finite contributes nothing to its step; checking that is one host sync.
    """
    terms_of = fused_terms if cfg.loss.impl == "fused" else eager_terms
    terms = terms_of(engine, teacher, ids, mask, labels, cfg.loss)
    parts = torch.stack([terms.total, terms.kd, terms.mlm, terms.cos]).detach().float()
    good = bool(torch.isfinite(terms.total))
    # DeepSpeed divides by the accumulation steps itself and only steps the optimizer at the boundary.
    if good:
        engine.backward(terms.total)
    else:
        del terms
        parts = torch.zeros_like(parts)
        _zero_backward(engine, ids)
    engine.step()
    return parts, good


def _zero_backward(engine, ids: torch.Tensor) -> None:
    """A backward that adds exactly nothing, for a micro-batch whose loss is not finite.

    DeepSpeed must see one backward per micro-batch (its gradient reduction runs in the boundary's backward),
    but the bad graph may hold inf activations, whose gradients would be NaN even when multiplied by 0. So this
    runs the student on one all-padding row and backpropagates 0 times its output.
    """
    out = engine(input_ids=ids[:1], attention_mask=torch.zeros_like(ids[:1]))
    engine.backward(out.logits.float().sum() * 0.0)


def log_interval(run: Run, *, steps_this_run: int) -> dict:
    """Reduce the interval over ranks, write one metrics row (rank 0) and start the next interval."""
    sums, state, world = run.sums, run.state, run.placement.world_size
    span_s = max(time.perf_counter() - sums.start, 1e-9)
    total = sums.reduce()
    state.tokens += int(total["tokens"])
    n = total["good"] or float("nan")  # no finite micro-batch in the interval: the losses are unknown, not 0
    grad_norm = run.engine.get_global_grad_norm()
    flops_per_device = total["flops"] / world / span_s
    row = {
        "step": state.step,
        "epoch": state.epoch,
        "samples": state.samples,
        "tokens": state.tokens,
        **{key: total[key] / n for key in ("loss", "kd", "mlm", "cos")},
        "lr": run.lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens_per_s": total["tokens"] / span_s,
        "samples_per_s": sums.micro_batches * run.cfg.train.micro_batch_size * world / span_s,
        "nonfinite_micro_batches": int(sums.micro_batches * world - total["good"]),
        "skipped_samples": int(total["skipped"]),
        "model_tflops": flops_per_device / 1e12,
        "mfu": mfu(total["flops"] / world, span_s, run.peak_flops),
        "elapsed_s": run.clock.elapsed(),
        "steps_this_run": steps_this_run,
    }
    if run.sink is not None:
        run.sink.write(row)
    sums.reset()
    return row


def save(run: Run) -> None:
    """Checkpoint the step reached, unless the weights went non-finite (then say so and skip)."""
    if not _weights_finite(run.engine, run.placement.cpu_group):
        _say(run, f"step {run.state.step}: the weights are not finite; no checkpoint")
        return
    run.state.elapsed_s = run.clock.elapsed()
    saved = run.checkpointer.save(run.state.step)
    _say(
        run,
        f"checkpoint {saved.tag}: {saved.bytes / 2**20:.0f} MB in {saved.seconds:.2f} s "
        f"({saved.checksum_seconds:.2f} s of it checksums for the manifest)",
    )


def export(run: Run) -> None:
    """Rank 0 consolidates the newest (ZeRO-sharded) checkpoint into a Hugging Face directory."""
    if run.placement.is_main:
        from distil_scale.export import export_student

        out = os.path.join(run.cfg.run.output_dir, "export")
        export_student(run.checkpointer.save_dir, out, tokenizer_dir=tokenizer_dir(run.cfg, run.manifest))
        print(f"distil-scale: exported the student to {out}", flush=True)
    dist.barrier()


def _weights_finite(engine, group) -> bool:
    """Whether every rank's share of the student's weights is finite (under ZeRO-3 a rank holds a partition)."""
    shares = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in engine.module.parameters()]
    flag = torch.stack(shares).all().reshape(1).long().cpu()  # one device sync, not one per parameter
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _config(teacher):
    return None if teacher is None else unwrapped(teacher).config


def _peak(cfg: Config, placement: Placement) -> float | None:
    if placement.device.type != "cuda" and cfg.log.peak_tflops is None:
        return None
    override = None if cfg.log.peak_tflops is None else cfg.log.peak_tflops * 1e12
    return peak_flops(resolve_dtype(cfg.train.precision, placement.device), override=override)


def _data_plan(cfg: Config, placement: Placement) -> dict:
    """The shape the stream's plan depends on: a resume with another one re-splits the unfinished epochs."""
    data = cfg.data
    return {
        "world_size": placement.world_size,
        "num_workers": max(data.num_workers, 1),
        "micro_batch_size": cfg.train.micro_batch_size,
        "shuffle_buffer": data.shuffle_buffer,
        "group_batches": data.group_batches,
        "seed": cfg.run.seed,
    }


def _say(run: Run, message: str) -> None:
    if run.placement.is_main:
        print(f"distil-scale: {message}", flush=True)


def _announce(cfg: Config, placement: Placement, engine, accum: int, checkpointer: Checkpointer, data) -> None:
    if not placement.is_main:
        return
    if data.resplit:
        print(f"distil-scale: {data.resplit}", flush=True)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: full size
    resumed = checkpointer.resumed
    where = f"resuming from {os.path.join(*resumed)}" if resumed else "starting fresh"
    extras = []
    if cfg.train.activation_checkpointing:
        extras.append("activation checkpointing")
    if cfg.teacher.partition and cfg.uses_teacher_outputs:
        extras.append("teacher partitioned (ZeRO-3" + (", offloaded to CPU)" if cfg.teacher.offload else ")"))
    print(
        f"distil-scale: {placement.world_size} rank(s) on {placement.device.type} | ZeRO {cfg.train.zero_stage} | "
        f"{cfg.train.sequences_per_step} seq/step = {cfg.train.micro_batch_size} x {accum} accum x "
        f"{placement.world_size} | {n_params / 1e6:.1f}M student params | {' | '.join([*extras, where])}",
        flush=True,
    )
