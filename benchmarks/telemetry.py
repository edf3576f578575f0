"""Accelerator telemetry and the peak FLOP/s that MFU is measured against.

``GpuTelemetry`` samples NVML (power, SM clock, memory used, utilisation) on a background thread
while a benchmark runs, so a result can be read next to what the card was doing (a throttled
clock or a half-idle GPU explains a low number). Without a GPU or without the NVML library it
records *why* telemetry is absent instead of failing: ``nvmlInit()`` raises
``NVMLError_LibraryNotFound`` on machines without the driver.

``peak_flops`` returns the dense bf16 tensor-core peak of known GPUs from their datasheets (the
denominator of MFU, as in the PaLM / Megatron convention), and ``measure_matmul_flops`` a probe of
what one large matmul actually reaches on this device (also the only "peak" a CPU has).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "GPU_PEAK_TFLOPS",
    "GpuTelemetry",
    "measure_matmul_flops",
    "peak_flops",
]

# Dense (no sparsity) bf16/fp16 tensor-core peak in TFLOP/s, from the vendors' datasheets. Matched
# against torch.cuda.get_device_name() by substring, most specific first.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def peak_flops(device: torch.device | str) -> tuple[float | None, str]:
    """(peak FLOP/s, source) of ``device``: a datasheet entry for known GPUs, else ``(None, why)``."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, "no datasheet peak for CPUs: use the measured matmul probe"
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"datasheet dense bf16 peak of {key}"
    return None, f"{name!r} is not in the peak table (benchmarks/telemetry.py): MFU uses the matmul probe"


def measure_matmul_flops(
    device: torch.device | str, dtype: torch.dtype | None = None, n: int | None = None, repeats: int = 5
) -> dict[str, Any]:
    """FLOP/s of an ``n x n @ n x n`` matmul on ``device`` (median of ``repeats``, after a warm-up).

    Defaults: bf16 at n=8192 on CUDA (what the tensor cores sustain on a large GEMM), fp32 at
    n=1024 on a CPU (what training there runs in).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"flops": 2.0 * n**3 / sec, "n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": sec}


@dataclass
class GpuTelemetry:
    """NVML samples every ``interval_s`` on a daemon thread while used as a context manager.

    ``summary()`` gives mean/max of power (W), SM clock (MHz), memory used (GiB) and GPU
    utilisation (%), or ``{"available": False, "reason": ...}`` when there is nothing to sample.
    """

    device_index: int = 0
    interval_s: float = 0.2
    samples: list[dict[str, float]] = field(default_factory=list)
    reason: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _handle: Any = field(default=None, repr=False)

    def __enter__(self) -> GpuTelemetry:
        if not torch.cuda.is_available():
            self.reason = "no CUDA device"
            return self
        try:
            import pynvml  # from nvidia-ml-py
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return self
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except pynvml.NVMLError as e:
            self.reason = f"NVML unavailable: {e}"
            return self
        self._nvml = pynvml
        self._thread = threading.Thread(target=self._run, name="nvml-telemetry", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> dict[str, float]:
        nv, h = self._nvml, self._handle
        util = nv.nvmlDeviceGetUtilizationRates(h)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        return {
            "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "sm_clock_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            "memory_used_gib": mem.used / 2**30,
            "gpu_util_pct": float(util.gpu),
            "t": time.perf_counter(),
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except Exception as e:  # a vanished device must not kill the benchmark
                self.reason = f"NVML sampling stopped: {e}"
                return
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"available": False, "reason": self.reason or "no samples taken (run too short)"}
        out: dict[str, Any] = {"available": True, "samples": len(self.samples)}
        for key in ("power_w", "sm_clock_mhz", "memory_used_gib", "gpu_util_pct"):
            xs = [s[key] for s in self.samples]
            out[f"{key}_mean"] = statistics.fmean(xs)
            out[f"{key}_max"] = max(xs)
        return out
