"""The training loop, top to bottom: batch -> teacher (no grad) -> student -> triple loss -> backward -> step.

`train(cfg)` is what `deepspeed cluster/launch.py --config X.yaml`, `python cluster/launch.py ...` and
`distil-scale train ...` run on every rank. Device syncs happen only at the log interval.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist
import transformers

from distil_scale import checkpoint
from distil_scale.config import Config, save_config
from distil_scale.data.position import DataOrigin, DataPosition
from distil_scale.data.stream import close_loader
from distil_scale.engine import Placement, build_engine, init_distributed, resolve_dtype, unwrapped
from distil_scale.flops import forward_flops, peak_flops
from distil_scale.inputs import build_models, ensure_inputs, make_batches, tokenizer_dir
from distil_scale.losses import LossTerms, fused_triple_loss, head_loss, triple_loss
from distil_scale.metrics import AuditLog, Clock, open_sinks
from distil_scale.models import lm_head_input, mlm_outputs, projection_replaced


class StopSignals:
    """Records SIGTERM / SIGUSR1 (a preemption notice) so that the loop checkpoints at the next step and stops.

    `agreed()` is one all-reduce of one integer over a gloo group (the default group on CPU, a side group next
    to NCCL), so every rank stops after the same step even when only some of them got the signal.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received = 0
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
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


_MODEL_INPUTS = ("input_ids", "attention_mask", "labels")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in _MODEL_INPUTS}


def _eager_terms(engine, teacher, ids, mask, labels, cfg: Config) -> LossTerms:
    t_logits = t_hidden = None
    if teacher is not None:
        with torch.no_grad():
            t_logits, t_hidden = mlm_outputs(teacher, ids, mask)
    s_logits, s_hidden = mlm_outputs(engine, ids, mask)
    loss = cfg.loss
    return triple_loss(
        s_logits,
        t_logits,
        labels,
        mask,
        s_hidden,
        t_hidden,
        temperature=loss.temperature,
        alpha_kd=loss.alpha_kd,
        alpha_mlm=loss.alpha_mlm,
        alpha_cos=loss.alpha_cos,
        restrict_kd_to_mlm=loss.restrict_kd_to_mlm,
    )


