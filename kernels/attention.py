"""Non-causal multi-head attention ``O = softmax(Q K^T * scale) V``: Triton flash attention
(forward + backward) with its plain PyTorch reference, behind the ``attention`` dispatch point.

Algorithm: FlashAttention-2 (Dao, 2023, arXiv:2307.08691), written after the Triton
fused-attention tutorial's structure. Per (batch, head) and block of ``BLOCK_M`` query rows::

    forward   for each key block j:  S_j = Q K_j^T * scale * log2(e)            (BLOCK_M, BLOCK_N)
                                     m'  = max(m, rowmax(S_j))
                                     P_j = exp2(S_j - m'),  l = l * exp2(m - m') + rowsum(P_j)
                                     A   = A * exp2(m - m') + P_j V_j ;  m = m'
              O = A / l,   L = m + log2(l)            (L: log2-sum-exp2 of the scaled scores)
    backward  D  = rowsum(dO * O)                                            (preprocess kernel)
              P  = exp2(S - L)   (recomputed; no N x N matrix is stored)
              dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),
              dK = scale * dS^T Q   (one kernel per key block, looping over query blocks)
              dQ = scale * dS K     (one kernel per query block, looping over key blocks)

Precision: the scores, the running max ``m``, the running sum ``l``, the output accumulator
``A``, ``L``, ``D`` and the dQ/dK/dV accumulators are fp32 whatever the input dtype: the
softmax normaliser sums up to N exponentials, and dK/dV sum N contributions, which fp16/bf16
would round away. ``P`` and ``dS`` are cast to the input dtype before their matmuls (as in
FlashAttention) so fp16/bf16 inputs run on the tensor cores; fp32 inputs use ``ieee`` dots, or
tf32 when ``torch.backends.cuda.matmul.allow_tf32`` is set.

Shapes: q (B, H, N_q, D), k and v (B, H, N_kv, D), any strides (e.g. views of a packed
(B, N, 3, H, D) qkv projection, read in place with no transposed copies). The head dim D
(<= 128, e.g. 72) is padded inside the kernel to the next power of two with masked loads;
sequence lengths need not be block multiples (e.g. 258). The output is shaped (B, H, N_q, D)
but laid out as (B, N_q, H, D) in memory, so ``o.transpose(1, 2).reshape(B, N_q, H * D)`` is a
free view. ``attention_qkvpacked`` takes the packed (B, N, 3, H, D) projection and also writes
the gradient straight into one packed (B, N, 3, H, D) tensor.

Backends of the ``attention`` op: ``reference`` = ``F.scaled_dot_product_attention`` (PyTorch's
own kernels, what the model used before); ``triton`` = the kernels below. ``attention_reference``
(softmax computed in fp32 by plain matmuls) is the oracle the tests compare both against. The
triton backend runs as ``torch.library`` custom ops (``dpt_triton::flash_attn_fwd`` / ``_bwd``
and the ``_qkvpacked`` pair) with fake implementations and a registered autograd formula, so
``torch.compile`` traces through them as single nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .dispatch import interpreted, register_backend, resolve_backend, tl, triton, triton_unavailable_reason

__all__ = [
    "attention",
    "attention_qkvpacked",
    "attention_reference",
    "attention_sdpa",
    "attention_triton",
    "attention_triton_backward",
    "attention_triton_forward",
]

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ============================================================================ reference
def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` with every step in fp32 (fp64 inputs stay fp64); the oracle.

    q (B, H, N_q, D), k and v (B, H, N_kv, D) -> (B, H, N_q, D) in q's dtype. Differentiable.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale  # (B, H, N_q, N_kv)
    return torch.matmul(torch.softmax(s, dim=-1), v.to(ct)).to(q.dtype)  # (B, H, N_q, D)


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The ``reference`` backend: ``F.scaled_dot_product_attention`` (non-causal, no dropout)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ============================================================================ triton kernels
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N_Q, N_KV, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (query block, batch*head) program: online softmax over all key blocks.

    ``qk_scale = scale * log2(e)`` so that ``exp2`` replaces ``exp``; LSE receives the log2
    normaliser ``m + log2(l)`` per row, fp32, laid out (B * H, N_Q).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q

    # -- load the query block once; padded rows / head-dim columns read as 0
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)  # unnormalised output

    # -- stream over key/value blocks (online softmax)
    for start_n in range(0, N_KV, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < N_KV
        kt = tl.load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # (D_PAD, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, D_PAD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # -- epilogue: normalise, store O and the log2-sum-exp2
    acc = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N_Q,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``DELTA = rowsum(dO * O)`` in fp32, laid out (B * H, N_Q)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, axis=1), mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_KV, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (key block, batch*head) program: ``dV = P^T dO`` and ``dK = scale dS^T Q`` summed in
    fp32 over all query blocks, with ``P^T`` recomputed from the saved log2-sum-exp2."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < N_KV)[:, None] & d_ok[None, :]

    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )  # (BLOCK_N, D_PAD)
    v = tl.load(
        V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )  # (BLOCK_N, D_PAD)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * N_Q
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + offs_m
        r_ok = rows < N_Q
        qt = tl.load(
            q_base + rows[None, :] * stride_qn + offs_d[:, None] * stride_qd,
            mask=r_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # (D_PAD, BLOCK_M)
        do = tl.load(
            do_base + rows[:, None] * stride_don + offs_d[None, :] * stride_dod,
            mask=r_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, D_PAD)
        lse = tl.load(LSE + row_base + rows, mask=r_ok, other=0.0)
        delta = tl.load(DELTA + row_base + rows, mask=r_ok, other=0.0)
        # -- recompute P^T for this (key block, query block)
        st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pt = tl.where(r_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
        # -- dV += P^T dO
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        # -- dS^T = P^T * (dP^T - D),  dP^T = V dO^T ;  dK += dS^T Q
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    dk_ptrs = (
        DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    )
    dv_ptrs = (
        DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    )
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N_Q, N_KV, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (query block, batch*head) program: ``dQ = scale dS K`` summed in fp32 over all key
    blocks (a separate pass, so no atomics are needed)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q
    q_mask = m_ok[:, None] & d_ok[None, :]

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=q_mask,
        other=0.0,
    )  # (BLOCK_M, D_PAD)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
        mask=q_mask,
        other=0.0,
    )  # (BLOCK_M, D_PAD)
    row_base = pid_bh.to(tl.int64) * N_Q
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    for start_n in range(0, N_KV, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < N_KV
        t_mask = n_ok[None, :] & d_ok[:, None]
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=t_mask, other=0.0)
        vt = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=t_mask, other=0.0)
        # -- recompute P, then dS = P * (dO V^T - D);  dQ += dS K
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.where(n_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    dq_ptrs = (
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
    )
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ============================================================================ host launchers
def head_dim_padded(head_dim: int) -> int:
    """The power-of-two head dim the kernels compute with (>= 16 for the tensor-core dots)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: ``ieee`` fp32 unless PyTorch's tf32 switch is on."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def fwd_config(d_pad: int, dtype: torch.dtype, interpret: bool = False) -> dict[str, int]:
    """Block sizes / warps / stages of the forward kernel. Picked (no GPU to autotune on) so that
    ptxas reports no register spills and the shared memory fits sm_80 (``python -m
    dpt_engine.kernels.aot`` prints both; ``tests/test_kernels_aot.py`` compiles exactly these
    for sm_80 and sm_90). Autotune them on a GPU before trusting them for speed."""
    if interpret:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if d_pad <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


