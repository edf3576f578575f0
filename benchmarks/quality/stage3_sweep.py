"""Choose stage 3's recipe on held-out training images, never on the test split.

For each label seed the preset runs stage 1, stage 2 and sampling once with ``data.holdout=N``
(N class-balanced training images that no stage trains on, labels unseen, become the evaluation
split). Then stage 3 runs once per candidate on the same stage 1 and the same pseudo images
(symlinked), and the table gives each candidate's top-1 on the held-out images and its gain over
stage 1 with the paired 95% interval, per seed and as the mean over seeds. The candidate chosen
here is then the preset's; its test-split figures come from ``run_quality``.

    python -m benchmarks.quality.stage3_sweep --preset digits --holdout 300 --seeds 0 1 2 \\
        --out runs/stage3_sweep_digits

Candidates are named override lists (``CANDIDATES``); ``--only`` picks some by name. Every run
directory resumes, so a stopped sweep continues with the same command. Results:
``<results>/stage3_sweep_<preset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

__all__ = ["CANDIDATES", "main"]

# stage-3 candidates: the preset as shipped first, then one change each
CANDIDATES: dict[str, list[str]] = {
    "preset": [],
    "no pseudo images (fine-tuning alone)": ["stage3.pseudo_weight=0"],
    "lr / 10": ["stage3.lr=0.003"],
    "lr / 10, no pseudo images": ["stage3.lr=0.003", "stage3.pseudo_weight=0"],
    "300 steps": ["stage3.steps=300"],
    # DPT's own CIFAR-10 stage 3: the learner retrained from scratch with the pseudo images drawn
    # into the labeled batches like real ones, as long as stage 1; and the same without them
    "from scratch, uniform (DPT's CIFAR-10 recipe)": [
        "stage3.init_from_stage1=false",
        "stage3.pseudo_weighting=uniform",
        "stage3.steps=1000",
    ],
    "from scratch, no pseudo images": [
        "stage3.init_from_stage1=false",
        "stage3.pseudo_weight=0",
        "stage3.steps=1000",
    ],
    # the preset's fine-tuning with every pseudo image drawn into the labeled batches like a real one
    "uniform (pseudo images drawn like real ones)": ["stage3.pseudo_weighting=uniform"],
    # how much the pseudo images alone teach: from scratch on the labeled + pseudo images, no real
    # unlabeled images (a supervised learner on a mostly generated labeled set)
    "from scratch, labeled + pseudo images only": [
        "stage3.init_from_stage1=false",
        "stage3.pseudo_weighting=uniform",
        "stage3.keep_unlabeled=false",
        "stage3.steps=1000",
    ],
    # the preset with the pseudo images' batch share capped (real labeled images keep the rest)
    "pseudo share <= 0.5": ["stage3.max_pseudo_share=0.5"],
    "pseudo share <= 0.25": ["stage3.max_pseudo_share=0.25"],
    # the pseudo images themselves: guidance trades class fidelity for diversity (DPT samples
    # ImageNet at 0.4 and CIFAR-10 unguided; digits samples at 1.0, chosen by class fidelity;
    # fashion-mnist unguided since this sweep measured it, benchmarks/results/
    # stage3_sweep_fashion-mnist.md, whose "preset" rows were measured at 1.0).
    # These resample from the seed's stage-2 model, then run the preset's stage 3.
    "guidance 0.4": ["sample.guidance_scale=0.4"],
    "guidance 0 (no guidance)": ["sample.guidance_scale=0"],
    "guidance 2": ["sample.guidance_scale=2"],
    # unguided sampling runs one forward per step instead of two: twice the preset's 300 images per
    # class in the same time (Fashion-MNIST)
    "fashion: guidance 0, 600 images per class": ["sample.guidance_scale=0", "sample.images_per_class=600"],
    # digits only (8x8 models): the generator that won recipe_search at equal wall clock
    # (benchmarks/results/recipe_digits.md), retrained on the seed's stage-1 pseudo-labels
    "digits: unet-tiny8 + min-SNR generator": ["stage2.model=unet-tiny8", "stage2.loss_weighting=min-snr"],
    "digits: unet-tiny8 + min-SNR + lr 2e-3 generator": [
        "stage2.model=unet-tiny8",
        "stage2.loss_weighting=min-snr",
        "stage2.lr=2e-3",
    ],
    "guidance 1.0": ["sample.guidance_scale=1"],
    # below zero the conditional prediction is mixed with the unconditional one,
    # uncond + (1 + w)(cond - uncond): more diverse, less class-faithful images than the unguided
    # preset (fashion-mnist's trend above: guidance 1.0 < 0.4 < 0 for stage 3)
    "guidance -0.3": ["sample.guidance_scale=-0.3"],
    "guidance -0.6": ["sample.guidance_scale=-0.6"],
    # how stage 3 weighs the pseudo images' labeled signal against FreeMatch's own pseudo-labels on
    # the real unlabeled images (which restate stage 1's beliefs): a lighter unlabeled term, none at
    # all (fine-tuning on the labeled + pseudo images), fewer unlabeled images per batch, heavier or
    # confidence-weighted pseudo images, a longer fine-tuning
    "lambda_u 0.5": ["stage3.lambda_u=0.5"],
    "fine-tune on labeled + pseudo images only": ["stage3.keep_unlabeled=false"],
    "uratio 3": ["stage3.uratio=3"],
    "pseudo weight 2": ["stage3.pseudo_weight=2"],
    "stage1-confidence weights": ["stage3.pseudo_weighting=stage1-confidence"],
    "1000 steps": ["stage3.steps=1000"],
    # longer fine-tuning, its ablation without pseudo images, and fewer real unlabeled images per
    # step (uratio 3 instead of 7: a step costs half) to pay for the steps
    "1000 steps, no pseudo images": ["stage3.steps=1000", "stage3.pseudo_weight=0"],
    "1000 steps, uratio 3": ["stage3.steps=1000", "stage3.uratio=3"],
    "2000 steps, uratio 3": ["stage3.steps=2000", "stage3.uratio=3"],
    "2000 steps, uratio 3, no pseudo images": [
        "stage3.steps=2000",
        "stage3.uratio=3",
        "stage3.pseudo_weight=0",
    ],
    # appended last: a candidate's run folder is named by its position (s<seed>_c<index>)
    # fashion-mnist's stage 3 before it fine-tuned 1000 steps (the "preset" rows measured before then)
    "500 steps": ["stage3.steps=500"],
    # FreeMatch's thresholds start where stage 1's ended instead of at 1/C (the fine-tuned model is
    # confident from its first step, so at 1/C nearly every pseudo-label passes until they rise)
    "stage-1 thresholds": ["stage3.init_thresholds_from_stage1=true"],
    # more labeled (so pseudo) images per step, fewer real unlabeled ones. The preset's step holds
    # 32 labeled + 2 x 224 unlabeled = 480 images: batch 128 at uratio 3 is 896 (a step costs ~1.9x),
    # batch 64 at uratio 3 is 448 (the preset's cost) with twice the labeled images
    "labeled batch 128, uratio 3": ["stage3.batch_size=128", "stage3.uratio=3"],
    "labeled batch 64, uratio 3": ["stage3.batch_size=64", "stage3.uratio=3"],
}

_STAGES = ("stage1", "stage2", "sample")


def reused_stages(overrides: list[str]) -> tuple[str, ...]:
    """The base run's stages a candidate can share: all three unless it changes stage 2 (then it
    retrains the generator on the same stage 1) or sampling (then it resamples the same generator)."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    if any(k.startswith(("data.", "stage1.", "run.")) for k in keys):
        raise ValueError(f"a sweep candidate cannot change the data, stage 1 or the run: {overrides}")
    if any(k.startswith("stage2.") for k in keys):
        return _STAGES[:1]
    if any(k.startswith("sample.") for k in keys):
        return _STAGES[:2]
    return _STAGES


