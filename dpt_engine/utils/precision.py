"""What ``precision=auto`` means, in one place, and saying once what it chose and why.

``auto`` is bf16 autocast (fp32 master weights, EMA and evaluation) on CUDA and fp32 elsewhere.
On a CPU with native bf16 (AVX512-BF16 or AMX) bf16 is faster for 28x28 models (training 1.3-1.4x,
sampling 1.55-1.75x) but not for the digits preset's 8x8 U-ViT (stage 2 471 s vs 340 s), whose
generator it also made worse (FID 44.5 vs 39.1 from the same stage 1:
``benchmarks/results/precision_auto_check_digits.md``). So ``auto`` stays fp32 on every CPU and
the fashion-mnist preset sets bf16 explicitly, where it was measured. The log line says so.
"""

from __future__ import annotations

import functools
import logging

import torch

__all__ = ["cpu_has_native_bf16", "resolve_precision"]

log = logging.getLogger("dpt_engine")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16; Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@functools.cache
def _say_once(what: str, device_type: str, choice: str) -> None:
    if device_type == "cuda":
        why = "bf16 autocast on CUDA"
    elif cpu_has_native_bf16():
        why = (f"fp32 on a CPU; this CPU has native bf16: {what}=bf16 is ~1.3-1.7x faster for "
               "28x28+ models, but not for tiny ones and not shown to keep quality everywhere "
               "(benchmarks/results/precision_auto_check_digits.md)")  # fmt: skip
    else:
        why = "fp32 on a CPU without native bf16"
    log.info("%s=auto -> %s (%s)", what, choice, why)


def resolve_precision(precision: str, device: torch.device | str, what: str = "precision") -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere (logged once per setting); explicit
    choices are kept."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"{what} must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision != "auto":
        return precision
    device_type = torch.device(device).type
    choice = "bf16" if device_type == "cuda" else "fp32"
    _say_once(what, device_type, choice)
    return choice