def bwd_config(d_pad: int, dtype: torch.dtype, interpret: bool = False) -> dict[str, int]:
    """Block sizes of the backward kernels (see ``fwd_config``). ``BLOCK_N`` key rows per dK/dV
    program looping over ``BLOCK_M`` query rows; ``DQ_BLOCK_M`` query rows per dQ program
    looping over ``DQ_BLOCK_N`` keys. The program's own rows are kept at 64 where possible so
    Hopper's wgmma (64-row tiles) is used."""
    if interpret:
        return {
            "BLOCK_M": 32,
            "BLOCK_N": 64,
            "DQ_BLOCK_M": 64,
            "DQ_BLOCK_N": 32,
            "num_warps": 4,
            "num_stages": 1,
        }
    if dtype == torch.float32:
        return {
            "BLOCK_M": 32,
            "BLOCK_N": 32,
            "DQ_BLOCK_M": 32,
            "DQ_BLOCK_N": 32,
            "num_warps": 8,
            "num_stages": 1,
        }
    if d_pad <= 64:
        return {
            "BLOCK_M": 64,
            "BLOCK_N": 64,
            "DQ_BLOCK_M": 64,
            "DQ_BLOCK_N": 64,
            "num_warps": 8,
            "num_stages": 2,
        }
    return {"BLOCK_M": 32, "BLOCK_N": 64, "DQ_BLOCK_M": 64, "DQ_BLOCK_N": 32, "num_warps": 8, "num_stages": 2}


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be 4-D (B, H, N, D), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _SUPPORTED_DTYPES:
        return f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}"
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or k.shape[2] != v.shape[2]:
        return f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape[3] != d or v.shape[3] != d:
        return f"q, k, v must share the head dim, got {d}, {k.shape[3]}, {v.shape[3]}"
    if not 1 <= d <= MAX_HEAD_DIM:
        return f"head dim {d} is outside 1..{MAX_HEAD_DIM}"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "empty sequence"
    return None


