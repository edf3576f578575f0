"""``dpt bench``: training, sampling and kernel benchmarks with their baselines, in one command.

    dpt bench train|sample|kernels|scale|all [--model PRESET] [--batch N] [--steps N] [--json OUT]

Sections (each runs the existing benchmark's ``main(argv)`` in this process, so every comparison
is measured interleaved in one run, against a baseline from the same run):

* ``train`` (``bench_train``): one stage-2 training step of our engine (fp32, bf16 autocast,
  optionally ``torch.compile``) vs a plain PyTorch step of the original U-ViT design: images/s,
  step time, achieved TFLOP/s, MFU, peak memory, paired speed-ups. ``--steps``: timed steps.
* ``sample``: guided DPM-Solver++ sampling (``bench_sampler``: ours vs diffusers'
  ``DPMSolverMultistepScheduler`` vs the original two-forward loop; ``--steps``: solver steps) and
  end-to-end generation to PNG files (``bench_generation``: ours vs the original per-class,
  synchronous-PNG loop), with the time split of our generation (network / solver / decode /
  write) from the sampling manifest.
* ``scale`` (``bench_scale``, not part of ``all``): a million images through the generation path
  with a ~10k-parameter network: pipeline images/s, memory at 10k / 100k / 1M images, manifest
  size and rebuild time, disk bytes per image, rerun time, stage 3's read rate.
* ``kernels``: the micro-benchmarks of ``run_all`` (attention, EMA, solver step, latent store, and
  the CUDA ones on a GPU), ``--quick``-sized unless ``--full``.

While each section runs, ``GpuTelemetry`` samples NVML (power, SM clock, memory, utilisation);
without a GPU the telemetry block says why it is absent.

Output: a table on the terminal; one JSON document (``--json``; default
``<results>/bench_<device>/bench_<device>.json``) with the run's device, versions (torch, triton,
deepspeed, dali, diffusers where installed), commit, each section's status, wall time and
telemetry, and every row (``harness.Row`` fields plus ``section`` and ``versions``); PNG bar
charts next to it (``ratios.png``: every speed-up against its baseline; plus each benchmark's
own chart). ``<results>`` is the repository's ``benchmarks/results`` when this package runs
from a source checkout, else ``./bench_results`` (an installed package has no results folder).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dpt_engine.utils.io import atomic_path, atomic_write_json

from .harness import REPO_ROOT, bar_chart, commit_hash, device_name
from .telemetry import GpuTelemetry

__all__ = ["SECTIONS", "add_arguments", "build_parser", "main", "results_root", "run", "versions"]

SECTIONS = ("train", "sample", "kernels")  # what `all` runs
# run on their own only: `scale` pushes a million images through the generation path (~15 min, ~6 GB)
SOLO_SECTIONS = ("scale",)
# run_all's micro-benchmarks (the end-to-end ones are the train and sample sections)
KERNEL_BENCHMARKS = ("attention", "ema", "solver_step", "latent_store", "ema_cuda", "solver_step_cuda")
# distribution names whose versions every row records (those installed)
VERSIONED = {
    "torch": "torch",
    "triton": "triton",
    "deepspeed": "deepspeed",
    "dali": "nvidia-dali-cuda120",
    "diffusers": "diffusers",
    "dpt_engine": "dpt_engine",
}


def results_root() -> Path:
    """Where benchmark results go by default: the repository's ``benchmarks/results`` when this
    package is the source checkout's ``benchmarks/`` folder, else ``./bench_results`` (an
    installed package has no results folder and must not write into site-packages)."""
    here = Path(__file__).resolve().parent
    if (here / "results").is_dir() and (REPO_ROOT / "pyproject.toml").is_file():
        return here / "results"
    return Path.cwd() / "bench_results"


def versions() -> dict[str, str]:
    """Installed versions of the stack (distribution metadata: nothing heavy is imported)."""
    out = {}
    for key, dist in VERSIONED.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------------------- arguments
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``dpt bench`` arguments (shared by ``dpt bench`` and ``python -m benchmarks.bench_cli``)."""
    from dpt_engine.models.uvit import list_uvits

    p.add_argument(
        "what",
        choices=(*SECTIONS, *SOLO_SECTIONS, "all"),
        help="which benchmarks to run (all = train, sample and kernels; scale runs alone)",
    )
    p.add_argument(
        "--model",
        default=None,
        choices=list_uvits(),
        help="U-ViT preset for train and sample (default: uvit-tiny28 for train and uvit-tiny8 for "
        "sample on a CPU, uvit-l2 on a GPU)",
    )
    p.add_argument("--batch", type=int, default=None, help="images per training step / sampling call")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train: timed training steps per variant (default 8 on a CPU, 20 on a GPU); "
        "sample: solver steps (default 20)",
    )
    p.add_argument("--repeats", type=int, default=3, help="sample: timed interleaved rounds (default 3)")
    p.add_argument("--compile", action="store_true", help="train: also time torch.compile (bf16)")
    p.add_argument("--full", action="store_true", help="kernels: run_all's full settings instead of --quick")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--json", type=Path, default=None, help="the JSON document (default <out-dir>/bench_<device>.json)"
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="charts and per-benchmark files (default: the --json file's folder, else "
        "<results>/bench_<device>/)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpt bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


