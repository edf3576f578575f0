"""Deterministic per-sample initial noise.

Sample ``index`` of class ``cls`` under run seed ``seed`` gets its own seed
``sample_seed(seed, cls, index)`` and its own CPU ``torch.Generator``, so its noise is
bit-identical whatever the batch size, the batch composition, the world size or the device
(noise is always drawn in fp32 on the CPU, then cast and moved).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["initial_noise", "sample_seed", "splitmix64"]

_MASK64 = (1 << 64) - 1
_DOMAIN = 0x44505453414D504C  # "DPTSAMPL": separates these seeds from other uses of the run seed


def splitmix64(x: int) -> int:
    """One SplitMix64 step (Steele et al., 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, cls: int, index: int) -> int:
    """A 63-bit seed hashed from ``(seed, cls, index)`` by chaining SplitMix64; all three must
    be non-negative integers below 2**64."""
    for v in (seed, cls, index):
        if not 0 <= int(v) <= _MASK64:
            raise ValueError(f"seed, cls and index must be in [0, 2**64), got {v}")
    h = splitmix64(_DOMAIN ^ int(seed))
    h = splitmix64(h ^ int(cls))
    h = splitmix64(h ^ int(index))
    return h >> 1


def initial_noise(
    seed: int,
    classes: torch.Tensor | Sequence[int],
    indices: torch.Tensor | Sequence[int],
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise (B, *shape): row ``b`` is drawn by a CPU generator seeded with
    ``sample_seed(seed, classes[b], indices[b])``."""
    cls_list = classes.tolist() if isinstance(classes, torch.Tensor) else list(classes)
    idx_list = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    if len(cls_list) != len(idx_list):
        raise ValueError(f"classes and indices differ in length ({len(cls_list)} vs {len(idx_list)})")
    shape = tuple(int(s) for s in shape)
    out = torch.empty((len(cls_list), *shape), dtype=torch.float32)  # (B, C, H, W)
    gen = torch.Generator(device="cpu")
    for b, (c, i) in enumerate(zip(cls_list, idx_list)):
        gen.manual_seed(sample_seed(seed, c, i))
        out[b] = torch.randn(shape, generator=gen, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)
