"""``load_autoencoder``: stage 2's autoencoder from a config string (pixel space, a diffusers
directory, or an original ldm-format Stable Diffusion file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .autoencoder import (
    IDENTITY_SPECS,
    AutoencoderNotFoundError,
    BaseAutoencoder,
    IdentityAutoencoder,
    LatentAutoencoder,
)
from .sd_autoencoder import load_ldm_autoencoder

__all__ = ["load_autoencoder"]


def load_autoencoder(spec: str | os.PathLike, **kwargs: Any) -> BaseAutoencoder:
    """Build the stage-2 autoencoder named by a config string.

    ``"identity"`` / ``"none"`` / ``"pixel"`` -> :class:`IdentityAutoencoder`; a directory ->
    :meth:`LatentAutoencoder.from_pretrained_dir`; a file -> the Stable Diffusion KL autoencoder in
    the original ldm format used by U-ViT / DPT (``autoencoder_kl.pth``, ``autoencoder_kl_ema.pth``,
    ``.safetensors`` or a full SD ``.ckpt``; :func:`~dpt_engine.models.sd_autoencoder.load_ldm_autoencoder`).
    ``kwargs`` (``scale_factor``, ``torch_dtype``, ``freeze``) are passed on. Anything else is an
    error naming the path.
    """
    s = str(spec)
    if s.lower() in IDENTITY_SPECS:
        return IdentityAutoencoder()
    p = Path(s).expanduser()
    if p.is_dir():
        return LatentAutoencoder.from_pretrained_dir(p, **kwargs)
    if p.is_file():
        return load_ldm_autoencoder(p, **kwargs)
    raise AutoencoderNotFoundError(
        f"autoencoder not found: {s!r} does not exist. Pass the original Stable Diffusion KL autoencoder "
        "file (e.g. assets/stable-diffusion/autoencoder_kl_ema.pth), a local diffusers AutoencoderKL "
        f"directory (config.json + weights) or one of {IDENTITY_SPECS} for pixel space"
    )