def _triton_available(tensors: Sequence[torch.Tensor]) -> str | None:
    reason = triton_unavailable_reason(tensors, _attn_fwd_kernel)
    if reason is None and len(tensors) >= 3:
        reason = _check_qkv(tensors[0], tensors[1], tensors[2])
    return reason


def _empty_bnhd(b: int, h: int, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, D) tensor stored as (B, N, H, D)."""
    return torch.empty(b, n, h, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def attention_triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns ``(o, lse2)``: o (B, H, N_q, D) (written into ``out``
    when given, any strides; else stored as (B, N_q, H, D)), lse2 (B, H, N_q) fp32 log2 units."""
    reason = _check_qkv(q, k, v)
    if reason is not None:
        raise ValueError(f"attention_triton_forward: {reason}")
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    o = _empty_bnhd(b, h, n_q, d, q) if out is None else out
    lse = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    d_pad = head_dim_padded(d)
    cfg = fwd_config(d_pad, q.dtype, interpreted(_attn_fwd_kernel))
    grid = (triton.cdiv(n_q, cfg["BLOCK_M"]), b * h)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        h, n_q, n_kv, scale * _LOG2E,
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return o, lse


def attention_triton_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels (preprocess, dK/dV, dQ). ``lse`` is the forward's
    log2 normaliser. ``dq``/``dk``/``dv`` may be given (any strides, e.g. views of a packed
    gradient); else they are allocated like q, k, v. Returns ``(dq, dk, dv)``."""
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    d_pad = head_dim_padded(d)
    cfg = bwd_config(d_pad, q.dtype, interpreted(_attn_bwd_dq_kernel))
    prec = dot_precision(q.dtype)
    delta = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(n_q, cfg["BLOCK_M"]), b * h)](
        o, do, delta, *o.stride(), *do.stride(), h, n_q,
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=cfg["BLOCK_M"],
    )  # fmt: skip
    common = {
        "HEAD_DIM": d,
        "D_PAD": d_pad,
        "DOT_PRECISION": prec,
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
    }
    _attn_bwd_dkdv_kernel[(triton.cdiv(n_kv, cfg["BLOCK_N"]), b * h)](
        q, k, v, do, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        h, n_q, n_kv, scale * _LOG2E, scale, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common,
    )  # fmt: skip
    _attn_bwd_dq_kernel[(triton.cdiv(n_q, cfg["DQ_BLOCK_M"]), b * h)](
        q, k, v, do, dq, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        h, n_q, n_kv, scale * _LOG2E, scale, BLOCK_M=cfg["DQ_BLOCK_M"], BLOCK_N=cfg["DQ_BLOCK_N"], **common,
    )  # fmt: skip
    return dq, dk, dv


# ============================================================================ torch.library ops + autograd
# Registered as torch.library custom ops (with fake implementations for FakeTensor /
# torch.compile tracing) whose autograd formula is the backward op, so compiled graphs keep the
# kernels as single nodes. Namespace ``dpt_triton`` (the C++ extension owns ``dpt_engine``).
@torch.library.custom_op("dpt_triton::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = attention_triton_forward(q, k, v, scale)
    return o, lse


@_flash_attn_fwd.register_fake
def _(q, k, v, scale):
    b, h, n, d = q.shape
    return _empty_bnhd(b, h, n, d, q), q.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("dpt_triton::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_triton_backward(do, q, k, v, o, lse, scale)


@_flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_attn_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _flash_attn_grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_flash_attn_fwd.register_autograd(_flash_attn_grad, setup_context=_flash_attn_setup)


@torch.library.custom_op("dpt_triton::flash_attn_qkvpacked_fwd", mutates_args=())
def _flash_attn_packed_fwd(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, _, h, d = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D) strided views, no copies
    o = torch.empty(b, n, h, d, dtype=qkv.dtype, device=qkv.device)  # (B, N, H, D)
    _, lse = attention_triton_forward(q, k, v, scale, out=o.transpose(1, 2))
    return o, lse


@_flash_attn_packed_fwd.register_fake
def _(qkv, scale):
    b, n, _, h, d = qkv.shape
    return qkv.new_empty(b, n, h, d), qkv.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("dpt_triton::flash_attn_qkvpacked_bwd", mutates_args=())
def _flash_attn_packed_bwd(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (B, N, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)  # written in place through the views
    attention_triton_backward(do.transpose(1, 2), q, k, v, o.transpose(1, 2), lse, scale, dq=dq, dk=dk, dv=dv)
    return dqkv


@_flash_attn_packed_bwd.register_fake
def _(do, qkv, o, lse, scale):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _flash_attn_packed_setup(ctx, inputs, output):
    qkv, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.scale = scale


def _flash_attn_packed_grad(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    return _flash_attn_packed_bwd(do, qkv, o, lse, ctx.scale), None


_flash_attn_packed_fwd.register_autograd(_flash_attn_packed_grad, setup_context=_flash_attn_packed_setup)


def _default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The ``triton`` backend: flash attention with autograd (see the module docstring)."""
    return _flash_attn_fwd(q, k, v, _default_scale(q.shape[-1], scale))[0]


