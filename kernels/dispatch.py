"""One dispatch point per fused op: which implementation (backend) runs a call.

Every op (``attention``, ``ema``, ``solver_step``) has a plain PyTorch ``reference`` backend and
may have ``triton``, ``cuda`` or ``cpp`` backends. Backends register themselves with
``register_backend(op, name, fn, available)``: the op modules register theirs when imported, the
C++/CUDA extension loader registers its ops when the extension loads. ``available(tensors)``
returns ``None`` when the backend can run on those tensors, else a sentence saying why not.

A call is resolved in this order:

1. the explicit ``backend=`` argument of the op;
2. the innermost ``use_backend(name)`` context (tests, benchmarks);
3. the ``DPT_KERNELS`` environment variable, read once (``reference|triton|cuda|cpp|auto``, or a
   per-op list such as ``DPT_KERNELS=auto,ema=triton,attention=reference``);
4. ``auto``: CUDA tensors take the first available of ``triton``, ``cuda``, ``reference``; CPU
   tensors ``cpp`` then ``reference``.

A named backend (steps 1-3) that cannot run raises ``BackendUnavailableError`` with the reason;
``auto`` falls through to the next candidate and logs (``logging``, level INFO) its choice once
per (op, device type, backend), with the reasons the better candidates were skipped.

This module also owns the optional ``triton`` import, so ``dpt_engine.kernels`` imports on
machines without triton (the triton backends then report "triton is not installed").
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "AUTO_ORDER",
    "BACKEND_NAMES",
    "CPU_AUTO_ORDER_BY_OP",
    "ENV_VAR",
    "HAS_TRITON",
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "check_env",
    "register_backend",
    "registered_backends",
    "reload_env",
    "resolve_backend",
    "triton_unavailable_reason",
    "unregister_backend",
    "use_backend",
]

logger = logging.getLogger("dpt_engine.kernels")

ENV_VAR = "DPT_KERNELS"
BACKEND_NAMES = ("reference", "triton", "cuda", "cpp")
#: auto-detection preference by device type of the op's first tensor
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    # PyTorch's own first on a GPU (SDPA's flash / cuDNN / efficient kernels, _foreach_lerp_, eager
    # ops); a fused backend moves ahead only where CUDA_MEASURED_WINNERS says it was measured faster
    "cuda": ("reference", "triton", "cuda"),
    "cpu": ("cpp", "reference"),
}

# Fused kernels that a committed GPU measurement (benchmarks/results/gpu_check_<device>/) showed
# faster than PyTorch's own on that GPU: {"op", "backend", "device" (a substring of
# torch.cuda.get_device_name(), lower case), "source" (the result file), "ratio"}. Empty until a
# GPU run measures one: until then `auto` on CUDA means PyTorch's implementation.
CUDA_MEASURED_WINNERS: list[dict[str, Any]] = []
_DEFAULT_AUTO_ORDER = ("reference",)
# Ops whose fused CPU kernel did not earn its place against PyTorch's own (>= 1.2x side by side):
# auto on a CPU uses PyTorch's. EMA over 100M fp32 parameters in 100 tensors is memory-bound:
# the fused C++ update is 1.02x (2 threads) / 1.05x (1 thread) torch._foreach_lerp_ on the 2-core
# AMD EPYC (benchmarks/results/ema_cpu.json, ema_cpu_threads1.json); backend="cpp" still runs it.
CPU_AUTO_ORDER_BY_OP: dict[str, tuple[str, ...]] = {"ema": ("reference", "cpp")}

# ---------------------------------------------------------------------------- optional triton
try:  # triton is optional: without it the triton backends are unavailable, nothing else changes
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: str | None = None
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess test without triton
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"triton is not installed ({_exc})"

    def _jit_stub(fn: Any = None, **_kwargs: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    # Inert stand-ins so the kernel modules' decorators and `tl.constexpr` annotations evaluate;
    # the kernels are never launched (every triton backend reports itself unavailable).
    triton = types.SimpleNamespace(jit=_jit_stub, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=Any, float32=None, float16=None, bfloat16=None)


def _fix_interpreter_scalar_index() -> bool:
    """Make the Triton interpreter's scalar -> int conversion work with numpy >= 2.5.

    The interpreter holds every scalar as a 1-element 1-D numpy array and converts one to a
    Python int (a loop bound such as ``range(0, n_kv, BLOCK)``, a loaded length) with
    ``int(array)``. numpy 2.5 refuses that for arrays of ndim > 0 ("only 0-dimensional arrays
    can be converted to Python scalars"), so every kernel with a runtime loop bound fails under
    triton 3.6's interpreter (the GPU image's stack: triton 3.6.0 with numpy 2.5); triton 3.8
    squeezes the array first. Wraps the interpreter's tensor patch so that ``__index__``
    squeezes too. Only the interpreter is touched, only when its own code does not squeeze
    already; returns whether it patched. Compiled (GPU) kernels never go through this path.
    """
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import inspect

        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover - a triton without the interpreter
        return False
    original = getattr(_interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_dpt_squeezes", False):
        return False
    try:
        if "squeeze" in inspect.getsource(original):
            return False
    except (OSError, TypeError):  # no source to read: patch anyway, squeezing is harmless
        pass

    def _patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._dpt_squeezes = True  # type: ignore[attr-defined]
    _interp._patch_lang_tensor = _patch_lang_tensor
    return True


INTERPRETER_PATCHED = _fix_interpreter_scalar_index()


def interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was decorated while ``TRITON_INTERPRET=1`` (it runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def triton_unavailable_reason(tensors: Sequence[torch.Tensor], kernel: Any) -> str | None:
    """Why a triton ``kernel`` cannot run on ``tensors`` (None when it can).

    Compiled kernels need CUDA tensors. Kernels decorated under ``TRITON_INTERPRET=1`` (the
    variable must be set before ``dpt_engine.kernels`` is imported, since ``triton.jit`` reads
    it when decorating) run on CPU tensors through the interpreter.
    """
    if not HAS_TRITON:
        return TRITON_IMPORT_ERROR
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"tensors are on several devices ({sorted(map(str, devices))})"
    if not devices:
        return None
    dev = next(iter(devices))
    if dev.type == "cuda" or interpreted(kernel):
        return None
    return (
        f"triton backend needs CUDA tensors (got {dev.type}) or TRITON_INTERPRET=1 set before "
        "dpt_engine.kernels is imported"
    )


# ---------------------------------------------------------------------------- registry
class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run this call."""


