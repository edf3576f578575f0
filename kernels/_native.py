"""Loader and Python face of the C++/CUDA operators in ``libdpt_engine_ops.so`` (``csrc/``).

The library is optional: ``bash scripts/build_native.sh`` builds it into ``kernels/lib/``; without
it (or when loading fails) this module imports fine, ``is_available()`` is False,
``load_error()`` says why, and the ``cpp``/``cuda`` backends are simply not registered, so the
dispatch (``kernels/dispatch.py``) falls back to the PyTorch references.

Set ``DPT_NATIVE_LIB=/path/to/libdpt_engine_ops.so`` to load another build, or ``DPT_NATIVE=0`` to
never load it. ``DPT_CPU_ISA=default|avx2`` picks the build of the CPU loops (default: the
best the CPU runs; ``cpu_isa()`` reports and switches it).

Operators (``torch.ops.dpt_engine.*``, registered through ``torch.library`` with fake impls here,
so ``torch.compile`` traces them; both validate their inputs and name the offending argument):

``ema_update_(ema: list[Tensor], params: list[Tensor], decay: float) -> None`` (mutates ``ema``)
    ``ema[i] <- lerp(ema[i], params[i], 1 - decay)``: the reference ``ema_update_reference_``
    (``torch._foreach_lerp_`` after upcasting the params), in one call over all tensors. ``ema``
    float32, ``params`` float32 or bfloat16 of the same shapes, all contiguous and on one device
    (views into a flat buffer, as ZeRO shards are, are fine). float32 results equal the
    reference to the last bit with the AVX2 loops (torch's fused multiply-add form); the
    baseline loops round the product separately, as torch's DEFAULT capability does.

``dpm_solver_step_(x, model_out, history, table, step, guidance_scale, out) -> None``
    (mutates ``history`` and ``out``). One DPM-Solver++ multistep update, exactly
    ``kernels/solver_step.py``'s ``solver_step_reference`` (``DPMSolverPP.data_prediction`` +
    ``.step`` with ``cfg_combine`` fused in) in one pass over the data::

        i      = step[0];  S = history.shape[0];  row = table[i]
        eps    = model_out                               if guidance_scale is None
               = cond + w * (cond - uncond)              cond, uncond = model_out.reshape(2, *x.shape)
        x0     = x * inv_alpha - eps * sigma_over_alpha  -> written to history[i % S]
        out    = x * x_scale + x0 * c_cur + history[(i-1) % S] * c_prev + history[(i-2) % S] * c_prev2
                 (only the first row[6] = order_i terms)

    Args:
        x: (B, ...) float32 sample x_i.
        model_out: float32/bfloat16/float16 noise prediction with x's number of elements, or with
            ``guidance_scale`` the doubled batch (2B, ...) ``[cond; uncond]``.
        history: (S, B, ...) float32 ring buffer of data predictions, S >= every step's order.
        table: ``solver_step_table(solver, device).coef``: (steps, 7) float32 (or float64) on x's
            device, columns ``x_scale, c_cur, c_prev, c_prev2, inv_alpha, sigma_over_alpha,
            order``.
        step: one-element int32/int64 tensor on x's device holding i (read on the device by the
            CUDA kernel: no host sync, CUDA-graph friendly).
        guidance_scale: w, or None when model_out already is eps.
        out: (B, ...) float32 destination of x_{i+1}; may be ``x`` itself.

    float32 arithmetic in the eager code's operation order with every product and sum rounded on
    its own (no fused multiply-add), so the result equals the eager step bit for bit.

Backends registered with ``kernels/dispatch.py`` when the library loads: ``cpp`` (CPU tensors) and
``cuda`` (CUDA tensors; it reports itself unavailable unless the library was built with
``DPT_BUILD_CUDA=ON``) for ``ema`` (``ema_update_``)
and ``solver_step`` (``solver_step_native``, same signature as ``solver_step_reference``). Their
``available`` checks return a reason for inputs the kernels do not take (e.g. float16 params, a
non-contiguous tensor), so ``auto`` falls back to the reference there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .solver_step import SolverStepTable

__all__ = [
    "LIB_NAME",
    "cpu_isa",
    "ema_native_unavailable_reason",
    "ema_update_",
    "has_cuda_kernels",
    "is_available",
    "library_path",
    "load",
    "load_error",
    "solver_native_unavailable_reason",
    "solver_step_native",
]

logger = logging.getLogger("dpt_engine.kernels")

LIB_NAME = "libdpt_engine_ops.so"
LIB_DIR = Path(__file__).resolve().parent / "lib"

_state: dict[str, object] = {"tried": False, "error": None, "path": None}


def library_path() -> Path:
    """Where the library is looked for: ``$DPT_NATIVE_LIB``, else ``kernels/lib/`` of this package."""
    env = os.environ.get("DPT_NATIVE_LIB")
    return Path(env) if env else LIB_DIR / LIB_NAME


def _ops_registered() -> bool:
    try:
        return hasattr(torch.ops.dpt_engine, "ema_update_")
    except (AttributeError, RuntimeError):
        return False


def load() -> bool:
    """Load the library once (later calls return the first result); True when the ops exist."""
    if _state["tried"]:
        return _state["error"] is None
    _state["tried"] = True
    if os.environ.get("DPT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["error"] = "disabled by DPT_NATIVE=0"
        return False
    path = library_path()
    if _ops_registered():  # already loaded (another copy of this module, or by hand)
        _state["path"] = path
    elif not path.is_file():
        _state["error"] = f"{path} not found (build it with `bash scripts/build_native.sh`)"
        return False
    else:
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as exc:  # wrong torch ABI, missing symbols, ...
            _state["error"] = f"loading {path} failed: {exc}"
            logger.warning("dpt_engine.kernels: %s; using the PyTorch fallbacks", _state["error"])
            return False
        _state["path"] = path
    _register_fakes()
    _register_backends()
    return True


def is_available() -> bool:
    """Whether the C++ operators are loaded (loading them on first call)."""
    return load()


def load_error() -> str | None:
    """Why the library is not loaded (None when it is)."""
    load()
    return _state["error"]  # type: ignore[return-value]


def has_cuda_kernels() -> bool:
    """Whether the loaded library contains the CUDA kernels."""
    return load() and bool(torch.ops.dpt_engine.built_with_cuda())


def cpu_isa(request: str = "") -> str:
    """The build of the CPU loops in use (``default``/``avx2``); switches first when
    ``request`` is one of those or ``auto``."""
    _require()
    return torch.ops.dpt_engine.cpu_isa(request)


def _require() -> None:
    if not load():
        raise RuntimeError(f"dpt_engine native ops are not available: {_state['error']}")


# ---------------------------------------------------------------------------- Python wrappers
def ema_update_(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """``torch.ops.dpt_engine.ema_update_`` (see the module docstring); in place on ``ema``."""
    _require()
    if len(ema) != len(params):
        raise ValueError(f"ema has {len(ema)} tensors but params has {len(params)}")
    if not ema:
        return
    with torch.no_grad():
        torch.ops.dpt_engine.ema_update_(list(ema), list(params), float(decay))


def solver_step_native(
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor,
    table: SolverStepTable,
    step: int | torch.Tensor,
    guidance_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.dpt_engine.dpm_solver_step_`` with ``solver_step_reference``'s signature.

    ``table`` is a ``SolverStepTable``; ``step`` an int (turned into a view of
    ``table.step_index``, no copy) or a one-element int tensor on x's device. Writes x0_i into
    ``history[i % S]`` and returns x_{i+1} (in ``out`` if given; ``out`` may be ``x``).
    """
    _require()
    out = torch.empty_like(x) if out is None else out
    if isinstance(step, torch.Tensor):
        step_t = step
    else:
        i = int(step)
        if not 0 <= i < table.step_index.numel():
            raise ValueError(
                f"solver_step: step {i} is out of range for a table of {table.step_index.numel()} steps"
            )
        step_t = table.step_index[i : i + 1]
    torch.ops.dpt_engine.dpm_solver_step_(
        x,
        model_out,
        history,
        table.coef,
        step_t,
        None if guidance_scale is None else float(guidance_scale),
        out,
    )
    return out


