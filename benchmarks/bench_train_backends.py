"""Stage-2 training throughput per backend: single process vs DDP vs FSDP2 vs DeepSpeed ZeRO 1/2/3.

The same U-ViT, the same global batch and the same trainer (``fit_diffusion``: global batch draw,
per-rank slices, loss, backward, clipping, AdamW, EMA) under each backend. Variants:

* ``single``: one process using all ``--cores`` threads (the baseline);
* ``ddp``, ``fsdp2``, ``zero1``, ``zero2``, ``zero3``: ``--procs`` processes (gloo on the CPU,
  NCCL on GPUs), ``--cores / --procs`` threads each, so every variant has the same cores.

Each variant is one launch (spawned processes) that trains ``warmup + windows x window`` steps;
images/s is measured per window of ``window`` steps (the first ``warmup`` steps are dropped) from
the trainer's own log (``history[*].images_per_s``: wall time of the training steps, checkpoint
and export excluded). Launches alternate ``A B C ... A B C`` for ``--rounds`` rounds, and the ratio
to ``single`` is the median over rounds of the per-round ratio of medians (``paired_ratio``), so
slow drift of the machine cancels. Startup (process launch, imports, DeepSpeed init) is not
counted: it is paid once per run.

On a 2-core CPU this measures the engine's overheads (gradient all-reduce / reduce-scatter over
gloo, ZeRO partitioning), not a scaling win: two single-threaded processes do the same arithmetic
as one two-threaded process plus the communication. On GPUs the same script gives the real
comparison (one GPU per process: ``--procs`` = GPUs).

Run: ``python -m benchmarks.bench_train_backends [--model uvit-tiny8] [--batch 64] [--rounds 2]``.
Results: ``benchmarks/results/train_backends_<device>.json`` (+ ``.png``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dpt_engine.utils.dist import free_port

from .harness import (
    Row,
    bar_chart,
    device_name,
    load_warning,
    paired_ratio,
    print_table,
    write_rows,
)

__all__ = ["VARIANTS", "build_parser", "main", "run"]

BENCHMARK = "train_backends"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINE = "single"
# variant -> (stage2.strategy, zero_stage, distributed)
VARIANTS: dict[str, tuple[str, int, bool]] = {
    "single": ("single", 0, False),
    "ddp": ("ddp", 0, True),
    "fsdp2": ("fsdp2", 0, True),
    "zero1": ("deepspeed", 1, True),
    "zero2": ("deepspeed", 2, True),
    "zero3": ("deepspeed", 3, True),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--model", default="uvit-tiny8", help="U-ViT preset (default uvit-tiny8: 8x8x1, 1.5M params)"
    )
    p.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--procs", type=int, default=2, help="processes of the distributed variants (default 2)")
    p.add_argument("--cores", type=int, default=None, help="cores shared by every variant (default: all)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--window", type=int, default=5, help="steps per timed window (default 5)")
    p.add_argument("--windows", type=int, default=4, help="timed windows per launch (default 4)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of launches (default 2)")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variants to run (baseline always runs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    return p


def _worker(rank: int, world: int, port: int, spec: dict[str, Any], out: str) -> None:
    """One rank of one launch: train, then rank 0 writes the per-window images/s."""
    if world > 1:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    torch.set_num_threads(spec["threads"])
    from dpt_engine.config.schema import DiffusionConfig
    from dpt_engine.diffusion.trainer import DiffusionData, fit_diffusion
    from dpt_engine.models.uvit import create_uvit, get_uvit_config

    ucfg = get_uvit_config(spec["model"])
    torch.manual_seed(0)
    net = create_uvit(spec["model"])
    g = torch.Generator().manual_seed(0)
    n = 1024
    data = DiffusionData(
        x=torch.rand(n, ucfg.in_chans, ucfg.img_size, ucfg.img_size, generator=g) * 2 - 1,
        y=torch.randint(0, max(ucfg.num_classes, 1), (n,), generator=g),
        weight=None,
        num_classes=ucfg.num_classes,
    )
    steps = spec["warmup"] + spec["windows"] * spec["window"]
    cfg = DiffusionConfig(
        model=spec["model"],
        steps=steps,
        batch_size=spec["batch"],
        warmup_steps=1,
        log_every=1,
        checkpoint_every=steps,
        strategy=spec["backend"],
        zero_stage=spec["zero_stage"],
        precision=spec["precision"],
    )
    device = torch.device(spec["device"], rank) if spec["device"] == "cuda" else torch.device("cpu")
    fit = fit_diffusion(net, cfg, data, Path(out) / "work", device, seed=0, progress=False)
    if rank == 0:
        # per-step records (log_every=1) regrouped into windows after the warm-up:
        # a window's rate is window / sum(1 / per-step rate) (= its images over its wall time)
        recs = fit.history[spec["warmup"] :]
        w = spec["window"]
        ips = [w / sum(1.0 / r["images_per_s"] for r in recs[i : i + w]) for i in range(0, len(recs), w)]
        torch.save({"ips": ips, "mfu": [r.get("mfu") for r in recs]}, Path(out) / "result.pt")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _launch(variant: str, args: argparse.Namespace, cores: int) -> dict[str, list]:
    import torch.multiprocessing as mp

    backend, zero, distributed = VARIANTS[variant]
    world = args.procs if distributed else 1
    spec = {
        "model": args.model,
        "batch": args.batch,
        "precision": args.precision,
        "backend": backend,
        "zero_stage": zero,
        "threads": max(1, cores // world),
        "warmup": args.warmup,
        "window": args.window,
        "windows": args.windows,
        "device": args.device,
    }
    with tempfile.TemporaryDirectory(prefix=f"bench-{variant}-") as tmp:
        mp.start_processes(
            _worker, args=(world, free_port(), spec, tmp), nprocs=world, join=True, start_method="spawn"
        )
        return torch.load(Path(tmp) / "result.pt", weights_only=True)


def run(args: argparse.Namespace) -> list[Row]:
    busy = load_warning()
    if busy:
        print(f"WARNING: {busy}")
    load_before = os.getloadavg()[0]
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dpt_engine" / "torch_extensions")
    )
    cores = args.cores or os.cpu_count() or 1
    names = [BASELINE] + [v for v in (args.only or VARIANTS) if v != BASELINE]
    per_round: dict[str, list[list[float]]] = {v: [] for v in names}
    mfus: dict[str, list[float]] = {v: [] for v in names}
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        for v in names:
            res = _launch(v, args, cores)
            per_round[v].append(res["ips"])
            mfus[v] += [m for m in res["mfu"] if m is not None]
            print(
                f"round {rnd + 1}/{args.rounds} {v:7s} images/s per window: {[round(x, 1) for x in res['ips']]}"
            )
    from dpt_engine.models.uvit import get_uvit_config

    ucfg = get_uvit_config(args.model)
    config = {
        "model": args.model,
        "params": None,
        "image": [ucfg.in_chans, ucfg.img_size, ucfg.img_size],
        "global_batch": args.batch,
        "precision": args.precision,
        "procs": args.procs,
        "cores": cores,
        "warmup_steps": args.warmup,
        "window_steps": args.window,
        "windows": args.windows,
        "rounds": args.rounds,
        "load_avg_1min_before": round(load_before, 2),
        "wall_s": round(time.perf_counter() - t0, 1),
        "torch_threads_per_process": {
            v: max(1, cores // (args.procs if VARIANTS[v][2] else 1)) for v in names
        },
    }
    from dpt_engine.models.uvit import create_uvit

    with torch.device("meta"):
        config["params"] = sum(p.numel() for p in create_uvit(args.model).parameters())
    prev = torch.get_num_threads()
    torch.set_num_threads(cores)  # the device string names the cores every variant shares
    dev = device_name(args.device)
    torch.set_num_threads(prev)
    rows: list[Row] = []
    medians = {v: [float(torch.tensor(w).median()) for w in per_round[v]] for v in names}
    for v in names:
        allw = torch.tensor([x for w in per_round[v] for x in w])
        q = torch.quantile(allw, torch.tensor([0.2, 0.5, 0.8])).tolist()
        extra = {"mfu_median": float(torch.tensor(mfus[v]).median()) if mfus[v] else None}
        rows.append(
            Row(
                BENCHMARK,
                v,
                "throughput",
                q[1],
                "images/s",
                p20=q[0],
                p80=q[2],
                config={**config, **extra},
                device=dev,
            )
        )
    for v in names:
        if v == BASELINE:
            continue
        # time per image ratio (baseline / variant) == images/s ratio (variant / baseline)
        r = paired_ratio([1.0 / x for x in medians[BASELINE]], [1.0 / x for x in medians[v]])
        rows.append(
            Row(
                BENCHMARK, v, "speed_vs_single", r, "x", baseline=BASELINE, ratio=r, config=config, device=dev
            )
        )
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    slug = "cpu" if args.device == "cpu" else "cuda"
    json_path = args.json or RESULTS_DIR / f"{BENCHMARK}_{slug}.json"
    png_path = args.png or RESULTS_DIR / f"{BENCHMARK}_{slug}.png"
    rows = run(args)
    print_table(rows)
    write_rows(json_path, rows)
    title = (
        f"stage-2 training, {args.model}, global batch {args.batch}, {args.precision}: "
        f"single process vs {args.procs} processes per backend"
    )
    bar_chart(rows, png_path, title, metric="throughput", muted=(BASELINE,))
    print(f"wrote {json_path} and {png_path}")
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()
