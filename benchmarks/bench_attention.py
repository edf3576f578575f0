"""Attention speed (TFLOP/s) at U-ViT shapes: our Triton flash attention against PyTorch SDPA with
each backend forced, xformers and the plain reference, all timed interleaved in one process.

Shapes ``(B, H, N, D)``: U-ViT at 256 px has 258 tokens and 16 heads of dim 64 (L/2) or 72 (H/2);
on CUDA the defaults are B = 8, 16, 32 at D = 64 and 72, plus (8, 16, 512, 64) (the B*H = 128
of the Triton tutorial's seq-512 anchor in /work/shared/REFERENCE.md). On CPU, where only the
PyTorch providers run, the defaults are small (B = 2 / 1) so the script still writes rows.

FLOPs, at the TRUE head dim (not the power of two the kernel pads 72 to): forward
``4 B H N^2 D`` (QK^T and PV, 2 FLOPs per multiply-accumulate); forward + backward ``3.5x`` that
(the backward is ``2.5x`` the forward: dV, dP, dQ, dK plus the recomputed QK^T, FlashAttention's
benchmark convention, as in ``tests/test_kernels_triton.py``).

Inputs: q, k, v are strided views of one packed projection ``qkv (B, N, 3, H, D)``, exactly what
``dpt_engine.models.uvit.Attention`` hands to the kernel, so layout copies a provider needs are
part of its cost. The backward is ``torch.autograd.grad(out, qkv, dout)``. Providers:

* ``triton`` (ours): ``attention(q, k, v, backend="triton")`` (CUDA only here; the interpreter
  is for tests, not timing).
* ``triton-qkvpacked`` (ours): ``attention_qkvpacked(qkv, backend="triton")``: reads q/k/v in
  place, writes (B, N, H, D) and the packed gradient, no copies.
* ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` / ``sdpa-math``:
  ``F.scaled_dot_product_attention`` inside ``torch.nn.attention.sdpa_kernel(SDPBackend.X)``;
  ``sdpa-default``: PyTorch's own choice (what the ``reference`` backend of the dispatch runs).
* ``xformers``: ``xformers.ops.memory_efficient_attention`` on (B, N, H, D) views, when installed
  (it has no CPU operator).
* ``reference``: ``attention_reference``, softmax in fp32 through plain matmuls materialising the
  (B, H, N, N) scores: the oracle, drawn grey.

A provider that cannot run a shape (not installed, no kernel for this device / dtype / head dim)
is skipped with the reason, which is printed and kept as a ``skipped`` row. Before timing,
every provider's forward is compared with ``attention_reference`` (max abs error in the rows'
``config``). Timing: ``harness.measure_alternating`` over all providers of a shape, each timed
unit running ``inner`` calls so that it lasts about ``--min-time-ms`` (one call can take ~20 us
on a GPU, less than a host sync); values are per call.

Run: ``python -m benchmarks.bench_attention [--device cuda] [--dtype bf16] [--shapes 8,16,258,72]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpt_engine.kernels import attention, attention_qkvpacked, attention_reference, available_backends
from dpt_engine.utils.io import atomic_path

from .harness import (
    Row,
    device_name,
    load_warning,
    measure_alternating,
    paired_ratio,
    summarize,
    write_rows,
)

__all__ = ["PROVIDERS", "attention_flops", "build_parser", "device_slug", "main", "run"]

BENCHMARK = "attention"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROVIDERS = (
    "triton",
    "triton-qkvpacked",
    "sdpa-flash",
    "sdpa-efficient",
    "sdpa-cudnn",
    "sdpa-math",
    "sdpa-default",
    "xformers",
    "reference",
)
OURS = ("triton", "triton-qkvpacked")
_BNHD_OUTPUT = ("triton-qkvpacked", "xformers")  # providers returning (B, N, H, D)
MUTED = ("reference",)
MODES = ("fwd", "fwd_bwd")
_SDPA = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CUDA_SHAPES = [(b, 16, 258, d) for d in (64, 72) for b in (8, 16, 32)] + [(8, 16, 512, 64)]
CPU_SHAPES = [(2, 16, 258, 64), (2, 16, 258, 72), (1, 16, 512, 64)]


def attention_flops(shape: Sequence[int], mode: str) -> float:
    """FLOPs of one call at the true head dim: fwd ``4 B H N^2 D``, fwd_bwd 3.5x that."""
    b, h, n, d = shape
    fwd = 4.0 * b * h * n * n * d
    return fwd if mode == "fwd" else 3.5 * fwd


def device_slug(device: torch.device | str = "cpu") -> str:
    """A file-name-safe device name: ``cpu``, or the GPU's name (``h100-80gb-hbm3``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().removeprefix("nvidia").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_attention", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        metavar="B,H,N,D",
        help="shapes to time (default: U-ViT shapes on CUDA, small ones on CPU)",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--repeats", type=int, default=None, help="timed interleaved rounds (10 CUDA / 5 CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed interleaved rounds first")
    p.add_argument(
        "--min-time-ms", type=float, default=None, help="length of one timed unit (20 CUDA / 0 CPU)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--json", type=Path, default=None, help="rows out (default results/attention_<device>.json)"
    )
    p.add_argument(
        "--png", type=Path, default=None, help="chart out (default results/attention_<device>.png)"
    )
    return p


# ---------------------------------------------------------------------------- providers
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


Context = Callable[[], contextlib.AbstractContextManager]


def _make_provider(
    name: str, qkv: torch.Tensor
) -> tuple[Callable[[], torch.Tensor] | None, str | None, Context]:
    """``(fn, reason, context)``: ``fn()`` runs the provider's forward on ``qkv`` (None with the
    reason when it cannot exist here); ``context()`` is entered around the calls (it forces the
    SDPA backend; a fresh one each time, as ``sdpa_kernel`` is a one-shot context manager)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D) strided views
    if name in OURS:
        reason = available_backends("attention", (q, k, v)).get("triton", "triton backend not registered")
        if reason is not None:
            return None, reason, contextlib.nullcontext
        if name == "triton":
            return (
                (lambda: attention(q, k, v, backend="triton")),
                None,
                contextlib.nullcontext,
            )  # (B, H, N, D)
        return (
            (lambda: attention_qkvpacked(qkv, backend="triton")),
            None,
            contextlib.nullcontext,
        )  # (B, N, H, D)
    if name in _SDPA:
        backend = _SDPA[name]
        return (lambda: F.scaled_dot_product_attention(q, k, v)), None, (lambda: sdpa_kernel(backend))
    if name == "sdpa-default":
        return (lambda: F.scaled_dot_product_attention(q, k, v)), None, contextlib.nullcontext
    if name == "xformers":
        try:
            import xformers.ops as xops
        except ImportError as exc:
            return None, f"xformers is not installed ({exc})", contextlib.nullcontext
        if qkv.device.type != "cuda":
            return None, "xformers has no CPU operator", contextlib.nullcontext
        xq, xk, xv = qkv.unbind(2)  # 3 x (B, N, H, D) views
        return (lambda: xops.memory_efficient_attention(xq, xk, xv)), None, contextlib.nullcontext
    if name == "reference":
        return (lambda: attention_reference(q, k, v)), None, contextlib.nullcontext
    raise ValueError(f"unknown provider {name!r}")


def _check(
    fn: Callable[[], torch.Tensor],
    ctx: Context,
    qkv: torch.Tensor,
    modes: Sequence[str],
) -> tuple[dict[str, str | None], torch.Tensor | None, torch.Tensor | None]:
    """Run the provider once per mode: ``({mode: None | reason}, forward output, dout)``.
    Warnings raised on failure (SDPA says why it rejected a backend) join the reason."""
    reasons: dict[str, str | None] = {}
    out = dout = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad(), ctx():
                out = fn()
            reasons["fwd"] = None
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
            reasons["fwd"] = _first_line(exc)
        if "fwd_bwd" in modes:
            if reasons["fwd"] is not None:
                reasons["fwd_bwd"] = reasons["fwd"]
            else:
                try:
                    with ctx():
                        o = fn()
                    dout = torch.randn_like(o)
                    torch.autograd.grad(o, qkv, dout)
                    reasons["fwd_bwd"] = None
                except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
                    reasons["fwd_bwd"] = _first_line(exc)
    notes = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0][:200] for w in caught))
    if notes:
        reasons = {m: (f"{r} ({notes})" if r is not None else None) for m, r in reasons.items()}
    return reasons, out, dout


def _unit(
    fn: Callable[[], torch.Tensor],
    ctx: Context,
    mode: str,
    qkv: torch.Tensor,
    dout: torch.Tensor | None,
    inner: int,
) -> Callable[[], None]:
    """One timed unit: ``inner`` forward (no_grad) or forward + backward calls, all inside one
    ``ctx()`` (entering ``sdpa_kernel`` per call would add host time a GPU call may not hide)."""
    if mode == "fwd":

        def fwd() -> None:
            with torch.no_grad(), ctx():
                for _ in range(inner):
                    fn()

        return fwd

    def fwd_bwd() -> None:
        with ctx():
            for _ in range(inner):
                torch.autograd.grad(fn(), qkv, dout)

    return fwd_bwd


def _calibrate(unit: Callable[[], None], min_time_s: float, sync: Callable[[], None]) -> int:
    """Calls per timed unit so that one unit lasts about ``min_time_s`` (1 when 0)."""
    if min_time_s <= 0:
        return 1
    unit()  # warm
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        unit()
    sync()
    per_call = max((time.perf_counter() - t0) / 3, 1e-7)
    return int(min(1000, max(1, math.ceil(min_time_s / per_call))))


# ---------------------------------------------------------------------------- run
def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in re.split(r"[,x ]+", text.strip()) if p)
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be B,H,N,D with positive entries, got {text!r}")
    return parts  # type: ignore[return-value]


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, str]]:
    """Time every provider at every shape and mode; returns the rows and ``{provider: reason}``
    for the providers skipped somewhere (with the shapes, when they ran elsewhere)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = _DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    shapes = [_parse_shape(s) for s in args.shapes] if args.shapes else (CUDA_SHAPES if cuda else CPU_SHAPES)
    repeats = args.repeats or (10 if cuda else 5)
    min_time_s = (args.min_time_ms if args.min_time_ms is not None else (20.0 if cuda else 0.0)) / 1e3
    providers = [p for p in PROVIDERS if p in args.providers]
    busy = load_warning()
    if busy and not cuda:
        print(f"WARNING: {busy}")
    load_before = os.getloadavg()[0]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    dev = device_name(device)
    rows: list[Row] = []
    skipped_somewhere: dict[str, dict[str, str]] = {}
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    for shape in shapes:
        b, h, n, d = shape
        qkv = torch.randn(b, n, 3, h, d, generator=g).to(device=device, dtype=dtype)  # (B, N, 3, H, D)
        qkv.requires_grad_(True)
        q, k, v = qkv.detach().permute(2, 0, 3, 1, 4).unbind(0)
        with torch.no_grad():
            oracle = attention_reference(q.float(), k.float(), v.float())  # (B, H, N, D) fp32
        label = f"{b}x{h}x{n}x{d}"
        fns: dict[str, tuple[Callable[[], torch.Tensor], Any, torch.Tensor | None]] = {}
        available: dict[str, list[str]] = {m: [] for m in args.modes}
        errors: dict[str, float] = {}
        for name in providers:
            fn, reason, ctx = _make_provider(name, qkv)
            if fn is None:
                reasons = dict.fromkeys(args.modes, reason)
                out = dout = None
            else:
                reasons, out, dout = _check(fn, ctx, qkv, args.modes)
            if out is not None:
                got = out.transpose(1, 2) if name in _BNHD_OUTPUT else out  # -> (B, H, N, D)
                errors[name] = float((got.float() - oracle).abs().max())
            for mode in args.modes:
                if reasons.get(mode) is None and fn is not None:
                    available[mode].append(name)
                    fns[name] = (fn, ctx, dout)
                else:
                    skipped_somewhere.setdefault(name, {})[f"{label} {mode}"] = str(reasons.get(mode))

        for mode in args.modes:
            names = available[mode]
            flops = attention_flops(shape, mode)
            base_config = {
                "shape": label,
                "batch": b,
                "heads": h,
                "seq": n,
                "head_dim": d,
                "dtype": str(dtype).removeprefix("torch."),
                "mode": mode,
                "flops_per_call": flops,
                "layout": "views of packed qkv (B, N, 3, H, D)",
                "repeats": repeats,
                "warmup": args.warmup,
                "threads": torch.get_num_threads(),
                "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
                "load_avg_1min_before": round(load_before, 2),
            }
            bench = f"{BENCHMARK}_{mode}"
            for name in providers:
                if name not in names:
                    why = skipped_somewhere.get(name, {}).get(f"{label} {mode}", "not available")
                    rows.append(
                        Row(
                            bench,
                            name,
                            "skipped",
                            0.0,
                            "-",
                            config={**base_config, "reason": why},
                            device=dev,
                        )
                    )
            if not names:
                continue
            probe = names[0] if "sdpa-default" not in names else "sdpa-default"
            fn, ctx, dout = fns[probe]
            inner = _calibrate(_unit(fn, ctx, mode, qkv, dout, 1), min_time_s, sync)
            units = {nm: _unit(fns[nm][0], fns[nm][1], mode, qkv, fns[nm][2], inner) for nm in names}
            times = measure_alternating(units, repeats=repeats, warmup=args.warmup, sync=sync)
            per_call = {nm: [t / inner for t in ts] for nm, ts in times.items()}
            config = {**base_config, "inner": inner}
            for name in names:
                s = summarize(per_call[name])
                cfg = {**config, "max_abs_err_vs_reference": errors.get(name)}
                rows.append(Row(bench, name, "ms", 1e3 * s["p50"], "ms", p20=1e3 * s["p20"], p80=1e3 * s["p80"],
                                config=cfg, device=dev))  # fmt: skip
                rows.append(
                    Row(bench, name, "tflops", flops / s["p50"] / 1e12, "TFLOP/s",
                        p20=flops / s["p80"] / 1e12, p80=flops / s["p20"] / 1e12, config=cfg, device=dev)
                )  # fmt: skip
            for ours in (o for o in OURS if o in names):
                for peer in (p for p in names if p not in OURS):
                    r = paired_ratio(per_call[peer], per_call[ours])
                    rows.append(
                        Row(bench, ours, "speedup", r, "x", baseline=peer, ratio=r, config=config, device=dev)
                    )
            del units, times
        del fns
        if cuda:
            torch.cuda.empty_cache()
    skipped: dict[str, str] = {}
    for name, where in skipped_somewhere.items():
        why = "; ".join(dict.fromkeys(where.values()))
        ran = any(r.variant == name and r.metric == "tflops" for r in rows)
        skipped[name] = f"{why} (at {', '.join(where)})" if ran else why
    return rows, skipped


# ---------------------------------------------------------------------------- output
def print_summary(rows: Sequence[Row | dict], skipped: dict[str, str] | None = None) -> None:
    """A pivot table: one line per (mode, shape), one column of TFLOP/s per provider."""
    dicts = [r.to_dict() if isinstance(r, Row) else r for r in rows]
    tf = [d for d in dicts if d["metric"] == "tflops"]
    if not tf:
        print("(no attention timings)")
    else:
        names = [p for p in PROVIDERS if any(d["variant"] == p for d in tf)]
        keys = list(dict.fromkeys((d["benchmark"], d["config"]["shape"]) for d in tf))
        cells = {(d["benchmark"], d["config"]["shape"], d["variant"]): d["value"] for d in tf}
        head = ["benchmark", "B x H x N x D", *names]
        table = [[bench, shape] + [f"{cells[bench, shape, n]:.3g}" if (bench, shape, n) in cells else "-"
                                   for n in names] for bench, shape in keys]  # fmt: skip
        widths = [max(len(head[i]), *(len(r[i]) for r in table)) for i in range(len(head))]
        print(f"attention TFLOP/s ({tf[0]['config']['dtype']}, {tf[0]['device']}):")
        print("  ".join(c.ljust(w) for c, w in zip(head, widths)))
        print("  ".join("-" * w for w in widths))
        for r in table:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for name, why in (skipped or {}).items():
        print(f"skipped {name}: {why}")


def chart(rows: Sequence[Row], path_png: str | os.PathLike, title: str) -> None:
    """Grouped bars: TFLOP/s per shape (groups) and provider (bars), one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tf = [r for r in rows if r.metric == "tflops"]
    if not tf:
        raise ValueError("no tflops rows to plot")
    modes = list(dict.fromkeys(r.benchmark for r in tf))
    names = [p for p in PROVIDERS if any(r.variant == p for r in tf)]
    palette = plt.get_cmap("tab10").colors
    n_shapes = len(dict.fromkeys(r.config["shape"] for r in tf))
    fig, axes = plt.subplots(
        len(modes),
        1,
        figsize=(max(7.0, 1.7 * n_shapes + 2.0), 3.4 * len(modes)),
        layout="constrained",
        squeeze=False,
    )
    for ax, mode in zip(axes[:, 0], modes):
        sel = [r for r in tf if r.benchmark == mode]
        shapes = list(dict.fromkeys(r.config["shape"] for r in sel))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            vals = {r.config["shape"]: r for r in sel if r.variant == name}
            xs = [i + (j - (len(names) - 1) / 2) * width for i, s in enumerate(shapes) if s in vals]
            rs = [vals[s] for s in shapes if s in vals]
            if not rs:
                continue
            color = "#A0A0A0" if name in MUTED else palette[j % len(palette)]
            err = [[max(0.0, r.value - r.p20) for r in rs], [max(0.0, r.p80 - r.value) for r in rs]]
            ax.bar(xs, [r.value for r in rs], width, yerr=err, capsize=2, label=name, color=color)
        ax.set_xticks(range(len(shapes)), shapes, fontsize=8)
        ax.set_xlabel("B x H x N x D")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode.replace('attention_', '')}", fontsize=9)
        ax.legend(fontsize=7, ncols=min(4, len(names)))
    fig.suptitle(title, fontsize=10)
    first = tf[0]
    fig.text(0.99, 0.003, f"{first.device} | torch {first.torch} | {first.commit}", ha="right", fontsize=7,
             color="gray")  # fmt: skip
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """CLI entry point; returns the rows as dicts (also written to ``--json``)."""
    args = build_parser().parse_args(argv)
    slug = device_slug(args.device)
    json_path = args.json or RESULTS_DIR / f"{BENCHMARK}_{slug}.json"
    png_path = args.png or RESULTS_DIR / f"{BENCHMARK}_{slug}.png"
    prev_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        rows, skipped = run(args)
    finally:
        torch.set_num_threads(prev_threads)
    print_summary(rows, skipped)
    write_rows(json_path, rows)
    if any(r.metric == "tflops" for r in rows):
        dtype = next(r.config["dtype"] for r in rows if r.metric == "tflops")
        title = (
            f"Attention at U-ViT shapes, {dtype}, FLOPs at the true head dim (fwd 4BHN^2D, fwd+bwd 3.5x)\n"
            f"median of interleaved repeats; p20-p80 bars; grey: fp32 reference"
        )
        chart(rows, png_path, title)
        print(f"wrote {json_path} and {png_path}")
    else:
        print(f"wrote {json_path} (no timings: nothing to chart)")
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()
