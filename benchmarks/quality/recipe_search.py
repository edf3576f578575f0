"""Which stage-2 recipe makes a class-faithful generator in a CPU budget (Fashion-MNIST, digits)?

Every candidate trains the preset's stage 2 (``--preset``: ``fashion-mnist`` or ``digits``, each
with its own candidates in ``RECIPES``) on the *true* labels for the same
wall-clock budget (its step count comes from a short throughput probe of that candidate, so a
faster network gets more steps, as it would for a user), then samples ``--per-class`` images per
class. Scored on generated images only, never on the test split:

* class fidelity: the share of generated images the oracle (``diagnose.train_oracle``: the same
  ``cnn-small`` trained fully supervised on every training label) puts in their intended class,
  overall and per class;
* FID (TF-Inception) of the generated images against as many real *training* images.

Results: ``benchmarks/results/recipe_<preset>.{json,md,png}`` (``recipe_fashion_mnist``,
``recipe_digits``); each candidate is a resumable
run directory under ``--out`` (a finished one is read back, not retrained).

    python -m benchmarks.quality.recipe_search --out runs/recipe --minutes 6
    python -m benchmarks.quality.recipe_search --preset digits --out runs/recipe_digits --minutes 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

__all__ = ["CANDIDATES", "RECIPES", "build_parser", "main", "probe_images_per_s"]


def _candidate(model: str, min_snr: bool = False, lr: float = 1e-3) -> tuple[str, list[str]]:
    """A named candidate that sets every lever the search varies, so it means the same recipe
    whatever the preset ships now (the preset may have adopted an earlier winner)."""
    name = (
        model + ("+minsnr" if min_snr else "") + ("" if lr == 1e-3 else f"+lr{lr:.0e}".replace("e-0", "e-"))
    )
    return name, [
        f"stage2.model={model}",
        f"stage2.loss_weighting={'min-snr' if min_snr else 'uniform'}",
        f"stage2.lr={lr:g}",
    ]


# Per preset: the overrides every candidate shares, and the candidates (name, stage-2 overrides):
# the original recipe first, then one lever at a time, then combinations.
RECIPES: dict[str, dict[str, Any]] = {
    "fashion-mnist": {
        "common": ["stage2.precision=bf16"],
        "candidates": [
            _candidate("uvit-tiny28"),
            _candidate("uvit-tiny28", min_snr=True),
            _candidate("unet-tiny28"),
            _candidate("unet-tiny28", min_snr=True),
            _candidate("unet-s2d28", min_snr=True),
            _candidate("unet-tiny28", min_snr=True, lr=2e-3),
        ],
    },
    # the preset's own precision (auto: fp32 on a CPU) for every candidate
    "digits": {
        "common": [],
        "candidates": [
            _candidate("uvit-tiny8"),
            _candidate("uvit-tiny8", min_snr=True),
            _candidate("unet-tiny8", min_snr=True),
            _candidate("unet-tiny8", min_snr=True, lr=2e-3),
        ],
    },
}
CANDIDATES = RECIPES["fashion-mnist"]["candidates"]

COMMON = [
    "stage2.label_source=true",
    "stage2.log_every=50",
    "stage2.checkpoint_every=200",
]


def probe_images_per_s(cfg, image_size: int, channels: int, steps: int = 3) -> float:
    """Training images/s of the candidate's network at its batch size and precision (after one
    warm-up step), on random data: the step count of a time budget."""
    from dpt_engine.models.denoisers import create_denoiser

    s = cfg.stage2
    torch.manual_seed(0)
    net = create_denoiser(s.model, img_size=image_size, in_chans=channels, num_classes=10)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr)
    x = torch.randn(s.batch_size, channels, image_size, image_size)
    t = torch.rand(s.batch_size) * 999
    y = torch.randint(0, 11, (s.batch_size,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.precision == "bf16"):
            out = net(x, t, y)
        loss = (out.float() - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * s.batch_size / (time.perf_counter() - t0)


def run_candidate(
    name: str, overrides: list[str], args: argparse.Namespace, oracle: torch.nn.Module
) -> dict[str, Any]:
    from dpt_engine.config.presets import resolve_config
    from dpt_engine.data import build_splits
    from dpt_engine.pipeline import run_pipeline
    from dpt_engine.ssl.trainer import predict_proba
    from dpt_engine.stages.stage3 import load_pseudo_images
    from dpt_engine.utils.io import atomic_write_json, read_json

    from .diagnose import _per_class_acc

    common = COMMON + RECIPES[args.preset]["common"]
    run_dir = Path(args.out) / name
    sample = [
        f"sample.images_per_class={args.per_class}",
        f"sample.fid_num_images={args.per_class * 10}",
        f"sample.fid_cache={(Path(args.out) / 'fid_cache').resolve()}",
    ]
    plan_path = run_dir / "recipe_plan.json"
    if plan_path.is_file():  # the step count is fixed when the candidate first starts
        plan = read_json(plan_path)
    else:
        probe_cfg = resolve_config(args.preset, overrides=common + overrides)
        sp = build_splits(probe_cfg.data)
        img_s = probe_images_per_s(probe_cfg, sp.image_size, sp.channels)
        steps = max(50, int(args.minutes * 60 * img_s / probe_cfg.stage2.batch_size))
        plan = {"probe_images_per_s": img_s, "steps": steps, "minutes": args.minutes}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(plan_path, plan)
    all_overrides = (
        common + overrides + [f"stage2.steps={plan['steps']}", f"stage2.warmup_steps={args.warmup}"]
    )
    cfg = resolve_config(args.preset, overrides=all_overrides + sample)
    print(
        f"[recipe] {name}: {plan['steps']} steps ({plan['probe_images_per_s']:.0f} img/s probe)", flush=True
    )
    run_pipeline(cfg, run_dir, stages=["stage2", "sample"], progress=not args.no_progress)
    splits = build_splits(cfg.data)
    images = load_pseudo_images(run_dir / "sample" / "samples", splits)
    pred = predict_proba(oracle, images).argmax(1).numpy()
    intended = images.labels.numpy()
    s2 = read_json(run_dir / "stage2" / "summary.json")
    hist = read_json(run_dir / "stage2" / "history.json")
    smp = read_json(run_dir / "sample" / "summary.json")
    return {
        "name": name,
        "overrides": overrides,
        "steps": plan["steps"],
        "probe_images_per_s": plan["probe_images_per_s"],
        "train_images_per_s": float(
            np.mean([h["images_per_s"] for h in hist[1:]] or [hist[-1]["images_per_s"]])
        ),
        "params": s2.get("params"),
        "final_loss": hist[-1]["loss"],
        "class_fidelity": float((pred == intended).mean() * 100.0),
        "class_fidelity_per_class": _per_class_acc(pred, intended, splits.num_classes),
        "fid": smp.get("fid"),
        "fid_num_generated": smp.get("fid_num_generated"),
        "classes": list(splits.classes),
    }


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# Stage-2 recipe search (preset `{meta.get('preset', 'fashion-mnist')}`, true labels, "
        "equal wall-clock budget)",
        "",
        f"Each candidate: {meta['minutes']} min of stage-2 training at batch 128 "
        f"({meta.get('precision', 'bf16 autocast')}, {meta['threads']} threads, {meta['device']}), then {meta['per_class']} images per class "
        "(the preset's sampler). Class fidelity = share the fully supervised oracle "
        f"(test top-1 {meta['oracle_test_top1']:.1f}%) puts in the intended class; FID against as many "
        "real training images. Nothing here looks at the test split.",
        "",
        "| candidate | steps | train img/s | class fidelity % | weakest class | FID |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        pc = r["class_fidelity_per_class"]
        w = int(np.argmin(pc))
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['train_images_per_s']:.0f} | {r['class_fidelity']:.1f} | "
            f"{r['classes'][w]} {pc[w]:.0f}% | {r['fid']:.1f} |"
        )
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [r["name"] for r in rows]
    axes[0].barh(names, [r["class_fidelity"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("oracle class fidelity (%)")
    axes[0].invert_yaxis()
    axes[1].barh(names, [r["fid"] for r in rows], color="tab:orange")
    axes[1].set_xlabel("FID (lower is better)")
    axes[1].invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle("Stage-2 candidates, equal wall-clock budget, true labels")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--preset", default="fashion-mnist", choices=sorted(RECIPES))
    p.add_argument("--minutes", type=float, default=6.0, help="stage-2 training budget per candidate")
    p.add_argument("--warmup", type=int, default=100, help="lr warm-up steps of every candidate")
    p.add_argument("--per-class", type=int, default=100, help="generated images per class")
    p.add_argument("--only", nargs="*", default=None, help="candidate names to run (default: all)")
    p.add_argument("--oracle-dir", default="runs/quality", help="where diagnose's oracle is cached")
    p.add_argument("--oracle-steps", type=int, default=1000, help="the oracle's supervised training steps")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--name", default=None, help="results file stem (default: recipe_<preset>)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    from dpt_engine.utils.io import atomic_write_json, atomic_write_text

    from ..harness import commit_hash, device_name
    from .diagnose import train_oracle

    args = build_parser().parse_args(argv)
    args.name = args.name or "recipe_" + args.preset.replace("-", "_")
    candidates = RECIPES[args.preset]["candidates"]
    oracle, oinfo = train_oracle(Path(args.oracle_dir), args.preset, args.oracle_steps, progress=False)
    oracle.eval()
    results = Path(args.results)
    prev = results / f"{args.name}.json"
    rows: dict[str, dict[str, Any]] = {}
    if prev.is_file():  # keep candidates measured by earlier sittings
        from dpt_engine.utils.io import read_json

        rows = {r["name"]: r for r in read_json(prev)["candidates"]}
    for name, overrides in candidates:
        if args.only is not None and name not in args.only:
            continue
        rows[name] = run_candidate(name, overrides, args, oracle)
        ordered = [rows[n] for n, _ in candidates if n in rows]
        meta = {
            "preset": args.preset,
            "precision": "bf16 autocast"
            if "stage2.precision=bf16" in RECIPES[args.preset]["common"]
            else "the preset's precision",
            "minutes": args.minutes,
            "per_class": args.per_class,
            "warmup_steps": args.warmup,
            "threads": torch.get_num_threads(),
            "device": device_name("cpu"),
            "commit": commit_hash(),
            "oracle_test_top1": oinfo["test_top1"],
            "command": " ".join(["python -m benchmarks.quality.recipe_search", *(argv or sys.argv[1:])]),
        }
        atomic_write_json(results / f"{args.name}.json", {"meta": meta, "candidates": ordered})
        atomic_write_text(results / f"{args.name}.md", markdown(meta, ordered))
        plot(ordered, results / f"{args.name}.png")
        r = rows[name]
        print(f"[recipe] {name}: class fidelity {r['class_fidelity']:.1f}%, FID {r['fid']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
