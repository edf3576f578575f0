"""Training loop of the class-conditional diffusion model (stage 2), single process.

Epsilon-prediction: sample t, noise, ``x_t = alpha_t x_0 + sigma_t eps``, minimise
``|| eps_theta(x_t, t, y) - eps ||^2`` (mean over pixels; per-image weights optional). Labels are
replaced by the null class with probability ``label_dropout`` so the same network also predicts
the unconditional epsilon for classifier-free guidance. AdamW, linear warmup then constant lr,
optional gradient clipping, fp32 EMA of the weights through the kernel dispatch.

Resumable: ``work_dir/checkpoint.pt`` holds model, EMA, optimizer, step, the data generator's
state and the global RNG state, written atomically every ``checkpoint_every`` steps; a restart
continues bit-identically on the CPU.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config.schema import DiffusionConfig
from ..kernels import ema_update_
from ..utils.io import atomic_torch_save
from .schedules import make_schedule

log = logging.getLogger("dpt_engine")

__all__ = ["DiffusionData", "DiffusionFit", "ema_decay_at", "fit_diffusion", "to_model_space"]


@dataclass
class DiffusionData:
    """Training images as the model sees them (pixels in [-1, 1] or scaled latents)."""

    x: torch.Tensor  # (N, C, H, W) float32 (latent space: the scaled posterior mean)
    y: torch.Tensor  # (N,) int64 class (ignored when num_classes == 0)
    weight: Optional[torch.Tensor]  # (N,) float32 per-image loss weight, or None
    num_classes: int  # 0 = unconditional
    x_std: Optional[torch.Tensor] = None  # (N, C, H, W) latent posterior std (scaled): x0 ~ N(x, x_std^2)


@dataclass
class DiffusionFit:
    ema: torch.nn.Module  # the EMA network in eval mode
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def _lr_at(step: int, cfg: DiffusionConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, ``min(decay, (1 + step) / (10 + step))``.

    Without it a short run's EMA stays close to the random initialisation (at 0.999 after 300
    steps, 74% of the EMA is still the initial weights); long runs are unaffected.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def _param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        # no decay on biases, norms and embeddings (as U-ViT does for pos_embed / tokens)
        if p.ndim < 2 or "pos_embed" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit_diffusion(
    net: torch.nn.Module,
    cfg: DiffusionConfig,
    data: DiffusionData,
    work_dir: Path,
    device: torch.device,
    seed: int,
    progress: bool = True,
) -> DiffusionFit:
    """Train ``net`` (a U-ViT predicting epsilon) for ``cfg.steps`` steps; return its EMA."""
    import copy

    torch.manual_seed(seed)
    schedule = make_schedule(cfg.schedule)
    net = net.to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(_param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    gen = torch.Generator().manual_seed(seed)
    start, history = 0, []
    ckpt_path = work_dir / "checkpoint.pt"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, history = int(state["step"]), list(state["history"])
        log.info("stage2: resuming from step %d (%s)", start, ckpt_path)

    x_all, y_all = data.x, data.y
    n = x_all.shape[0]
    null_class = data.num_classes  # the extra embedding row
    interrupt_at = int(os.environ.get("DPT_TEST_INTERRUPT_AT_STEP", "0") or 0)
    ema_params = list(ema.parameters())
    net_params = list(net.parameters())
    net.train()
    t_last, running = time.perf_counter(), []
    bar = tqdm(
        total=cfg.steps, initial=start, desc="stage2 diffusion", disable=not progress, dynamic_ncols=True
    )
    for step in range(start, cfg.steps):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0 = x_all[idx].to(device, non_blocking=True)  # (B, C, H, W)
        if data.x_std is not None:  # a fresh latent from the stored posterior, as U-ViT does
            x0 = x0 + data.x_std[idx].to(device) * torch.randn(x0.shape, generator=gen).to(device)
        if cfg.hflip and data.x_std is None:  # latents: flips are encoded up front instead
            flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1).to(device), x0.flip(-1), x0)
        t = schedule.sample_time(cfg.batch_size, gen).to(device)  # (B,) continuous time
        noise = torch.randn(x0.shape, generator=gen).to(device)
        xt = schedule.add_noise(x0, noise, t)
        if data.num_classes > 0:
            y = y_all[idx].clone()
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
            y[drop] = null_class
            y = y.to(device)
        else:
            y = None
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        pred = net(xt, schedule.network_time(t), y)
        per_image = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if data.weight is not None:
            w = data.weight[idx].to(device)
            loss = (per_image * w).sum() / w.sum().clamp_min(1e-8)
        else:
            loss = per_image.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(net_params, cfg.grad_clip)
        opt.step()
        ema_update_(ema_params, net_params, ema_decay_at(step, cfg.ema_decay))
        running.append(loss.detach())
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            mean_loss = float(torch.stack(running).mean())
            now = time.perf_counter()
            ips = len(running) * cfg.batch_size / max(now - t_last, 1e-9)
            history.append({"step": done, "loss": mean_loss, "lr": _lr_at(step, cfg), "images_per_s": ips})
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
            running, t_last = [], now
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            for b_ema, b_net in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b_net)
            atomic_torch_save(
                ckpt_path,
                {
                    "model": net.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "step": done,
                    "history": history,
                },
            )
            if interrupt_at and done >= interrupt_at:
                bar.close()
                raise KeyboardInterrupt(f"DPT_TEST_INTERRUPT_AT_STEP={interrupt_at}")
    bar.close()
    atomic_torch_save(work_dir / "model.pt", {"ema": ema.state_dict(), "step": cfg.steps})
    return DiffusionFit(ema=ema, history=history, resumed_from=start)
