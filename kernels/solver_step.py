"""One fused DPM-Solver++ multistep update (with optional classifier-free guidance): Triton
kernel + the eager reference, behind the ``solver_step`` dispatch point.

Maths (``DPMSolverPP`` in ``dpt_engine/diffusion/dpm_solver.py``, table row ``i`` with the
columns ``x_scale, c_cur, c_prev, c_prev2, inv_alpha, sigma_over_alpha``; guidance as
``dpt_engine.diffusion.guidance.cfg_combine``)::

    eps      = cond + w * (cond - uncond)       (guided: model output (2B, ...) = [cond; uncond])
    x0_i     = inv_alpha_i * x_i - sigma_over_alpha_i * eps
    x_{i+1}  = x_scale_i * x_i + c_cur_i * x0_i + c_prev_i * x0_{i-1} + c_prev2_i * x0_{i-2}

where only the first ``order_i`` data predictions enter (orders 1-3; the warm-up and
``lower_order_final`` steps use fewer). The eager version is ~8 kernels and as many passes
over x-sized tensors; the fused kernel reads x, the model output(s) and the ``order_i - 1``
older predictions once, and writes x_{i+1} and x0_i once.

State lives on the device: the data predictions in a ring buffer ``history`` (S, *x.shape) with
x0_i in slot ``i % S`` (S >= the solver's order), the coefficients in a device table (steps, 7)
(the six columns rounded to fp32 plus the order), and the step index may be a device int
tensor, so a step needs no host sync and can be captured in a CUDA graph (replay it after
``step.add_(1)``).

Precision: all arithmetic is fp32 (model outputs in fp16/bf16 are upcast on load), in the same
operation order as the eager code; the Triton kernel is launched with floating-point
contraction disabled (no fma fusion), so it reproduces the eager fp32 result bit for bit on
GPUs as well as under the interpreter.

The launch runs as the ``torch.library`` custom op ``dpt_triton::dpm_solver_step_`` (it mutates
``history`` and ``out``; same argument list as the C++ extension's ``dpt_engine::dpm_solver_step_``)
with a fake implementation, so ``torch.compile`` traces a step as one graph node.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .dispatch import interpreted, register_backend, resolve_backend, tl, triton, triton_unavailable_reason

__all__ = [
    "TABLE_COLUMNS",
    "SolverStepTable",
    "sample_multistep_fused",
    "solver_step",
    "solver_step_reference",
    "solver_step_table",
    "solver_step_triton",
]

TABLE_COLUMNS = ("x_scale", "c_cur", "c_prev", "c_prev2", "inv_alpha", "sigma_over_alpha", "order")


@dataclass(frozen=True)
class SolverStepTable:
    """Per-step data of a multistep ``DPMSolverPP`` on one device.

    coef: (steps, 7) fp32 device table, columns ``TABLE_COLUMNS``.
    step_index: (steps,) int32 device ``arange``: ``step_index[i:i+1]`` is a device step index.
    rows: the float64 coefficient rows on the host (the reference uses these, as DPMSolverPP).
    orders: order of each step; times: continuous time ``t_i`` at which step ``i`` evaluates.
    """

    coef: torch.Tensor
    step_index: torch.Tensor
    rows: tuple[tuple[float, ...], ...]
    orders: tuple[int, ...]
    times: tuple[float, ...]

    @property
    def steps(self) -> int:
        return len(self.orders)

    @property
    def max_order(self) -> int:
        return max(self.orders)


def solver_step_table(solver: Any, device: torch.device | str) -> SolverStepTable:
    """Build the device table of a multistep ``DPMSolverPP`` (one host->device copy)."""
    if getattr(solver, "method", None) != "multistep":
        raise ValueError("the fused solver step needs a DPMSolverPP with method='multistep'")
    coef64 = solver.coefficients  # (steps, 6) float64
    orders = tuple(int(k) for k in solver.orders)
    table = torch.cat([coef64, torch.tensor(orders, dtype=torch.float64)[:, None]], dim=1)  # (steps, 7)
    return SolverStepTable(
        coef=table.to(torch.float32).to(device),
        step_index=torch.arange(len(orders), dtype=torch.int32, device=device),
        rows=tuple(tuple(float(v) for v in row) for row in coef64.tolist()),
        orders=orders,
        times=tuple(float(t) for t in solver.timesteps[:-1].tolist()),
    )


# ============================================================================ reference
def _check_step(x, model_out, history, table, guidance_scale, out) -> str | None:
    n = x.numel()
    want = 2 * n if guidance_scale is not None else n
    if model_out.numel() != want:
        kind = "the doubled batch (2B, ...)" if guidance_scale is not None else "x's size"
        return f"model output has {model_out.numel()} elements, expected {want} ({kind})"
    if history.dim() != x.dim() + 1 or history.shape[1:] != x.shape:
        return (
            f"history must be (S, *x.shape) = (S, {', '.join(map(str, x.shape))}), got {tuple(history.shape)}"
        )
    if history.shape[0] < table.max_order:
        return f"history has {history.shape[0]} slots but the solver's order is {table.max_order}"
    if out is not None and out.shape != x.shape:
        return f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}"
    return None


def solver_step_reference(
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor,
    table: SolverStepTable,
    step: int | torch.Tensor,
    guidance_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager multi-op step: exactly ``DPMSolverPP.data_prediction`` + ``.step`` (with
    ``cfg_combine`` first when guided), in x's dtype. A tensor ``step`` is read with ``int()``
    (a host sync). Writes x0_i into ``history[i % S]``; returns x_{i+1} (in ``out`` if given)."""
    reason = _check_step(x, model_out, history, table, guidance_scale, out)
    if reason is not None:
        raise ValueError(f"solver_step: {reason}")
    i = int(step)
    if not 0 <= i < table.steps:
        raise IndexError(f"step {i} is outside 0..{table.steps - 1}")
    row = table.rows[i]
    s = history.shape[0]
    eps = model_out.to(x.dtype)
    if guidance_scale is not None:
        cond, uncond = eps.reshape(2, *x.shape).unbind(0)  # 2 x (B, ...)
        eps = cond + guidance_scale * (cond - uncond)
    else:
        eps = eps.reshape(x.shape)
    x0 = x * row[4] - eps * row[5]
    history[i % s].copy_(x0)
    nxt = x * row[0] + x0 * row[1]
    for j in range(1, table.orders[i]):
        nxt = nxt + history[(i - j) % s] * row[1 + j]
    if out is None:
        return nxt
    return out.copy_(nxt)


