"""EMA of model weights: ``ema <- decay * ema + (1 - decay) * param``, in place.

Reference: one ``torch._foreach_lerp_`` over all tensors, ``ema + (1 - decay) * (param - ema)``,
which is the same update written as a lerp (one read of each operand, one write of ``ema``).
Parameters of another dtype (bf16 weights, fp32 EMA) are upcast first. The fused Triton /
C++ / CUDA versions plug in through ``ema_update_``'s dispatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ema_update_", "ema_update_reference_"]


@torch.no_grad()
def ema_update_reference_(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """Plain PyTorch EMA update of the tensors in ``ema`` towards ``params`` (in place)."""
    if len(ema) != len(params):
        raise ValueError(f"ema has {len(ema)} tensors but params has {len(params)}")
    if not ema:
        return
    src = [p if p.dtype == e.dtype else p.to(e.dtype) for e, p in zip(ema, params)]
    torch._foreach_lerp_(list(ema), src, 1.0 - decay)


def ema_update_(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """EMA update through the kernel dispatch (today: the reference)."""
    ema_update_reference_(ema, params, decay)