# ---------------------------------------------------------------------------- availability
_EMA_PARAM_DTYPES = (torch.float32, torch.bfloat16)


def _native_device_reason(device_type: str) -> str | None:
    if not load():
        return f"native ops not loaded: {_state['error']}"
    if device_type == "cuda" and not has_cuda_kernels():
        return "libdpt_engine_ops.so was built without CUDA kernels (DPT_BUILD_CUDA=ON)"
    return None


def ema_native_unavailable_reason(tensors: Sequence[torch.Tensor], device_type: str) -> str | None:
    """Why the native EMA cannot run on ``[*ema, *params]`` (None when it can)."""
    if (reason := _native_device_reason(device_type)) is not None:
        return reason
    half = len(tensors) // 2
    ema, params = tensors[:half], tensors[half:]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"tensors are on several devices ({sorted(map(str, devices))})"
    if devices and next(iter(devices)).type != device_type:
        return f"needs {device_type} tensors, got {next(iter(devices)).type}"
    for i, (e, p) in enumerate(zip(ema, params)):
        if e.dtype != torch.float32:
            return f"ema[{i}] is {e.dtype}; the native EMA keeps float32 EMA weights"
        if p.dtype not in _EMA_PARAM_DTYPES:
            return f"params[{i}] is {p.dtype}; the native EMA reads float32 or bfloat16"
        if p.shape != e.shape:
            return f"params[{i}] has shape {tuple(p.shape)} but ema[{i}] has {tuple(e.shape)}"
        if not (e.is_contiguous() and p.is_contiguous()):
            return f"ema[{i}] or params[{i}] is not contiguous"
    return None