# ============================================================================ triton kernel
@triton.jit
def _dpm_multistep_kernel(
    X, MODEL_OUT, HIST, OUT, TABLE, STEP,
    numel, num_slots, guidance_scale,
    GUIDED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Elementwise over the ``numel`` elements of x: guidance, x0, history write, update."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    # -- step i and its coefficient row, read on the device (no host sync)
    step = tl.load(STEP).to(tl.int64)
    row = TABLE + step * 7
    x_scale = tl.load(row + 0)
    c_cur = tl.load(row + 1)
    c_prev = tl.load(row + 2)
    c_prev2 = tl.load(row + 3)
    inv_alpha = tl.load(row + 4)
    sigma_over_alpha = tl.load(row + 5)
    order = tl.load(row + 6).to(tl.int32)

    x = tl.load(X + offs, mask=mask, other=0.0)
    if GUIDED:  # model output (2B, ...): cond in the first half, uncond in the second
        cond = tl.load(MODEL_OUT + offs, mask=mask, other=0.0).to(tl.float32)
        uncond = tl.load(MODEL_OUT + numel + offs, mask=mask, other=0.0).to(tl.float32)
        eps = cond + guidance_scale * (cond - uncond)
    else:
        eps = tl.load(MODEL_OUT + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = x * inv_alpha - eps * sigma_over_alpha

    # -- ring buffer: x0_i -> slot i % S; x0_{i-1}, x0_{i-2} in the two slots before it
    slot0 = step % num_slots
    slot1 = (step + num_slots - 1) % num_slots
    slot2 = (step + 2 * num_slots - 2) % num_slots
    tl.store(HIST + slot0 * numel + offs, x0, mask=mask)
    nxt = x * x_scale + x0 * c_cur
    use1 = order >= 2
    m1 = tl.load(HIST + slot1 * numel + offs, mask=mask & use1, other=0.0)
    nxt = tl.where(use1, nxt + m1 * c_prev, nxt)
    use2 = order >= 3
    m2 = tl.load(HIST + slot2 * numel + offs, mask=mask & use2, other=0.0)
    nxt = tl.where(use2, nxt + m2 * c_prev2, nxt)
    tl.store(OUT + offs, nxt, mask=mask)


def _fp32(value: float) -> float:
    """``value`` rounded to fp32 (as torch rounds a Python scalar for an fp32 op); the Triton
    interpreter would otherwise pass it through as fp64."""
    return struct.unpack("f", struct.pack("f", float(value)))[0]


def step_config(interpret: bool = False) -> dict[str, int]:
    """Elements per program and warps (a bandwidth-bound elementwise kernel)."""
    if interpret:
        return {"BLOCK": 1024, "num_warps": 4}
    return {"BLOCK": 2048, "num_warps": 8}


def _triton_available(tensors: Sequence[torch.Tensor]) -> str | None:
    """``tensors`` = ``(x, model_out, history, table.coef[, out])``."""
    reason = triton_unavailable_reason(tensors, _dpm_multistep_kernel)
    if reason is not None:
        return reason
    x, model_out, history = tensors[0], tensors[1], tensors[2]
    if x.dtype != torch.float32 or history.dtype != torch.float32:
        return f"x and history must be fp32, got {x.dtype} and {history.dtype}"
    if model_out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"model output must be fp32/fp16/bf16, got {model_out.dtype}"
    if len(tensors) > 4 and tensors[4].dtype != torch.float32:
        return f"out must be fp32, got {tensors[4].dtype}"
    if not all(t.is_contiguous() for t in tensors):
        return "x, model output, history and out must be contiguous"
    return None


def solver_step_triton(
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor,
    table: SolverStepTable,
    step: int | torch.Tensor,
    guidance_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused step (one launch). ``step``: an int, or a 1-element int device tensor (CUDA-graph
    friendly). ``out`` may be ``x`` itself (in-place update). Arguments as ``solver_step``."""
    reason = _check_step(x, model_out, history, table, guidance_scale, out)
    if reason is not None:
        raise ValueError(f"solver_step: {reason}")
    out = torch.empty_like(x) if out is None else out
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype not in (torch.int32, torch.int64) or step.device != x.device:
            raise ValueError("a tensor step must be one int32/int64 element on x's device")
        step_ptr = step
    else:
        if not 0 <= int(step) < table.steps:
            raise IndexError(f"step {step} is outside 0..{table.steps - 1}")
        step_ptr = table.step_index[int(step) :]  # a view: its address is the index, no copy
    _solver_step_op(x, model_out, history, table.coef, step_ptr, guidance_scale, out)
    return out


# ============================================================================ torch.library op
# Namespace ``dpt_triton`` (shared with the attention ops; the C++ extension owns ``dpt_engine``).
@torch.library.custom_op("dpt_triton::dpm_solver_step_", mutates_args=("history", "out"))
def _solver_step_op(
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor,
    coef: torch.Tensor,
    step: torch.Tensor,
    guidance_scale: float | None,
    out: torch.Tensor,
) -> None:
    """Host launcher (no checks: ``solver_step_triton`` validated the call). ``coef`` is
    ``table.coef``, ``step`` an int tensor whose first element is the step index."""
    numel = x.numel()
    cfg = step_config(interpreted(_dpm_multistep_kernel))
    _dpm_multistep_kernel[(triton.cdiv(numel, cfg["BLOCK"]),)](
        x, model_out, history, out, coef, step,
        numel, history.shape[0], _fp32(0.0 if guidance_scale is None else guidance_scale),
        GUIDED=guidance_scale is not None, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
        enable_fp_fusion=False,
    )  # fmt: skip


@_solver_step_op.register_fake
def _(x, model_out, history, coef, step, guidance_scale, out):
    torch._check(coef.dim() == 2 and coef.shape[1] == 7, lambda: "coef must be (steps, 7)")
    torch._check(history.dim() == x.dim() + 1, lambda: "history must be (S, *x.shape)")
    torch._check(out.shape == x.shape, lambda: "out must have x's shape")


# ============================================================================ public entry points
register_backend("solver_step", "reference", solver_step_reference)
register_backend("solver_step", "triton", solver_step_triton, _triton_available)


def solver_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor,
    table: SolverStepTable,
    step: int | torch.Tensor,
    *,
    guidance_scale: float | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """DPM-Solver++ multistep update ``x_i -> x_{i+1}`` through the kernel dispatch.

    Args:
        x: (B, ...) current sample x_i (fp32 for the fused backend).
        model_out: the noise prediction (B, ...), or with ``guidance_scale`` the doubled-batch
            prediction (2B, ...) whose first B rows are conditional and last B unconditional.
        history: (S, B, ...) ring buffer of data predictions, S >= the solver's order; x0_i is
            written to slot ``i % S``, x0_{i-1} / x0_{i-2} are read from the slots before it.
        table: ``solver_step_table(solver, device)``.
        step: the step index i (int, or a 1-element int device tensor for the fused backend).
        guidance_scale: w in ``cond + w * (cond - uncond)``; None = model_out is eps already.
        out: where to write x_{i+1} (may be ``x``); default a new tensor.
        backend: ``"reference"``, ``"triton"``, ``"auto"``, a registered one, or None.

    Returns x_{i+1}.
    """
    tensors = (x, model_out, history, table.coef) if out is None else (x, model_out, history, table.coef, out)
    fn = resolve_backend("solver_step", tensors, backend)
    return fn(x, model_out, history, table, step, guidance_scale, out)


@torch.no_grad()
def sample_multistep_fused(
    solver: Any,
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    *,
    guidance_scale: float | None = None,
    backend: str | None = None,
    table: SolverStepTable | None = None,
) -> torch.Tensor:
    """``DPMSolverPP.sample`` (multistep) with one fused ``solver_step`` per model call.

    ``model_fn(x (B, ...), t (B,))`` returns eps (B, ...), or with ``guidance_scale`` the
    doubled-batch prediction (2B, ...) = [cond; uncond] (guidance is fused into the step).
    ``x_T`` is not modified. Returns x at ``t_end``.
    """
    table = solver_step_table(solver, x_T.device) if table is None else table
    tdtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
    history = torch.zeros((table.max_order, *x_T.shape), dtype=x_T.dtype, device=x_T.device)  # (S, B, ...)
    x, buf = x_T, torch.empty_like(x_T)
    for i in range(table.steps):
        t = torch.full((x.shape[0],), table.times[i], dtype=tdtype, device=x.device)  # (B,)
        x = solver_step(
            x, model_fn(x, t), history, table, i, guidance_scale=guidance_scale, out=buf, backend=backend
        )
    return x
