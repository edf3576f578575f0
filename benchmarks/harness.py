"""Shared benchmark harness: interleaved timing, paired ratios, result rows, table and chart.

Speed on the project's CPU machines drifts 10-25% between runs a few minutes apart while
repetitions inside one run agree to a few percent, so every comparison here is made inside one
process: variants run interleaved (``A B C A B C ...``) after a warm-up, timings are summarised by
percentiles, and a ratio between two variants is the median over repeats of the per-repeat ratio
(``paired_ratio``), never a ratio of figures taken at different times.

Results are flat rows (``Row``), one per (benchmark, variant, metric), written as JSON so later
runs and other machines can be compared by tooling rather than by eye.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dpt_engine.utils.io import atomic_path, atomic_write_json

__all__ = [
    "ROW_FIELDS",
    "Row",
    "bar_chart",
    "commit_hash",
    "device_name",
    "load_warning",
    "measure_alternating",
    "paired_ratio",
    "print_table",
    "summarize",
    "write_rows",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _default_sync() -> None:
    """Wait for queued GPU work so wall-clock times cover it (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure_alternating(
    variants: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = _default_sync,
) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times, interleaved ``A B C A B C ...``.

    Args:
        variants: name -> zero-argument callable doing one unit of work (e.g. one sampling call).
        repeats: timed rounds; each round runs every variant once, in the mapping's order.
        warmup: untimed interleaved rounds run first (allocator, thread pools, caches).
        sync: called before starting and before stopping each timer (GPU synchronisation);
            ``None`` for none.

    Returns name -> list of ``repeats`` wall-clock seconds; entry ``i`` of every list comes from
    round ``i``, so ``paired_ratio`` can pair them. Each round starts with a full garbage
    collection and runs with the cyclic collector paused, so a collection is not charged to
    whichever variant happens to trigger it (reference counting still frees tensors at once).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not variants:
        raise ValueError("no variants to measure")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rnd in range(warmup + repeats):
        gc.collect()
        gc.disable()
        try:
            for name, fn in variants.items():
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                fn()
                if sync is not None:
                    sync()
                elapsed = time.perf_counter() - t0
                if rnd >= warmup:
                    times[name].append(elapsed)
        finally:
            gc.enable()
    return times


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an already sorted sequence."""
    pos = (len(sorted_xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> dict[str, float]:
    """``{p20, p50, p80, mean}`` of a list of timings (seconds)."""
    if not times:
        raise ValueError("no timings to summarise")
    xs = sorted(float(t) for t in times)
    return {
        "p20": _percentile(xs, 0.2),
        "p50": _percentile(xs, 0.5),
        "p80": _percentile(xs, 0.8),
        "mean": statistics.fmean(xs),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repeats of ``numerator[i] / denominator[i]``.

    With times from ``measure_alternating``, ``paired_ratio(times[peer], times[ours])`` is our
    speed-up over the peer (> 1: we are faster), each ratio taken from the same round so slow
    drift of the machine cancels.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need two equal, non-empty lists, got {len(numerator)} and {len(denominator)}")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def paired_ratio_band(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """``{p20, p50, p80}`` of the per-round ratios ``numerator[i] / denominator[i]`` (p50 is
    ``paired_ratio``): how much the speed-up itself varies from round to round."""
    paired_ratio(numerator, denominator)  # same checks
    s = summarize([a / b for a, b in zip(numerator, denominator)])
    return {k: s[k] for k in ("p20", "p50", "p80")}


@functools.lru_cache(maxsize=1)
@functools.cache
def commit_hash() -> str:
    """``git rev-parse --short HEAD`` of this repository when first asked in this process (the code
    a long benchmark loaded, even if commits land while it runs), or ``'unknown'``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str | None = None) -> str:
    """A human-readable name of ``device``: the GPU's name, or the CPU model with the number of
    threads torch uses (e.g. ``'AMD EPYC (2 threads)'``). ``None``: the device a run of the
    pipeline computes on here (the GPU where there is one, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def load_warning() -> str | None:
    """A warning when other processes keep this machine's cores busy (1-minute load average
    above half the core count), else None. A multi-threaded torch pool can run several times
    slower when it shares its cores; such a run's absolute figures mean little."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return (
            f"machine busy: 1-min load average {load:.2f} on {cores} cores before the benchmark; "
            "absolute timings will be slow and noisy (paired ratios suffer less)"
        )
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Row:
    """One result: ``value`` of ``metric`` (in ``unit``) for ``variant`` in ``benchmark``.

    Timing rows also carry ``p20``/``p80`` around ``value`` (the median). Comparison rows name
    the ``baseline`` variant and hold the paired ``ratio`` (also in ``value``). ``config`` records
    the benchmark's settings (model, batch, steps, ...); ``device``, ``torch``, ``commit`` and
    ``timestamp`` are filled in automatically.
    """

    benchmark: str
    variant: str
    metric: str
    value: float
    unit: str
    baseline: str | None = None
    ratio: float | None = None
    p20: float | None = None
    p80: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    device: str = field(default_factory=device_name)
    torch: str = field(default_factory=lambda: torch.__version__)
    commit: str = field(default_factory=commit_hash)
    timestamp: str = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Row))