def _always(_tensors: Sequence[torch.Tensor]) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """A registered implementation of ``op``. ``available(tensors) -> None | reason``;
    ``auto=False`` keeps it out of auto-detection (it runs only when named)."""

    op: str
    name: str
    fn: Callable[..., Any]
    available: Callable[[Sequence[torch.Tensor]], str | None] = _always
    auto: bool = True


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register_backend(
    op: str,
    name: str,
    fn: Callable[..., Any],
    available: Callable[[Sequence[torch.Tensor]], str | None] | None = None,
    *,
    auto: bool = True,
) -> None:
    """Register (or replace) backend ``name`` of ``op``.

    Args:
        op: op name (``"attention"``, ``"ema"``, ``"solver_step"``, or a new one).
        name: backend name; one of ``BACKEND_NAMES`` is expected but any identifier works.
        fn: the implementation; it receives the op's arguments (see each op's docstring).
        available: ``available(tensors)`` returns None when ``fn`` can run on the op's tensor
            arguments (same order as the op passes them), else the reason it cannot.
        auto: whether auto-detection may pick it.
    """
    if not name or name == "auto" or not name.replace("_", "").isalnum():
        raise ValueError(f"invalid backend name {name!r}")
    _REGISTRY.setdefault(op, {})[name] = Backend(op, name, fn, available or _always, auto)