# ---------------------------------------------------------------------------- sections
def _defaults(args: argparse.Namespace, cuda: bool) -> dict[str, dict[str, Any]]:
    """Per-section settings: explicit arguments win, else small defaults for the device."""
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"dpt bench: --batch must be >= 1, got {args.batch}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"dpt bench: --steps must be >= 1, got {args.steps}")
    return {
        "train": {
            "model": args.model or ("uvit-l2" if cuda else "uvit-tiny28"),
            "batch": args.batch or (64 if cuda else 32),
            "steps": args.steps or (20 if cuda else 8),
        },
        "sample": {
            "model": args.model or ("uvit-l2" if cuda else "uvit-tiny8"),
            "batch": args.batch or 64,
            "steps": args.steps or 20,
            "repeats": args.repeats,
        },
    }


def _threads(args: argparse.Namespace) -> list[str]:
    return ["--threads", str(args.threads)] if args.threads is not None else []


def _section_train(
    args: argparse.Namespace, device: torch.device, out: Path, s: dict[str, Any]
) -> list[dict]:
    from . import bench_train

    argv = [
        "--model",
        s["model"],
        "--batch",
        str(s["batch"]),
        "--steps",
        str(s["steps"]),
        "--device",
        str(device),
    ]
    argv += [*_threads(args), "--json", str(out / "train.json"), "--png", str(out / "train.png")]
    return bench_train.main(argv + (["--compile"] if args.compile else []))


def _generation_split(rows: list[dict]) -> list[dict]:
    """Our generation's time split (network / solver / decode / write) from the sampling manifest's
    breakdown in ``bench_generation``'s ``dpt_engine`` row (its last round), as shares of the
    generation loop's accounted time (noise, model, solver, decode, transfer and waiting for the
    writers). ``write`` is the PNG encode + write time of the background writer threads: it
    overlaps the loop, so the shares need not sum to 1."""
    from .harness import Row

    ours = next(r for r in rows if r["variant"] == "dpt_engine" and r["metric"] == "throughput")
    sec = {k: float(v) for k, v in ours["config"]["breakdown_s"].items()}
    loop = sum(sec.get(k, 0.0) for k in ("noise", "model", "solver", "decode", "transfer", "writer_wait"))
    parts = {
        "network": ("model",),
        "solver": ("noise", "solver"),
        "decode": ("decode", "transfer"),
        "write": ("encode", "write"),
    }
    out = []
    for part, keys in parts.items():
        seconds = sum(sec.get(k, 0.0) for k in keys)
        cfg = {**ours["config"], "seconds": seconds, "loop_seconds": loop, "from": list(keys),
               "note": "share of the loop's accounted time; write = background encode + write threads"}  # fmt: skip
        out.append(
            Row("generation_split", part, "time_share", seconds / loop, "fraction", config=cfg).to_dict()
        )
    return out


