"""Conversions between the three pixel spaces, written once.

* uint8 images, 0..255 (datasets, PNG files, the FID Inception's input);
* float32 in ``[0, 1]`` (the classifiers' input and the augmentations);
* float32 in ``[-1, 1]``, "model space" (the diffusion models' and autoencoders' space).

Each formula is the one the package has always used, so results are bit-identical to before:
``uint8 -> [0, 1]`` divides by 255 and ``uint8 -> [-1, 1]`` divides by 127.5 and subtracts 1
(not ``2 * x / 255 - 1``, which rounds differently); ``[-1, 1] -> uint8`` clamps, scales by
127.5 and rounds to nearest (ties to even), as saving to PNG would.
"""

from __future__ import annotations

import torch

__all__ = ["model_space_to_uint8", "uint8_to_model_space", "uint8_to_unit"]


def _float32_copy(images: torch.Tensor) -> torch.Tensor:
    """``images`` as a float32 tensor that the caller may change in place (never ``images``)."""
    out = images.float()
    return out.clone() if out is images else out


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` -> float32 in ``[0, 1]`` (``x / 255``), a new tensor."""
    return _float32_copy(images).div_(255.0)


def uint8_to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` -> float32 in ``[-1, 1]`` (``x / 127.5 - 1``), a new tensor."""
    return _float32_copy(images).div_(127.5).sub_(1.0)


def model_space_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in ``[-1, 1]`` (any float dtype) -> uint8 in ``[0, 255]``: clamped, then
    ``(x + 1) * 127.5`` rounded to nearest in fp32. No autograd graph is recorded."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
