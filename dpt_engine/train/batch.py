"""The global diffusion batch: drawn once from one generator, then split across ranks and micro-batches.

Why one generator for the whole global batch: every rank draws the same indices, times, noise and
label drops (the draws are cheap next to a forward pass), so the samples a step sees do not depend
on the backend, the world size or the gradient accumulation. Rank ``r`` of ``W`` keeps rows
``[r B/W, (r+1) B/W)`` and splits them into ``grad_accum`` equal micro-batches. Each micro-batch's
loss is normalised by the *global* batch (its size, or its total per-image weight), so the sum of
the micro-batch gradients over all ranks is the single-process gradient; multi-process training
then matches single-process training up to floating-point summation order.

The draw order is the one ``fit_diffusion`` has always used (indices, latent posterior noise,
flips, times, noise, label drops), so the single-process path is bit-identical to earlier runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "DiffusionData",
    "GlobalBatch",
    "MicroBatch",
    "draw_global_batch",
    "micro_batches",
    "micro_loss",
    "min_snr_weight",
]


@dataclass
class DiffusionData:
    """Training images as the model sees them (pixels in [-1, 1] or scaled latents)."""

    x: torch.Tensor  # (N, C, H, W) float32 (latent space: the scaled posterior mean)
    y: torch.Tensor  # (N,) int64 class (ignored when num_classes == 0)
    weight: Optional[torch.Tensor]  # (N,) float32 per-image loss weight, or None
    num_classes: int  # 0 = unconditional
    x_std: Optional[torch.Tensor] = None  # (N, C, H, W) latent posterior std (scaled): x0 ~ N(x, x_std^2)


@dataclass
class GlobalBatch:
    """The random draws of one optimizer step, for the whole global batch (CPU tensors)."""

    idx: torch.Tensor  # (B,) int64 dataset rows
    posterior_noise: Optional[torch.Tensor]  # (B, C, H, W) or None: fresh latent from the stored posterior
    flip: Optional[torch.Tensor]  # (B,) bool or None: horizontal flips (pixel space only)
    t: torch.Tensor  # (B,) continuous time
    noise: torch.Tensor  # (B, C, H, W) the epsilon target
    drop: Optional[torch.Tensor]  # (B,) bool or None: labels replaced by the null class
    weight_total: Optional[torch.Tensor]  # () sum of the global batch's per-image weights, or None

    @property
    def size(self) -> int:
        return int(self.idx.shape[0])


@dataclass
class MicroBatch:
    """One micro-batch on one rank, on the training device."""

    x0: torch.Tensor  # (b, C, H, W)
    t: torch.Tensor  # (b,)
    noise: torch.Tensor  # (b, C, H, W)
    y: Optional[torch.Tensor]  # (b,) int64 or None (unconditional)
    weight: Optional[torch.Tensor]  # (b,) float32 or None
    time_weight: Optional[torch.Tensor] = None  # (b,) loss weight of each image's noise level (Min-SNR)


def draw_global_batch(
    data: DiffusionData, batch_size: int, schedule, gen: torch.Generator, hflip: bool, label_dropout: float
) -> GlobalBatch:
    """All random draws of one step from ``gen``, in ``fit_diffusion``'s historical order."""
    n = data.x.shape[0]
    shape = (batch_size, *data.x.shape[1:])
    idx = torch.randint(0, n, (batch_size,), generator=gen)
    posterior_noise = torch.randn(shape, generator=gen) if data.x_std is not None else None
    flip = torch.rand(batch_size, generator=gen) < 0.5 if hflip and data.x_std is None else None
    t = schedule.sample_time(batch_size, gen)
    noise = torch.randn(shape, generator=gen)
    drop = torch.rand(batch_size, generator=gen) < label_dropout if data.num_classes > 0 else None
    weight_total = data.weight[idx].sum() if data.weight is not None else None
    return GlobalBatch(idx, posterior_noise, flip, t, noise, drop, weight_total)


def micro_batches(
    batch: GlobalBatch,
    data: DiffusionData,
    rank: int,
    world_size: int,
    grad_accum: int,
    device: torch.device,
) -> list[MicroBatch]:
    """This rank's ``grad_accum`` micro-batches of ``batch``, gathered and moved to ``device``."""
    b_global = batch.size
    parts = world_size * grad_accum
    if b_global % parts:
        raise ValueError(
            f"stage2.batch_size={b_global} is not divisible by world_size x grad_accum = "
            f"{world_size} x {grad_accum} = {parts}: choose a batch size that is a multiple of {parts}"
        )
    b = b_global // parts
    out = []
    for m in range(grad_accum):
        lo = (rank * grad_accum + m) * b
        sl = slice(lo, lo + b)
        idx = batch.idx[sl]
        x0 = data.x[idx].to(device, non_blocking=True)  # (b, C, H, W)
        if batch.posterior_noise is not None:
            x0 = x0 + data.x_std[idx].to(device) * batch.posterior_noise[sl].to(device)
        if batch.flip is not None:
            x0 = torch.where(batch.flip[sl].view(-1, 1, 1, 1).to(device), x0.flip(-1), x0)
        if batch.drop is not None:
            y = data.y[idx].clone()
            y[batch.drop[sl]] = data.num_classes  # the null class (the extra embedding row)
            y = y.to(device)
        else:
            y = None
        weight = data.weight[idx].to(device) if data.weight is not None else None
        out.append(MicroBatch(x0, batch.t[sl].to(device), batch.noise[sl].to(device), y, weight))
    return out


def min_snr_weight(schedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weight for epsilon prediction (Hang et al. 2023): ``min(SNR, gamma) / SNR``
    with ``SNR(t) = alpha_t^2 / sigma_t^2``. Noisy images keep weight 1; nearly clean ones, whose
    epsilon is hard to predict and does not matter for sampling, are down-weighted, which stops
    the noise levels' gradients from fighting and speeds up convergence."""
    snr = torch.exp(2.0 * schedule.marginal_lambda(t.float()))
    return torch.clamp(snr, max=gamma) / snr


def micro_loss(pred: torch.Tensor, mb: MicroBatch, batch: GlobalBatch, whole_batch: bool) -> torch.Tensor:
    """This micro-batch's share of the global batch's loss (the shares sum to the global loss).

    ``whole_batch`` (one rank, no accumulation) uses the historical expressions verbatim, so the
    single-process path stays bit-identical; otherwise the per-image losses are summed and divided
    by the global batch size (or the global batch's total weight).
    """
    per_image = F.mse_loss(pred.float(), mb.noise, reduction="none").mean(dim=(1, 2, 3))  # (b,)
    if mb.time_weight is not None:
        per_image = per_image * mb.time_weight
    if mb.weight is not None:
        if whole_batch:
            return (per_image * mb.weight).sum() / mb.weight.sum().clamp_min(1e-8)
        total = batch.weight_total.to(per_image.device)
        return (per_image * mb.weight).sum() / total.clamp_min(1e-8)
    if whole_batch:
        return per_image.mean()
    return per_image.sum() / batch.size