def _section_sample(
    args: argparse.Namespace, device: torch.device, out: Path, s: dict[str, Any]
) -> list[dict]:
    from dpt_engine.models.uvit import get_uvit_config

    from . import bench_generation, bench_sampler

    common = ["--model", s["model"], "--batch", str(s["batch"]), "--steps", str(s["steps"]), "--scale", "0.4"]
    common += ["--repeats", str(s["repeats"]), *_threads(args)]
    rows: list[dict] = []
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        print(f"sample: bench_sampler skipped: diffusers is not installed ({e}); pip install diffusers")
    else:
        rows += bench_sampler.main(
            [
                *common,
                "--device",
                str(device),
                "--json",
                str(out / "sampler.json"),
                "--png",
                str(out / "sampler.png"),
            ]
        )
    if device.type == "cuda":
        # bench_generation builds its network on the CPU: a CPU figure next to GPU rows would mislead
        print("sample: bench_generation skipped on CUDA (it measures the CPU path only)")
        return rows
    ucfg = get_uvit_config(s["model"])
    # one full batch per class: the original's per-class padding then costs nothing, so the ratio
    # shows the two-forward guidance and synchronous writes, not padding of a small demo set
    gen = bench_generation.main(
        [*common, "--image-size", str(ucfg.img_size), "--channels", str(ucfg.in_chans), "--classes", "10",
         "--per-class", str(s["batch"]), "--workers", "2",
         "--json", str(out / "generation.json"), "--png", str(out / "generation.png")]
    )  # fmt: skip
    split = _generation_split(gen)
    bar_chart(
        split, out / "generation_split.png", "dpt_engine generation: share of wall time", metric="time_share"
    )
    return rows + gen + split


def _section_scale(args: argparse.Namespace, out: Path) -> list[dict]:
    from . import bench_scale

    return bench_scale.main(
        [*_threads(args), "--json", str(out / "scale.json"), "--png", str(out / "scale.png")]
    )


def _section_kernels(args: argparse.Namespace, device: torch.device, out: Path) -> list[dict]:
    import json

    from . import run_all
    from .bench_attention import device_slug

    kdir = out / "kernels"
    argv = ["--device", str(device), "--out-dir", str(kdir), "--only", *KERNEL_BENCHMARKS, *_threads(args)]
    rc = run_all.main(argv + ([] if args.full else ["--quick"]))
    rows = json.loads((kdir / f"all_{device_slug(device)}.json").read_text())
    if rc != 0:
        failed = [
            r["variant"]
            for r in rows
            if r["benchmark"] == "run_all" and r["config"].get("status") == "failed"
        ]
        raise RuntimeError(f"run_all: benchmarks failed: {', '.join(failed)} (see {kdir})")
    return rows


# ---------------------------------------------------------------------------- output
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


_HEADLINE = {"throughput", "step_time", "tflops", "mfu", "peak_memory", "peak_rss", "time_share", "bandwidth"}


def print_summary(rows: Sequence[dict], status: Sequence[dict]) -> None:
    """The headline rows (rates, MFU, memory, time shares and every ratio against a baseline)."""
    sel = [
        r
        for r in rows
        if r["metric"] in _HEADLINE or (r.get("ratio") is not None and r["metric"] != "rel_diff")
    ]
    cols = ["section", "benchmark", "variant", "metric", "value", "unit", "baseline", "ratio"]
    cells = [[_fmt(r.get(c)) for c in cols] for r in sel]
    if cells:
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        print("  ".join("-" * w for w in widths))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print()
    for s in status:
        print(f"{s['section']:<8} {s['status']:<8} {s['seconds']:7.1f} s  {s['reason'] or ''}")


