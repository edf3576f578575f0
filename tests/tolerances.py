"""The tolerance policy for kernel tests: it lives in ``dpt_engine.kernels.tolerances`` (so
``benchmarks/gpu_check.py`` applies the same rules on a GPU) and is re-exported here for the
tests' ``from tolerances import ...``."""

from dpt_engine.kernels.tolerances import (
    LOW_PRECISION_FACTOR,
    TOLERANCES,
    Tolerance,
    assert_bit_exact,
    assert_close,
    assert_within_factor_of_pytorch,
    max_abs_error,
)

__all__ = [
    "LOW_PRECISION_FACTOR",
    "TOLERANCES",
    "Tolerance",
    "assert_bit_exact",
    "assert_close",
    "assert_within_factor_of_pytorch",
    "max_abs_error",
]
