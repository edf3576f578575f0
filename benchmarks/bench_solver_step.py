"""Speed of one DPM-Solver++ multistep update on CPU: the fused C++ step against the eager one.

One update ``x_i -> x_{i+1}`` with fused classifier-free guidance (the model output is the doubled
batch ``[cond; uncond]``) on a large sample (default 64 x 4 x 128 x 128 = 4.2M elements, 16 MB per
fp32 tensor: beyond the caches, so bandwidth-bound). Variants, timed interleaved in one process
(``benchmarks.harness.measure_alternating``), for each requested order:

* ``eager``: ``kernels.solver_step.solver_step_reference``: ``cfg_combine``, the data prediction,
  the history write and the multistep combination as ~8-10 separate PyTorch ops, each a pass
  over x-sized tensors with temporaries.
* ``sampler-eager``: what ``DPMSolverPP.sample`` runs per step: ``cfg_combine``,
  ``DPMSolverPP.data_prediction`` and ``DPMSolverPP.step`` (Python list history, no ring buffer).
* ``cpp-fused``: ``torch.ops.dpt_engine.dpm_solver_step_`` (one parallel pass; identical output)
  into a new output tensor per call, as the eager variants return one.
* ``cpp-fused-out``: the same into a preallocated ``out`` (what ``sample_multistep_fused`` does):
  no fresh pages to fault in per call.

Bandwidth: the bytes the fused step must move, ``(4 x + 8 model_out + 4 (order - 1) history + 4
x0 + 4 out) * numel`` per call, divided by each variant's time. Target: ``cpp-fused`` >= 2x
``eager`` (paired ratio).

Run: ``python -m benchmarks.bench_solver_step [--shape 64 4 128 128] [--orders 2 3] [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dpt_engine.diffusion import DiscreteVPSchedule, DPMSolverPP
from dpt_engine.diffusion.guidance import cfg_combine
from dpt_engine.kernels import _native as native
from dpt_engine.kernels.solver_step import SolverStepTable, solver_step_reference, solver_step_table

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

BENCHMARK = "solver_step"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("eager", "sampler-eager", "cpp-fused", "cpp-fused-out")
OURS = "cpp-fused"
TARGET = 2.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs="+", default=[64, 4, 128, 128], help="x's shape (B, ...)")
    p.add_argument("--orders", type=int, nargs="+", default=[2, 3], choices=(1, 2, 3), help="orders to time")
    p.add_argument("--scale", type=float, default=0.4, help="guidance scale w (negative: no guidance)")
    p.add_argument("--repeats", type=int, default=15, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed interleaved rounds first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="rows out (default results/solver_step_cpu.json)")
    p.add_argument("--png", type=Path, default=None, help="chart out (default results/solver_step_cpu.png)")
    return p


def _step_with_order(solver: DPMSolverPP, order: int) -> int:
    """The first step index whose multistep order is ``order``."""
    for i, k in enumerate(solver.orders):
        if k == order:
            return i
    raise ValueError(f"no step of order {order} in {solver.orders}")


def _make_variants(
    solver: DPMSolverPP,
    table: SolverStepTable,
    i: int,
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor,
    scale: float | None,
) -> dict[str, Callable[[], torch.Tensor]]:
    slots = history.shape[0]
    prev = [history[(i - j) % slots] for j in range(1, solver.orders[i])]  # newest first
    hist_eager = history.clone()
    hist_fused = history.clone()
    step = table.step_index[i : i + 1]

    def eager() -> torch.Tensor:
        return solver_step_reference(x, model_out, hist_eager, table, i, scale)

    def sampler_eager() -> torch.Tensor:
        if scale is None:
            eps = model_out
        else:
            cond, uncond = model_out.chunk(2)  # 2 x (B, ...)
            eps = cfg_combine(cond, uncond, scale)
        x0 = solver.data_prediction(i, x, eps)
        return solver.step(i, x, [x0, *prev])

    def cpp_fused() -> torch.Tensor:
        out = torch.empty_like(x)  # a new tensor per call, as the eager variants return
        torch.ops.dpt_engine.dpm_solver_step_(x, model_out, hist_fused, table.coef, step, scale, out)
        return out

    buf = torch.empty_like(x)

    def cpp_fused_out() -> torch.Tensor:
        torch.ops.dpt_engine.dpm_solver_step_(x, model_out, hist_fused, table.coef, step, scale, buf)
        return buf

    return {
        "eager": eager,
        "sampler-eager": sampler_eager,
        "cpp-fused": cpp_fused,
        "cpp-fused-out": cpp_fused_out,
    }


def run(args: argparse.Namespace) -> list[Row]:
    if not native.is_available():
        raise SystemExit(
            f"the C++ ops are not built ({native.load_error()}); run `bash scripts/build_native.sh`"
        )
    busy = load_warning()
    if busy:
        print(f"WARNING: {busy}")
    load_before = os.getloadavg()[0]
    shape = tuple(args.shape)
    numel = math.prod(shape)
    scale = None if args.scale < 0 else args.scale
    solver = DPMSolverPP(DiscreteVPSchedule("linear"), steps=20, order=3, skip_type="time_uniform")
    table = solver_step_table(solver, "cpu")
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(shape, generator=g)
    lead = (2 * shape[0], *shape[1:]) if scale is not None else shape
    model_out = torch.randn(lead, generator=g)  # (2B, ...) = [cond; uncond]
    history = torch.randn((3, *shape), generator=g)  # (S, B, ...)
    dev = device_name("cpu")

    rows: list[Row] = []
    for order in args.orders:
        i = _step_with_order(solver, order)
        variants = _make_variants(solver, table, i, x, model_out, history, scale)
        outputs = {name: fn() for name, fn in variants.items()}  # untimed: warm-up and agreement
        exact = torch.equal(outputs["cpp-fused"], outputs["eager"]) and torch.equal(
            outputs["cpp-fused-out"], outputs["eager"]
        )
        max_diff = float((outputs["cpp-fused"] - outputs["sampler-eager"]).abs().max())
        print(
            f"order {order} (step {i}): cpp-fused == eager bit for bit: {exact}; "
            f"max |cpp-fused - sampler-eager| = {max_diff:.3g}"
        )
        del outputs
        times = measure_alternating(variants, repeats=args.repeats, warmup=args.warmup, sync=None)

        moved = (4 + 4 * model_out.numel() // numel + 4 * (order - 1) + 4 + 4) * numel
        config = {
            "shape": list(shape),
            "numel": numel,
            "order": order,
            "step": i,
            "guidance_scale": scale,
            "dtype": "float32",
            "bytes_per_call": moved,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "cpu_isa": native.cpu_isa(),
            "load_avg_1min_before": round(load_before, 2),
            "bit_exact_vs_eager": exact,
        }
        bench = f"{BENCHMARK}_order{order}"

        def row(
            variant: str, metric: str, value: float, unit: str, bench=bench, config=config, **kw: Any
        ) -> Row:
            return Row(bench, variant, metric, float(value), unit, config=config, device=dev, **kw)

        for name in VARIANTS:
            s = summarize(times[name])
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
        for ours in (OURS, "cpp-fused-out"):
            for peer in ("eager", "sampler-eager"):
                r = paired_ratio(times[peer], times[ours])
                cfg = {**config, "target": TARGET, "meets_target": r >= TARGET} if peer == "eager" else config
                rows.append(row(ours, "speedup", r, "x", config=cfg, baseline=peer, ratio=r))
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
        with torch.no_grad():
            rows = run(args)
    finally:
        torch.set_num_threads(prev_threads)
    print_table(rows)
    write_rows(json_path, rows)
    last = args.orders[-1]
    shown = [r for r in rows if r.benchmark == f"{BENCHMARK}_order{last}"]
    title = (
        f"DPM-Solver++ multistep update (order {last}, guidance w={args.scale}), x {tuple(args.shape)} fp32\n"
        f"(bandwidth at the fused step's bytes; median of {args.repeats} interleaved repeats)"
    )
    bar_chart(shown, png_path, title, metric="bandwidth")
    print(f"wrote {json_path} and {png_path}")
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()
