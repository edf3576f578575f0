"""End-to-end guided sampling speed: dpt_engine's DPM-Solver++ against diffusers and the original
two-forward guidance, with the same network, noise, labels and time grid.

Variants (all timed interleaved in one process, see ``benchmarks.harness``):

* ``dpt_engine``: ``DPMSolverPP`` multistep order 2 with ``cfg_eps_fn`` (one forward of the
  doubled batch ``cat([x, x])`` with labels ``cat([y, null])`` per step).
* ``diffusers``: ``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 2, midpoint, the same
  discrete linear betas) stepping with the same ``cfg_eps_fn`` output, so only the solver loop
  differs from ``dpt_engine``.
* ``naive-original``: ``DPMSolverPP`` with ``two_forward_eps_fn``: separate conditional and
  null-class forwards of batch B per step, as the original U-ViT/DPT code does.
* ``network-forward``: the bare doubled-batch forwards alone (``steps`` of them, inputs prepared
  beforehand): the floor under ``dpt_engine`` and ``diffusers``; the gap is the time spent
  outside the network (solver arithmetic, guidance combine, concatenations, Python).

Time grid: diffusers' ``linspace`` spacing, integer timestep ``k`` <-> our continuous time
``(k + 1) / N``, then a final ``1 / N`` (``final_sigmas_type='sigma_min'``); ``DPMSolverPP`` gets
exactly that grid and ``lower_order_final_below=15`` (diffusers' rule), as in
``tests/test_dpm_solver.py``. Each timed call includes the solver's per-call setup
(``DPMSolverPP`` construction, diffusers' ``set_timesteps``).

Run: ``python -m benchmarks.bench_sampler [--model uvit-tiny8] [--batch 64] [--steps 20]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
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
from dpt_engine.diffusion import (
    DiscreteVPSchedule,
    DPMSolverPP,
    cfg_eps_fn,
    initial_noise,
    make_schedule,
    two_forward_eps_fn,
)
from dpt_engine.models.uvit import UViT, create_uvit, list_uvits

__all__ = ["VARIANTS", "build_parser", "main", "run"]

BENCHMARK = "sampler"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("dpt_engine", "diffusers", "naive-original", "network-forward")
NUM_CLASSES = 10
SCHEDULE = "discrete-linear"
ORDER = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sampler",
        description="Guided DPM-Solver++ sampling: dpt_engine vs diffusers vs two-forward guidance.",
    )
    p.add_argument("--model", default="uvit-tiny8", choices=list_uvits(), help="U-ViT preset")
    p.add_argument("--batch", type=int, default=64, help="images per sampling call")
    p.add_argument("--steps", type=int, default=20, help="solver steps (= network evaluations)")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds")
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="extra untimed rounds; every variant already runs once untimed for the agreement check",
    )
    p.add_argument("--scale", type=float, default=0.4, help="guidance scale w (eps_c + w (eps_c - eps_u))")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the initial noise")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--json", type=Path, default=None, help="rows out (default results/sampler_<dev>.json)")
    p.add_argument("--png", type=Path, default=None, help="chart out (default results/sampler_<dev>.png)")
    return p


def _diffusers_scheduler(schedule: DiscreteVPSchedule) -> Any:
    """diffusers' DPM-Solver++(2M) on the same betas, configured like tests/test_dpm_solver.py."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_train_timesteps,
        trained_betas=schedule.betas.float().numpy(),
        solver_order=ORDER,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="sigma_min",
        timestep_spacing="linspace",
        prediction_type="epsilon",
    )


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _make_variants(
    net: UViT,
    schedule: DiscreteVPSchedule,
    x_T: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    scale: float,
) -> tuple[dict[str, Callable[[], torch.Tensor]], int]:
    """The four zero-argument variant callables (each returns its final tensor) and the number
    of network evaluations per sampling call."""
    n = schedule.num_train_timesteps
    null = net.cfg.null_class_id
    guided = cfg_eps_fn(net, y, scale, null, schedule)
    two_forward = two_forward_eps_fn(net, y, scale, null, schedule)
    sched = _diffusers_scheduler(schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 copy= notice inside diffusers
        sched.set_timesteps(steps, device=x_T.device)
    ks = [int(k) for k in sched.timesteps]
    grid = [(k + 1) / n for k in ks] + [1.0 / n]
    tdtype = torch.float32

    def ours() -> torch.Tensor:
        solver = DPMSolverPP(schedule, steps, order=ORDER, timesteps=grid, lower_order_final_below=15)
        return solver.sample(guided, x_T)

    def naive() -> torch.Tensor:
        solver = DPMSolverPP(schedule, steps, order=ORDER, timesteps=grid, lower_order_final_below=15)
        return solver.sample(two_forward, x_T)

    def peer() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            sched.set_timesteps(steps, device=x_T.device)
        x = x_T
        for k in sched.timesteps:
            t = torch.full((x.shape[0],), (int(k) + 1) / n, dtype=tdtype, device=x.device)  # (B,)
            x = sched.step(guided(x, t), k, x).prev_sample
        return x

    # bare forwards: exactly the doubled-batch inputs cfg_eps_fn builds, prepared beforehand
    x2 = torch.cat([x_T, x_T])  # (2B, C, H, W)
    y2 = torch.cat([y, torch.full_like(y, null)])  # (2B,)
    t_nets = [
        schedule.network_time(torch.full((x2.shape[0],), t, dtype=tdtype, device=x_T.device))
        for t in grid[:-1]
    ]

    def forwards() -> torch.Tensor:
        out = x2
        for t_net in t_nets:
            out = net(x2, t_net, y2)
        return out

    variants = {"dpt_engine": ours, "diffusers": peer, "naive-original": naive, "network-forward": forwards}
    assert tuple(variants) == VARIANTS
    return variants, len(t_nets)


def run(args: argparse.Namespace) -> list[Row]:
    """Build the model and inputs, check agreement, time the variants and return the rows."""
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    busy = load_warning()
    if busy:
        print(f"WARNING: {busy}")
    torch.manual_seed(args.seed)
    net = create_uvit(args.model, num_classes=NUM_CLASSES).to(device).eval()
    cfg = net.cfg
    schedule = make_schedule(SCHEDULE)
    assert isinstance(schedule, DiscreteVPSchedule)
    y = torch.arange(args.batch, device=device) % NUM_CLASSES  # (B,)
    x_T = initial_noise(
        args.seed,
        y.cpu(),
        torch.arange(args.batch),
        (cfg.in_chans, cfg.img_size, cfg.img_size),
        device=device,
    )  # (B, C, H, W) fp32

    config = {
        "model": args.model,
        "params": sum(p.numel() for p in net.parameters()),
        "batch": args.batch,
        "steps": args.steps,
        "order": ORDER,
        "schedule": SCHEDULE,
        "guidance_scale": args.scale,
        "num_classes": NUM_CLASSES,
        "dtype": "float32",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "load_avg_1min_before": round(load_before, 2),
    }

    with torch.no_grad():
        variants, nfe = _make_variants(net, schedule, x_T, y, args.steps, args.scale)
        # untimed first call of every variant: warm-up, and the outputs for the agreement check
        outputs = {name: fn() for name, fn in variants.items()}
        rel_peer = _rel_diff(outputs["dpt_engine"], outputs["diffusers"])
        rel_naive = _rel_diff(outputs["dpt_engine"], outputs["naive-original"])
        print(
            f"agreement: ||dpt_engine - diffusers|| / ||diffusers|| = {rel_peer:.2e}, "
            f"||dpt_engine - naive-original|| / ||naive-original|| = {rel_naive:.2e}"
        )
        times = measure_alternating(variants, repeats=args.repeats, warmup=args.warmup)

    dev = device_name(device)

    def row(variant: str, metric: str, value: float, unit: str, **kw: Any) -> Row:
        return Row(BENCHMARK, variant, metric, float(value), unit, config=config, device=dev, **kw)

    rows: list[Row] = []
    for name in VARIANTS:
        s = summarize(times[name])
        rows.append(row(name, "seconds_per_batch", s["p50"], "s", p20=s["p20"], p80=s["p80"]))
        rows.append(
            row(
                name,
                "throughput",
                args.batch / s["p50"],
                "img/s",
                p20=args.batch / s["p80"],
                p80=args.batch / s["p20"],
            )
        )
    ours = times["dpt_engine"]
    fwd = times["network-forward"]
    for peer in ("diffusers", "naive-original"):
        r = paired_ratio(times[peer], ours)
        rows.append(row("dpt_engine", "speedup", r, "x", baseline=peer, ratio=r))
    for name in ("dpt_engine", "diffusers"):
        frac = 1.0 - paired_ratio(fwd, times[name])
        outside = statistics.median(a - b for a, b in zip(times[name], fwd))
        rows.append(
            row(name, "outside_forward_fraction", frac, "fraction", baseline="network-forward", ratio=frac)
        )
        rows.append(
            row(name, "outside_forward_ms_per_step", 1e3 * outside / nfe, "ms", baseline="network-forward")
        )
    rows.append(row("dpt_engine", "rel_diff", rel_peer, "rel_l2", baseline="diffusers"))
    rows.append(row("dpt_engine", "rel_diff", rel_naive, "rel_l2", baseline="naive-original"))
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """CLI entry point; returns the rows as dicts (also written to ``--json``)."""
    args = build_parser().parse_args(argv)
    tag = torch.device(args.device).type
    json_path = args.json or RESULTS_DIR / f"{BENCHMARK}_{tag}.json"
    png_path = args.png or RESULTS_DIR / f"{BENCHMARK}_{tag}.png"
    prev_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        rows = run(args)
    finally:
        torch.set_num_threads(prev_threads)  # main() may be called in-process (tests)
    print_table(rows)
    write_rows(json_path, rows)
    title = (
        f"Guided DPM-Solver++(2M) sampling, {args.model}, batch {args.batch}, {args.steps} steps, "
        f"w={args.scale}, fp32\n(median of {args.repeats} interleaved repeats; p20-p80 bars)"
    )
    bar_chart(rows, png_path, title, metric="throughput", muted=("network-forward",))
    print(f"wrote {json_path} and {png_path}")
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()