def _fused_terms(engine, teacher, ids, mask, labels, cfg: Config) -> LossTerms:
    """The same terms with no (B, L, V) logits: the LM heads run inside the fused kernels.

    The student still runs through engine(...) (DeepSpeed's forward hooks and backward prologue), with its
    vocabulary projection swapped for the fused head loss; see models.projection_replaced.
    """
    t_head = None
    if teacher is not None:
        with torch.no_grad():
            t_head = lm_head_input(teacher, ids, mask)
    loss = cfg.loss
    fn = head_loss(
        t_head,
        labels,
        mask,
        temperature=loss.temperature,
        alpha_kd=loss.alpha_kd,
        alpha_mlm=loss.alpha_mlm,
        restrict_kd_to_mlm=loss.restrict_kd_to_mlm,
    )
    # A partitioned teacher's vocabulary projection is gathered for the student's forward, where the fused loss
    # uses it (the fused backward does not).
    with _gathered(t_head), projection_replaced(engine, fn):
        out = engine(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return fused_triple_loss(
        out.logits,
        mask,
        out.hidden_states[-1],
        None if t_head is None else t_head.last_hidden,
        alpha_kd=loss.alpha_kd,
        alpha_mlm=loss.alpha_mlm,
        alpha_cos=loss.alpha_cos,
    )


def _gathered(head):
    """Gathers a ZeRO-3 teacher's head weights for the block (nothing to do for a replicated teacher)."""
    import deepspeed

    params = [] if head is None else [p for p in (head.weight, head.bias) if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(params, enabled=bool(params))


# What micro_step returns and the loop sums per log interval (and all-reduces there).
_TOTAL, _KD, _MLM, _COS, _TOKENS, _GOOD, _SKIPPED = range(7)
_FLOPS = _SKIPPED + 1  # model FLOPs of the interval (see distil_scale.flops), counted on the host


def _zero_backward(engine, ids: torch.Tensor) -> None:
    """A backward that adds exactly nothing, for a micro-batch whose loss is not finite.

    DeepSpeed must see one backward per micro-batch (its gradient reduction runs in the boundary's backward),
    but the bad graph may hold inf activations, whose gradients would be NaN even when multiplied by 0. So this
    runs the student on one all-padding row and backpropagates 0 times its output.
    """
    out = engine(input_ids=ids[:1], attention_mask=torch.zeros_like(ids[:1]))
    engine.backward(out.logits.float().sum() * 0.0)


def micro_step(engine, teacher, batch: dict, cfg: Config, *, skipped: int = 0) -> tuple[torch.Tensor, bool]:
    """Forward + backward of one micro-batch: (the detached sums row, see _TOTAL ..., whether its loss was finite).

    A micro-batch whose loss is not finite contributes nothing to its step; checking that is one host sync.
    `skipped` is how many of the batch's rows stand in for unreadable samples (the stream's count).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    terms_of = _fused_terms if cfg.loss.impl == "fused" else _eager_terms
    terms = terms_of(engine, teacher, ids, mask, labels, cfg)
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
    counts = parts.new_tensor([float(good), float(skipped)])
    return torch.cat([parts, mask.sum().float().reshape(1), counts]), good


def _log_row(
    sums: torch.Tensor,
    *,
    micro_batches: int,
    state: dict,
    engine,
    lr: float,
    clock: Clock,
    span_s: float,
    peak_flops: float | None,
):
    """Reduce the interval's sums over ranks: the loop's only device sync besides the per-micro-batch check."""
    dist.all_reduce(sums)
    values = sums.tolist()
    world = dist.get_world_size()
    flops_per_gpu = values[_FLOPS] / world / max(span_s, 1e-9)
    n = values[_GOOD] or float("nan")  # no finite micro-batch in the interval: the losses are unknown, not 0
    grad_norm = engine.get_global_grad_norm()
    return {
        "step": state["step"],
        "epoch": state["epoch"],
        "samples": state["samples"],
        "tokens": state["tokens"],
        "loss": values[_TOTAL] / n,
        "kd": values[_KD] / n,
        "mlm": values[_MLM] / n,
        "cos": values[_COS] / n,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens_per_s": values[_TOKENS] / max(span_s, 1e-9),
        "samples_per_s": micro_batches * engine.train_micro_batch_size_per_gpu() * dist.get_world_size() / span_s,
        "nonfinite_micro_batches": int(micro_batches * dist.get_world_size() - values[_GOOD]),
        "skipped_samples": int(values[_SKIPPED]),
        "model_tflops": flops_per_gpu / 1e12,  # per accelerator
        "mfu": None if peak_flops is None else flops_per_gpu / peak_flops,
        "elapsed_s": clock.elapsed(),
    }


def _flop_counter(teacher, student_config):
    """Model FLOPs of one micro-batch of shape (B, L): teacher forward + student forward and backward."""
    teacher_config = None if teacher is None else unwrapped(teacher).config

    def count(batch: int, length: int) -> float:
        total = 3 * forward_flops(student_config, batch * length, length)
        if teacher_config is not None:
            total += forward_flops(teacher_config, batch * length, length)
        return float(total)

    return count


def _weights_finite(engine, group) -> bool:
    """Whether every rank's share of the student's weights is finite (under ZeRO-3 a rank holds a partition)."""
    shares = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in engine.module.parameters()]
    flag = torch.stack(shares).all().reshape(1).long().cpu()  # one device sync, not one per parameter
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


class Diverged(RuntimeError):
    """The loss stayed non-finite for train.max_nonfinite_steps steps in a row."""


def _announce(cfg: Config, placement: Placement, engine, accum: int, resumed: tuple | None) -> None:
    if not placement.is_main:
        return
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: full size
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


def _announce_resplit(placement: Placement, old: dict, new: dict, position: DataPosition) -> None:
    if not placement.is_main:
        return
    changed = ", ".join(f"{key} {old.get(key)} -> {value}" for key, value in new.items() if old.get(key) != value)
    left = ", ".join(
        f"epoch {epoch}: {position.num_samples - int(mask.sum())} of {position.num_samples}"
        for epoch, mask in position.consumed.items()
    )
    print(
        f"distil-scale: the data plan changed ({changed}); re-splitting from epoch {position.start_epoch} over the "
        f"samples not yet trained on ({left or 'a fresh epoch'})",
        flush=True,
    )


def train(cfg: Config) -> dict:
    """Run (or resume) one training run; returns the last metrics row (on every rank)."""
    placement = init_distributed()
    # Weight-loading progress bars on every rank drown the progress line.
    transformers.utils.logging.disable_progress_bar()
    if placement.is_main:
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        ensure_inputs(cfg)
    dist.barrier()
    teacher, student, manifest = build_models(cfg, placement)
    save_dir = os.path.join(cfg.run.output_dir, "checkpoints")
    resumed = checkpoint.resolve(save_dir, cfg.train.resume)
    saved = checkpoint.training_state(*resumed) if resumed else {}
    universal = bool(resumed) and checkpoint.prepare_load(
        *resumed, saved, world_size=placement.world_size, zero_stage=cfg.train.zero_stage
    )
    engine, ds_config = build_engine(student, cfg, placement, load_universal=universal)
    accum = ds_config["gradient_accumulation_steps"]
    state = {"step": 0, "epoch": 0, "samples": 0, "tokens": 0, "elapsed_s": 0.0}
    plan = _data_plan(cfg, placement)
    position = DataPosition(sum(manifest.samples("train")))
    origin = DataOrigin(0, plan, position.copy())
    if resumed:
        same_world = saved["world_size"] == placement.world_size
        checkpoint.load(engine, *resumed, universal=universal, restore_rng=same_world)
        state = saved
        if not same_world:  # the saved RNG states belong to other ranks: a fresh stream per (step, rank)
            torch.manual_seed(cfg.run.seed + 1 + placement.rank + state["step"] * 7919)
        origin, position = checkpoint.load_data(*resumed, state, num_samples=position.num_samples)
        if origin.plan != plan:
            _announce_resplit(placement, origin.plan, plan, position)
            origin = DataOrigin(state["step"], plan, position.copy())
    else:
        # Dropout differs across ranks; checkpoints carry each rank's RNG from here on.
        torch.manual_seed(cfg.run.seed + 1 + placement.rank)
    if placement.is_main:
        save_config(cfg, os.path.join(cfg.run.output_dir, "config.yaml"))
    _announce(cfg, placement, engine, accum, resumed)
    skip_batches = (state["step"] - origin.step) * accum
    batches = iter(make_batches(cfg, manifest, placement, origin=origin, skip_batches=skip_batches))
    sink = None
    if placement.is_main:
        sink = open_sinks(
            cfg.run.output_dir,
            max_steps=cfg.train.max_steps,
            tensorboard=cfg.log.tensorboard,
            resumed_step=state["step"],
        )
    audit = None
    if cfg.data.audit:
        audit = AuditLog(
            cfg.run.output_dir, placement.rank, world_size=placement.world_size, keep_until_step=state["step"]
        )
    clock, start_step = Clock(state["elapsed_s"]), state["step"]
    row = {}
    sums = torch.zeros(_FLOPS + 1, device=placement.device)
    count_flops, span_flops = _flop_counter(teacher, engine.module.config), 0.0
    peak = None
    if placement.device.type == "cuda" or cfg.log.peak_tflops is not None:
        override = None if cfg.log.peak_tflops is None else cfg.log.peak_tflops * 1e12
        peak = peak_flops(resolve_dtype(cfg.train.precision, placement.device), override=override)
    span_start, span_micro = time.perf_counter(), 0
    signals = StopSignals()
    stop = nonfinite_run = 0
    engine.train()
    try:
        while state["step"] < cfg.train.max_steps and not stop:
            # The rate this step's update uses (the scheduler advances inside the boundary engine.step()).
            lr = engine.optimizer.param_groups[0]["lr"]
            keys: dict[int, list[str]] = {}  # epoch -> the keys trained on; a step may straddle two epochs
            bad_step = False
            for _ in range(accum):
                batch = next(batches)
                row_sums, good = micro_step(
                    engine, teacher, _to(batch, placement.device), cfg, skipped=batch.get("skipped", 0)
                )
                sums[:_FLOPS] += row_sums
                span_flops += count_flops(*batch["input_ids"].shape)
                bad_step |= not good
                state["epoch"] = batch["epoch"]
                position.mark(batch["epoch"], batch["sample_ids"])
                keys.setdefault(batch["epoch"], []).extend(batch["keys"])
                span_micro += 1
            state["step"] += 1
            state["samples"] += cfg.train.sequences_per_step
            step = state["step"]
            if audit is not None:
                audit.write(step, keys)
            stop, bad_step = signals.agreed(int(bad_step))
            nonfinite_run = nonfinite_run + 1 if bad_step else 0
            last = step == cfg.train.max_steps or stop or nonfinite_run >= cfg.train.max_nonfinite_steps
            if step % cfg.log.every_steps == 0 or last:
                tokens_before = state["tokens"]
                sums[_FLOPS] = span_flops
                row = _log_row(
                    sums,
                    micro_batches=span_micro,
                    state=state,
                    engine=engine,
                    lr=lr,
                    clock=clock,
                    span_s=time.perf_counter() - span_start,
                    peak_flops=peak,
                )
                state["tokens"] = tokens_before + int(sums[_TOKENS].item())
                row["tokens"], row["steps_this_run"] = state["tokens"], step - start_step
                if sink is not None:
                    sink.write(row)
                sums.zero_()
                span_start, span_micro, span_flops = time.perf_counter(), 0, 0.0
            if nonfinite_run >= cfg.train.max_nonfinite_steps:
                break
            if (step % cfg.checkpoint.every_steps == 0 or last) and not bad_step:
                if not _weights_finite(engine, signals.group):
                    if placement.is_main:
                        print(f"distil-scale: step {step}: the weights are not finite; no checkpoint", flush=True)
                    continue
                state["elapsed_s"] = clock.elapsed()
                position.agree(signals.group)
                checkpoint.save(
                    engine,
                    save_dir,
                    step=step,
                    state=dict(state),
                    data=(origin, position),
                    cfg=cfg,
                    model_config=engine.module.config,
                    keep_last=cfg.checkpoint.keep_last,
                )
    finally:
        close_loader(batches)
        signals.restore()
        for log in (sink, audit):
            if log is not None:
                log.close()
    if nonfinite_run >= cfg.train.max_nonfinite_steps:
        last_good = checkpoint.latest_tag(save_dir)
        raise Diverged(
            f"the loss was not finite for {nonfinite_run} steps in a row (steps {state['step'] - nonfinite_run + 1}-"
            f"{state['step']}); stopped without saving them. The newest complete checkpoint is "
            f"{last_good or 'none'}: lower optim.peak_lr or check the data, then run again to resume from it"
        )
    if stop:
        if placement.is_main:
            print(
                f"distil-scale: {signal.Signals(stop).name} received: saved a checkpoint at step {state['step']} "
                f"in {save_dir} and stopped; run the same command again to resume",
                flush=True,
            )
        return row
    if cfg.checkpoint.export:
        _export(cfg, placement, save_dir, manifest)
    return row


def _export(cfg: Config, placement: Placement, save_dir: str, manifest) -> None:
    """Rank 0 consolidates the newest (ZeRO-sharded) checkpoint into a Hugging Face directory."""
    if placement.is_main:
        from distil_scale.export import export_student

        out = os.path.join(cfg.run.output_dir, "export")
        export_student(save_dir, out, tokenizer_dir=tokenizer_dir(cfg, manifest))
        print(f"distil-scale: exported the student to {out}", flush=True)
    dist.barrier()
