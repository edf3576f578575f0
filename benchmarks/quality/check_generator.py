"""Is the shipped preset's stage 2 class-faithful? Train it exactly as shipped, on the *true* labels.

Runs the preset's ``stage2`` and ``sample`` stages unchanged except ``stage2.label_source=true``
(the generator a perfect stage 1 would give), then scores the generated images, never the test
split:

* class fidelity: the share of generated images that the oracle of ``diagnose.py`` (``cnn-small``
  trained fully supervised on all training labels) puts in their intended class, overall and per
  class, against the oracle's own test top-1 (target: at least that minus 5 points);
* FID (TF-Inception) of ``sample.fid_num_images`` generated vs as many real training images, as
  the sample stage computes it (target for Fashion-MNIST: <= 40 at 2,000 vs 2,000);
* the wall time of each stage and the threads used.

Writes ``benchmarks/results/generator_<preset>.{json,md}`` and the sample grid beside them. The run
directory is resumable: a finished stage is read back, not retrained.

    python -m benchmarks.quality.check_generator --out runs/generator
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/generator")
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--oracle-dir", default="runs/quality", help="where diagnose's oracle is cached")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides (recorded in the result)")
    p.add_argument("--no-progress", action="store_true")
    return p


def markdown(r: dict[str, Any]) -> str:
    ok_f = r["class_fidelity"] >= r["fidelity_target"]
    lines = [
        f"# Stage 2 of the `{r['preset']}` preset on the true labels",
        "",
        f"Stage 2 and sampling exactly as the preset ships them (`{r['model']}`, {r['stage2_steps']} steps), "
        f"trained on the true labels; {r['threads']} threads on {r['device']}. Nothing here looks at the "
        "test split.",
        "",
        "| measure | value | target |",
        "|---|---:|---:|",
        f"| stage-2 wall time | {r['wall_time_s']['stage2'] / 60:.1f} min | <= 30 min |",
        f"| sampling (+ FID) wall time | {r['wall_time_s']['sample'] / 60:.1f} min | |",
        f"| oracle class fidelity | {r['class_fidelity']:.1f}% {'(met)' if ok_f else '(missed)'} | "
        f">= {r['fidelity_target']:.1f}% (oracle test top-1 {r['oracle_test_top1']:.1f} - 5) |",
        f"| FID, {r['fid_num_generated']} generated vs {r['fid_num_real']} real | {r['fid']:.1f} | "
        f"<= {r['fid_target']:.0f} |",
        "",
        "Class fidelity per class: "
        + ", ".join(f"{c} {v:.0f}%" for c, v in zip(r["classes"], r["class_fidelity_per_class"])),
        "",
        f"![samples]({r['grid']})",
        "",
        f"Command: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dpt_engine.config.presets import resolve_config
    from dpt_engine.data import build_splits
    from dpt_engine.pipeline import run_pipeline
    from dpt_engine.ssl.trainer import predict_proba
    from dpt_engine.stages.stage3 import load_pseudo_images
    from dpt_engine.utils.io import atomic_write_json, atomic_write_text, read_json

    from ..harness import commit_hash, device_name
    from .diagnose import _per_class_acc, train_oracle

    args = build_parser().parse_args(argv)
    oracle, oinfo = train_oracle(Path(args.oracle_dir), args.preset, 1000, progress=False)
    oracle.eval()
    run_dir = Path(args.out)
    cfg = resolve_config(args.preset, overrides=["stage2.label_source=true", *args.set])
    run_pipeline(cfg, run_dir, stages=["stage2", "sample"], progress=not args.no_progress)
    splits = build_splits(cfg.data)
    images = load_pseudo_images(run_dir / "sample" / "samples", splits)
    pred = predict_proba(oracle, images).argmax(1).numpy()
    intended = images.labels.numpy()
    smp = read_json(run_dir / "sample" / "summary.json")
    wall = {
        s: float(read_json(run_dir / s / "done.json").get("wall_time_s", 0.0)) for s in ("stage2", "sample")
    }
    name = f"generator_{args.preset.replace('-', '_')}"
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    grid = results / f"{name}_samples.png"
    shutil.copyfile(run_dir / "sample" / "sample_grid.png", grid)
    r = {
        "preset": args.preset,
        "overrides": ["stage2.label_source=true", *args.set],
        "model": cfg.stage2.model,
        "stage2_steps": cfg.stage2.steps,
        "images_per_class": cfg.sample.images_per_class,
        "class_fidelity": float((pred == intended).mean() * 100.0),
        "class_fidelity_per_class": _per_class_acc(pred, intended, splits.num_classes),
        "classes": list(splits.classes),
        "oracle_test_top1": oinfo["test_top1"],
        "fidelity_target": oinfo["test_top1"] - 5.0,
        "fid": smp.get("fid"),
        "fid_num_generated": smp.get("fid_num_generated"),
        "fid_num_real": smp.get("fid_num_real", smp.get("fid_num_generated")),
        "fid_target": 40.0,
        "wall_time_s": wall,
        "threads": torch.get_num_threads(),
        "device": device_name("cpu"),
        "commit": commit_hash(),
        "grid": grid.name,
        "command": " ".join(["python -m benchmarks.quality.check_generator", *(argv or sys.argv[1:])]),
    }
    atomic_write_json(results / f"{name}.json", r)
    atomic_write_text(results / f"{name}.md", markdown(r))
    print(
        f"[generator] class fidelity {r['class_fidelity']:.1f}% (target {r['fidelity_target']:.1f}), "
        f"FID {r['fid']:.1f} (target 40), stage 2 {wall['stage2'] / 60:.1f} min",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