# ============================================================================ public entry points
register_backend("attention", "reference", attention_sdpa)
register_backend("attention", "triton", attention_triton, _triton_available)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Non-causal attention ``softmax(q k^T * scale) v`` through the kernel dispatch.

    Args:
        q: (B, H, N_q, D); k, v: (B, H, N_kv, D); any strides; fp32, fp16 or bf16.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"reference"`` (PyTorch SDPA), ``"triton"``, a registered ``"cuda"``/``"cpp"``
            backend, ``"auto"``, or None (``use_backend`` / ``DPT_KERNELS`` / auto).

    Returns (B, H, N_q, D) in q's dtype.
    """
    return resolve_backend("attention", (q, k, v), backend)(q, k, v, scale)


def attention_qkvpacked(
    qkv: torch.Tensor, scale: float | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """Attention on the packed projection ``qkv`` (B, N, 3, H, D) -> (B, N, H, D).

    The triton backend reads q, k, v in place from ``qkv`` and writes the output as
    (B, N, H, D) (so ``.reshape(B, N, H * D)`` is a view) and the gradient as one packed
    (B, N, 3, H, D) tensor: no layout copies in either direction. Other backends go through
    ``attention`` on the unbound views.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, D), got {tuple(qkv.shape)}")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
    fn = resolve_backend("attention", (q, k, v), backend)
    if fn is attention_triton:
        return _flash_attn_packed_fwd(qkv, _default_scale(qkv.shape[-1], scale))[0]
    return fn(q, k, v, scale).transpose(1, 2)  # (B, N, H, D)