def _run(
    preset: str, overrides: list[str], run_dir: Path, stages: list[str], progress: bool
) -> dict[str, Any]:
    from dpt_engine.config.presets import resolve_config
    from dpt_engine.pipeline import run_pipeline

    cfg = resolve_config(preset, overrides=overrides)
    return run_pipeline(cfg, run_dir, stages=stages, progress=progress)


def _mean(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:+.2f}"
    return f"{statistics.fmean(xs):+.2f} +- {statistics.stdev(xs):.2f}"


def markdown(res: dict[str, Any]) -> str:
    seeds = res["seeds"]
    lines = [
        f"# Stage-3 recipe on held-out training images: preset `{res['preset']}`",
        "",
        f"{res['holdout']} class-balanced training images held out of every stage (labels unseen) are the "
        f"evaluation split; label seeds {', '.join(map(str, seeds))}; each candidate's stage 3 runs on the same "
        "stage 1 and pseudo images of its seed (a candidate that changes sampling resamples the seed's "
        "generator, one that changes stage 2 retrains it, both on that stage 1; their cells give their FID). "
        f"Commit {res['commit']}, {res['device']}, "
        f"{res['wall_time_s'] / 60:.0f} min of compute in all (each run's own stage times). The test split "
        "is not used.",
        "",
        "Stage 1 on the held-out images (%): "
        + ", ".join(f"seed {s}: {res['stage1'][str(s)]:.2f}" for s in seeds if str(s) in res["stage1"]),
        "",
        *(
            [
                "FID of the base runs' pseudo-label generators: "
                + ", ".join(
                    f"seed {s}: {res['base_fid'][str(s)]:.1f}" for s in seeds if str(s) in res["base_fid"]
                ),
                "",
            ]
            if res.get("base_fid")
            else []
        ),
        "| stage 3 | "
        + " | ".join(f"seed {s}: top-1 (gain, 95% interval)" for s in seeds)
        + " | mean gain |",
        "| --- | " + " | ".join("---:" for _ in seeds) + " | ---: |",
    ]
    for name, per_seed in res["candidates"].items():
        cells, gains = [], []
        for s in seeds:
            r = per_seed.get(str(s))
            if r is None:
                cells.append("-")
                continue
            lo, hi = r["ci95"] if r.get("ci95") else (float("nan"), float("nan"))
            fid = f"; FID {r['fid']:.1f}" if r.get("fid") is not None else ""
            cells.append(f"{r['top1']:.2f} ({r['gain']:+.2f}, {lo:+.2f}..{hi:+.2f}{fid})")
            gains.append(r["gain"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_mean(gains)} |")
    return "\n".join(lines) + "\n"


def _keep_earlier(res: dict[str, Any], path: Path, seeds: list[int]) -> None:
    """Keep what an earlier call recorded for the same preset, holdout and overrides (other seeds,
    other candidates), so a sweep can grow seed by seed; this call's runs replace theirs."""
    if not path.is_file():
        return
    from dpt_engine.utils.io import read_json

    old = read_json(path)
    if (old.get("preset"), old.get("holdout"), old.get("set", [])) != (
        res["preset"],
        res["holdout"],
        res["set"],
    ):
        return
    res["seeds"] = sorted({*old.get("seeds", []), *seeds})
    for key in ("stage1", "base_fid", "base_wall_time_s"):
        res[key].update(old.get(key, {}))  # this call's seeds are rewritten as their base runs finish
    merged = {}
    for name in CANDIDATES:  # the candidates' own order
        rerun = name in res["candidates"]
        old_runs = old.get("candidates", {}).get(name, {})
        per_seed = {k: v for k, v in old_runs.items() if not (rerun and int(k) in seeds)}
        if rerun or per_seed:
            merged[name] = per_seed
    res["candidates"] = merged
    res["wall_time_s"] = _total_wall_time(res)


def _total_wall_time(res: dict[str, Any]) -> float:
    """Seconds of compute behind the table: every base run's stages plus every candidate's own
    (stage 3, and the sampling or stage 2 it redid)."""
    total = sum(sum(w.values()) for w in res["base_wall_time_s"].values())
    for per_seed in res["candidates"].values():
        total += sum(r.get("wall_time_s") or 0.0 for r in per_seed.values())
    return float(total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument(
        "--holdout", type=int, default=300, help="training images held out as the evaluation split"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="label seeds")
    p.add_argument("--only", nargs="*", default=None, help="candidate names to run (default: all)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    p.add_argument("--out", default="runs/stage3_sweep")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument(
        "--name",
        default=None,
        help="results file stem (default stage3_sweep_<preset>); a sweep at another preset revision "
        "gets its own file instead of mixing its rows into an earlier sweep's",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from dpt_engine.cli import set_process_defaults

    set_process_defaults()  # before torch loads (the imports below load it)
    from dpt_engine.utils.io import atomic_write_json, atomic_write_text

    from ..harness import commit_hash, device_name
    from .run_quality import link_parent

    names = list(CANDIDATES) if args.only is None else args.only
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {unknown}; known: {list(CANDIDATES)}")
    out = Path(args.out)
    stem = args.name or f"stage3_sweep_{args.preset}"
    res: dict[str, Any] = {
        "preset": args.preset,
        "holdout": args.holdout,
        "seeds": args.seeds,
        "commit": commit_hash(),
        "device": device_name(),
        "command": " ".join(["python -m benchmarks.quality.stage3_sweep", *(argv or sys.argv[1:])]),
        "set": list(args.set),
        "stage1": {},
        "base_fid": {},
        "candidates": {n: {} for n in names},
        # the compute the table stands for: each run's own stage times (a resumed or reused stage
        # keeps the time it took when it ran), not the wall clock of this call
        "base_wall_time_s": {},
        "wall_time_s": 0.0,
    }
    _keep_earlier(res, Path(args.results) / f"{stem}.json", args.seeds)
    for s in args.seeds:
        common = [f"data.holdout={args.holdout}", f"data.seed={s}", f"run.seed={s}", *args.set]
        base = out / f"s{s}_base"
        print(f"[sweep] seed {s}: stage 1, stage 2, sampling", flush=True)
        rep = _run(args.preset, common, base, list(_STAGES), not args.no_progress)
        res["stage1"][str(s)] = rep["stage1"]["top1"]
        if (rep.get("generation") or {}).get("fid") is not None:
            res["base_fid"][str(s)] = rep["generation"]["fid"]
        res["base_wall_time_s"][str(s)] = rep.get("wall_time_s", {})
        for name in names:
            run_dir = out / f"s{s}_c{list(CANDIDATES).index(name)}"
            shared = reused_stages(CANDIDATES[name])
            link_parent(base, run_dir, shared)
            own = [st for st in (*_STAGES, "stage3") if st not in shared]
            print(f"[sweep] seed {s}: {', '.join(own)} '{name}'", flush=True)
            rep = _run(args.preset, [*common, *CANDIDATES[name]], run_dir, own, not args.no_progress)
            st = rep["stage3"]
            times = rep.get("wall_time_s") or {}
            res["candidates"][name][str(s)] = {
                "top1": st["top1"],
                "gain": st["gain"],
                "ci95": (st.get("gain_stats") or {}).get("ci95"),
                "overrides": CANDIDATES[name],
                # a candidate that resamples has its own FID (None where the preset computes none)
                "fid": (rep.get("generation") or {}).get("fid") if "sample" in own else None,
                "stages_run": own,
                "wall_time_s": sum(times.get(x) or 0.0 for x in own) or None,
                "commit": res["commit"],
            }
            res["wall_time_s"] = _total_wall_time(res)
            atomic_write_json(Path(args.results) / f"{stem}.json", res)
            atomic_write_text(Path(args.results) / f"{stem}.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