def unregister_backend(op: str, name: str) -> None:
    """Remove a backend (tests); a no-op when it is not registered."""
    _REGISTRY.get(op, {}).pop(name, None)


def registered_backends(op: str) -> dict[str, Backend]:
    """The registered backends of ``op`` by name (a copy)."""
    return dict(_REGISTRY.get(op, {}))


def available_backends(op: str, tensors: Sequence[torch.Tensor]) -> dict[str, str | None]:
    """``{name: None | reason}`` for every registered backend of ``op`` on ``tensors``."""
    return {name: b.available(tensors) for name, b in _REGISTRY.get(op, {}).items()}


# ---------------------------------------------------------------------------- choices
@functools.cache
def _env_choices() -> tuple[str | None, dict[str, str]]:
    """Parse ``DPT_KERNELS`` once: ``(default or None, {op: name})``."""
    raw = os.environ.get(ENV_VAR, "").strip()
    default: str | None = None
    per_op: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        if "=" in part:
            op, _, name = part.partition("=")
            per_op[op.strip()] = name.strip()
        else:
            default = part
    return default, per_op


def check_env(device_type: str) -> None:
    """Check ``DPT_KERNELS`` before any work: its syntax, that every op and backend it names exists,
    and that each named backend can run on ``device_type`` at all. Raises
    :class:`BackendUnavailableError` with the fix (a run should not fail on it hours in)."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return
    ops = sorted(_REGISTRY)
    where = f"{ENV_VAR}={raw}"
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        op, sep, name = part.rpartition("=") if "=" in part else ("", "", part)
        op, name = op.strip(), name.strip()
        if sep and (not op or not name):
            raise BackendUnavailableError(
                f"{where}: {part!r} is not of the form BACKEND or OP=BACKEND (e.g. {ENV_VAR}=auto,ema=cpp)"
            )
        if sep and op not in _REGISTRY:
            raise BackendUnavailableError(f"{where}: unknown op {op!r}; ops: {', '.join(ops)}")
        if name != "auto" and name not in BACKEND_NAMES:
            raise BackendUnavailableError(
                f"{where}: unknown backend {name!r}; backends: auto, {', '.join(BACKEND_NAMES)}"
            )
        if name == "auto":
            continue
        for o in [op] if sep else ops:
            b = _REGISTRY[o].get(name)
            if b is None:
                if sep:  # a default that some op lacks falls back per op at call time
                    raise BackendUnavailableError(
                        f"{where}: {o} has no {name!r} backend here; registered: {', '.join(sorted(_REGISTRY[o]))}"
                    )
                continue
            try:  # device-level checks only; the per-call checks need real tensors
                reason = b.available([])
            except (ValueError, IndexError, TypeError):
                reason = None
            if reason is None and name == "cuda" and device_type != "cuda":
                reason = f"the run is on {device_type}, not a CUDA GPU"
            if reason is None and name == "triton" and device_type != "cuda":
                probe = [torch.zeros(1, device=device_type)]
                try:
                    reason = b.available(probe) if HAS_TRITON else TRITON_IMPORT_ERROR
                except (ValueError, IndexError, TypeError):
                    reason = None
            if reason is not None:
                raise BackendUnavailableError(f"{where}: {o} backend {name!r} cannot run: {reason}")


def reload_env() -> None:
    """Re-read ``DPT_KERNELS`` on the next call (tests that change the environment)."""
    _env_choices.cache_clear()


_OVERRIDE: contextvars.ContextVar[tuple[tuple[str | None, str], ...]] = contextvars.ContextVar(
    "dpt_kernels_override", default=()
)


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None) -> Iterator[None]:
    """Within the block, run ``op`` (every op when None) with backend ``name`` (or ``"auto"``).

    Takes precedence over ``DPT_KERNELS``; an explicit ``backend=`` argument still wins.
    """
    token = _OVERRIDE.set((*_OVERRIDE.get(), (op, name)))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def _requested(op: str, backend: str | None) -> tuple[str, str]:
    """The requested backend name and where the request came from."""
    if backend is not None:
        return backend, "backend= argument"
    for scope, name in reversed(_OVERRIDE.get()):
        if scope is None or scope == op:
            return name, f"use_backend({name!r})"
    default, per_op = _env_choices()
    if op in per_op:
        return per_op[op], f"{ENV_VAR}={os.environ.get(ENV_VAR, '')}"
    if default is not None:
        return default, f"{ENV_VAR}={os.environ.get(ENV_VAR, '')}"
    return "auto", "default"


_LOGGED: set[tuple[str, str, str]] = set()


def _device_name(tensors: Sequence[torch.Tensor]) -> str:
    dev = tensors[0].device if tensors else None
    if dev is None or dev.type != "cuda":
        return str(dev.type) if dev is not None else ""
    try:
        return torch.cuda.get_device_name(dev).lower()
    except Exception:  # pragma: no cover - no driver
        return "cuda"


def _auto_order(op: str, device_type: str, tensors: Sequence[torch.Tensor]) -> tuple[tuple[str, ...], str]:
    """The auto candidates for ``op`` on this device, and where that order comes from (for the log)."""
    order = AUTO_ORDER.get(device_type, _DEFAULT_AUTO_ORDER)
    if device_type == "cpu" and op in CPU_AUTO_ORDER_BY_OP:
        return CPU_AUTO_ORDER_BY_OP[
            op
        ], " (PyTorch's own: the fused CPU kernel was not measured >= 1.2x faster)"
    if device_type not in ("cuda", "meta"):  # meta: the tests' stand-in for a GPU
        return order, ""
    name = _device_name(tensors)
    for w in CUDA_MEASURED_WINNERS:
        if w.get("op") == op and str(w.get("device", "")).lower() in name:
            first = w["backend"]
            return (first, *(c for c in order if c != first)), (
                f" (measured {w.get('ratio', '?')}x faster than PyTorch's on {w['device']}: {w.get('source', '?')})"
            )
    return order, " (PyTorch's own: no committed GPU measurement shows a fused kernel faster here)"


def resolve_backend(
    op: str, tensors: Sequence[torch.Tensor], backend: str | None = None
) -> Callable[..., Any]:
    """The implementation of ``op`` that runs on ``tensors`` (see the module docstring)."""
    registry = _REGISTRY.get(op)
    if not registry:
        raise KeyError(f"no backend registered for op {op!r}")
    name, source = _requested(op, backend)
    if name != "auto":
        chosen = registry.get(name)
        if chosen is None:
            known = ", ".join(sorted(registry))
            hint = (
                " (the C++/CUDA extension is not built or failed to load)" if name in ("cuda", "cpp") else ""
            )
            raise BackendUnavailableError(
                f"{op}: backend {name!r} (from {source}) is not registered{hint}; registered: {known}"
            )
        reason = chosen.available(tensors)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} (from {source}) cannot run: {reason}")
        return chosen.fn

    device_type = tensors[0].device.type if tensors else "cpu"
    skipped = []
    order, why_order = _auto_order(op, device_type, tensors)
    for cand in order:
        b = registry.get(cand)
        if b is None or not b.auto:
            skipped.append(f"{cand}: not registered")
            continue
        reason = b.available(tensors)
        if reason is not None:
            skipped.append(f"{cand}: {reason}")
            continue
        key = (op, device_type, cand)
        if key not in _LOGGED:
            _LOGGED.add(key)
            why = f" (skipped {'; '.join(skipped)})" if skipped else ""
            logger.info(
                "dpt_engine.kernels: %s on %s tensors -> %s backend%s%s",
                op,
                device_type,
                cand,
                why,
                why_order,
            )
        return b.fn
    raise BackendUnavailableError(f"{op}: no backend can run on {device_type} tensors ({'; '.join(skipped)})")
