"""The one install hint for a missing torch-fidelity (every ``dpt_engine.eval`` module needs it)."""

from __future__ import annotations


def missing_torch_fidelity() -> ImportError:
    return ImportError(
        "dpt_engine.eval needs torch-fidelity: pip install 'torch-fidelity>=0.3' "
        "(or pip install 'dpt_engine[diffusion]')"
    )
