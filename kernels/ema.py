"""EMA of model weights: ``ema <- decay * ema + (1 - decay) * param``, in place.

Reference: one ``torch._foreach_lerp_`` over all tensors, ``ema + (1 - decay) * (param - ema)``,
which is the same update written as a lerp (one read of each operand, one write of ``ema``;
PyTorch evaluates it as one fused multiply-add per element). Parameters of another dtype (bf16
weights, fp32 EMA) are upcast first. ``ema_update_`` is the dispatch point of the ``ema`` op:
``reference`` (this), ``triton`` (``ema_triton.ema_update_triton_``: one multi-tensor launch,
bit-identical to the reference), or a registered ``cuda``/``cpp`` backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dispatch import register_backend, resolve_backend
from .ema_triton import ema_triton_available, ema_update_triton_unchecked_

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


register_backend("ema", "reference", ema_update_reference_)
register_backend("ema", "triton", ema_update_triton_unchecked_, ema_triton_available)


def ema_update_(
    ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float, *, backend: str | None = None
) -> None:
    """In-place EMA update through the kernel dispatch.

    Args:
        ema: the EMA tensors (fp32 for the fused backends), updated in place.
        params: the matching parameters (same sizes; fp32, bf16 or fp16), read only.
        decay: EMA decay (the weight of the old EMA).
        backend: ``"reference"``, ``"triton"``, a registered ``"cuda"``/``"cpp"``, ``"auto"`` or
            None (``use_backend`` / ``DPT_KERNELS`` / auto).

    A backend's ``available`` check receives ``[*ema, *params]``.
    """
    if len(ema) != len(params):
        raise ValueError(f"ema has {len(ema)} tensors but params has {len(params)}")
    if not ema:
        return
    tensors = [*ema, *params]
    resolve_backend("ema", tensors, backend)(ema, params, decay)
