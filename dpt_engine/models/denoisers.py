"""The stage-2 denoiser registry: U-ViT presets (``uvit-*``) and convolutional U-Nets (``unet-*``).

Both take ``forward(x, t, y)`` and return the noise prediction; ``stage2.model`` names one.
"""

from __future__ import annotations

import torch.nn as nn

from . import unet, uvit

__all__ = ["create_denoiser", "denoiser_flops", "list_denoisers"]


def list_denoisers() -> list[str]:
    """Every name ``stage2.model`` accepts."""
    return sorted(uvit.list_uvits() + unet.list_unets())


def create_denoiser(name: str, **overrides) -> nn.Module:
    """Build the registered denoiser ``name`` with config field ``overrides`` (img_size, in_chans,
    num_classes, ...)."""
    if name in uvit.UVIT_PRESETS:
        return uvit.create_uvit(name, **overrides)
    if name in unet.UNET_PRESETS:
        return unet.create_unet(name, **overrides)
    raise KeyError(f"unknown stage-2 model {name!r}; choose from {list_denoisers()}")


def denoiser_flops(net: nn.Module) -> int | None:
    """Forward FLOPs per image of a registered denoiser, None for other modules."""
    cfg = getattr(net, "cfg", None)
    if isinstance(cfg, uvit.UViTConfig):
        return uvit.flops_per_forward(cfg)
    if isinstance(cfg, unet.UNetConfig):
        return unet.flops_per_forward(cfg)
    return None
