"""Training guards: non-finite losses, out-of-memory hints, throughput/MFU, TensorBoard.

* ``BadStepGuard``: a non-finite loss skips the step (no optimizer update, no EMA update) with a
  warning; ``max_bad_steps`` of them in a row stop the run with an error that names the likely
  causes. Every rank sees the same all-reduced loss, so every rank skips the same steps.
* ``oom_hint``: turns an out-of-memory error into one that says what to change.
* ``ThroughputMeter``: images/s and model FLOP utilisation (MFU) over a logging window. FLOPs per
  image come from the U-ViT's ``flops_per_forward`` (training ~ 3x forward: the backward pass costs
  two forwards; gradient checkpointing's recompute is not counted, as is customary for MFU). The
  peak is the datasheet dense figure of a known GPU, ``DPT_PEAK_TFLOPS`` when set, or on a CPU a
  measured matmul rate (labelled as measured); otherwise MFU is unknown (None).
* ``TensorBoardLogger``: scalars to ``<work_dir>/tensorboard`` on rank 0.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("dpt_engine")

__all__ = [
    "BadStepGuard",
    "NonFiniteLossError",
    "TensorBoardLogger",
    "ThroughputMeter",
    "measure_cpu_peak_flops",
    "oom_hint",
    "peak_flops",
]


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_bad_steps`` non-finite losses in a row."""


class BadStepGuard:
    """Counts non-finite losses; ``check`` says whether to apply the step."""

    def __init__(self, max_bad_steps: int) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.in_a_row = 0
        self.total = 0

    def check(self, step: int, loss: float) -> bool:
        """True when ``loss`` is finite (apply the step); False to skip it (or raise after too many)."""
        if math.isfinite(loss):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"stage2: the loss was {loss} for {self.in_a_row} steps in a row (last: step {step + 1}); "
                "stopping. Likely causes: a learning rate too high (lower stage2.lr or raise "
                "stage2.warmup_steps), non-finite training data (NaN/inf in the images or latents), or "
                "overflow in low precision (try stage2.precision=fp32). Raise stage2.max_bad_steps to "
                "tolerate more. The last checkpoint predates the failure."
            )
        log.warning(
            "stage2: non-finite loss (%s) at step %d: step skipped (%d in a row, stop at %d)",
            loss,
            step + 1,
            self.in_a_row,
            self.max_bad_steps,
        )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@contextlib.contextmanager
def oom_hint(
    micro_batch: int, global_batch: int, grad_accum: int, grad_checkpointing: bool
) -> Iterator[None]:
    """Re-raise an out-of-memory error with what to change (same exception type, cause chained)."""
    try:
        yield
    except BaseException as exc:
        if not _is_oom(exc):
            raise
        tips = [
            f"raise stage2.grad_accum (now {grad_accum}: same global batch, smaller micro-batches)",
            f"or lower stage2.batch_size (now {global_batch})",
        ]
        if not grad_checkpointing:
            tips.append("set stage2.grad_checkpointing=true (recompute activations in backward)")
        tips.append("use stage2.precision=bf16, or shard with stage2.strategy=fsdp2 / deepspeed zero_stage=3")
        msg = (
            f"stage2: out of memory with a micro-batch of {micro_batch} images per rank: "
            + "; ".join(tips)
            + f". Original error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )
        raise type(exc)(msg) from exc


# Dense peak FLOP/s (datasheet, without sparsity) by GPU name fragment: (bf16/fp16, tf32).
_GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989e12, 494e12),
    ("H100", 989e12, 494e12),  # SXM; PCIe parts are slower (756e12)
    ("GH200", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62.5e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),  # fp16 tensor cores; no bf16
)


@functools.lru_cache(maxsize=4)
def measure_cpu_peak_flops(
    dtype: torch.dtype = torch.float32, size: int = 512, seconds: float = 0.2
) -> float:
    """FLOP/s of a square matmul on the CPU with torch's current thread count (a measured "peak").

    Measured once per process and dtype (~0.2 s), not per training run."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2.0 * size**3 * n / elapsed


def peak_flops(device: torch.device, bf16: bool) -> tuple[Optional[float], str]:
    """(peak FLOP/s or None, where it came from) for MFU on ``device``."""
    env = os.environ.get("DPT_PEAK_TFLOPS")
    if env:
        try:
            return float(env) * 1e12, "DPT_PEAK_TFLOPS"
        except ValueError:
            raise ValueError(f"DPT_PEAK_TFLOPS={env!r} is not a number (TFLOP/s, e.g. 989)") from None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, half, tf32 in _GPU_PEAKS:
            if key in name:
                return (half if bf16 else tf32), f"datasheet ({key})"
        return None, f"unknown GPU {name!r} (set DPT_PEAK_TFLOPS)"
    if device.type == "cpu":
        return measure_cpu_peak_flops(torch.bfloat16 if bf16 else torch.float32), "measured CPU matmul"
    return None, f"unknown device {device.type}"


class ThroughputMeter:
    """Images/s and MFU over the steps since the last ``read``."""

    def __init__(
        self, flops_per_image: Optional[float], world_size: int, peak: Optional[float], peak_source: str
    ) -> None:
        self.flops_per_image = flops_per_image  # training FLOPs per image (3x forward)
        self.world_size = world_size
        self.peak = peak  # per device
        self.peak_source = peak_source
        self.images = 0
        self.t0 = time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (e.g. a checkpoint save) out of the current window's wall time."""
        self.t0 += seconds

    def read(self) -> dict[str, Optional[float]]:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        ips = self.images / dt
        mfu = None
        if self.flops_per_image is not None and self.peak:
            mfu = ips * self.flops_per_image / (self.peak * self.world_size)
        self.images, self.t0 = 0, now
        return {"images_per_s": ips, "mfu": mfu}


class TensorBoardLogger:
    """Scalars to ``log_dir`` (rank 0 only; a no-op elsewhere or when disabled)."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError(
                f"stage2.tensorboard=true needs the tensorboard package ({e}): "
                "pip install tensorboard, or set stage2.tensorboard=false"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, scalars: dict[str, Optional[float]]) -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            if v is not None:
                self.writer.add_scalar(f"stage2/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
