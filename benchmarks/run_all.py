"""Run every benchmark (micro and end-to-end) in one process and write one table for this machine.

Benchmarks, each in this process through its own ``main(argv)`` (so each keeps its own
interleaved measurement, agreement check and JSON/PNG, written under
``results/all_<device>/``):

* ``attention`` (``bench_attention``): TFLOP/s of our Triton kernels (CUDA) vs PyTorch SDPA
  (every backend forced), xformers and the reference;
* ``ema`` (``bench_ema``) and ``solver_step`` (``bench_solver_step``): the C++ CPU ops vs their
  PyTorch formulations, GB/s (CPU benchmarks on every machine; they need the native library);
* ``sampler`` (``bench_sampler``): guided DPM-Solver++ sampling vs diffusers (needs diffusers);
* ``latent_store`` (``bench_latent_store``): the memory-mapped latent store vs one file per row;
* ``generation`` (``bench_generation``): end-to-end generation to PNG files vs the original loop
  (CPU only);
* ``train`` (``bench_train``): the stage-2 training step (fp32, bf16) vs the original U-ViT step;
* ``train_backends`` (``bench_train_backends``): single vs DDP/FSDP2/ZeRO launches (spawns
  processes; not part of ``--quick`` unless named in ``--only``);
* on CUDA only, ``ema_cuda`` and ``solver_step_cuda`` (defined here): the Triton and CUDA-extension
  EMA update and solver step vs ``torch._foreach_lerp_`` / the eager step, GB/s on the GPU.

A benchmark that fails is recorded (status ``failed`` with the error, or ``skipped`` when an
optional dependency is missing or the device does not apply) and the others still run. Output:

* ``results/all_<device>.json``: every row (``harness.Row`` dicts), plus one ``run_all`` row per
  benchmark (metric ``seconds``: its wall time; ``config.status`` and ``config.reason``);
* ``results/all_<device>.md``: the device, torch, commit, the status of each benchmark and one
  table of all results (skipped attention providers listed with their reasons);
* the same table printed at the end. Exit status 1 when a benchmark failed.

``<device>`` is ``cpu`` or the GPU's name (``bench_attention.device_slug``). Defaults take several
minutes on a 2-core CPU (``train_backends`` launches every backend twice; more when other jobs
share the cores); ``--quick`` (~15-30 s) is a smoke run with tiny shapes. Both files are rewritten after every benchmark, so a run
that is killed keeps what it finished.

Run: ``python -m benchmarks.run_all [--quick] [--device cuda] [--threads 1] [--only attention ema]``
(or ``python -m dpt_engine.benchmarks.run_all`` from an installed package).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dpt_engine.utils.io import atomic_write_text

from .bench_attention import device_slug
from .bench_cli import results_root
from .harness import (
    Row,
    commit_hash,
    device_name,
    measure_alternating,
    paired_ratio,
    print_table,
    summarize,
    write_rows,
)

__all__ = ["BENCHMARKS", "build_parser", "main"]

RESULTS_DIR = results_root()  # the repository's benchmarks/results, or ./bench_results when installed
BENCHMARKS = (
    "attention",
    "ema",
    "solver_step",
    "sampler",
    "latent_store",
    "generation",
    "train",
    "train_backends",
    "ema_cuda",
    "solver_step_cuda",
)
# multi-process launches (tens of seconds even when tiny): --quick runs them only when named
NOT_QUICK = ("train_backends",)


class Skip(Exception):
    """A benchmark that does not apply here (the reason is the message)."""


# ---------------------------------------------------------------------------- settings
def _settings(quick: bool, cuda: bool) -> dict[str, list[str]]:
    """Command-line arguments of each benchmark's ``main`` (outputs are added by the caller)."""
    if quick:
        attention = ["--shapes", "2,4,130,64", "2,4,258,72", "--repeats", "2", "--warmup", "1"]
        if cuda:
            attention = ["--shapes", "8,16,258,72", "--repeats", "3", "--warmup", "1", "--min-time-ms", "5"]
        return {
            "attention": attention,
            "ema": ["--params", "2e6", "--tensors", "20", "--repeats", "3", "--warmup", "1"],
            "solver_step": "--shape 4 4 32 32 --orders 3 --repeats 3 --warmup 1".split(),
            "sampler": ["--batch", "4", "--steps", "3", "--repeats", "1"],
            "latent_store": "--rows 512 --shape 4 8 8 --batch 64 --batches 2 --repeats 2 --warmup 1".split(),
            "generation": "--per-class 4 --batch 16 --steps 3 --repeats 1 --workers 2".split(),
            "train": "--model uvit-tiny8 --batch 8 --steps 2 --warmup 1".split(),
            "train_backends": "--only ddp --batch 16 --warmup 1 --window 2 --windows 1 --rounds 1".split(),
        }
    return {
        "attention": [] if cuda else ["--repeats", "7"],  # bench_attention's per-device shapes
        "ema": ["--params", "100e6", "--tensors", "100", "--repeats", "11", "--warmup", "2"],
        "solver_step": ["--shape", "64", "4", "128", "128", "--orders", "2", "3", "--repeats", "11"],
        "sampler": ["--batch", "64", "--steps", "20", "--repeats", "5"],
        "latent_store": [],
        "generation": ["--repeats", "2"],
        "train": ["--model", "uvit-l2", "--batch", "64", "--steps", "20"] if cuda else [],
        "train_backends": [],
    }  # fmt: skip


