"""GPU telemetry sampled through NVML while a benchmark runs.

``GpuTelemetry`` samples NVML (power, SM clock, memory used, utilisation) on a background thread
while a benchmark runs, so a result can be read next to what the card was doing (a throttled
clock or a half-idle GPU explains a low number). Without a GPU or without the NVML library it
records *why* telemetry is absent instead of failing: ``nvmlInit()`` raises
``NVMLError_LibraryNotFound`` on machines without the driver.

The peak FLOP/s that MFU is measured against lives in one place, the trainer's
``dpt_engine.train.guards.peak_flops`` (datasheet table of known GPUs, ``DPT_PEAK_TFLOPS``, or a
measured CPU matmul rate), so the benchmarks and the training log report the same MFU.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["GpuTelemetry"]


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
