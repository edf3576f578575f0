"""EMA update speed on CPU: the C++ multi-tensor op against PyTorch formulations of the same update.

``ema <- decay * ema + (1 - decay) * param`` over ~100M fp32 parameters in ~100 tensors of mixed
sizes (far beyond the caches: a bandwidth-bound update). Variants, timed interleaved in one
process (``benchmarks.harness.measure_alternating``):

* ``original``: the per-tensor loop of the original code, ``e.mul_(d); e.add_(p * (1 - d))``:
  a temporary per tensor, ~28 bytes moved per parameter.
* ``lerp-loop``: per-tensor ``e.lerp_(p, 1 - d)`` (12 bytes per parameter, one op per tensor).
* ``foreach-lerp``: ``torch._foreach_lerp_`` over the lists (``ema_update_reference_``).
* ``flat-lerp``: one ``lerp_`` over two contiguous buffers of the same total size: the best a
  single PyTorch op can do (what a flattened EMA would cost).
* ``cpp-fused``: ``torch.ops.dpt_engine.ema_update_`` (one parallel loop over a chunk table
  spanning all tensors; needs ``bash scripts/build_native.sh``).
* ``copy``: ``dst.copy_(src)`` over a buffer of the same size: the machine's copy bandwidth,
  counted as 8 bytes per parameter. The hardware moves 12 (the destination's cache lines are
  read before they are written), while the EMA's 12 bytes need no such extra read: an EMA at
  the memory limit therefore shows ~1.5x the copy's figure.

Bandwidth: ``12 * params / time`` (fp32 params; 10 with ``--param-dtype bf16``) for every EMA
variant, i.e. the bytes the update must move, whatever extra traffic a variant makes. Targets of
the fused op: >= 2.5x ``original`` and >= 0.9x ``flat-lerp`` (paired ratios).

Run: ``python -m benchmarks.bench_ema [--params 100e6] [--tensors 100] [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dpt_engine.kernels import _native as native
from dpt_engine.kernels import ema_update_reference_

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

BENCHMARK = "ema"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("original", "lerp-loop", "foreach-lerp", "flat-lerp", "cpp-fused", "copy")
OURS = "cpp-fused"
TARGETS = {"original": 2.5, "flat-lerp": 0.9}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--params", type=float, default=100e6, help="total parameters (default 100e6)")
    p.add_argument("--tensors", type=int, default=100, help="number of tensors (default 100)")
    p.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the params")
    p.add_argument("--decay", type=float, default=0.9999)
    p.add_argument("--repeats", type=int, default=15, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed interleaved rounds first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="rows out (default results/ema_cpu.json)")
    p.add_argument("--png", type=Path, default=None, help="chart out (default results/ema_cpu.png)")
    return p


def tensor_sizes(total: int, count: int, seed: int) -> list[int]:
    """``count`` sizes summing to ``total``: a few large matrices and many odd-sized smaller ones
    (log-uniform, as a transformer's weights, biases and norms), none a multiple of 16."""
    g = torch.Generator().manual_seed(seed)
    logs = torch.rand(count, generator=g, dtype=torch.float64) * 6.0  # sizes over ~6 decades
    weights = torch.exp(logs)
    sizes = (weights / weights.sum() * total).long().clamp(min=1)
    sizes = sizes + (sizes % 16 == 0).long()  # odd tails for every vector loop
    sizes[0] += total - int(sizes.sum())  # exact total
    return [int(s) for s in sizes]


def _make_variants(
    ema: list[torch.Tensor],
    params: list[torch.Tensor],
    flat_ema: torch.Tensor,
    flat_param: torch.Tensor,
    copy_dst: torch.Tensor,
    copy_src: torch.Tensor,
    decay: float,
) -> dict[str, Callable[[], None]]:
    w = 1.0 - decay

    def original() -> None:
        for e, p in zip(ema, params):
            e.mul_(decay)
            e.add_(p * w)  # temporary of p's size and dtype; bf16 params add through promotion

    def lerp_loop() -> None:
        for e, p in zip(ema, params):
            e.lerp_(p if p.dtype == e.dtype else p.float(), w)

    def foreach_lerp() -> None:
        ema_update_reference_(ema, params, decay)

    def flat_lerp() -> None:
        flat_ema.lerp_(flat_param if flat_param.dtype == flat_ema.dtype else flat_param.float(), w)

    def cpp_fused() -> None:
        torch.ops.dpt_engine.ema_update_(ema, params, decay)

    def copy() -> None:
        copy_dst.copy_(copy_src)

    fns = {
        "original": original,
        "lerp-loop": lerp_loop,
        "foreach-lerp": foreach_lerp,
        "flat-lerp": flat_lerp,
        "cpp-fused": cpp_fused,
        "copy": copy,
    }
    return {name: fns[name] for name in VARIANTS}


def run(args: argparse.Namespace) -> list[Row]:
    if not native.is_available():
        raise SystemExit(
            f"the C++ ops are not built ({native.load_error()}); run `bash scripts/build_native.sh`"
        )
    busy = load_warning()
    if busy:
        print(f"WARNING: {busy}")
    load_before = os.getloadavg()[0]
    total = int(args.params)
    pdtype = torch.bfloat16 if args.param_dtype == "bf16" else torch.float32
    sizes = tensor_sizes(total, args.tensors, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    ema = [torch.randn(n, generator=g) for n in sizes]
    params = [(e + 0.01 * torch.randn(n, generator=g)).to(pdtype) for e, n in zip(ema, sizes)]
    flat_ema = torch.randn(total, generator=g)
    flat_param = torch.randn(total, generator=g).to(pdtype)
    copy_src = torch.randn(total, generator=g)
    copy_dst = torch.empty_like(copy_src)

    # agreement on the first tensors before timing (the fused op against the reference)
    check = slice(0, min(8, len(sizes)))
    ref = [e.clone() for e in ema[check]]
    got = [e.clone() for e in ema[check]]
    ema_update_reference_(ref, params[check], args.decay)
    torch.ops.dpt_engine.ema_update_(got, params[check], args.decay)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(got, ref))
    print(f"agreement: max |cpp-fused - foreach-lerp| = {max_diff:.3g} (CPU loops: {native.cpu_isa()})")

    variants = _make_variants(ema, params, flat_ema, flat_param, copy_dst, copy_src, args.decay)
    with torch.no_grad():
        times = measure_alternating(variants, repeats=args.repeats, warmup=args.warmup, sync=None)

    bytes_per_param = 4 + 4 + flat_param.element_size()  # read ema + param, write ema
    config = {
        "params": total,
        "tensors": len(sizes),
        "largest_tensor": max(sizes),
        "smallest_tensor": min(sizes),
        "param_dtype": args.param_dtype,
        "ema_dtype": "fp32",
        "decay": args.decay,
        "bytes_per_param": bytes_per_param,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "cpu_isa": native.cpu_isa(),
        "load_avg_1min_before": round(load_before, 2),
        "max_abs_diff_vs_reference": max_diff,
    }
    dev = device_name("cpu")

    def row(variant: str, metric: str, value: float, unit: str, **kw: Any) -> Row:
        return Row(BENCHMARK, variant, metric, float(value), unit, config=config, device=dev, **kw)

    rows: list[Row] = []
    for name in VARIANTS:
        s = summarize(times[name])
        moved = 8 * total if name == "copy" else bytes_per_param * total  # bytes per call
        rows.append(row(name, "seconds", s["p50"], "s", p20=s["p20"], p80=s["p80"]))
        rows.append(
            row(
                name,
                "bandwidth",
                moved / s["p50"] / 1e9,
                "GB/s",
                p20=moved / s["p80"] / 1e9,
                p80=moved / s["p20"] / 1e9,
            )
        )
    for peer in ("original", "lerp-loop", "foreach-lerp", "flat-lerp"):
        r = paired_ratio(times[peer], times[OURS])
        extra = {"target": TARGETS[peer], "meets_target": r >= TARGETS[peer]} if peer in TARGETS else {}
        rows.append(
            Row(
                BENCHMARK,
                OURS,
                "speedup",
                r,
                "x",
                baseline=peer,
                ratio=r,
                config={**config, **extra},
                device=dev,
            )
        )
    # fraction of the machine's copy bandwidth the fused update reaches (per-round pairing)
    frac = paired_ratio([t * bytes_per_param for t in times["copy"]], [t * 8 for t in times[OURS]])
    rows.append(row(OURS, "fraction_of_copy_bandwidth", frac, "fraction", baseline="copy", ratio=frac))
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
    title = (
        f"EMA update, {args.params / 1e6:.0f}M {args.param_dtype} params in {args.tensors} tensors, fp32 EMA\n"
        f"(bandwidth at {rows[0].config['bytes_per_param']} B/param; median of {args.repeats} interleaved repeats)"
    )
    bar_chart(rows, png_path, title, metric="bandwidth", muted=("copy",))
    print(f"wrote {json_path} and {png_path}")
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()
