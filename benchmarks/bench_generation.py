"""End-to-end pseudo-image generation: the sharded sampler against the original's design.

Both variants make the same images (``classes x per_class`` (class, index) pairs, the same
randomly initialised U-ViT, the same per-sample noise, DPM-Solver++(2M) with the same steps and
guidance scale, the data prediction clipped to [-1, 1] as in pixel space) and write them as PNG
files, timed from the first network call to the last byte on disk, interleaved in one process:

* ``dpt_engine``: ``dpt_engine.sampling.run_generation``: batches of ``--batch`` mixed-class
  pairs (no padding), one forward of the doubled batch for cond + uncond, the table-driven fused
  solver loop, PNG encoding and tar-shard writing on ``--workers`` background threads, shards
  committed atomically with records and a manifest (the ``dpt sample`` path).
* ``naive-original``: the original DPT/U-ViT sampling design: class by class, batches of
  ``--batch`` labels of one class (the last one padded to the full batch and cut), separate
  conditional and null-class forwards of batch B per step, the eager multi-op solver step, then
  one ``PIL.Image.save`` per PNG file, synchronously, in the sampling loop.

Reported per variant: images/s (end to end), the share of the wall time spent outside the network
forward (``outside_forward_fraction``, target < 5% for ``dpt_engine`` at batch 64; for
``dpt_engine`` it is taken from the manifest's breakdown: wall minus the timed forwards), and the
paired speed-up of ``dpt_engine`` over ``naive-original``. ``dpt_engine``'s breakdown (noise,
model, solver, decode, encode, write; encode/write run on background threads) is in its rows'
``config.breakdown_s``.

Run: ``python -m benchmarks.bench_generation [--batch 64] [--steps 20] [--per-class 100]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dpt_engine.data.imagefolder import class_dirnames
from dpt_engine.diffusion import (
    DPMSolverPP,
    clip_denoised_fn,
    initial_noise,
    make_schedule,
    two_forward_eps_fn,
)
from dpt_engine.models.uvit import create_uvit, list_uvits
from dpt_engine.sampling import BatchSampler, ShardPlan, run_generation
from dpt_engine.utils.pixels import model_space_to_uint8

from .harness import (
    Row,
    bar_chart,
    load_warning,
    measure_alternating,
    paired_ratio,
    print_table,
    summarize,
    write_rows,
)

__all__ = ["VARIANTS", "build_parser", "main"]

BENCHMARK = "generation"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("dpt_engine", "naive-original")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_generation",
        description="End-to-end generation (images on disk): sharded sampler vs the original per-class loop.",
    )
    p.add_argument(
        "--model", default="uvit-tiny8", choices=list_uvits(), help="U-ViT preset (default: digits')"
    )
    p.add_argument("--image-size", type=int, default=8, help="image side (8: the digits preset)")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=100, help="images per class (digits preset: 100)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scale", type=float, default=1.0, help="guidance scale (digits preset: 1.0)")
    p.add_argument("--workers", type=int, default=4, help="dpt_engine's background encode threads")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2, help="timed interleaved rounds")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="rows out (default results/generation_cpu.json)")
    p.add_argument("--png", type=Path, default=None, help="chart out (default results/generation_cpu.png)")
    return p


class _TimedNet:
    """The network with its forward time accumulated (CPU: synchronous, perf_counter is exact)."""

    def __init__(self, net: torch.nn.Module):
        self.net, self.seconds = net, 0.0

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.net(*args)
        self.seconds += time.perf_counter() - t0
        return out


def _naive(
    net: _TimedNet, solver: DPMSolverPP, schedule: Any, args: argparse.Namespace, out: Path
) -> dict[str, float]:
    """The original design: per class, padded single-class batches, two forwards, sync PNG writes."""
    dirs = class_dirnames([str(c) for c in range(args.classes)])
    shape = (args.channels, args.image_size, args.image_size)
    for c in range(args.classes):
        d = out / dirs[c]
        d.mkdir(parents=True, exist_ok=True)
        for start in range(0, args.per_class, args.batch):
            idx = torch.arange(start, start + args.batch)  # the last batch is padded
            y = torch.full((args.batch,), c, dtype=torch.int64)
            x = initial_noise(0, y, idx, shape)
            fn = clip_denoised_fn(two_forward_eps_fn(net, y, args.scale, args.classes, schedule), schedule)
            with torch.no_grad():
                imgs = model_space_to_uint8(solver.sample(fn, x))[: args.per_class - start]
            for k, img in enumerate(imgs.permute(0, 2, 3, 1).numpy()):
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(d / f"{c}_{start + k}.png")
    return {}


def run(args: argparse.Namespace) -> list[Row]:
    torch.manual_seed(0)
    net = create_uvit(
        args.model, img_size=args.image_size, in_chans=args.channels, num_classes=args.classes
    ).eval()
    schedule = make_schedule("discrete-linear")
    solver = DPMSolverPP(schedule, steps=args.steps, order=2, skip_type="logSNR")
    shape = (args.channels, args.image_size, args.image_size)
    n_images = args.classes * args.per_class
    scratch = Path(tempfile.mkdtemp(prefix="dpt-bench-gen-"))
    timed = _TimedNet(net)
    extra: dict[str, list[Any]] = {"manifest": [], "naive_forward": []}
    rounds = {"n": 0}

    def ours() -> None:
        rounds["n"] += 1
        sampler = BatchSampler(
            net,
            solver,
            schedule,
            shape,
            args.classes,
            guidance_scale=args.scale,
            seed=0,
            clip=True,
            precision="fp32",
        )
        m = run_generation(
            sampler,
            scratch / f"ours{rounds['n']}",
            ShardPlan(args.classes, args.per_class, args.shard_size),
            {"latent_space": "pixel"},
            [str(c) for c in range(args.classes)],
            format="tar",
            batch_size=args.batch,
            workers=args.workers,
            progress=False,
        )
        extra["manifest"].append(m["throughput"])

    def naive() -> None:
        timed.seconds = 0.0
        _naive(timed, solver, schedule, args, scratch / f"naive{rounds['n']}")
        extra["naive_forward"].append(timed.seconds)

    variants: dict[str, Callable[[], None]] = {"dpt_engine": ours, "naive-original": naive}
    try:
        times = measure_alternating(variants, repeats=args.repeats, warmup=0, sync=None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    manifests = extra["manifest"]
    config = {
        "model": args.model,
        "image": list(shape),
        "classes": args.classes,
        "per_class": args.per_class,
        "images": n_images,
        "batch": args.batch,
        "steps": args.steps,
        "scale": args.scale,
        "workers": args.workers,
        "shard_size": args.shard_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "format": "tar + png",
        "load_warning": load_warning(),
    }
    rows: list[Row] = []
    outside = {
        "dpt_engine": [1 - m["seconds"]["model"] / t for m, t in zip(manifests, times["dpt_engine"])],
        "naive-original": [1 - f / t for f, t in zip(extra["naive_forward"], times["naive-original"])],
    }
    for v in VARIANTS:
        tput = [n_images / t for t in times[v]]
        s = summarize(tput)
        cfg = dict(config)
        if v == "dpt_engine":
            last = manifests[-1]
            cfg["breakdown_s"] = {k: round(x, 4) for k, x in last["seconds"].items()}
        rows.append(
            Row(BENCHMARK, v, "throughput", s["p50"], "img/s", p20=s["p20"], p80=s["p80"], config=cfg)
        )
        o = summarize(outside[v])
        rows.append(
            Row(
                BENCHMARK,
                v,
                "outside_forward_fraction",
                o["p50"],
                "fraction",
                p20=o["p20"],
                p80=o["p80"],
                config=config,
            )
        )
    ratio = paired_ratio(times["naive-original"], times["dpt_engine"])
    rows.append(
        Row(
            BENCHMARK,
            "dpt_engine",
            "speedup",
            ratio,
            "x",
            baseline="naive-original",
            ratio=ratio,
            config=config,
        )
    )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    json_path = args.json or RESULTS_DIR / f"{BENCHMARK}_cpu.json"
    png_path = args.png or RESULTS_DIR / f"{BENCHMARK}_cpu.png"
    prev = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        rows = run(args)
    finally:
        torch.set_num_threads(prev)
    write_rows(json_path, rows)
    print_table(rows)
    bar_chart(
        rows,
        png_path,
        "End-to-end generation (images on disk)",
        metric=["throughput", "outside_forward_fraction"],
    )
    print(f"wrote {json_path} and {png_path}")
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()
