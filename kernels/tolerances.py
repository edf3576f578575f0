"""The tolerance policy for comparing kernels with their references, written down once.

1. **Bit-exact** where the kernel performs the reference's operations in the same order and
   precision: the EMA update (one fma per element, as ``torch.lerp``) and the DPM-Solver++
   step in fp32 (no fp contraction). ``assert_bit_exact``.
2. **fp32 / fp64** kernels against a reference computed in fp64 (or fp32): the absolute and
   relative tolerances of ``TOLERANCES`` (``torch.testing.assert_close`` semantics:
   ``|a - e| <= atol + rtol * |e|``). They only allow for a different summation order (online
   softmax, block-wise dot products): measured attention errors are ~5e-7 (forward) and ~1e-6
   (gradients) on O(1) values, so fp32 sits ~10x under its bound.
3. **fp16 / bf16** kernels (FlashAttention's rule): the kernel's max error against the fp32
   (fp64) reference must be at most ``LOW_PRECISION_FACTOR`` (2x) the error of plain PyTorch
   doing the same maths in the same low precision, plus a small ``floor`` so that a bit-perfect
   PyTorch run does not demand a bit-perfect kernel. ``assert_within_factor_of_pytorch``. The
   ``TOLERANCES`` rows for fp16/bf16 are coarse sanity bounds for places without a low-precision
   PyTorch peer.

The ``assert_*`` functions are what the tests use (``tests/tolerances.py`` re-exports them);
the ``check_*`` functions apply the same rules without raising and return a ``Check`` (passed,
the error, the bound, a sentence), for reports such as ``benchmarks/gpu_check.py`` that record a
failure and go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "LOW_PRECISION_FACTOR",
    "TOLERANCES",
    "Check",
    "Tolerance",
    "assert_bit_exact",
    "assert_close",
    "assert_within_factor_of_pytorch",
    "check_bit_exact",
    "check_close",
    "check_within_factor_of_pytorch",
    "max_abs_error",
]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


#: kernel output in this dtype vs a higher-precision reference
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-9),
    torch.float32: Tolerance(atol=1e-5, rtol=1e-5),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=2e-2, rtol=2e-2),
}
#: the low-precision rule: kernel error <= factor * PyTorch error (+ floor)
LOW_PRECISION_FACTOR = 2.0


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = ""
) -> None:
    """``TOLERANCES[dtype]`` (default: ``actual``'s dtype), compared in fp64."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=tol.atol, rtol=tol.rtol, msg=lambda m: f"{msg}: {m}"
    )


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
    if not torch.equal(actual, expected):
        n = (actual != expected).sum().item()
        raise AssertionError(
            f"{msg}: {n} of {actual.numel()} elements differ, max |diff| = {max_abs_error(actual, expected):.3e}"
        )


def assert_within_factor_of_pytorch(
    kernel_out: torch.Tensor,
    pytorch_out: torch.Tensor,
    reference: torch.Tensor,
    factor: float = LOW_PRECISION_FACTOR,
    floor: float | None = None,
    msg: str = "",
) -> None:
    """Max error of ``kernel_out`` vs ``reference`` <= ``factor`` x that of ``pytorch_out``
    (PyTorch in the same low precision) + ``floor`` (default: 1 ulp at 1.0 of the dtype)."""
    floor = torch.finfo(kernel_out.dtype).eps if floor is None else floor
    err_k = max_abs_error(kernel_out, reference)
    err_pt = max_abs_error(pytorch_out, reference)
    assert err_k <= factor * err_pt + floor, (
        f"{msg}: kernel error {err_k:.3e} > {factor} x PyTorch error {err_pt:.3e} + {floor:.1e}"
    )


# ---------------------------------------------------------------------------- non-raising checks
@dataclass(frozen=True)
class Check:
    """The outcome of one comparison: ``passed``, the max abs ``error`` against the expected
    values, the ``bound`` it was held to (0 for bit-exact) and the ``rule`` in words."""

    passed: bool
    error: float
    bound: float
    rule: str


def check_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> Check:
    """Rule 1: same dtype, shape and bits."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return Check(False, float("inf"), 0.0, f"bit-exact (got {actual.dtype} {tuple(actual.shape)}, "
                     f"expected {expected.dtype} {tuple(expected.shape)})")  # fmt: skip
    return Check(bool(torch.equal(actual, expected)), max_abs_error(actual, expected), 0.0, "bit-exact")


def check_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> Check:
    """Rule 2: ``|a - e| <= atol + rtol * |e|`` elementwise with ``TOLERANCES[dtype]`` (default:
    ``actual``'s dtype). ``bound`` is the largest allowed difference (at the largest ``|e|``)."""
    tol = TOLERANCES[dtype or actual.dtype]
    a, e = actual.double(), expected.double()
    ok = a.shape == e.shape and bool(torch.all((a - e).abs() <= tol.atol + tol.rtol * e.abs()))
    bound = tol.atol + tol.rtol * float(e.abs().max()) if e.numel() else tol.atol
    err = max_abs_error(a, e) if a.shape == e.shape else float("inf")
    return Check(
        ok, err, bound, f"atol {tol.atol:g} + rtol {tol.rtol:g} x |expected| ({dtype or actual.dtype})"
    )


def check_within_factor_of_pytorch(
    kernel_out: torch.Tensor,
    pytorch_out: torch.Tensor,
    reference: torch.Tensor,
    factor: float = LOW_PRECISION_FACTOR,
    floor: float | None = None,
) -> Check:
    """Rule 3: the kernel's max error <= ``factor`` x PyTorch's in the same precision + ``floor``
    (default: 1 ulp at 1.0 of the kernel's dtype)."""
    floor = torch.finfo(kernel_out.dtype).eps if floor is None else floor
    err_k = max_abs_error(kernel_out, reference)
    bound = factor * max_abs_error(pytorch_out, reference) + floor
    return Check(
        err_k <= bound, err_k, bound, f"<= {factor:g} x PyTorch's error in {kernel_out.dtype} + {floor:.1e}"
    )
