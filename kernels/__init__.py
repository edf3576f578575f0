"""dpt_engine.kernels: fused ops (EMA update, ...) with their plain PyTorch references.

This folder is installed as ``dpt_engine.kernels`` (see pyproject.toml); never import it as a
top-level ``kernels`` package.
"""

from .ema import ema_update_, ema_update_reference_

__all__ = ["ema_update_", "ema_update_reference_"]
