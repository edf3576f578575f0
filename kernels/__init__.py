"""dpt_engine.kernels: fused ops with their plain PyTorch references, one dispatch point each.

=============  ==========================================  ====================================
op             entry point                                 backends
=============  ==========================================  ====================================
attention      ``attention(q, k, v)``,                     reference (SDPA), triton
               ``attention_qkvpacked(qkv)``
ema            ``ema_update_(ema, params, decay)``         reference (foreach lerp), triton
solver_step    ``solver_step.solver_step(x, eps, hist,     reference (eager), triton
               table, i)``, ``sample_multistep_fused``
=============  ==========================================  ====================================

The backend of a call is the ``backend=`` argument, else ``use_backend(...)``, else the
``DPT_KERNELS`` environment variable, else auto-detection (see ``dispatch``). The C++/CUDA
extension adds ``cpp``/``cuda`` backends through ``register_backend`` when it loads. Triton is
optional: without it everything imports and the triton backends report themselves unavailable.

``dpt_engine.kernels.attention`` is the function; its module (and the other op modules) are
``importlib.import_module("dpt_engine.kernels.attention")``. ``dpt_engine.kernels.solver_step``
stays the module (its entry point is ``solver_step.solver_step``).

This folder is installed as ``dpt_engine.kernels`` (see pyproject.toml); never import it as a
top-level ``kernels`` package.
"""

import importlib.util
import logging

from .attention import attention, attention_qkvpacked, attention_reference
from .dispatch import (
    BackendUnavailableError,
    available_backends,
    register_backend,
    registered_backends,
    resolve_backend,
    use_backend,
)
from .ema import ema_update_, ema_update_reference_
from .solver_step import SolverStepTable, sample_multistep_fused, solver_step_reference, solver_step_table

__all__ = [
    "BackendUnavailableError",
    "SolverStepTable",
    "attention",
    "attention_qkvpacked",
    "attention_reference",
    "available_backends",
    "ema_update_",
    "ema_update_reference_",
    "register_backend",
    "registered_backends",
    "resolve_backend",
    "sample_multistep_fused",
    "solver_step_reference",
    "solver_step_table",
    "use_backend",
]

# The native extension's loader (``_native``) registers its backends on import. It is optional:
# whatever goes wrong there is logged and the other backends keep working.
if importlib.util.find_spec(f"{__name__}._native") is not None:
    try:
        from . import _native  # noqa: F401
    except Exception as _exc:
        logging.getLogger("dpt_engine.kernels").warning(
            "dpt_engine.kernels: native (cpp/cuda) backends not loaded: %s: %s", type(_exc).__name__, _exc
        )
