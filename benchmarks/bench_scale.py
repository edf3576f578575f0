"""A million pseudo images through the real generation path: what breaks at scale is not the network.

Runs ``dpt_engine.sampling.run_generation`` (the path ``dpt sample`` takes: the (class, index)
plan, the batch sampler with per-image noise seeds and DPM-Solver++, the background encoder and
writer threads, atomic shard records, the manifest) for ``--classes x --per-class`` images
(default 1,000 x 1,000 = 1,000,000) in each ``--formats`` (default ``tar`` with 32x32 PNGs, and
``latents``), with a registered network that costs almost nothing (``uvit-nano32`` on 3x32x32
pixels for ``tar``, ``uvit-nano8`` on 4x8x8 latents for ``latents``: ~10k parameters, one solver
step, no guidance), so the figures measure the pipeline itself.

Reported per format:

* ``throughput``: images/s end to end, and ``pipeline_throughput``: images/s of everything outside
  the network forward (``images / (wall - network seconds)``; target >= 2,000 for 32x32 PNG tar
  shards on a 2-core CPU, so a GPU that makes small images far faster is not kept waiting);
* ``peak_rss`` after 10k / 100k / 1M images (a sampling thread reads ``VmRSS`` every 0.2 s; the
  peak up to the moment the count is reached) and ``median_rss`` between 5k-10k, 50k-100k and
  500k-1M images (the level without the bounded queues' momentary peaks): both must stay flat,
  nothing per image is kept; the trace is in the JSON (``rss_trace`` rows) and the chart;
* ``manifest_bytes`` and ``manifest_rebuild``: the size of ``manifest.json`` and the seconds to
  rebuild it from the shard records;
* ``disk_bytes_per_image``: every byte under the output directory (shards, records, manifest)
  divided by the number of images;
* ``rerun``: seconds for the same command again on the finished directory (it finds every shard
  complete from its record and the data files' sizes; nothing is decoded or rescanned);
* ``reader_open``, ``reader_index_memory`` and ``read_throughput``: stage 3's reader
  (``ShardDataset``) over the finished set without extracting it: seconds to build its index from
  the records, the memory the index takes, and images/s of random batches of 256 (tar: a seek and
  a PNG decode per image; target >= 5,000).

Output directories are deleted after each format unless ``--keep`` (1M tar PNGs take ~5 GB).

Run: ``python -m benchmarks.bench_scale [--per-class 1000] [--formats tar latents]`` or
``dpt bench scale``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from dpt_engine.diffusion import DPMSolverPP, make_schedule
from dpt_engine.models.uvit import create_uvit, get_uvit_config
from dpt_engine.sampling import BatchSampler, ShardPlan, run_generation
from dpt_engine.sampling.plan import CONFIG_FILE
from dpt_engine.sampling.runner import MANIFEST, assemble_manifest
from dpt_engine.utils.io import read_json

from .harness import Row, load_warning, print_table, write_rows

__all__ = ["MODELS", "build_parser", "main", "run_format"]

BENCHMARK = "scale"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = {"tar": "uvit-nano32", "latents": "uvit-nano8", "imagefolder": "uvit-nano32"}
CHECKPOINTS = (10_000, 100_000, 1_000_000)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_scale",
        description="A million images through run_generation: pipeline images/s, flat memory, manifest, rerun.",
    )
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1000, help="images per class (1000: a million in all)")
    p.add_argument("--formats", nargs="+", default=["tar", "latents"], choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=500, help="images per sampler call")
    p.add_argument("--workers", type=int, default=2, help="background encoder threads")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--steps", type=int, default=1, help="solver steps (1: the network costs ~nothing)")
    p.add_argument(
        "--read-images", type=int, default=50_000, help="random images read back (stage 3's reader)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the generated sets")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="rows out (default results/scale_cpu.json)")
    p.add_argument("--png", type=Path, default=None, help="chart out (default results/scale_cpu.png)")
    return p


def _rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _RssMonitor:
    """Samples RSS every ``period`` s; ``peak_until(n)``: the largest RSS seen while fewer than
    ``n`` images were done (the count comes from the sampler wrapper)."""

    def __init__(self, period: float = 0.2):
        self.period = period
        self.done = 0
        self.trace: list[tuple[int, int]] = []  # (images done, rss), one per sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-monitor", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.trace.append((self.done, _rss_bytes()))

    def __enter__(self) -> _RssMonitor:
        self.trace.append((0, _rss_bytes()))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.trace.append((self.done, _rss_bytes()))

    def peak_until(self, n: int) -> int:
        return max((r for d, r in self.trace if d <= n), default=0)

    def median_between(self, lo: int, hi: int) -> int:
        """Median RSS while ``lo < images done <= hi`` (the level, without the bounded queues'
        momentary peaks)."""
        xs = sorted(r for d, r in self.trace if lo < d <= hi)
        return xs[len(xs) // 2] if xs else 0


class _CountingSampler:
    """The batch sampler, counting the images it has produced for the RSS monitor."""

    def __init__(self, sampler: BatchSampler, monitor: _RssMonitor):
        self.sampler, self.monitor = sampler, monitor

    def __call__(self, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out = self.sampler(classes, indices)
        self.monitor.done += len(classes)
        return out

    def timings(self) -> dict[str, float]:
        return self.sampler.timings()


def _dir_bytes(root: Path) -> int:
    return sum(e.stat().st_size for e in root.rglob("*") if e.is_file())


def _sampler(fmt: str, num_classes: int, steps: int) -> BatchSampler:
    name = MODELS[fmt]
    cfg = get_uvit_config(name)
    torch.manual_seed(0)
    net = create_uvit(name, num_classes=num_classes).eval()
    schedule = make_schedule("discrete-linear")
    solver = DPMSolverPP(schedule, steps=steps, order=1, skip_type="logSNR")
    return BatchSampler(
        net,
        solver,
        schedule,
        (cfg.in_chans, cfg.img_size, cfg.img_size),
        num_classes,
        guidance_scale=0.0,
        seed=0,
        clip=fmt != "latents",
        output="latents" if fmt == "latents" else "images",
        precision="fp32",
    )


def _read(out: Path, fmt: str, n: int) -> dict[str, Any]:
    """How stage 3 reads the set: ``ShardDataset`` over the shards (no extraction), random
    batches of 256 (tar: one seek + PNG decode per image; latents: memory-mapped rows)."""
    from dpt_engine.sampling import ShardDataset

    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    ds = ShardDataset(out) if fmt != "latents" else ShardDataset(out, decode=lambda z: z)
    open_s = time.perf_counter() - t0
    index_rss = _rss_bytes() - rss0
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(ds), (min(n, len(ds)),), generator=g)
    t0 = time.perf_counter()
    for s in range(0, len(idx), 256):
        if fmt == "latents":
            ds.latents(idx[s : s + 256].tolist())
        else:
            ds.get_batch(idx[s : s + 256])
    read_s = time.perf_counter() - t0
    return {"open_s": open_s, "index_rss": index_rss, "read_throughput": len(idx) / read_s}


def run_format(fmt: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Generate the whole plan in ``fmt`` into ``out``; time the manifest rebuild and a rerun."""
    plan = ShardPlan(args.classes, args.per_class, args.shard_size)
    classes = [f"class{c:04d}" for c in range(args.classes)]
    config = {"model": MODELS[fmt], "steps": args.steps, "bench": BENCHMARK}

    def generate(sampler: Any) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        m = run_generation(
            sampler, out, plan, config, classes, format=fmt, batch_size=args.batch,
            workers=args.workers, progress=not args.no_progress,
        )  # fmt: skip
        return m, time.perf_counter() - t0

    with _RssMonitor() as mon:
        manifest, wall = generate(_CountingSampler(_sampler(fmt, args.classes, args.steps), mon))
    tp = manifest["throughput"]
    network = float(tp["seconds"].get("model", 0.0))
    fp = read_json(out / CONFIG_FILE)["fingerprint"]
    t0 = time.perf_counter()
    assemble_manifest(out, plan, fp, classes, [{"generated": 0, "wall_s": 0.0, "seconds": {}}])
    rebuild = time.perf_counter() - t0
    read = _read(out, fmt, args.read_images)
    rerun_manifest, rerun = generate(_sampler(fmt, args.classes, args.steps))
    if rerun_manifest["throughput"]["generated"] != 0:
        raise RuntimeError(f"{fmt}: the rerun generated {rerun_manifest['throughput']['generated']} images")
    n = plan.total
    return {
        "images": n,
        "wall_s": wall,
        "network_s": network,
        "throughput": n / wall,
        "pipeline_throughput": n / max(wall - network, 1e-9),
        "peak_rss": {c: mon.peak_until(c) for c in CHECKPOINTS if c <= n} | {n: mon.peak_until(n)},
        "median_rss": {c: mon.median_between(c // 2, c) for c in CHECKPOINTS if c <= n}
        | {n: mon.median_between(n // 2, n)},
        "rss_trace": mon.trace[:: max(1, len(mon.trace) // 400)],
        "manifest_bytes": (out / MANIFEST).stat().st_size,
        "manifest_rebuild_s": rebuild,
        "disk_bytes_per_image": _dir_bytes(out) / n,
        "rerun_s": rerun,
        **read,
        "breakdown_s": {k: round(float(v), 3) for k, v in tp["seconds"].items()},
    }


def _rows(fmt: str, r: dict[str, Any], config: dict[str, Any]) -> list[Row]:
    cfg = {**config, "format": fmt, "model": MODELS[fmt], "breakdown_s": r["breakdown_s"],
           "wall_s": r["wall_s"], "network_s": r["network_s"]}  # fmt: skip
    rows = [
        Row(BENCHMARK, fmt, "throughput", r["throughput"], "img/s", config=cfg),
        Row(BENCHMARK, fmt, "pipeline_throughput", r["pipeline_throughput"], "img/s", config=cfg),
    ]
    for n, rss in r["peak_rss"].items():
        rows.append(Row(BENCHMARK, fmt, "peak_rss", rss / 2**20, "MiB", config={**cfg, "after_images": n}))
    for n, rss in r["median_rss"].items():
        window = {**cfg, "between_images": [n // 2, n]}
        rows.append(Row(BENCHMARK, fmt, "median_rss", rss / 2**20, "MiB", config=window))
    rows += [
        Row(BENCHMARK, fmt, "manifest_bytes", r["manifest_bytes"], "bytes", config=cfg),
        Row(BENCHMARK, fmt, "manifest_rebuild", r["manifest_rebuild_s"], "s", config=cfg),
        Row(BENCHMARK, fmt, "disk_bytes_per_image", r["disk_bytes_per_image"], "bytes", config=cfg),
        Row(BENCHMARK, fmt, "rerun", r["rerun_s"], "s", config=cfg),
        Row(BENCHMARK, fmt, "reader_open", r["open_s"], "s", config=cfg),
        Row(BENCHMARK, fmt, "reader_index_memory", r["index_rss"] / 2**20, "MiB", config=cfg),
        Row(BENCHMARK, fmt, "read_throughput", r["read_throughput"], "img/s", config=cfg),
        Row(
            BENCHMARK,
            fmt,
            "rss_trace",
            len(r["rss_trace"]),
            "samples",
            config={**cfg, "trace": [[d, round(b / 2**20, 1)] for d, b in r["rss_trace"]]},
        ),
    ]
    return rows


def _chart(results: dict[str, dict[str, Any]], path_png: Path) -> None:
    """RSS against images generated, one line per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpt_engine.utils.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for fmt, r in results.items():
        xs = [max(d, 1) for d, _ in r["rss_trace"]]
        ax.plot(xs, [b / 2**20 for _, b in r["rss_trace"]],
                label=f"{fmt}: {r['pipeline_throughput']:.0f} img/s outside the network")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("images generated")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("bench_scale: memory over a run (flat = nothing kept per image)", fontsize=9)
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    for name in ("classes", "per_class", "batch", "shard_size", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"bench_scale: --{name.replace('_', '-')} must be >= 1")
    json_path = args.json or RESULTS_DIR / f"{BENCHMARK}_cpu.json"
    png_path = args.png or RESULTS_DIR / f"{BENCHMARK}_cpu.png"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scratch = args.out or Path(tempfile.mkdtemp(prefix="dpt-bench-scale-"))
    config = {
        "classes": args.classes,
        "per_class": args.per_class,
        "batch": args.batch,
        "workers": args.workers,
        "shard_size": args.shard_size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_warning": load_warning(),
    }
    results: dict[str, dict[str, Any]] = {}
    rows: list[Row] = []
    try:
        for fmt in args.formats:
            out = scratch / fmt
            if out.exists():
                shutil.rmtree(out)  # a stale set from an earlier run would be "complete" already
            print(f"bench_scale: {fmt}: {args.classes * args.per_class:,} images into {out}", flush=True)
            results[fmt] = run_format(fmt, args, out)
            rows += _rows(fmt, results[fmt], config)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print_table(rows)
    write_rows(json_path, rows)
    _chart(results, png_path)
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()