def _as_dict(row: Row | Mapping[str, Any]) -> dict[str, Any]:
    return row.to_dict() if isinstance(row, Row) else dict(row)


def write_rows(path_json: str | os.PathLike, rows: Iterable[Row | Mapping[str, Any]]) -> None:
    """Write ``rows`` as a JSON list of objects, atomically (temporary file + rename)."""
    atomic_write_json(path_json, [_as_dict(r) for r in rows])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(rows: Iterable[Row | Mapping[str, Any]]) -> None:
    """Print the rows' variant, metric, value, unit, p20/p80 and baseline as an aligned table."""
    dicts = [_as_dict(r) for r in rows]
    if not dicts:
        print("(no rows)")
        return
    cols = ["benchmark", "variant", "metric", "value", "unit", "p20", "p80", "baseline"]
    cells = [[_fmt(d.get(c)) for c in cols] for d in dicts]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    first = dicts[0]
    print(f"device: {first.get('device')} | torch {first.get('torch')} | commit {first.get('commit')}")


def bar_chart(
    rows: Iterable[Row | Mapping[str, Any]],
    path_png: str | os.PathLike,
    title: str,
    metric: str | Sequence[str] = "throughput",
    muted: Sequence[str] = (),
) -> None:
    """Bar chart of ``metric`` per variant (error bars from ``p20``/``p80`` where present),
    written atomically as a PNG with matplotlib's Agg backend. Several metrics give one panel
    each, side by side. Variants named in ``muted`` (reference floors rather than competitors)
    are drawn in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [metric] if isinstance(metric, str) else list(metric)
    dicts = [_as_dict(r) for r in rows]
    panels = []
    for m in metrics:
        sel = [d for d in dicts if d.get("metric") == m and d.get("baseline") is None]
        if not sel:
            raise ValueError(f"no rows with metric {m!r} to plot")
        panels.append((m, sel))
    widths = [1.5 * len(sel) + 1.5 for _, sel in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(sum(widths), 4.2), width_ratios=widths, layout="constrained", squeeze=False
    )
    for ax, (m, sel) in zip(axes[0], panels):
        names = [d["variant"] for d in sel]
        values = [float(d["value"]) for d in sel]
        lo = [max(0.0, v - d["p20"]) if d.get("p20") is not None else 0.0 for v, d in zip(values, sel)]
        hi = [max(0.0, d["p80"] - v) if d.get("p80") is not None else 0.0 for v, d in zip(values, sel)]
        colors = ["#A0A0A0" if n in muted else "#4C72B0" for n in names]
        bars = ax.bar(names, values, yerr=[lo, hi], capsize=4, color=colors)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=3)
        ax.set_ylabel(f"{m} ({sel[0].get('unit', '')})")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.margins(y=0.15)
    first = panels[0][1][0]
    footer = f"{first.get('device')} | torch {first.get('torch')} | commit {first.get('commit')}"
    fig.suptitle(f"{title}\n{footer}", fontsize=9)
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