def solver_native_unavailable_reason(tensors: Sequence[torch.Tensor], device_type: str) -> str | None:
    """Why the native solver step cannot run on ``(x, model_out, history, table.coef[, out])``."""
    if (reason := _native_device_reason(device_type)) is not None:
        return reason
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"tensors are on several devices ({sorted(map(str, devices))})"
    if devices and next(iter(devices)).type != device_type:
        return f"needs {device_type} tensors, got {next(iter(devices)).type}"
    x, model_out, history, coef = tensors[:4]
    if x.dtype != torch.float32 or history.dtype != torch.float32:
        return f"x and history must be float32, got {x.dtype} and {history.dtype}"
    if model_out.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"model output must be float32/bfloat16/float16, got {model_out.dtype}"
    if coef.dtype not in (torch.float32, torch.float64):
        return f"the coefficient table must be float32 or float64, got {coef.dtype}"
    if len(tensors) > 4 and tensors[4].dtype != torch.float32:
        return f"out must be float32, got {tensors[4].dtype}"
    if not all(t.is_contiguous() for t in tensors):
        return "x, model output, history, table and out must be contiguous"
    return None


# ---------------------------------------------------------------------------- registrations
def _register_fakes() -> None:
    """Shape-only implementations for FakeTensor / torch.compile tracing."""

    @torch.library.register_fake("dpt_engine::ema_update_")
    def _ema_fake(ema, params, decay):
        torch._check(len(ema) == len(params), lambda: "ema and params differ in length")
        return None

    @torch.library.register_fake("dpt_engine::dpm_solver_step_")
    def _solver_fake(x, model_out, history, table, step, guidance_scale, out):
        torch._check(table.dim() == 2 and table.shape[1] == 7, lambda: "table must be (steps, 7)")
        torch._check(history.dim() == x.dim() + 1, lambda: "history must be (S, *x.shape)")
        torch._check(out.shape == x.shape, lambda: "out must have x's shape")
        return None


def _register_backends() -> None:
    try:
        from .dispatch import register_backend
    except ImportError:  # the dispatch module is optional for the ops themselves
        return

    register_backend("ema", "cpp", ema_update_, lambda ts: ema_native_unavailable_reason(ts, "cpu"))
    register_backend("ema", "cuda", ema_update_, lambda ts: ema_native_unavailable_reason(ts, "cuda"))
    register_backend(
        "solver_step", "cpp", solver_step_native, lambda ts: solver_native_unavailable_reason(ts, "cpu")
    )
    register_backend(
        "solver_step", "cuda", solver_step_native, lambda ts: solver_native_unavailable_reason(ts, "cuda")
    )


load()
