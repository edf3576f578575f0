"""End-to-end guided sampling speed: dpt_engine's DPM-Solver++ against diffusers and the original
two-forward guidance, with the same network, noise, labels and time grid.

Variants with the network (all timed interleaved in one process, see ``benchmarks.harness``):

* ``dpt_engine``: ``DPMSolverPP.sample`` multistep order 2 with ``cfg_eps_fn`` (one forward of the
  doubled batch ``cat([x, x])`` with labels ``cat([y, null])`` per step).
* ``dpt_engine-fused``: what sampling runs on GPUs (``dpt_engine.stages.sample``; on a CPU ``-fused-two``): ``sample_multistep_fused``
  with ``doubled_eps_fn``, i.e. the same forward, then guidance, data prediction and update in one
  ``solver_step`` through the kernel dispatch (the C++ op on CPU when built, else the reference).
* ``diffusers``: ``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 2, midpoint, the same
  discrete linear betas) stepping with the same ``cfg_eps_fn`` output, so only the solver loop
  differs from ``dpt_engine``.
* ``dpt_engine-fused-two``: ``dpt_engine-fused`` with the conditional and null-class outputs from
  two forwards of batch B (``sample.guidance_forwards=two``) instead of one of 2B: which of the two
  is faster depends on the device (``AUTO_GUIDANCE_FORWARDS``).
* ``naive-original``: ``DPMSolverPP`` with ``two_forward_eps_fn``: separate conditional and
  null-class forwards of batch B per step, as the original U-ViT/DPT code does.
* ``network-forward``: the bare doubled-batch forwards alone (``steps`` of them, inputs prepared
  beforehand): the floor under the samplers; the gap is the time spent outside the network
  (solver arithmetic, guidance combine, concatenations, Python).

Solver loop alone (a second interleaved measurement, the model replaced by a precomputed output,
many repeats): ``dpt_engine``, ``dpt_engine-fused`` and ``diffusers`` per-step loop cost, and the
per-call setup: ``DPMSolverPP`` construction plus ``solver_step_table`` (done once per sampling
run, as stage 2 does, so outside the timed sampling calls) vs diffusers' ``set_timesteps`` (needed
before every call to reset the scheduler, so inside its timed calls).

Time grid: diffusers' ``linspace`` spacing, integer timestep ``k`` <-> our continuous time
``(k + 1) / N``, then a final ``1 / N`` (``final_sigmas_type='sigma_min'``); ``DPMSolverPP`` gets
exactly that grid and ``lower_order_final_below=15`` (diffusers' rule), as in
``tests/test_dpm_solver.py``. The grid is computed here (``linspace_grid``) and checked against
diffusers' when diffusers is installed.

diffusers is optional: without it (e.g. a bare GPU image) the ``diffusers`` variant is left out
with a ``skipped`` row saying why, and the rest runs. ``--variants`` picks a subset (the
``benchmarks/gpu_check.py`` driver times ``dpt_engine-fused`` against ``naive-original``);
``--precision bf16`` runs every network forward under bf16 autocast (the solver state stays
fp32), as stage 2 samples on a GPU.

Run: ``python -m benchmarks.bench_sampler [--model uvit-tiny8] [--batch 64] [--steps 20]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpt_engine.diffusion import (
    DiscreteVPSchedule,
    DPMSolverPP,
    cfg_eps_fn,
    initial_noise,
    make_schedule,
    two_forward_eps_fn,
)
from dpt_engine.diffusion.guidance import doubled_eps_fn
from dpt_engine.kernels import registered_backends, resolve_backend
from dpt_engine.kernels.solver_step import SolverStepTable, sample_multistep_fused, solver_step_table
from dpt_engine.models.denoisers import create_denoiser, list_denoisers

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

__all__ = ["LOOP_VARIANTS", "VARIANTS", "build_parser", "linspace_grid", "main", "run"]

BENCHMARK = "sampler"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = (
    "dpt_engine",
    "dpt_engine-fused",
    "dpt_engine-fused-two",
    "diffusers",
    "naive-original",
    "network-forward",
)
LOOP_VARIANTS = ("dpt_engine", "dpt_engine-fused", "diffusers")
NUM_CLASSES = 10
SCHEDULE = "discrete-linear"
ORDER = 2
LOOP_REPEATS_PER_REPEAT = 10  # the network-free loop takes milliseconds: time it more often


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sampler",
        description="Guided DPM-Solver++ sampling: dpt_engine vs diffusers vs two-forward guidance.",
    )
    p.add_argument(
        "--model", default="uvit-tiny8", choices=list_denoisers(), help="denoiser preset (U-ViT or U-Net)"
    )
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
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="network forwards in fp32 or under bf16 autocast (solver state fp32 either way)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="variants to time (default all; diffusers is left out when not installed)",
    )
    p.add_argument("--json", type=Path, default=None, help="rows out (default results/sampler_<dev>.json)")
    p.add_argument("--png", type=Path, default=None, help="chart out (default results/sampler_<dev>.png)")
    return p


def linspace_grid(num_train_timesteps: int, steps: int) -> list[float]:
    """The ``steps + 1`` continuous times of diffusers' ``linspace`` spacing: integer timesteps
    ``k = round(linspace(0, N - 1, steps + 1))`` (descending, the last dropped) as ``(k + 1) / N``,
    then ``1 / N`` (``final_sigmas_type='sigma_min'``)."""
    n = num_train_timesteps
    ks = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    return [(int(k) + 1) / n for k in ks] + [1.0 / n]


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


def _set_timesteps(sched: Any, steps: int, device: torch.device) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 copy= notice inside diffusers
        sched.set_timesteps(steps, device=device)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@dataclass
class _Setup:
    """Everything the variants share: the schedule, the matched time grid and both solvers."""

    schedule: DiscreteVPSchedule
    steps: int
    grid: list[float]  # steps + 1 decreasing continuous times
    sched: Any  # diffusers DPMSolverMultistepScheduler, or None without diffusers
    x_T: torch.Tensor  # (B, C, H, W) fp32

    def solver(self) -> DPMSolverPP:
        return DPMSolverPP(
            self.schedule, self.steps, order=ORDER, timesteps=self.grid, lower_order_final_below=15
        )

    def table(self, solver: DPMSolverPP) -> SolverStepTable:
        return solver_step_table(solver, self.x_T.device)

    def diffusers_loop(self, eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One diffusers sampling call (``set_timesteps`` resets the scheduler's step index)."""
        n = self.schedule.num_train_timesteps
        _set_timesteps(self.sched, self.steps, self.x_T.device)
        x = self.x_T
        for k in self.sched.timesteps:
            t = torch.full((x.shape[0],), (int(k) + 1) / n, dtype=torch.float32, device=x.device)  # (B,)
            x = self.sched.step(eps_fn(x, t), k, x).prev_sample
        return x


