"""Classifier-free guidance (CFG) wrappers that turn a class-conditional denoiser into the
``model_fn(x, t_continuous) -> eps`` a sampler expects.

Convention (U-ViT / DPT): with guidance ``scale`` ``w``::

    eps = eps_cond + w * (eps_cond - eps_uncond)            # the original's form
        = eps_uncond + (1 + w) * (eps_cond - eps_uncond)    # the "guidance weight 1 + w" form

so ``w = 0`` is plain conditional sampling and DPT's ``scale = 0.4`` is a weight of 1.4 in the
second (Imagen / diffusers ``guidance_scale``) form. ``eps_uncond`` uses the null class label
(``num_classes``, the last row of the class embedding).

Two ways to get ``eps_cond`` and ``eps_uncond`` (``forwards``): ``"doubled"``, one forward of the
doubled batch ``cat([x, x])`` with labels ``cat([y, null])`` (better GEMM shapes, half the kernel
launches), and ``"two"``, the original's two separate forwards of batch B. Which is faster depends
on the device: ``resolve_guidance_forwards("auto", device)`` picks per device type from
``AUTO_GUIDANCE_FORWARDS``, a table filled by measurement (``benchmarks/bench_sampler.py``). Both
give the same result up to float rounding (a forward of 2B rows is not bit-identical to two of B).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dpt_engine.diffusion.schedules import NoiseSchedule

__all__ = [
    "AUTO_GUIDANCE_FORWARDS",
    "GUIDANCE_FORWARDS",
    "cfg_combine",
    "cfg_eps_fn",
    "clip_denoised_fn",
    "doubled_eps_fn",
    "resolve_guidance_forwards",
    "two_forward_eps_fn",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

GUIDANCE_FORWARDS = ("doubled", "two")
# What ``auto`` uses per device type, by measurement (README "Performance"):
# cpu: two forwards of B. ``benchmarks/bench_sampler.py`` (2-core AMD EPYC, batch 64, 20 steps,
#   fused solver step, interleaved rounds): two forwards / one doubled forward = 1.28x (fp32) and
#   1.06x (bf16) for unet-tiny28, 1.12x (fp32) for uvit-tiny28: the CPU GEMMs do not gain from
#   twice the rows, and the doubled batch costs two concatenations per step.
# cuda: one doubled forward (not yet measured on a GPU: ``benchmarks/gpu_check.py`` times it
#   against the two-forward loop); other device types: the doubled forward.
AUTO_GUIDANCE_FORWARDS = {"cpu": "two", "cuda": "doubled"}


def resolve_guidance_forwards(choice: str, device: torch.device | str) -> str:
    """``auto`` -> the measured choice for ``device``'s type; ``doubled`` / ``two`` are kept."""
    if choice == "auto":
        return AUTO_GUIDANCE_FORWARDS.get(torch.device(device).type, "doubled")
    if choice not in GUIDANCE_FORWARDS:
        raise ValueError(f"guidance forwards must be 'auto', 'doubled' or 'two', got {choice!r}")
    return choice


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``cond + scale * (cond - uncond)``."""
    return cond + scale * (cond - uncond)


def _null_labels(y: torch.Tensor, null_class: int) -> torch.Tensor:
    return torch.full_like(y, null_class)


def cfg_eps_fn(
    net: nn.Module,
    y: torch.Tensor | None,
    scale: float,
    null_class: int | None,
    schedule: NoiseSchedule,
    forwards: str = "doubled",
) -> ModelFn:
    """Guided noise prediction (one batched forward per call; ``forwards="two"``: two).

    Args:
        net: ``net(x (B,C,H,W), t_net (B,), y (B,) | None) -> eps (B,C,H,W)``.
        y: (B,) int64 class labels (None for an unconditional net, which needs ``scale == 0``).
        scale: guidance scale ``w`` (0 -> a single conditional forward, no doubling).
        null_class: label of the null class (the net's ``num_classes``).
        schedule: maps continuous sampler time to the net's input with ``network_time``.

    Returns ``model_fn(x (B,...), t (B,)) -> eps (B,...)``; with ``w > 0`` the net sees a batch
    of ``2B``: rows ``[:B]`` conditional, ``[B:]`` null-class.
    """
    if scale == 0:

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x, schedule.network_time(t), y)

        return model_fn
    if forwards == "two":
        return two_forward_eps_fn(net, y, scale, null_class, schedule)
    if y is None or null_class is None:
        raise ValueError("guidance with scale != 0 needs labels y and a null_class")
    doubled = doubled_eps_fn(net, y, null_class, schedule)

    def guided_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = doubled(x, t).chunk(2)  # 2 x (B, C, H, W)
        return cfg_combine(cond, uncond, scale)

    return guided_fn


def two_forward_eps_fn(
    net: nn.Module, y: torch.Tensor | None, scale: float, null_class: int | None, schedule: NoiseSchedule
) -> ModelFn:
    """The original U-ViT/DPT guidance: separate conditional and null-class forwards of batch B
    (same arguments and result as ``cfg_eps_fn``)."""
    if scale == 0:
        return cfg_eps_fn(net, y, scale, null_class, schedule)
    if y is None or null_class is None:
        raise ValueError("guidance with scale != 0 needs labels y and a null_class")
    y_null = _null_labels(y, null_class)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_net = schedule.network_time(t)
        return cfg_combine(net(x, t_net, y), net(x, t_net, y_null), scale)

    return model_fn


def doubled_eps_fn(
    net: nn.Module, y: torch.Tensor, null_class: int, schedule: NoiseSchedule, forwards: str = "doubled"
) -> ModelFn:
    """``model_fn(x (B,...), t (B,)) -> (2B, ...)``: ``[cond; uncond]`` from one forward of the
    doubled batch (``forwards="two"``: from two forwards of B), for a solver step that fuses the
    guidance combination itself."""
    if forwards == "two":
        y_null = _null_labels(y, null_class)

        def two(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t_net = schedule.network_time(t)
            return torch.cat([net(x, t_net, y), net(x, t_net, y_null)])  # (2B, C, H, W)

        return two
    y2 = torch.cat([y, _null_labels(y, null_class)])  # (2B,)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_net = schedule.network_time(t)
        return net(torch.cat([x, x]), torch.cat([t_net, t_net]), y2)  # (2B, C, H, W)

    return fn


def clip_denoised_fn(
    model_fn: ModelFn, schedule: NoiseSchedule, lo: float = -1.0, hi: float = 1.0
) -> Callable:
    """Wrap ``model_fn(x, t) -> eps`` so the implied data prediction is clipped to [lo, hi].

    ``x0 = (x - sigma_t eps) / alpha_t`` is clipped, and the matching ``eps = (x - alpha_t x0) /
    sigma_t`` is returned: DPM-Solver++ (a data-prediction solver) then integrates with the
    clipped ``x0`` -- the static thresholding of Lu et al. 2022 for pixel-space models, which
    keeps a guided solve inside the data range. Tensor ops only (no host syncs).
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model_fn(x, t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        alpha = schedule.marginal_alpha(t).to(x.dtype).reshape(shape)
        sigma = schedule.marginal_std(t).to(x.dtype).reshape(shape)
        x0 = ((x - sigma * eps) / alpha).clamp(lo, hi)
        return (x - alpha * x0) / sigma

    return fn
