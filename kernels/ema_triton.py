"""Multi-tensor fused EMA update in Triton: one launch per parameter dtype over all tensors.

Maths (identical to ``torch.lerp`` / ``torch._foreach_lerp_`` with weight ``w = 1 - decay``)::

    ema <- ema + w * (param - ema)            if |w| < 0.5
    ema <- param - (param - ema) * (1 - w)    otherwise

each evaluated as one fused multiply-add (``fma(w, d, ema)`` / ``fma(w - 1, d, param)`` with
``d = param - ema``), which is how PyTorch's CPU (vectorised) and CUDA lerp kernels evaluate
it, so the result is bit-identical to the reference. The EMA is fp32; parameters may be fp32,
bf16 or fp16 and are upcast exactly to fp32 on load. Under the Triton interpreter, whose ``fma``
rounds twice, the fused multiply-add is evaluated in fp64 (exact product, then one rounding to
fp64 and one to fp32 - equal to a true fp32 fma except in vanishingly rare double-rounding
ties), keeping the interpreter tests bit-exact. ``w`` is rounded to fp32 on the host, as torch
rounds the Python scalar (the interpreter would otherwise keep it in fp64).

Multi-tensor scheme (after Apex's ``multi_tensor_apply``): the host cuts every tensor into
chunks of at most ``CHUNK`` elements and writes one row per chunk ``(ema address, param
address, length)`` (int64) into a device table; program ``i`` updates chunk ``i`` with
``BLOCK``-wide vector loads. Moving 12 bytes per fp32 parameter (read EMA and param, write
EMA) in one launch is the bandwidth floor; the table is cached on the tensors' addresses, so a
training loop builds it once.

The launch runs as the ``torch.library`` custom op ``dpt_triton::ema_update_`` (``mutates_args``
= the EMA tensors) with a fake implementation, so ``torch.compile`` traces an update as one graph
node (it functionalises the mutation) instead of breaking the graph at the Triton launch.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .dispatch import interpreted, tl, triton, triton_unavailable_reason

__all__ = [
    "ema_chunk_table",
    "ema_config",
    "ema_triton_available",
    "ema_update_triton_",
    "ema_update_triton_unchecked_",
]

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _ema_multi_tensor_kernel(
    TABLE, weight,
    PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, EMULATE_FMA: tl.constexpr,
):  # fmt: skip
    """Program ``pid`` updates chunk ``pid``: TABLE row = (ema address, param address, length)."""
    pid = tl.program_id(0).to(tl.int64)
    row = TABLE + pid * 3
    ema_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    par_ptr = tl.load(row + 1).to(tl.pointer_type(PARAM_DTYPE))
    n = tl.load(row + 2)
    # lerp's two branches, chosen once per launch (w is uniform)
    small = tl.abs(weight) < 0.5
    coeff = tl.where(small, weight, weight - 1.0)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        e = tl.load(ema_ptr + offs, mask=mask, other=0.0)
        p = tl.load(par_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        base = tl.where(small, e, p)
        if EMULATE_FMA:
            r = (coeff.to(tl.float64) * (p - e).to(tl.float64) + base.to(tl.float64)).to(tl.float32)
        else:
            r = tl.fma(coeff, p - e, base)
        tl.store(ema_ptr + offs, r, mask=mask)


def ema_config(interpret: bool = False) -> dict[str, int]:
    """``CHUNK`` (elements per program) / ``BLOCK`` (elements per vector step) / warps.

    GPU: 64K-element chunks keep ~8k programs for a 500M-parameter model (enough to fill an
    H100) while each program streams 256 KiB. Interpreter: tiny chunks so the tests exercise
    tensors that span several chunks.
    """
    if interpret:
        return {"CHUNK": 256, "BLOCK": 64, "num_warps": 4}
    return {"CHUNK": 65536, "BLOCK": 2048, "num_warps": 8}


_TABLE_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TABLE_CACHE_SIZE = 8


def ema_chunk_table(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], chunk: int) -> torch.Tensor:
    """The (n_chunks, 3) int64 device table ``(ema address, param address, length)``.

    Cached on the addresses and sizes: the table depends on nothing else, so a reused address
    (e.g. a freed and reallocated buffer) maps to the same, still correct, table.
    """
    key = (
        ema[0].device,
        chunk,
        tuple((e.data_ptr(), p.data_ptr(), e.numel(), p.element_size()) for e, p in zip(ema, params)),
    )
    table = _TABLE_CACHE.get(key)
    if table is not None:
        _TABLE_CACHE.move_to_end(key)
        return table
    rows = []
    for e_ptr, p_ptr, n, p_size in key[2]:
        for start in range(0, n, chunk):
            rows.append((e_ptr + 4 * start, p_ptr + p_size * start, min(chunk, n - start)))
    table = torch.tensor(rows, dtype=torch.int64).to(ema[0].device)
    _TABLE_CACHE[key] = table
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table


def ema_triton_available(tensors: Sequence[torch.Tensor]) -> str | None:
    """``tensors`` = ``[*ema, *params]``; None when the fused kernel can update them."""
    reason = triton_unavailable_reason(tensors, _ema_multi_tensor_kernel)
    if reason is not None:
        return reason
    half = len(tensors) // 2
    for e, p in zip(tensors[:half], tensors[half:]):
        if e.dtype != torch.float32:
            return f"the EMA must be fp32, got {e.dtype}"
        if p.dtype not in PARAM_DTYPES:
            return f"parameters must be fp32/bf16/fp16, got {p.dtype}"
        if e.numel() != p.numel():
            return f"EMA and parameter sizes differ ({e.numel()} vs {p.numel()})"
        if not (e.is_contiguous() and p.is_contiguous()):
            return "EMA and parameter tensors must be contiguous"
    return None


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@torch.no_grad()
def ema_update_triton_(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """Fused in-place EMA update (one launch per parameter dtype). Inputs as ``ema_update_``."""
    if len(ema) != len(params):
        raise ValueError(f"ema has {len(ema)} tensors but params has {len(params)}")
    if not ema:
        return
    reason = ema_triton_available([*ema, *params])
    if reason is not None:
        raise ValueError(f"ema_update_triton_: {reason}")
    ema_update_triton_unchecked_(ema, params, decay)


def _ema_launch(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """Host launcher: one ``_ema_multi_tensor_kernel`` launch per parameter dtype (no checks)."""
    pairs = [(e, p) for e, p in zip(ema, params) if e.numel()]
    if not pairs:
        return
    interpret = interpreted(_ema_multi_tensor_kernel)
    cfg = ema_config(interpret)
    # round w to fp32 on the host as torch does: the interpreter passes Python floats through as
    # fp64, and `w - 1` must be the exact fp32 value in both modes (exact for w in [0.5, 2])
    weight = struct.unpack("f", struct.pack("f", 1.0 - float(decay)))[0]
    for dtype in PARAM_DTYPES:
        group = [(e, p) for e, p in pairs if p.dtype == dtype]
        if not group:
            continue
        table = ema_chunk_table([e for e, _ in group], [p for _, p in group], cfg["CHUNK"])
        _ema_multi_tensor_kernel[(table.shape[0],)](
            table, weight,
            PARAM_DTYPE=_tl_dtype(dtype),
            BLOCK=cfg["BLOCK"], EMULATE_FMA=interpret, num_warps=cfg["num_warps"],
        )  # fmt: skip


# ============================================================================ torch.library op
# Namespace ``dpt_triton`` (shared with the attention ops; the C++ extension owns ``dpt_engine``).
@torch.library.custom_op("dpt_triton::ema_update_", mutates_args=("ema",))
def _ema_update_op(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    _ema_launch(ema, params, decay)


@_ema_update_op.register_fake
def _(ema, params, decay):
    torch._check(len(ema) == len(params), lambda: "ema and params differ in length")
    for e, p in zip(ema, params):
        torch._check(e.numel() == p.numel(), lambda: "EMA and parameter sizes differ")


@torch.no_grad()
def ema_update_triton_unchecked_(
    ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float
) -> None:
    """``ema_update_triton_`` without the input checks: the dispatch registers this one, since
    it has run ``ema_triton_available`` already (one pass over ~1000 tensors is ~1 ms of Python).
    Runs the custom op ``dpt_triton::ema_update_``."""
    if not ema:  # an op call needs a tensor to dispatch on; nothing to update anyway
        return
    _ema_update_op(list(ema), list(params), float(decay))