def ratio_chart(rows: Sequence[dict], path_png: Path, title: str) -> None:
    """Horizontal bars of every speed-up (``ratio`` rows in ``x`` against a baseline) on a log
    scale (ratios span 0.5x to 200x), with a line at 1x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.get("ratio") is not None and r["unit"] == "x"]
    if not sel:
        raise ValueError("no ratio rows to plot")
    labels = [
        f"{r['benchmark']}: {r['variant']} vs {r['baseline']}"
        + ("" if r["metric"] == "speedup" else f" ({r['metric']})")
        for r in sel
    ]
    values = [float(r["ratio"]) for r in sel]
    pos = list(range(len(sel)))
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(sel) + 1.6), layout="constrained")
    # bars grow from 1x: right (blue) = faster than the baseline, left (red) = slower
    widths = [v - 1.0 for v in values]
    bars = ax.barh(pos, widths, left=1.0, color=["#4C72B0" if v >= 1 else "#C44E52" for v in values])
    ax.bar_label(bars, labels=[f"{v:.3g}x" for v in values], padding=3, fontsize=8)
    ax.set_yticks(pos, labels, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(min(0.35, min(values) / 2.5), max(2.0, max(values) * 3))
    ax.invert_yaxis()
    ax.set_xlabel("speed-up, log scale (paired median ratio; > 1: faster than the baseline)")
    ax.set_title(title, fontsize=9)
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- driver
def run(args: argparse.Namespace) -> int:
    """Run the sections named by ``args.what``; write the JSON and charts; 0 unless one failed."""
    from .bench_attention import device_slug

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise SystemExit(
            f"dpt bench: --device {args.device!r} is not a device; use cpu, cuda or cuda:N"
        ) from None
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("dpt bench: --device cuda, but torch sees no CUDA GPU")
    slug = device_slug(device)
    if args.out_dir is not None:
        out = args.out_dir
    elif args.json is not None:
        out = args.json.parent
    else:
        root = results_root()
        if root.name == "bench_results":
            print(f"dpt bench: not in a source checkout: results go to {root}")
        out = root / f"bench_{slug}"
    json_path = args.json or out / f"bench_{slug}.json"
    import tempfile

    for d in {out, json_path.parent}:  # an unwritable place fails now, not after the measurements
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=d, prefix=".dpt-write-probe-"):
                pass
        except OSError as e:
            why = "a file is in the way" if any(p.is_file() for p in (d, *d.parents)) else (e.strerror or e)
            raise SystemExit(
                f"dpt bench: cannot write results to {d} ({why}); choose a writable --json / --out-dir"
            ) from None
    settings = _defaults(args, cuda)
    sections = list(SECTIONS) if args.what == "all" else [args.what]
    runners: dict[str, Callable[[], list[dict]]] = {
        "train": lambda: _section_train(args, device, out, settings["train"]),
        "sample": lambda: _section_sample(args, device, out, settings["sample"]),
        "kernels": lambda: _section_kernels(args, device, out),
        "scale": lambda: _section_scale(args, out),
    }
    vers, commit = versions(), commit_hash()
    meta = {
        "device": device_name(device),
        "device_slug": slug,
        "cpu": device_name("cpu"),
        "versions": vers,
        "commit": commit,
        "argv": list(sys.argv),
        "settings": {**settings, "what": args.what, "full_kernels": args.full, "compile": args.compile},
    }
    rows: list[dict] = []
    status: list[dict] = []
    telemetry: dict[str, Any] = {}
    t_all = time.perf_counter()
    for name in sections:
        print(f"\n==== dpt bench {name} " + "=" * max(0, 60 - len(name)), flush=True)
        t0 = time.perf_counter()
        index = torch.cuda.current_device() if cuda else 0
        with GpuTelemetry(device_index=index) as tele:
            try:
                got = runners[name]()
                st, reason = "ok", f"{len(got)} rows"
            except (Exception, SystemExit) as exc:  # one section's failure must not stop the others
                traceback.print_exc()
                got, st, reason = [], "failed", f"{type(exc).__name__}: {exc}"
        telemetry[name] = tele.summary()
        rows += [{**r, "section": name, "versions": vers} for r in got]
        status.append({"section": name, "status": st, "reason": reason, "seconds": time.perf_counter() - t0})
    doc = {
        **meta,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - t_all,
        "sections": status,
        "telemetry": telemetry,
        "rows": rows,
    }
    atomic_write_json(json_path, doc)
    print("\n==== dpt bench: results " + "=" * 50)
    print_summary(rows, status)
    print(
        f"device: {meta['device']} | "
        + ", ".join(f"{k} {v}" for k, v in vers.items())
        + f" | commit {commit}"
    )
    for name, tele in telemetry.items():
        if not tele.get("available"):
            print(f"telemetry ({name}): absent: {tele.get('reason')}")
    if any(r.get("ratio") is not None and r["unit"] == "x" for r in rows):
        ratio_chart(rows, out / "ratios.png", f"dpt bench {args.what} on {meta['device']} (commit {commit})")
    print(f"wrote {json_path} and the charts in {out}")
    return 1 if any(s["status"] == "failed" for s in status) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.bench_cli`` (``dpt bench`` calls ``run``)."""
    args = build_parser().parse_args(argv)
    prev = torch.get_num_threads()
    try:
        return run(args)
    finally:
        torch.set_num_threads(prev)


if __name__ == "__main__":
    sys.exit(main())
