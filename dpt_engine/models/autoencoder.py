"""The latent-space interface of stage 2: a frozen KL autoencoder, or the identity for pixel space.

Stage 2 trains the diffusion model in a *scaled* latent space, as Stable Diffusion / U-ViT do:

    moments:  (mean, logvar) = encode_moments(x)            x in [-1, 1], (B, C, H, W)
    latent:   z = (mean + exp(logvar / 2) * eps - shift) * scale_factor      (B, c, H/f, W/f)
    image:    x = decode(z) = vae.decode(z / scale_factor + shift)           in [-1, 1]

``scale_factor`` (0.18215 for the SD autoencoder) brings the latents to roughly unit variance. Datasets
can store the moments once and draw a fresh latent per epoch with :meth:`sample` (U-ViT's recipe).

:class:`LatentAutoencoder` wraps a diffusers ``AutoencoderKL``; :class:`IdentityAutoencoder` has the
same interface with no compression, so pixel-space and latent-space stage-2 code are the same code.
:func:`dpt_engine.models.autoencoder_loader.load_autoencoder` builds either from a config string (a diffusers directory, or the
original ldm-format ``autoencoder_kl.pth`` of U-ViT / DPT through ``models/sd_autoencoder.py``). diffusers is imported lazily (it
belongs to the ``[diffusion]`` extra).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL

__all__ = [
    "DEFAULT_SCALE_FACTOR",
    "IDENTITY_SPECS",
    "LOGVAR_MAX",
    "LOGVAR_MIN",
    "AutoencoderNotFoundError",
    "BaseAutoencoder",
    "IdentityAutoencoder",
    "LatentAutoencoder",
    "import_autoencoder_kl",
]

DEFAULT_SCALE_FACTOR = 0.18215  # Stable Diffusion's KL-f8 autoencoder
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the clamp of the LDM / diffusers DiagonalGaussianDistribution
IDENTITY_SPECS = ("identity", "none", "pixel")

# A tiny AutoencoderKL for tests: 2 blocks -> one 2x downsampling, ~0.6M parameters.
_TINY_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
}


class AutoencoderNotFoundError(FileNotFoundError):
    """An autoencoder spec names a path that does not exist or holds no diffusers model."""


def import_autoencoder_kl() -> type[AutoencoderKL]:
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover - diffusers is part of the [diffusion] extra
        raise ImportError(
            "LatentAutoencoder needs diffusers: pip install 'diffusers>=0.30' (or 'dpt_engine[diffusion]')"
        ) from e
    return AutoencoderKL


class BaseAutoencoder(nn.Module, ABC):
    """The interface stage 2 uses. Subclasses define the moments and the decoder.

    Attributes:
        scale_factor: multiplies (shifted) latents into the diffusion model's space.
        shift_factor: subtracted before scaling (0 for SD's autoencoder).
        latent_channels: ``c`` of the latent (B, c, H/f, W/f).
        downsample_factor: ``f``.
    """

    scale_factor: float
    shift_factor: float
    latent_channels: int | None
    downsample_factor: int

    @abstractmethod
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, c, H/f, W/f), unscaled."""

    @abstractmethod
    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images (B, C, H, W), not clamped."""

    def sample(
        self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``mean + exp(logvar / 2) * eps`` and map it to the diffusion space (shift, scale).

        ``logvar`` is clamped to [-30, 20]. ``generator`` must live on ``mean``'s device.
        """
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self._to_diffusion_space(mean + torch.exp(0.5 * logvar) * eps)

    def encode(
        self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, H/f, W/f).

        ``sample=True`` draws from the posterior (training); ``False`` uses its mean (deterministic).
        """
        mean, logvar = self.encode_moments(x)
        return self.sample(mean, logvar, generator) if sample else self._to_diffusion_space(mean)

    def decode(self, z: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> images (B, C, h*f, w*f) in [-1, 1] (``clamp=False``: raw)."""
        x = self._decode_unscaled(z / self.scale_factor + self.shift_factor)
        return x.clamp(-1.0, 1.0) if clamp else x

    def _to_diffusion_space(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scale_factor

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent shape for an image shape (C, H, W) or (B, C, H, W); H and W must divide by f."""
        shape = tuple(int(s) for s in image_shape)
        if len(shape) not in (3, 4):
            raise ValueError(f"image shape must be (C, H, W) or (B, C, H, W), got {shape}")
        *lead, c, h, w = shape
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not divisible by the autoencoder's downsampling {f}")
        channels = self.latent_channels if self.latent_channels is not None else c
        return (*lead, channels, h // f, w // f)


class LatentAutoencoder(BaseAutoencoder):
    """A diffusers ``AutoencoderKL``, frozen by default, with the stage-2 latent interface.

    Args:
        vae: the autoencoder.
        scale_factor: latent scale; ``None`` reads ``vae.config.scaling_factor`` (0.18215 by default).
        shift_factor: latent shift; ``None`` reads ``vae.config.shift_factor`` (``None`` -> 0).
        freeze: put the VAE in eval mode with ``requires_grad=False`` and keep it in eval mode even
            when the parent module calls ``.train()`` (DPT never trains the autoencoder).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        scale_factor: float | None = None,
        shift_factor: float | None = None,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.scale_factor = float(
            scale_factor if scale_factor is not None else cfg.get("scaling_factor", DEFAULT_SCALE_FACTOR)
        )
        self.shift_factor = float(
            shift_factor if shift_factor is not None else (cfg.get("shift_factor") or 0.0)
        )
        self.latent_channels = int(cfg["latent_channels"])
        self.downsample_factor = 2 ** (len(cfg["block_out_channels"]) - 1)  # every block but the last halves
        self.frozen = freeze
        if freeze:
            self.vae.eval().requires_grad_(False)

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained_dir(
        cls,
        path: str | os.PathLike,
        *,
        scale_factor: float | None = None,
        torch_dtype: torch.dtype | None = None,
        freeze: bool = True,
    ) -> LatentAutoencoder:
        """Load a local diffusers ``AutoencoderKL`` directory (``config.json`` + weights), offline.

        A full pipeline directory (with the autoencoder in ``vae/``) works too.
        """
        p = Path(path).expanduser()
        if not p.is_dir():
            raise AutoencoderNotFoundError(
                f"autoencoder directory not found: {p}. Pass a local diffusers AutoencoderKL directory "
                "(config.json + diffusion_pytorch_model.safetensors), e.g. one written by vae.save_pretrained()"
            )
        subfolder = None
        if not (p / "config.json").is_file():
            if (p / "vae" / "config.json").is_file():
                subfolder = "vae"
            else:
                raise AutoencoderNotFoundError(
                    f"{p} has no config.json (nor vae/config.json): not a diffusers AutoencoderKL directory"
                )
        autoencoder_kl = import_autoencoder_kl()
        kwargs: dict[str, Any] = {"local_files_only": True}
        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        vae = autoencoder_kl.from_pretrained(str(p), **kwargs)
        return cls(vae, scale_factor=scale_factor, freeze=freeze)

    @classmethod
    def from_config(
        cls, *, scale_factor: float | None = None, freeze: bool = True, **config: Any
    ) -> LatentAutoencoder:
        """A randomly initialised ``AutoencoderKL``: a tiny test config, overridable key by key.

        Defaults: block_out_channels (32, 64) (so f = 2), latent_channels 4, layers_per_block 1,
        sample_size 32. Seed torch first for reproducible weights.
        """
        cfg = {**_TINY_CONFIG, **config}
        n_blocks = len(cfg["block_out_channels"])  # block types follow the number of blocks unless given
        if "down_block_types" not in config:
            cfg["down_block_types"] = ("DownEncoderBlock2D",) * n_blocks
        if "up_block_types" not in config:
            cfg["up_block_types"] = ("UpDecoderBlock2D",) * n_blocks
        vae = import_autoencoder_kl()(**cfg)
        return cls(vae, scale_factor=scale_factor, freeze=freeze)

    # -- interface -------------------------------------------------------------------------------

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean, posterior.logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)  # (B, c, H/f, W/f) each

    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def train(self, mode: bool = True) -> LatentAutoencoder:
        super().train(mode)
        if self.frozen:
            self.vae.eval()
        return self

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the wrapped VAE as a diffusers directory (readable by :meth:`from_pretrained_dir`)."""
        self.vae.save_pretrained(str(path))


class IdentityAutoencoder(BaseAutoencoder):
    """Pixel space behind the autoencoder interface: scale 1, no shift, f = 1, no parameters.

    ``encode_moments(x)`` is ``(x, full(-30))`` (a point mass up to the clamp), and :meth:`sample`
    returns the mean exactly, so ``encode(x) == x`` and ``decode(x) == x.clamp(-1, 1)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale_factor = 1.0
        self.shift_factor = 0.0
        self.latent_channels = None  # same as the image
        self.downsample_factor = 1

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.full_like(x, LOGVAR_MIN)

    def sample(
        self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return mean

    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return z