def _make_setup(schedule: DiscreteVPSchedule, steps: int, x_T: torch.Tensor, diffusers: bool) -> _Setup:
    n = schedule.num_train_timesteps
    grid = linspace_grid(n, steps)
    sched = None
    if diffusers:
        sched = _diffusers_scheduler(schedule)
        _set_timesteps(sched, steps, x_T.device)
        theirs = [(int(k) + 1) / n for k in sched.timesteps] + [1.0 / n]
        if theirs != grid:
            raise RuntimeError(f"diffusers' linspace grid {theirs} differs from linspace_grid's {grid}")
    return _Setup(schedule, steps, grid, sched, x_T)


class _Autocast(torch.nn.Module):
    """``net`` with every forward under bf16 autocast on its device (what stage 2 samples with)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.cfg = net.cfg

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.net(x, t, y)


def _fused_backend(setup: _Setup, table: SolverStepTable) -> str:
    """Name of the ``solver_step`` backend the dispatch picks for these tensors."""
    x = setup.x_T
    history = torch.zeros((table.max_order, *x.shape), dtype=x.dtype, device=x.device)
    fn = resolve_backend("solver_step", (x, torch.cat([x, x]), history, table.coef))
    return next((name for name, b in registered_backends("solver_step").items() if b.fn is fn), "unknown")


def _network_variants(
    net: torch.nn.Module, setup: _Setup, y: torch.Tensor, scale: float, names: Sequence[str]
) -> dict[str, Callable[[], torch.Tensor]]:
    """The sampling variants in ``names``, each a zero-argument callable returning its final tensor."""
    schedule, x_T = setup.schedule, setup.x_T
    null = net.cfg.null_class_id
    assert null is not None
    guided = cfg_eps_fn(net, y, scale, null, schedule)
    two_forward = two_forward_eps_fn(net, y, scale, null, schedule)
    doubled = doubled_eps_fn(net, y, null, schedule)
    doubled_two = doubled_eps_fn(net, y, null, schedule, forwards="two")
    solver = setup.solver()  # built once per run, as stage 2 does
    table = setup.table(solver)

    def ours() -> torch.Tensor:
        return solver.sample(guided, x_T)

    def fused() -> torch.Tensor:
        return sample_multistep_fused(solver, doubled, x_T, guidance_scale=scale, table=table)

    def fused_two() -> torch.Tensor:
        return sample_multistep_fused(solver, doubled_two, x_T, guidance_scale=scale, table=table)

    def peer() -> torch.Tensor:
        return setup.diffusers_loop(guided)

    def naive() -> torch.Tensor:
        return solver.sample(two_forward, x_T)

    # bare forwards: exactly the doubled-batch inputs cfg_eps_fn builds, prepared beforehand
    x2 = torch.cat([x_T, x_T])  # (2B, C, H, W)
    y2 = torch.cat([y, torch.full_like(y, null)])  # (2B,)
    t_nets = [
        schedule.network_time(torch.full((x2.shape[0],), t, dtype=torch.float32, device=x_T.device))
        for t in setup.grid[:-1]
    ]

    def forwards() -> torch.Tensor:
        out = x2
        for t_net in t_nets:
            out = net(x2, t_net, y2)
        return out

    variants = {
        "dpt_engine": ours,
        "dpt_engine-fused": fused,
        "dpt_engine-fused-two": fused_two,
        "diffusers": peer,
        "naive-original": naive,
        "network-forward": forwards,
    }
    assert tuple(variants) == VARIANTS
    return {name: variants[name] for name in VARIANTS if name in names}


def _loop_variants(setup: _Setup, scale: float, names: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """The solver loops with the model replaced by a precomputed output, plus the setup costs."""
    x_T = setup.x_T
    gen = torch.Generator(device="cpu").manual_seed(1)
    doubled = (0.1 * torch.randn((2 * x_T.shape[0], *x_T.shape[1:]), generator=gen)).to(x_T.device)
    cond, uncond = doubled.chunk(2)
    eps = cond + scale * (cond - uncond)  # what cfg_eps_fn would return
    solver = setup.solver()
    table = setup.table(solver)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps

    def doubled_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return doubled

    loops: dict[str, Callable[[], Any]] = {
        "dpt_engine": lambda: solver.sample(eps_fn, x_T),
        "dpt_engine-fused": lambda: sample_multistep_fused(
            solver, doubled_fn, x_T, guidance_scale=scale, table=table
        ),
        "diffusers": lambda: setup.diffusers_loop(eps_fn),
        "dpt_engine-setup": lambda: setup.table(setup.solver()),
        "diffusers-setup": lambda: _set_timesteps(setup.sched, setup.steps, x_T.device),
    }
    keep = [*(n for n in LOOP_VARIANTS if n in names), "dpt_engine-setup"]
    if "diffusers" in names:
        keep.append("diffusers-setup")
    return {name: loops[name] for name in keep}


def _diffusers_missing() -> str | None:
    """Why diffusers cannot be used here (None when it imports)."""
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        return f"diffusers is not installed ({exc})"
    return None


def run(args: argparse.Namespace) -> list[Row]:
    """Build the model and inputs, check agreement, time the variants and return the rows."""
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    busy = load_warning()
    if busy:
        print(f"WARNING: {busy}")
    names = [v for v in VARIANTS if v in args.variants]
    skipped: dict[str, str] = {}
    if "diffusers" in names and (why := _diffusers_missing()) is not None:
        print(f"sampler: diffusers variant skipped: {why}")
        skipped["diffusers"] = why
        names.remove("diffusers")
    if not names:
        raise SystemExit("sampler: no variant left to time")
    torch.manual_seed(args.seed)
    net = create_denoiser(args.model, num_classes=NUM_CLASSES).to(device).eval()
    cfg = net.cfg
    model: torch.nn.Module = _Autocast(net) if args.precision == "bf16" else net
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
    setup = _make_setup(schedule, args.steps, x_T, diffusers="diffusers" in names)
    loop_repeats = LOOP_REPEATS_PER_REPEAT * args.repeats

    with torch.no_grad():
        variants = _network_variants(model, setup, y, args.scale, names)
        # untimed first call of every variant: warm-up, and the outputs for the agreement check
        outputs = {name: fn() for name, fn in variants.items()}
        samplers = [n for n in names if n != "network-forward"]
        ref_name = "dpt_engine" if "dpt_engine" in names else (samplers[0] if samplers else None)
        rel = {} if ref_name is None else {n: _rel_diff(outputs[n], outputs[ref_name]) for n in samplers
                                            if n != ref_name}  # fmt: skip
        if rel:
            print(f"agreement (relative L2 difference to {ref_name}'s output):")
            for name, value in rel.items():
                print(f"  {name:<17} {value:.2e}")
        del outputs
        times = measure_alternating(variants, repeats=args.repeats, warmup=args.warmup)
        loops = _loop_variants(setup, args.scale, names)
        loop_times = measure_alternating(loops, repeats=loop_repeats, warmup=2)

    config = {
        "model": args.model,
        "params": sum(p.numel() for p in net.parameters()),
        "batch": args.batch,
        "steps": args.steps,
        "order": ORDER,
        "schedule": SCHEDULE,
        "guidance_scale": args.scale,
        "num_classes": NUM_CLASSES,
        "dtype": "float32" if args.precision == "fp32" else "bf16 autocast (solver fp32)",
        "repeats": args.repeats,
        "loop_repeats": loop_repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "fused_backend": _fused_backend(setup, setup.table(setup.solver())),
        "load_avg_1min_before": round(load_before, 2),
    }
    dev = device_name(device)

    def row(variant: str, metric: str, value: float, unit: str, **kw: Any) -> Row:
        return Row(BENCHMARK, variant, metric, float(value), unit, config=config, device=dev, **kw)

    def ms(x: float) -> float:
        return 1e3 * x

    rows: list[Row] = [
        Row(BENCHMARK, name, "skipped", 0.0, "-", config={**config, "reason": why}, device=dev)
        for name, why in skipped.items()
    ]
    for name in names:
        s = summarize(times[name])
        rows.append(row(name, "seconds_per_batch", s["p50"], "s", p20=s["p20"], p80=s["p80"]))
        tp = (args.batch / s["p50"], args.batch / s["p80"], args.batch / s["p20"])
        rows.append(row(name, "throughput", tp[0], "img/s", p20=tp[1], p80=tp[2]))
    for name, peers in (
        ("dpt_engine", ("diffusers", "naive-original")),
        ("dpt_engine-fused", ("diffusers", "naive-original", "dpt_engine")),
        ("dpt_engine-fused-two", ("dpt_engine-fused", "naive-original")),
    ):
        for peer in (p for p in peers if name in times and p in times):
            r = paired_ratio(times[peer], times[name])
            rows.append(row(name, "speedup", r, "x", baseline=peer, ratio=r))
    nfe = args.steps
    if "network-forward" in times:
        fwd = times["network-forward"]
        for name in (n for n in ("dpt_engine", "dpt_engine-fused", "diffusers") if n in times):
            frac = 1.0 - paired_ratio(fwd, times[name])
            outside = statistics.median(a - b for a, b in zip(times[name], fwd))
            # a difference of two timings: the per-round band shows the noise (it straddles 0 when
            # the solver's cost is below it, and the median may then come out slightly negative)
            band = summarize([1.0 - f / t for f, t in zip(fwd, times[name])])
            rows.append(
                row(
                    name,
                    "outside_forward_fraction",
                    frac,
                    "fraction",
                    baseline="network-forward",
                    ratio=frac,
                    p20=band["p20"],
                    p80=band["p80"],
                )
            )
            rows.append(
                row(name, "outside_forward_ms_per_step", ms(outside) / nfe, "ms", baseline="network-forward")
            )
    for name in (n for n in LOOP_VARIANTS if n in loop_times):
        s = summarize(loop_times[name])
        rows.append(
            row(
                name,
                "solver_loop_ms_per_step",
                ms(s["p50"]) / nfe,
                "ms",
                p20=ms(s["p20"]) / nfe,
                p80=ms(s["p80"]) / nfe,
            )
        )
    if "diffusers" in loop_times:
        for name in (n for n in ("dpt_engine", "dpt_engine-fused") if n in loop_times):
            r = paired_ratio(loop_times["diffusers"], loop_times[name])
            rows.append(row(name, "solver_loop_speedup", r, "x", baseline="diffusers", ratio=r))
    for name in ("dpt_engine", "diffusers"):
        if f"{name}-setup" in loop_times:
            s = summarize(loop_times[f"{name}-setup"])
            rows.append(row(name, "setup_ms", ms(s["p50"]), "ms", p20=ms(s["p20"]), p80=ms(s["p80"])))
    for name, value in rel.items():  # ours named first, as in the speed-ups
        if ref_name == "dpt_engine" and name in ("diffusers", "naive-original"):
            rows.append(row("dpt_engine", "rel_diff", value, "rel_l2", baseline=name))
        else:
            rows.append(row(name, "rel_diff", value, "rel_l2", baseline=ref_name))
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
        f"Guided DPM-Solver++(2M), {args.model}, batch {args.batch}, {args.steps} steps, w={args.scale}, "
        f"{args.precision} (medians of {args.repeats} / {rows[0].config['loop_repeats']} interleaved "
        "repeats, p20-p80)"
    )
    metrics = [m for m in ("throughput", "solver_loop_ms_per_step") if any(r.metric == m for r in rows)]
    bar_chart(rows, png_path, title, metric=metrics, muted=("network-forward",))
    print(f"wrote {json_path} and {png_path}")
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()
