"""Training loop of the class-conditional diffusion model (stage 2), on any training backend.

Epsilon-prediction: sample t, noise, ``x_t = alpha_t x_0 + sigma_t eps``, minimise
``|| eps_theta(x_t, t, y) - eps ||^2`` (mean over pixels; per-image weights optional). Labels are
replaced by the null class with probability ``label_dropout`` so the same network also predicts
the unconditional epsilon for classifier-free guidance. AdamW, linear warmup then constant lr,
optional gradient clipping, fp32 EMA of the weights through the kernel dispatch.

Distributed strategies (``stage2.strategy``): ``single`` (default), ``ddp``, ``fsdp2``, ``deepspeed`` (ZeRO 0-3),
all behind ``dpt_engine.train.engine.Backend``. One generator draws each step's global batch
(``dpt_engine.train.batch``); every rank trains on its slice with the loss normalised to the global
batch, so every backend and world size trains the same model up to rounding, and the single-process
path is bit-identical to earlier versions of this loop.

Resumable: ``work_dir/checkpoints/step-N/`` (atomic directories, newest ``keep_checkpoints`` kept)
hold model, EMA, optimizer, step, the data generator's state and every rank's RNG states (the lr
schedule is a function of the step); a restart continues bit-identically on the CPU. A legacy
``work_dir/checkpoint.pt`` from older versions is resumed too (single/ddp).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config.schema import DiffusionConfig
from ..models.denoisers import denoiser_flops
from ..train.batch import DiffusionData, draw_global_batch, micro_batches, micro_loss, min_snr_weight
from ..train.checkpoint import CheckpointManager
from ..train.ema import ema_decay_at
from ..train.engine import Backend, build_backend, setup_process_group
from ..train.guards import BadStepGuard, TensorBoardLogger, ThroughputMeter, oom_hint, peak_flops
from ..train.loop import TrainingSteps
from ..train.state import TrainState, load_train_state, save_train_state
from ..utils.dist import DistInfo, barrier
from ..utils.io import atomic_torch_save
from .schedules import NoiseSchedule, make_schedule

log = logging.getLogger("dpt_engine")

__all__ = ["DiffusionData", "DiffusionFit", "StepResult", "fit_diffusion", "train_step"]


@dataclass
class DiffusionFit:
    ema: torch.nn.Module  # the EMA network in eval mode
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def _lr_at(step: int, cfg: DiffusionConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


@dataclass
class StepResult:
    """What one stage-2 optimisation step did."""

    loss: torch.Tensor  # () the global batch's loss, detached (summed over ranks and micro-batches)
    lr: float
    applied: bool  # False: the bad-step guard skipped it (non-finite or exploding loss)
    grad_norm: Optional[torch.Tensor] = None  # () before clipping, when the backend reports it


def train_step(
    backend: Backend,
    data: DiffusionData,
    cfg: DiffusionConfig,
    schedule: NoiseSchedule,
    gen: torch.Generator,
    step: int,
    guard: BadStepGuard,
    device: torch.device,
    info: DistInfo,
) -> StepResult:
    """One optimisation step of stage 2 (0-based ``step``), the loop body of :func:`fit_diffusion`
    and of the training benchmark: draw the global batch from ``gen``, this rank's micro-batches
    (Min-SNR weights if configured), the lr of the step, forward / backward per micro-batch, the
    global loss (all-reduced across ranks), then the optimizer step and EMA update, or a skip when
    the guard rejects the loss. One host sync per step (the guard needs the loss value)."""
    whole_batch = info.world_size * cfg.grad_accum == 1
    batch = draw_global_batch(data, cfg.batch_size, schedule, gen, cfg.hflip, cfg.label_dropout)
    mbs = micro_batches(batch, data, info.rank, info.world_size, cfg.grad_accum, device)
    if cfg.loss_weighting == "min-snr":
        for mb in mbs:
            mb.time_weight = min_snr_weight(schedule, mb.t, cfg.min_snr_gamma)
    lr = _lr_at(step, cfg)
    backend.set_lr(lr)
    loss_sum = None
    micro = cfg.batch_size // (info.world_size * cfg.grad_accum)
    with oom_hint(micro, cfg.batch_size, cfg.grad_accum, cfg.grad_checkpointing):
        for m, mb in enumerate(mbs):
            last = m == len(mbs) - 1
            xt = schedule.add_noise(mb.x0, mb.noise, mb.t)
            with backend.accumulate(last):
                pred = backend.forward(xt, schedule.network_time(mb.t), mb.y)
                loss = micro_loss(pred, mb, batch, whole_batch)
                backend.backward(loss, last)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if info.world_size > 1:  # every rank sees the global loss (and skips the same steps)
            dist.all_reduce(loss_sum)
        # float() syncs with the device once per step: the skip decision needs the value
        if not guard.check(step, float(loss_sum)):
            backend.skip_step()
            return StepResult(loss=loss_sum, lr=lr, applied=False)
        norm = backend.step(cfg.grad_clip)
        backend.ema_update(ema_decay_at(step, cfg.ema_decay))
    return StepResult(loss_sum, lr, True, None if norm is None else norm.detach().float())


def fit_diffusion(
    net: torch.nn.Module,
    cfg: DiffusionConfig,
    data: DiffusionData,
    work_dir: Path,
    device: torch.device,
    seed: int,
    progress: bool = True,
) -> DiffusionFit:
    """Train ``net`` (a U-ViT predicting epsilon) for ``cfg.steps`` steps with ``cfg.strategy``; return its EMA.

    Under a multi-process launcher every rank calls this with the same arguments; every rank
    returns the full EMA network. Rank 0 writes ``work_dir/model.pt`` (plain ``model`` and ``ema``
    state dicts) at the end.
    """
    import copy

    torch.manual_seed(seed)
    schedule = make_schedule(cfg.schedule)
    info = setup_process_group(cfg.strategy, device)
    if device.type == "cuda" and info.world_size > 1:
        device = torch.device("cuda", info.local_rank)
    # sharding backends change the module in place: keep a plain copy to return the EMA in
    template = None if cfg.strategy in ("single", "ddp") else copy.deepcopy(net)
    backend = build_backend(net, cfg, device, info)
    guard = BadStepGuard(cfg.max_bad_steps)
    state = TrainState(torch.Generator().manual_seed(seed), guard=guard)
    ckpts = CheckpointManager(work_dir / "checkpoints", cfg.keep_checkpoints)
    ckpts.remove_partial()
    _resume(backend, ckpts, work_dir, state, info)
    start, history = state.step, state.history
    if start:
        log.info("stage2: resuming from step %d", start)

    fwd_flops = denoiser_flops(net)
    peak, peak_src = peak_flops(device, backend.bf16) if info.is_main and fwd_flops else (None, "")
    meter = ThroughputMeter(3.0 * fwd_flops if fwd_flops else None, info.world_size, peak, peak_src)
    tb = TensorBoardLogger(work_dir / "tensorboard", cfg.tensorboard and info.is_main)
    running: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []

    def save(done: int) -> None:
        t_save = time.perf_counter()
        state.step = done
        meta = {
            "strategy": backend.name,
            "full_state": backend.full_state,
            "zero_stage": backend.cfg.zero_stage,
        }
        save_train_state(ckpts, state, meta, write_files=backend.save)
        meter.exclude(time.perf_counter() - t_save)  # images/s measures training steps only

    loop = TrainingSteps(
        start,
        cfg.steps,
        save=save,
        checkpoint_every=cfg.checkpoint_every,
        desc="stage2 diffusion",
        progress=progress and info.is_main,
    )
    try:
        for step in loop:
            res = train_step(backend, data, cfg, schedule, state.gen, step, guard, device, info)
            lr = res.lr
            if res.applied:
                running.append(res.loss)
                if res.grad_norm is not None:
                    norms.append(res.grad_norm)
            meter.add(cfg.batch_size)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                mean_loss = float(torch.stack(running).mean()) if running else float("nan")
                speed = meter.read()
                rec = {"step": done, "loss": mean_loss, "lr": lr, **speed, "skipped_steps": guard.total}
                if norms:
                    rec["grad_norm"] = float(torch.stack(norms).mean())
                history.append(rec)
                tb.log(done, {k: v for k, v in rec.items() if k != "step"})
                loop.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{speed['images_per_s']:.0f}")
                running, norms = [], []
    finally:
        loop.bar.close()
        tb.close()
    model_sd, ema_sd = backend.export()
    if info.is_main:
        atomic_torch_save(work_dir / "model.pt", {"model": model_sd, "ema": ema_sd, "step": cfg.steps})
    if template is None:
        ema = backend.ema
    else:
        template.load_state_dict(ema_sd)
        ema = template.to(device).eval().requires_grad_(False)
    backend.close()
    barrier()
    return DiffusionFit(ema=ema, history=history, resumed_from=start)


def _resume(backend: Backend, ckpts: CheckpointManager, work_dir: Path, state: TrainState, info) -> None:
    """Load the newest checkpoint into ``backend`` and ``state`` (step, history, data generator,
    guard); nothing when there is none."""
    latest = ckpts.latest()
    if latest is None:
        legacy = work_dir / "checkpoint.pt"
        # a checkpoint.pt written by the single-process trainer before checkpoints/ existed
        if legacy.is_file() and backend.full_state:
            old = torch.load(legacy, map_location="cpu", weights_only=True)
            backend.load_state(old)
            state.gen.set_state(old["generator"])
            torch.set_rng_state(old["torch_rng"])
            state.step, state.history = int(old["step"]), list(old["history"])
        return
    meta = ckpts.read_meta(latest)
    written_by = meta.get("strategy", meta.get("backend"))  # "backend" before the rename
    same_kind = written_by == backend.name or (meta.get("full_state") and backend.full_state)
    if not same_kind or (backend.name == "deepspeed" and meta.get("zero_stage") != backend.cfg.zero_stage):
        raise ValueError(
            f"{latest} was written by stage2.strategy={written_by} (zero_stage={meta.get('zero_stage')}) "
            f"and cannot be resumed with strategy={backend.name} (zero_stage={backend.cfg.zero_stage}): "
            "resume with the original strategy (single and ddp checkpoints are interchangeable), or move "
            "the checkpoints directory away to start over"
        )
    if meta["world_size"] != info.world_size and backend.name == "deepspeed":
        raise ValueError(
            f"{latest} was written by {meta['world_size']} DeepSpeed ranks; this run has {info.world_size}. "
            f"Resume with --nproc_per_node/--nnodes giving {meta['world_size']} ranks, or convert it with "
            "DeepSpeed's zero_to_fp32.py and start a new run"
        )
    # DeepSpeed's loader and DCP unpickle their files: load only what this code wrote, unchanged
    require = backend.name in ("deepspeed", "fsdp2")
    load_train_state(latest, state, require_digests=require, read_files=backend.load)
