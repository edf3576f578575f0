"""Latent read rate: the memory-mapped latent store against one ``.npy`` file per image.

The original DPT/U-ViT pipeline saves each image's (and each flip's) autoencoder moments as its own
small ``.npy`` file (2.56M files for ImageNet) and a training step opens ``batch`` of them. The
store (``dpt_engine.data.latent_store``) keeps all rows in one ``.npy`` memory map. Both hold the
same rows: moments ``(2, c, h, w)`` (default ``(2, 4, 32, 32)``: SD's KL-f8 latent of a 256 px
image) in the same dtype (default float32, as the original). Variants, timed interleaved in one
process (``benchmarks.harness.measure_alternating``), each reading ``--batches`` batches of
``--batch`` rows per call:

* ``store-random``: ``LatentStore.read(rows)`` of batches from a shuffled permutation (what a
  training step reads; indices sorted inside the batch, a copy out of the map);
* ``store-sequential``: contiguous row slices (a rank reading its shard in order);
* ``store-loader``: ``LatentLoader`` end to end: ``--batches`` batches of its epoch permutation
  with labels, posterior draw and scaling into float32 training latents (what stage 2 consumes);
* ``npy-files-random``: ``np.load`` of one file per row for the same random batches, stacked
  (the original design; the baseline of ``store-random`` and ``store-loader``);
* ``npy-files-sequential``: the same over files in index order (baseline of ``store-sequential``).

The files are freshly written, so both layouts are read from the page cache: the figures measure
per-row overhead (open/parse/close per file vs one slice of a map), not the disk. On a cold cache
or a network file system each small file costs one or more extra round trips, so the gap is wider.

Rows: ``throughput`` (rows/s, p20/p50/p80) and ``bandwidth`` (MB/s) per variant, and paired
``speedup`` rows against the per-file baselines.

Run: ``python -m benchmarks.bench_latent_store [--rows 8192] [--batch 256] [--batches 8] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpt_engine.data.latent_store import FORMAT_VERSION, LatentLoader, LatentStore
from dpt_engine.utils.io import atomic_write_json

from .harness import (
    Row,
    bar_chart,
    device_name,
    load_warning,
    measure_alternating,
    paired_ratio,
    print_table,
    summarize,
    write_rows,
)

__all__ = ["VARIANTS", "build_parser", "main", "run"]

BENCHMARK = "latent_store"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("store-random", "store-sequential", "store-loader", "npy-files-random", "npy-files-sequential")
BASELINES = {
    "store-random": "npy-files-random",
    "store-loader": "npy-files-random",
    "store-sequential": "npy-files-sequential",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--rows", type=int, default=8192, help="rows in each layout (default 8192)")
    p.add_argument("--shape", type=int, nargs=3, default=(4, 32, 32), help="latent c h w (default 4 32 32)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--batch", type=int, default=256, help="rows per batch (default 256)")
    p.add_argument("--batches", type=int, default=8, help="batches per timed call (default 8)")
    p.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed interleaved rounds first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--workdir", type=Path, default=None, help="where the data goes (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="rows out (default results/latent_store_cpu.json)")
    p.add_argument("--png", type=Path, default=None, help="chart out (default results/latent_store_cpu.png)")
    return p


def _write_store(path: Path, data: np.ndarray) -> LatentStore:
    """A complete store holding ``data`` (rows, 2, c, h, w), as ``encode_to_store`` lays it out."""
    path.mkdir(parents=True)
    mm = np.lib.format.open_memmap(path / "latents.npy", mode="w+", dtype=data.dtype, shape=data.shape)
    mm[:] = data
    mm.flush()
    del mm
    n = data.shape[0]
    np.save(path / "labels.npy", np.arange(n, dtype=np.int64) % 10)
    atomic_write_json(
        path / "meta.json",
        {
            "format_version": FORMAT_VERSION,
            "kind": "moments",
            "dtype": str(data.dtype),
            "flip": False,
            "num_images": n,
            "num_rows": n,
            "latent_shape": list(data.shape[2:]),
            "num_chunks": 1,
            "scale_factor": 0.18215,
            "shift_factor": 0.0,
            "complete": True,
        },
    )
    return LatentStore(path)


def _write_files(path: Path, data: np.ndarray) -> list[str]:
    """One ``<i>.npy`` per row, as the original feature-extraction script writes them."""
    path.mkdir(parents=True)
    files = []
    for i in range(data.shape[0]):
        f = str(path / f"{i}.npy")
        np.save(f, data[i])
        files.append(f)
    return files


def _make_variants(
    store: LatentStore, files: list[str], perm: np.ndarray, batch: int, batches: int
) -> dict[str, Callable[[], Any]]:
    n = len(files)
    span = batch * batches
    state = {"rnd": 0}

    def window() -> tuple[np.ndarray, int]:
        # each call reads the next window of the permutation / of the rows, so no variant rereads
        # a window the previous call just touched more than the others do
        k = state["rnd"]
        start = (k * span) % max(1, n - span + 1)
        return perm[start : start + span], start

    def store_random() -> None:
        rows, _ = window()
        for s in range(0, span, batch):
            store.read(rows[s : s + batch])

    def store_sequential() -> None:
        _, start = window()
        for s in range(start, start + span, batch):
            np.array(store.latents[s : s + batch])

    loader = LatentLoader(store, batch, labels="true", rank=0, world_size=1, seed=0)

    def store_loader() -> None:
        loader.set_epoch(state["rnd"])  # its own epoch permutation, a new one every round
        for _ in itertools.islice(iter(loader), batches):
            pass

    def files_random() -> None:
        rows, _ = window()
        for s in range(0, span, batch):
            np.stack([np.load(files[i]) for i in rows[s : s + batch]])

    def files_sequential() -> None:
        _, start = window()
        for s in range(start, start + span, batch):
            np.stack([np.load(files[i]) for i in range(s, s + batch)])
        state["rnd"] += 1  # the last variant of a round moves every variant to the next window

    fns = {
        "store-random": store_random,
        "store-sequential": store_sequential,
        "store-loader": store_loader,
        "npy-files-random": files_random,
        "npy-files-sequential": files_sequential,
    }
    return {name: fns[name] for name in VARIANTS}


def run(args: argparse.Namespace) -> list[Row]:
    busy = load_warning()
    if busy:
        print(f"WARNING: {busy}")
    load_before = os.getloadavg()[0]
    span = args.batch * args.batches
    if args.rows < span:
        raise SystemExit(f"--rows {args.rows} is smaller than one call's --batch x --batches = {span}")
    rng = np.random.default_rng(args.seed)
    shape = (args.rows, 2, *args.shape)
    data = rng.standard_normal(shape, dtype=np.float32).astype(args.dtype)
    own_dir = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench_latent_store_")) if own_dir else args.workdir
    try:
        store = _write_store(work / "store", data)
        files = _write_files(work / "files", data)
        perm = rng.permutation(args.rows)

        # agreement before timing: the same rows from both layouts
        probe = perm[: args.batch]
        same = np.array_equal(store.read(probe), np.stack([np.load(files[i]) for i in probe]))
        print(f"agreement: store rows == per-file rows: {same}")
        if not same:
            raise SystemExit("the store and the per-file layout disagree; not timing")

        variants = _make_variants(store, files, perm, args.batch, args.batches)
        times = measure_alternating(variants, repeats=args.repeats, warmup=args.warmup, sync=None)
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)

    row_bytes = int(np.prod(shape[1:])) * np.dtype(args.dtype).itemsize
    config = {
        "rows": args.rows,
        "row_shape": list(shape[1:]),
        "dtype": args.dtype,
        "row_bytes": row_bytes,
        "batch": args.batch,
        "batches_per_call": args.batches,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "cache": "page cache warm (files freshly written)",
        "load_avg_1min_before": round(load_before, 2),
    }
    dev = device_name("cpu")

    def row(variant: str, metric: str, value: float, unit: str, **kw: Any) -> Row:
        return Row(BENCHMARK, variant, metric, float(value), unit, config=config, device=dev, **kw)

    rows: list[Row] = []
    for name in VARIANTS:
        s = summarize(times[name])
        rows.append(row(name, "seconds", s["p50"], "s", p20=s["p20"], p80=s["p80"]))
        rows.append(
            row(name, "throughput", span / s["p50"], "rows/s", p20=span / s["p80"], p80=span / s["p20"])
        )
        mb = span * row_bytes / 1e6
        rows.append(row(name, "bandwidth", mb / s["p50"], "MB/s", p20=mb / s["p80"], p80=mb / s["p20"]))
    for ours, peer in BASELINES.items():
        r = paired_ratio(times[peer], times[ours])
        rows.append(row(ours, "speedup", r, "x", baseline=peer, ratio=r))
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """CLI entry point; returns the rows as dicts (also written to ``--json``)."""
    args = build_parser().parse_args(argv)
    json_path = args.json or RESULTS_DIR / f"{BENCHMARK}_cpu.json"
    png_path = args.png or RESULTS_DIR / f"{BENCHMARK}_cpu.png"
    prev_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        rows = run(args)
    finally:
        torch.set_num_threads(prev_threads)
    print_table(rows)
    write_rows(json_path, rows)
    c, h, w = args.shape
    title = (
        f"Latent reads: one memory-mapped store vs one .npy per row ({args.rows} rows of 2x{c}x{h}x{w} "
        f"{args.dtype})\n(batch {args.batch}; median of {args.repeats} interleaved repeats; page cache warm)"
    )
    bar_chart(rows, png_path, title, metric="throughput", muted=("npy-files-random", "npy-files-sequential"))
    print(f"wrote {json_path} and {png_path}")
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()