# ---------------------------------------------------------------------------- CUDA micro-benchmarks
def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _timings(
    variants: dict[str, Callable[[], Any]], device: torch.device, repeats: int, min_time_s: float
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Interleaved per-call seconds. Each variant's timed unit is ``inner[name]`` calls long (about
    ``min_time_s``, calibrated per variant, at most 1000 calls) so that the host synchronisation is
    amortised without a slow variant repeating a fast one's call count."""
    sync = _sync(device)
    inner: dict[str, int] = {}
    for name, fn in variants.items():
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        sync()
        per_call = max((time.perf_counter() - t0) / 3, 1e-7)
        inner[name] = int(min(1000, max(1, math.ceil(min_time_s / per_call))))

    def unit(fn: Callable[[], Any], n: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                fn()

        return run

    times = measure_alternating(
        {k: unit(f, inner[k]) for k, f in variants.items()}, repeats=repeats, warmup=2, sync=sync
    )
    return {k: [t / inner[k] for t in v] for k, v in times.items()}, inner


def _bandwidth_rows(
    bench: str,
    times: dict[str, list[float]],
    bytes_per_call: dict[str, float],
    ours: Sequence[str],
    peers: Sequence[str],
    config: dict[str, Any],
    device: torch.device,
) -> list[Row]:
    dev = device_name(device)
    rows = []
    for name, ts in times.items():
        s, moved = summarize(ts), bytes_per_call[name]
        rows.append(
            Row(bench, name, "seconds", s["p50"], "s", p20=s["p20"], p80=s["p80"], config=config, device=dev)
        )
        rows.append(Row(bench, name, "bandwidth", moved / s["p50"] / 1e9, "GB/s", p20=moved / s["p80"] / 1e9,
                        p80=moved / s["p20"] / 1e9, config=config, device=dev))  # fmt: skip
    for o in (o for o in ours if o in times):
        for p in (p for p in peers if p in times):
            r = paired_ratio(times[p], times[o])
            rows.append(Row(bench, o, "speedup", r, "x", baseline=p, ratio=r, config=config, device=dev))
    return rows


def bench_ema_cuda(
    quick: bool,
    device: torch.device | str = "cuda",
    *,
    sizes: Sequence[int] | None = None,
    layout: str | None = None,
    repeats: int | None = None,
) -> list[Row]:
    """fp32 EMA of ~100M parameters in 200 odd-sized tensors on the GPU: the Triton multi-tensor
    kernel and the CUDA extension vs ``torch._foreach_lerp_``, one flat ``lerp_`` and a copy.
    Bandwidth at 12 bytes per parameter (8 for the copy); the floor on an H100 is ~1.8 ms per
    500M parameters at 3.35 TB/s. ``sizes`` replaces the synthetic tensor sizes (e.g. a real
    model's parameter sizes, named by ``layout``). (``device`` may be ``cpu`` to smoke-test the
    code path: the fused variants then report themselves unavailable, unless the Triton
    interpreter runs them.)"""
    from dpt_engine.kernels import available_backends, ema_update_, ema_update_reference_

    from .bench_ema import tensor_sizes

    device = torch.device(device)
    total, count, decay = (int(4e6), 40, 0.9999) if quick else (int(100e6), 200, 0.9999)
    g = torch.Generator(device=device).manual_seed(0)
    if sizes is None:
        sizes = tensor_sizes(total, count, 0)
        layout = layout or f"{count} synthetic odd-sized tensors"
    else:
        sizes = [int(n) for n in sizes]
        total, count = sum(sizes), len(sizes)
    ema = [torch.randn(n, device=device, generator=g) for n in sizes]
    params = [e + 0.01 * torch.randn(n, device=device, generator=g) for e, n in zip(ema, sizes)]
    flat_e, flat_p = (torch.randn(total, device=device, generator=g) for _ in range(2))
    copy_src, copy_dst = torch.randn(total, device=device, generator=g), torch.empty(total, device=device)
    avail = available_backends("ema", [*ema, *params])
    variants: dict[str, Callable[[], Any]] = {
        "foreach-lerp": lambda: ema_update_reference_(ema, params, decay)
    }
    exact: dict[str, bool] = {}
    skipped: dict[str, str] = {}
    for name, backend in (("triton", "triton"), ("cuda-native", "cuda")):
        reason = avail.get(backend, f"backend {backend!r} not registered")
        if reason is not None:
            skipped[name] = reason
            print(f"ema_cuda: {name} skipped: {reason}")
            continue
        sub_p = [p[:4096] for p in params[:8]]
        got, ref = [e[:4096].clone() for e in ema[:8]], [e[:4096].clone() for e in ema[:8]]
        ema_update_(got, sub_p, decay, backend=backend)
        ema_update_reference_(ref, sub_p, decay)
        exact[name] = all(torch.equal(a, b) for a, b in zip(got, ref))
        variants[name] = lambda b=backend: ema_update_(ema, params, decay, backend=b)
    variants["flat-lerp"] = lambda: flat_e.lerp_(flat_p, 1.0 - decay)
    variants["copy"] = lambda: copy_dst.copy_(copy_src)
    repeats = repeats or (5 if quick else 15)
    times, inner = _timings(variants, device, repeats=repeats, min_time_s=0.02)
    config = {"params": total, "tensors": count, "layout": layout, "dtype": "fp32", "decay": decay,
              "inner": inner, "repeats": repeats, "bit_exact_vs_foreach": exact, "skipped": skipped}  # fmt: skip
    moved = {k: float((8 if k == "copy" else 12) * total) for k in times}
    peers = ("foreach-lerp", "flat-lerp")
    return _bandwidth_rows("ema_cuda", times, moved, ("triton", "cuda-native"), peers, config, device)


def bench_solver_step_cuda(
    quick: bool,
    device: torch.device | str = "cuda",
    *,
    shape: Sequence[int] | None = None,
    repeats: int | None = None,
) -> list[Row]:
    """One guided DPM-Solver++ order-3 update of a (64, 4, 128, 128) sample (or ``shape``) on the
    GPU: the Triton kernel and the CUDA extension vs the eager reference (~10 PyTorch ops), GB/s
    at the fused step's bytes (``28 * numel``: x, cond + uncond, two older predictions, x0, out)."""
    from dpt_engine.diffusion import DiscreteVPSchedule, DPMSolverPP
    from dpt_engine.kernels import available_backends, solver_step_reference, solver_step_table
    from dpt_engine.kernels.solver_step import solver_step

    device = torch.device(device)
    if shape is None:
        shape = (8, 4, 32, 32) if quick else (64, 4, 128, 128)
    shape = tuple(int(n) for n in shape)
    numel, scale, order = math.prod(shape), 0.4, 3
    solver = DPMSolverPP(DiscreteVPSchedule("linear"), steps=20, order=3)
    i = next(j for j, k in enumerate(solver.orders) if k == order)
    table = solver_step_table(solver, device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=g)  # (B, C, H, W)
    model_out = torch.randn(
        (2 * shape[0], *shape[1:]), device=device, generator=g
    )  # (2B, ...) [cond; uncond]
    hist0 = torch.randn((3, *shape), device=device, generator=g)  # (S, B, ...) ring buffer
    hist = {k: hist0.clone() for k in ("eager", "triton", "cuda-native")}
    out = torch.empty_like(x)
    avail = available_backends("solver_step", (x, model_out, hist0, table.coef, out))
    variants: dict[str, Callable[[], Any]] = {
        "eager": lambda: solver_step_reference(x, model_out, hist["eager"], table, i, scale)
    }
    ref = variants["eager"]()
    exact: dict[str, bool] = {}
    skipped: dict[str, str] = {}
    for name, backend in (("triton", "triton"), ("cuda-native", "cuda")):
        reason = avail.get(backend, f"backend {backend!r} not registered")
        if reason is not None:
            skipped[name] = reason
            print(f"solver_step_cuda: {name} skipped: {reason}")
            continue

        def fused(b: str = backend, h: torch.Tensor = hist[name]) -> torch.Tensor:
            return solver_step(x, model_out, h, table, i, guidance_scale=scale, out=out, backend=b)

        exact[name] = torch.equal(fused(), ref)
        variants[name] = fused
    repeats = repeats or (5 if quick else 15)
    times, inner = _timings(variants, device, repeats=repeats, min_time_s=0.02)
    config = {"shape": list(shape), "order": order, "guidance_scale": scale, "inner": inner,
              "repeats": repeats, "bit_exact_vs_eager": exact, "skipped": skipped}  # fmt: skip
    moved = dict.fromkeys(times, float((4 + 8 + 4 * (order - 1) + 4 + 4) * numel))
    return _bandwidth_rows(
        "solver_step_cuda", times, moved, ("triton", "cuda-native"), ("eager",), config, device
    )


# ---------------------------------------------------------------------------- driver
def _run_module(module: str, argv: list[str]) -> list[dict[str, Any]]:
    import importlib

    mod = importlib.import_module(f".{module}", __package__)
    return mod.main(argv)


def _classify(exc: BaseException) -> tuple[str, str]:
    """``(status, reason)`` of a benchmark that raised."""
    if isinstance(exc, Skip):
        return "skipped", str(exc)
    if isinstance(exc, ImportError):
        return "skipped", f"missing optional dependency: {exc}"
    if isinstance(exc, SystemExit):
        return "failed", str(exc.code)
    return "failed", f"{type(exc).__name__}: {exc}"


def _markdown(
    rows: list[dict[str, Any]],
    status: list[dict[str, Any]],
    meta: dict[str, Any],
    pending: Sequence[str] = (),
) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")

    lines = [
        f"# Micro-benchmarks on {meta['device']}",
        "",
        f"- device: **{meta['device']}** (`{meta['slug']}`); CPU: {meta['cpu']}",
        f"- torch {meta['torch']}, commit `{meta['commit']}`, {meta['timestamp']}, "
        f"{'quick' if meta['quick'] else 'default'} settings, {meta['seconds']:.0f} s in all",
        "- timings are medians of interleaved repeats inside one process (`benchmarks/harness.py`); "
        "compare only figures from the same run",
        "",
        "| benchmark | status | seconds | note |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {fmt(s['reason'])} |" for s in status]
    lines += [f"| {name} | not run yet |  | the run stopped before it |" for name in pending]
    lines += [
        "",
        "| benchmark | variant | metric | value | unit | p20 | p80 | baseline | config |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["metric"] == "skipped":
            continue
        c = r.get("config", {})
        keys = ("shape", "order") if "shape" in c else ("params", "batch", "steps")
        key = ", ".join(f"{k}={c[k]}" for k in keys if k in c)
        lines.append(
            f"| {r['benchmark']} | {r['variant']} | {r['metric']} | {fmt(r['value'])} | {r['unit']} | "
            f"{fmt(r['p20'])} | {fmt(r['p80'])} | {fmt(r['baseline'])} | {fmt(key)} |"
        )
    skipped = dict.fromkeys(
        (r["variant"], str(r["config"].get("reason"))) for r in rows if r["metric"] == "skipped"
    )
    if skipped:
        lines += ["", "Providers not run:", ""]
        lines += [f"- `{variant}`: {why}" for variant, why in skipped]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke run, ~1 min)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for every benchmark")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, help="run only these")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where all_<device>.{json,md} go")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA GPU")
    slug = device_slug(device)
    per_bench_dir = args.out_dir / f"all_{slug}"
    settings = _settings(args.quick, cuda)
    threads = ["--threads", str(args.threads)] if args.threads is not None else []
    cores = ["--cores", str(args.threads)] if args.threads is not None else []  # bench_train_backends

    def outputs(name: str) -> list[str]:
        return ["--json", str(per_bench_dir / f"{name}.json"), "--png", str(per_bench_dir / f"{name}.png")]

    def needs_native(module: str, name: str) -> Callable[[], list[dict[str, Any]]]:
        def run() -> list[dict[str, Any]]:
            from dpt_engine.kernels import _native as native

            if not native.is_available():
                raise Skip(f"C++ ops not built ({native.load_error()}); run `bash scripts/build_native.sh`")
            return _run_module(module, [*settings[name], *threads, *outputs(name)])

        return run

    def cpu_only(module: str, name: str) -> Callable[[], list[dict[str, Any]]]:
        def run() -> list[dict[str, Any]]:
            if cuda:
                raise Skip(f"{module} measures the CPU path only (it has no --device)")
            return _run_module(module, [*settings[name], *threads, *outputs(name)])

        return run

    def train_backends() -> list[dict[str, Any]]:
        if cuda and torch.cuda.device_count() < 2:
            raise Skip("needs >= 2 GPUs (one process per GPU)")
        argv = [*settings["train_backends"], "--device", device.type, *cores, *outputs("train_backends")]
        return _run_module("bench_train_backends", argv)

    def cuda_only(fn: Callable[[bool, torch.device], list[Row]]) -> Callable[[], list[dict[str, Any]]]:
        def run() -> list[dict[str, Any]]:
            if not cuda:
                raise Skip("CUDA only (run with --device cuda on a GPU machine)")
            rows = fn(args.quick, device)
            print_table(rows)
            write_rows(per_bench_dir / f"{fn.__name__.removeprefix('bench_')}.json", rows)
            return [r.to_dict() for r in rows]

        return run

    runners: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "attention": lambda: _run_module(
            "bench_attention",
            [*settings["attention"], "--device", str(device), *threads, *outputs("attention")],
        ),
        "ema": needs_native("bench_ema", "ema"),
        "solver_step": needs_native("bench_solver_step", "solver_step"),
        "sampler": lambda: _run_module(
            "bench_sampler", [*settings["sampler"], "--device", str(device), *threads, *outputs("sampler")]
        ),
        "latent_store": lambda: _run_module(
            "bench_latent_store", [*settings["latent_store"], *threads, *outputs("latent_store")]
        ),
        "generation": cpu_only("bench_generation", "generation"),
        "train": lambda: _run_module(
            "bench_train", [*settings["train"], "--device", str(device), *threads, *outputs("train")]
        ),
        "train_backends": train_backends,
        "ema_cuda": cuda_only(bench_ema_cuda),
        "solver_step_cuda": cuda_only(bench_solver_step_cuda),
    }
    assert tuple(runners) == BENCHMARKS
    if args.only is not None:
        selected = [b for b in BENCHMARKS if b in args.only]
    else:
        selected = [b for b in BENCHMARKS if not (args.quick and b in NOT_QUICK)]

    dev_name = device_name(device)
    json_path, md_path = args.out_dir / f"all_{slug}.json", args.out_dir / f"all_{slug}.md"
    t_all = time.perf_counter()
    rows: list[dict[str, Any]] = []
    status: list[dict[str, Any]] = []

    def save() -> list[dict[str, Any]]:
        """Write both files (after every benchmark, so a killed run keeps what it finished)."""
        status_rows = [
            Row("run_all", s["name"], "seconds", s["seconds"], "s",
                config={"status": s["status"], "reason": s["reason"], "quick": args.quick}, device=dev_name).to_dict()
            for s in status
        ]  # fmt: skip
        meta = {
            "device": dev_name,
            "slug": slug,
            "cpu": device_name("cpu"),
            "torch": torch.__version__,
            "commit": commit_hash(),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": args.quick,
            "seconds": time.perf_counter() - t_all,
        }
        pending = [b for b in selected if b not in {s["name"] for s in status}]
        write_rows(json_path, rows + status_rows)
        atomic_write_text(md_path, _markdown(rows, status, meta, pending))
        return status_rows

    status_rows = save()
    for name in selected:
        print(f"\n==== {name} " + "=" * max(0, 70 - len(name)), flush=True)
        t0 = time.perf_counter()
        try:
            got = runners[name]()
            rows.extend(got)
            st, reason = "ok", f"{len(got)} rows"
        except (Exception, SystemExit) as exc:  # one benchmark's failure must not stop the others
            st, reason = _classify(exc)
            if st == "failed":
                traceback.print_exc()
            print(f"{name}: {st}: {reason}")
        finally:
            if cuda:
                with contextlib.suppress(RuntimeError):
                    torch.cuda.empty_cache()
        status.append({"name": name, "status": st, "reason": reason, "seconds": time.perf_counter() - t0})
        status_rows = save()
    seconds = time.perf_counter() - t_all

    print("\n==== all results " + "=" * 60)
    print_table([r for r in rows + status_rows if r["metric"] != "skipped"])
    print()
    for s in status:
        print(f"{s['name']:<17} {s['status']:<8} {s['seconds']:7.1f} s  {s['reason']}")
    print(f"wrote {json_path} and {md_path} ({seconds:.0f} s)")
    return 1 if any(s["status"] == "failed" for s in status) else 0


if __name__ == "__main__":
    sys.exit(main())
