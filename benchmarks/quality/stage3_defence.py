"""How each stage-3 mode handles generators from useless to perfect (digits, 1 label per class).

One stage 1 (the ``digits`` preset at 1 label/class, the settings of
``tests/test_stage3_defence.py``), then stage 3 in each mode on three stand-in generators made
from real held-in training images, so each generator's quality is known exactly:

* *useless*: every image filed under the wrong class (class c's images under c + 1);
* *chance*: image j of class c filed under class (c + j) mod C: every folder holds every class
  alike, what a barely trained generator gives (Fashion-MNIST after 30 stage-2 steps: 10.3%
  agreement with stage 1);
* *perfect*: real images under their true class.

Modes: plain DPT (uniform, from scratch), ``filter_pseudo``, ``stage1-confidence`` + init,
``stage1-agreement`` + init (the presets' choice), and the real images alone
(``pseudo_weight=0`` + init). Writes ``benchmarks/results/stage3_defence.{json,md}``.

    python -m benchmarks.quality.stage3_defence --out runs/stage3_defence
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

BASE = [
    "data.labels_per_class=1",
    "stage1.steps=300",
    "stage1.eval_every=300",
    "stage1.checkpoint_every=300",
    "stage3.steps=150",
    "stage3.eval_every=150",
    "stage3.checkpoint_every=150",
]
MODES: dict[str, list[str]] = {
    "plain DPT (uniform, from scratch)": ["stage3.pseudo_weighting=uniform", "stage3.init_from_stage1=false"],
    "filter_pseudo (keep what stage 1 agrees with)": [
        "stage3.pseudo_weighting=uniform",
        "stage3.filter_pseudo=true",
        "stage3.init_from_stage1=false",
    ],
    "stage1-confidence weights + init": [
        "stage3.pseudo_weighting=stage1-confidence",
        "stage3.init_from_stage1=true",
    ],
    "stage1-agreement + init (the presets' choice)": [
        "stage3.pseudo_weighting=stage1-agreement",
        "stage3.init_from_stage1=true",
    ],
    "real images alone (pseudo_weight=0) + init": [
        "stage3.pseudo_weighting=stage1-agreement",
        "stage3.init_from_stage1=true",
        "stage3.pseudo_weight=0",
    ],
}
GENERATORS = ("useless", "chance", "perfect")
PER_CLASS = 50


def write_generator(root: Path, splits, kind: str, per_class: int = PER_CLASS) -> None:
    """Real held-in training images as an ImageFolder tree, filed as generator ``kind`` would."""
    from PIL import Image

    from dpt_engine.data.imagefolder import safe_class_dirname
    from dpt_engine.utils.io import atomic_path

    labels, n = splits.train.labels.numpy(), len(splits.classes)
    for c in range(n):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            filed = {"useless": c + 1, "chance": c + j, "perfect": c}[kind] % n
            d = root / safe_class_dirname(splits.classes[filed])
            d.mkdir(parents=True, exist_ok=True)
            with atomic_path(d / f"{c:04d}_{j:06d}.png") as tmp:
                Image.fromarray(splits.train[int(i)][0][0].numpy()).save(tmp, format="PNG")


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Stage 3 against generators from useless to perfect (digits, 1 label/class)",
        "",
        f"Stage 1: {r['stage1_top1']:.1f}% top-1 on the 500 test images (one image = 0.2 points). Each "
        f"generator: {PER_CLASS} real held-in training images per class, filed under the wrong class "
        "(useless), spread over all classes (chance) or under their class (perfect). Stage-3 top-1 (%):",
        "",
        "| stage 3 | " + " | ".join(GENERATORS) + " |",
        "| --- | " + " | ".join("---:" for _ in GENERATORS) + " |",
    ]
    for mode, row in r["rows"].items():
        lines.append(f"| {mode} | " + " | ".join(f"{row[g]['top1']:.1f}" for g in GENERATORS) + " |")
    lines += [
        "",
        "Stage-1 agreement with the generated class: "
        + ", ".join(f"{g} {100 * r['agreement'][g]:.0f}%" for g in GENERATORS)
        + f". Commit {r['commit']}, {r['threads']} thread(s), {r['wall_s'] / 60:.1f} min.",
        "",
        "Command: `python -m benchmarks.quality.stage3_defence --out runs/stage3_defence`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/stage3_defence")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from dpt_engine.cli import set_process_defaults

    set_process_defaults()
    import torch

    from dpt_engine.config.presets import resolve_config
    from dpt_engine.data import build_splits
    from dpt_engine.pipeline import setup_run
    from dpt_engine.stages.stage1 import run_stage1
    from dpt_engine.stages.stage3 import run_stage3
    from dpt_engine.utils.io import atomic_write_json, atomic_write_text

    from ..harness import commit_hash

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    base = [*BASE, f"run.threads={args.threads}"]
    splits = build_splits(resolve_config("digits", overrides=base).data)
    s1 = run_stage1(setup_run(resolve_config("digits", overrides=base), out / "run", progress=False), splits)
    for g in GENERATORS:
        if not (out / g).is_dir():
            write_generator(out / g, splits, g)
    rows: dict[str, dict[str, Any]] = {}
    agreement: dict[str, float] = {}
    for mode, extra in MODES.items():
        rows[mode] = {}
        for g in GENERATORS:
            cfg = resolve_config(
                "digits", overrides=[*base, f"stage3.pseudo_dir={(out / g).resolve()}", *extra]
            )
            s3 = run_stage3(setup_run(cfg, out / "run", progress=False), splits).summary
            rows[mode][g] = {
                k: s3.get(k) for k in ("top1", "gain", "pseudo_kept", "pseudo_trust", "pseudo_batch_share")
            }
            if s3.get("pseudo_stage1_agreement") is not None:
                agreement[g] = float(s3["pseudo_stage1_agreement"])
            print(f"{mode:50s} {g:8s} top-1 {s3['top1']:.1f}", flush=True)
    r = {
        "stage1_top1": s1.summary["top1"],
        "rows": rows,
        "agreement": agreement,
        "commit": commit_hash(),
        "threads": args.threads,
        "wall_s": time.perf_counter() - t0,
    }
    results = Path(args.results)
    atomic_write_json(results / "stage3_defence.json", r)
    atomic_write_text(results / "stage3_defence.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
