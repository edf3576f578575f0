"""Quality benchmark: does DPT's loop help on real data? Fashion-MNIST with 1, 2 and 4 labels/class.

For every (labels per class k, label seed s) the full pipeline runs in its own run directory
``<out>/k{k}_s{s}``: stage 1 (FreeMatch), pseudo-labels, stage 2 (U-ViT on the pseudo-labels),
sampling with FID, stage 3 (classifier on real labeled + pseudo images). Seeds listed in
``--classifier-only-seeds`` run stage 1 only (more seeds for the stage-1 mean at little cost).
Two reference diffusion models are trained on the same images once: with the *true* labels
(``<out>/true_labels``) and *unconditional* (``<out>/unconditional``), so the FID of the
pseudo-label model can be read between the fully supervised and the label-free one (the paper's
comparison: 4.34 / 3.31 / 27.99 FID for 1-label pseudo / supervised / unconditional U-ViT-L/2).

Every run directory is resumable (finished stages are skipped, interrupted ones resume from their
checkpoint), so the benchmark can be stopped and continued with the same command. Results:

* ``<results>/quality_fashion_mnist.json``: one record per run (all report metrics, wall times,
  config overrides) plus aggregated rows (mean, sample std, n over seeds);
* ``<results>/quality_fashion_mnist.md``: the tables the README quotes;
* ``<results>/quality_fashion_mnist.png``: stage 1 vs stage 3 top-1 per k, and FID per label source.

Scales: ``preset`` (default, the published numbers) runs the ``fashion-mnist`` preset exactly as
a user gets it from ``dpt run --preset fashion-mnist`` (about 40 minutes of 2 cores per run; see
the README). There is no reduced "benchmark" scale any more: a figure is what the shipped preset
gives. Each finished run's record (metrics, wall time per stage, torch threads, a digest of its
resolved config) is written to ``<results>/<name>_runs/<run>.json`` as it arrives, and a later
sitting, on this machine or a fresh one, reuses every record whose config digest still matches
instead of recomputing it.
``smoke`` is a minutes-long check of the machinery on a 2,000-image subset.

    python -m benchmarks.quality.run_quality --out runs/quality --labels 1 2 4 --seeds 0 1 2

``--jobs N`` runs N runs at once, each in its own process with cpu_count/N torch threads (the old
U-ViT recipe did not scale to two threads: two one-thread
processes train the U-ViT 1.05x and the classifier 1.2x faster than one two-thread process).
The long runs go first and the stage-1-only seeds last, filling the time the long runs leave.
``--no-run`` runs nothing and writes the results of the planned runs that have finished, listing
the rest as missing (to publish a benchmark stopped before its extra seeds).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

__all__ = ["aggregate", "build_parser", "link_parent", "main", "plan_runs"]

# Smoke scale: the same pipeline with every stage shrunk (2,000 training images, short schedules).
SMOKE_OVERRIDES = [
    "data.max_train=2000",
    "stage1.steps=60",
    "stage1.eval_every=60",
    "stage1.checkpoint_every=60",
    "stage1.batch_size=16",
    "stage1.uratio=2",
    "stage2.steps=40",
    "stage2.log_every=20",
    "stage2.checkpoint_every=40",
    "stage2.batch_size=32",
    "sample.images_per_class=8",
    "sample.steps=5",
    "sample.fid_num_images=80",
    "sample.grid_per_class=4",
    "stage3.steps=60",
    "stage3.eval_every=60",
    "stage3.checkpoint_every=60",
    "stage3.batch_size=16",
    "stage3.uratio=2",
]


def plan_runs(
    labels: Sequence[int],
    seeds: Sequence[int],
    classifier_only_seeds: Sequence[int],
    references: bool,
    ablations: bool = False,
) -> list[dict[str, Any]]:
    """The runs of the benchmark: name, stages and config overrides of each.

    ``ablations``: for every DPT run, stage 3 once more on the same stage 1 with
    ``stage3.pseudo_weight=0`` (same start, schedule and real images, no pseudo images), so the
    pseudo images' own share of the stage-3 gain is measured, apart from the extra training."""
    runs: list[dict[str, Any]] = []
    for k in labels:
        for s in seeds:
            runs.append(
                {
                    "name": f"k{k}_s{s}",
                    "kind": "dpt",
                    "labels_per_class": k,
                    "seed": s,
                    "stages": ["stage1", "stage2", "sample", "stage3"],
                    "overrides": [f"data.labels_per_class={k}", f"data.seed={s}", f"run.seed={s}"],
                }
            )
    if references:
        for source, name in (("true", "true_labels"), ("none", "unconditional")):
            runs.append(
                {
                    "name": name,
                    "kind": f"reference-{source}",
                    "labels_per_class": None,
                    "seed": 0,
                    "stages": ["stage2", "sample"],
                    "overrides": [f"stage2.label_source={source}", "run.seed=0"],
                }
            )
    if ablations:
        for k in labels:
            for s in seeds:
                runs.append(
                    {
                        "name": f"k{k}_s{s}_nopseudo",
                        "kind": "ablation-no-pseudo",
                        "labels_per_class": k,
                        "seed": s,
                        "stages": ["stage3"],
                        "overrides": [
                            f"data.labels_per_class={k}",
                            f"data.seed={s}",
                            f"run.seed={s}",
                            "stage3.pseudo_weight=0",
                        ],
                        "parent": f"k{k}_s{s}",
                    }
                )
    # the cheap stage-1-only seeds last: with --jobs they fill the time the long runs leave
    for k in labels:
        for s in classifier_only_seeds:
            if s in seeds:
                continue
            runs.append(
                {
                    "name": f"k{k}_s{s}",
                    "kind": "stage1-only",
                    "labels_per_class": k,
                    "seed": s,
                    "stages": ["stage1"],
                    "overrides": [f"data.labels_per_class={k}", f"data.seed={s}", f"run.seed={s}"],
                }
            )
    return runs


def config_digest(preset: str, overrides: list[str]) -> str:
    """What a run computes, independent of where: the resolved config without paths that only
    place files (the FID statistics cache, output directories)."""
    from dpt_engine.config.base import to_dict
    from dpt_engine.config.presets import resolve_config
    from dpt_engine.utils.io import stable_hash

    d = to_dict(resolve_config(preset, overrides=overrides))
    d.get("sample", {}).pop("fid_cache", None)
    d.get("sample", {}).pop("output_dir", None)
    return stable_hash(d)


def _record(
    run: dict[str, Any],
    extra: list[str],
    report: dict[str, Any],
    seconds: float,
    preset: str,
    threads: int | None = None,
) -> dict[str, Any]:
    """One results row: the run's identity, its config overrides and its report's metrics, the wall
    time of each stage, the machine and torch threads it ran with and the commit of the code that
    wrote it (a benchmark spanning sittings may run on different machines)."""
    import torch

    from ..harness import commit_hash, device_name

    return {
        "name": run["name"],
        "kind": run["kind"],
        "labels_per_class": run["labels_per_class"],
        "seed": run["seed"],
        "preset": preset,
        "overrides": [o for o in run["overrides"] + extra if not o.startswith("sample.fid_cache=")],
        "config_digest": config_digest(preset, run["overrides"] + extra),
        "metrics": report["metrics"],
        **_report_extras(report),
        "wall_time_s": report["wall_time_s"],
        "wall_time_this_call_s": seconds,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "device": device_name(),
        "commit": commit_hash(),
    }


def _report_extras(report: dict[str, Any]) -> dict[str, Any]:
    """What a record takes from its run's report besides the metrics: the paired 95% interval of
    the stage-3 gain over the test images, and their number."""
    return {
        "stage3_gain_ci95": (report.get("stage3", {}).get("gain_stats") or {}).get("ci95"),
        "num_eval": report.get("num_eval"),
    }


def run_record_path(results: Path, name: str, run: dict[str, Any]) -> Path:
    """Each finished run's record, committed as it arrives (``<results>/<name>_runs/<run>.json``)."""
    return results / f"{name}_runs" / f"{run['name']}.json"


def _committed_record(
    path: Path, preset: str, run: dict[str, Any], extra: list[str], report_path: Path
) -> dict[str, Any] | None:
    """A record committed by an earlier sitting (maybe on another machine) for exactly this config,
    or for the run whose ``report.json`` is at ``report_path`` (the same metrics). A record written
    before records carried the gain's interval and the test-split size gets both from that report
    where the run directory is still here."""
    from dpt_engine.utils.io import read_json

    if not path.is_file():
        return None
    rec = read_json(path)
    report = read_json(report_path) if report_path.is_file() else None
    if rec.get("config_digest") != config_digest(preset, run["overrides"] + extra):
        # the resolved config changed shape since (a renamed key, a new default): the record still
        # stands for the run directory it was read from, when that run's report gives the same metrics
        if report is None or report.get("metrics") != rec.get("metrics"):
            return None  # the preset or the overrides changed since: run it again
    if "num_eval" not in rec and report is not None:
        rec = {**rec, **_report_extras(report)}
    return rec


def _other_records(results: Path, name: str, planned: set[str]) -> list[dict[str, Any]]:
    """The committed records under ``<results>/<name>_runs/`` of runs outside ``planned``."""
    from dpt_engine.utils.io import read_json

    folder = results / f"{name}_runs"
    if not folder.is_dir():
        return []
    return [read_json(p) for p in sorted(folder.glob("*.json")) if p.stem not in planned]


def _record_order(rec: dict[str, Any]) -> tuple:
    """DPT runs by k and seed, then stage-1-only seeds, the reference generators, the ablations."""
    kinds = ("dpt", "stage1-only", "reference-true", "reference-none", "ablation-no-pseudo")
    rank = kinds.index(rec["kind"]) if rec["kind"] in kinds else len(kinds)
    return rank, rec.get("labels_per_class") or 0, rec.get("seed") or 0, rec["name"]


def _finished_record(run: dict[str, Any], out: Path, extra: list[str], preset: str) -> dict[str, Any] | None:
    """The record of a run that already finished all its stages (from its report.json), else None."""
    from dpt_engine.utils.io import read_json

    path = out / run["name"] / "report.json"
    if not path.is_file():
        return None
    report = read_json(path)
    if not set(run["stages"]) <= set(report.get("stages_run", [])):
        return None
    return _record(
        run, extra, report, 0.0, preset, threads=report.get("environment", {}).get("torch_threads")
    )


def _run_one(run: dict[str, Any], out: Path, preset: str, extra: list[str], progress: bool) -> dict[str, Any]:
    from dpt_engine.config.presets import resolve_config
    from dpt_engine.pipeline import run_pipeline

    cfg = resolve_config(preset, overrides=run["overrides"] + extra)
    if run.get("parent"):
        link_parent(out / run["parent"], out / run["name"])
    t0 = time.perf_counter()
    report = run_pipeline(cfg, out / run["name"], stages=run["stages"], progress=progress)
    return _record(run, extra, report, time.perf_counter() - t0, preset)


def link_parent(
    parent: Path, run_dir: Path, stages: tuple[str, ...] = ("stage1", "stage2", "sample")
) -> None:
    """A run that reuses another run's finished ``stages`` (symlinks; by default stage 1, stage 2
    and the samples): an ablation, a candidate of the stage-3 sweep."""
    for stage in stages:
        if not (parent / stage / "done.json").is_file():
            raise RuntimeError(f"{parent.name} has not finished {stage}: run it before its ablation")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        link = run_dir / stage
        if not link.exists():
            link.symlink_to(Path("..") / parent.name / stage, target_is_directory=True)


def _mean_std(xs: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
        "values": xs,
    }


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean / sample std / n over seeds for every k, and the reference FIDs."""
    by_k: dict[int, dict[str, Any]] = {}
    for k in sorted({r["labels_per_class"] for r in records if r["labels_per_class"] is not None}):
        rs = [r for r in records if r["labels_per_class"] == k and r["kind"] in ("dpt", "stage1-only")]
        abl = {
            r["seed"]: r for r in records if r["labels_per_class"] == k and r["kind"] == "ablation-no-pseudo"
        }

        def col(key: str, rs=rs) -> list[float]:
            return [r["metrics"][key] for r in rs if r["metrics"].get(key) is not None]

        entry: dict[str, Any] = {}
        for key, label in (
            ("stage1.top1", "stage1_top1"),
            ("pseudo_labels.accuracy", "pseudo_label_accuracy"),
            ("generation.fid", "fid_pseudo"),
            ("stage3.top1", "stage3_top1"),
            ("stage3.gain", "stage3_gain"),
        ):
            xs = col(key)
            if xs:
                entry[label] = _mean_std(xs)
        # the ablation (same stage 1, no pseudo images) and the pseudo images' own effect, paired by seed
        no_pseudo, effect = [], []
        for r in rs:
            a = abl.get(r.get("seed"))
            if r["kind"] == "dpt" and a is not None and a["metrics"].get("stage3.top1") is not None:
                no_pseudo.append(a["metrics"]["stage3.top1"])
                if r["metrics"].get("stage3.top1") is not None:
                    effect.append(r["metrics"]["stage3.top1"] - a["metrics"]["stage3.top1"])
        if no_pseudo:
            entry["stage3_top1_no_pseudo"] = _mean_std(no_pseudo)
        if effect:
            entry["pseudo_image_effect"] = _mean_std(effect)
        by_k[k] = entry
    refs = {
        r["kind"].removeprefix("reference-"): r["metrics"].get("generation.fid")
        for r in records
        if r["kind"].startswith("reference-")
    }
    return {"by_labels_per_class": by_k, "reference_fid": refs}


def _fmt(e: dict[str, Any] | None, digits: int = 1) -> str:
    if not e:
        return "-"
    if e["std"] is None:
        return f"{e['mean']:.{digits}f} (n=1)"
    return f"{e['mean']:.{digits}f} +- {e['std']:.{digits}f} (n={e['n']})"


# test-split sizes of the presets, for records written before they carried num_eval
_TEST_IMAGES = {"fashion-mnist": 10000, "digits": 500}


def _per_run_table(records: list[dict[str, Any]]) -> list[str]:
    """Every DPT run on its own: the values behind the means, with the gain's paired interval."""
    rows = [r for r in records if r["kind"] == "dpt"]
    if not rows:
        return []
    abl = {(r["labels_per_class"], r["seed"]): r for r in records if r["kind"] == "ablation-no-pseudo"}
    out = [
        "",
        "Per run (gain with its paired 95% interval over the test images; wall time of the four stages):",
        "",
        "| run | stage-1 top-1 (%) | FID | stage-3 top-1 (%) | gain (points) | without pseudo images (%) "
        "| wall time (min) | threads | machine | commit |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["labels_per_class"], r["seed"])):
        m = r["metrics"]

        def f(key: str, digits: int = 1, m=m) -> str:
            v = m.get(key)
            return "-" if v is None else f"{v:.{digits}f}"

        gain = "-" if m.get("stage3.gain") is None else f"{m['stage3.gain']:+.1f}"
        ci = r.get("stage3_gain_ci95")
        if ci and gain != "-":
            gain += f" ({ci[0]:+.1f}..{ci[1]:+.1f})"
        a = abl.get((r["labels_per_class"], r["seed"]))
        no_pseudo = (
            "-"
            if a is None or a["metrics"].get("stage3.top1") is None
            else f"{a['metrics']['stage3.top1']:.1f}"
        )
        wall = sum(r["wall_time_s"].values()) / 60
        out.append(
            f"| {r['name']} | {f('stage1.top1')} | {f('generation.fid')} | {f('stage3.top1')} | {gain} "
            f"| {no_pseudo} | {wall:.1f} | {r.get('threads', '-')} | {_cpu(r.get('device'))} | {r.get('commit', '-')} |"
        )
    notes = [f"- {r['name']}: {r['note']}" for r in sorted(rows, key=lambda r: r["name"]) if r.get("note")]
    return out + (["", "Notes on single runs:", "", *notes] if notes else [])


def _cpu(device: str | None) -> str:
    """The machine without the thread count (a column of its own)."""
    return "-" if not device else device.split(" (")[0]


def _machines(records: list[dict[str, Any]], fallback: str) -> str:
    """Which machines the runs ran on, with how many runs each (records older than the device field
    count under none): a benchmark resumed on another machine must not be credited to the last one."""
    from collections import Counter

    seen = Counter(r["device"] for r in records if r.get("device"))
    if not seen:
        return fallback
    parts = [f"{d}: {n} run{'s' * (n != 1)}" for d, n in seen.most_common()]
    unknown = sum(1 for r in records if not r.get("device"))
    return "; ".join(parts + ([f"machine not recorded: {unknown}"] if unknown else []))


def markdown(agg: dict[str, Any], meta: dict[str, Any]) -> str:
    dataset = {"fashion-mnist": "Fashion-MNIST", "digits": "digits"}.get(meta["preset"], meta["preset"])
    n_eval = {r.get("num_eval") for r in meta.get("records", []) if r.get("num_eval")}
    n_test = n_eval.pop() if len(n_eval) == 1 else _TEST_IMAGES.get(meta["preset"])
    split = f"test split of {n_test:,} images" if n_test else "the preset's test split"
    if n_test:
        split += f" (one image = {100 / n_test:.2g} points)"
    lines = [
        f"# Quality benchmark: DPT on {dataset}",
        "",
        f"Scale `{meta['scale']}`, preset `{meta['preset']}`, "
        f"{_machines(meta.get('records', []), meta['device'])} (runs and their ablations), tables built "
        f"by commit {meta['commit']}, total wall time of the runs {meta['total_wall_time_s'] / 3600:.2f} h.",
        "",
    ]
    if not meta.get("complete", True):
        lines += [f"**Incomplete**: not yet run: {', '.join(meta.get('missing', [])) or '?'}.", ""]
    lines += [
        f"Mean +- sample standard deviation over label seeds (n = seeds); {split}.",
        "",
        "| labels/class | stage-1 top-1 (%) | pseudo-label acc. (%) | FID (pseudo-label model) "
        "| stage-3 top-1 (%) | stage-3 gain (points) | stage 3 without pseudo images (%) "
        "| pseudo images' own effect (points) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, e in agg["by_labels_per_class"].items():
        lines.append(
            f"| {k} | {_fmt(e.get('stage1_top1'))} | {_fmt(e.get('pseudo_label_accuracy'))} "
            f"| {_fmt(e.get('fid_pseudo'), 2)} | {_fmt(e.get('stage3_top1'))} | {_fmt(e.get('stage3_gain'))} "
            f"| {_fmt(e.get('stage3_top1_no_pseudo'))} | {_fmt(e.get('pseudo_image_effect'))} |"
        )
    lines += [
        "",
        "Stage 3 starts from stage 1's weights and trains `stage3.steps` more steps; the ablation runs exactly that "
        "with `stage3.pseudo_weight=0` (no pseudo images) on the same stage 1, so the last column is what "
        "the pseudo images themselves add (paired by seed).",
    ]
    lines += _per_run_table(meta.get("records", []))
    refs = agg["reference_fid"]
    if refs:
        true_fid = refs.get("true")
        lines += [
            "",
            "| diffusion model trained on | FID | / true-label FID |",
            "| --- | --- | --- |",
        ]
        for k, e in agg["by_labels_per_class"].items():
            if e.get("fid_pseudo"):
                ratio = f"{e['fid_pseudo']['mean'] / true_fid:.2f}" if true_fid else "-"
                lines.append(
                    f"| pseudo-labels from {k} label(s)/class | {_fmt(e['fid_pseudo'], 2)} | {ratio} |"
                )
        for src, fid in refs.items():
            name = {"true": "true labels (fully supervised)", "none": "no labels (unconditional)"}.get(
                src, src
            )
            ratio = f"{fid / true_fid:.2f}" if (fid is not None and true_fid) else "-"
            lines.append(f"| {name} | {'-' if fid is None else f'{fid:.2f}'} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(agg: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpt_engine.utils.io import atomic_path

    ks = list(agg["by_labels_per_class"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    width = 0.38
    for j, (key, label) in enumerate((("stage1_top1", "stage 1"), ("stage3_top1", "stage 3 (DPT)"))):
        means = [agg["by_labels_per_class"][k].get(key, {}).get("mean", math.nan) for k in ks]
        errs = [agg["by_labels_per_class"][k].get(key, {}).get("std") or 0.0 for k in ks]
        xs = [i + (j - 0.5) * width for i in range(len(ks))]
        bars = axes[0].bar(xs, means, width, yerr=errs, capsize=3, label=label)
        axes[0].bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=2, fontsize=8)
    axes[0].set_xticks(range(len(ks)), [f"{k} label(s)/class" for k in ks])
    axes[0].set_ylabel("test top-1 (%)")
    axes[0].legend(loc="lower right")
    axes[0].set_title("Classifier: stage 1 vs stage 3")
    names, fids = [], []
    for k in ks:
        e = agg["by_labels_per_class"][k].get("fid_pseudo")
        if e:
            names.append(f"pseudo ({k}/cls)")
            fids.append(e["mean"])
    for src, fid in agg["reference_fid"].items():
        if fid is not None:
            names.append({"true": "true labels", "none": "unconditional"}.get(src, src))
            fids.append(fid)
    if fids:
        bars = axes[1].bar(names, fids, color="#55A868")
        axes[1].bar_label(bars, labels=[f"{f:.1f}" for f in fids], padding=2, fontsize=8)
        axes[1].tick_params(axis="x", labelrotation=15, labelsize=8)
    axes[1].set_ylabel("FID (lower is better)")
    axes[1].set_title("Diffusion model by label source")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quality", help="parent of the per-run directories")
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--labels", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="label seeds running the full pipeline"
    )
    p.add_argument(
        "--classifier-only-seeds",
        type=int,
        nargs="*",
        default=[],
        help="extra seeds running stage 1 only",
    )
    p.add_argument("--no-references", action="store_true", help="skip the true-label / unconditional models")
    p.add_argument(
        "--no-ablations",
        action="store_true",
        help="skip the stage-3 runs without pseudo images (stage3.pseudo_weight=0 on each DPT run's stage 1)",
    )
    p.add_argument(
        "--scale",
        choices=("preset", "smoke"),
        default="preset",
        help="preset: the preset exactly as a user runs it (the published numbers); smoke: a shrunk check",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--results", default=str(RESULTS_DIR), help="where the JSON / markdown / PNG go")
    p.add_argument("--name", default="quality_fashion_mnist", help="file stem of the results")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--no-run",
        action="store_true",
        help="run nothing: write the results of the planned runs that already finished (report.json), "
        "listing the others as missing",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each in its own process with cpu_count/jobs torch threads (on 2 cores "
        "two one-thread runs train ~1.05-1.2x faster than one two-thread run); progress bars are off",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dpt_engine.cli import set_process_defaults

    set_process_defaults()  # what `dpt` sets (passive OpenMP waits), before torch loads
    import torch

    from dpt_engine.utils.io import atomic_write_json, atomic_write_text

    from ..harness import commit_hash, device_name

    commit_hash()  # the code this process loaded: records written hours later name it, not a later HEAD
    out, results = Path(args.out), Path(args.results)
    # every run uses the same real images for FID: their Inception statistics are computed once
    extra = [f"sample.fid_cache={(out / 'fid_cache').resolve()}"]
    extra += {"preset": [], "smoke": SMOKE_OVERRIDES}[args.scale]
    extra += list(args.set)
    runs = plan_runs(
        args.labels, args.seeds, args.classifier_only_seeds, not args.no_references, not args.no_ablations
    )
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    device = device_name()
    command = " ".join(["python -m benchmarks.quality.run_quality", *(argv or sys.argv[1:])])
    done: dict[int, dict[str, Any]] = {}
    failed: list[str] = []

    def write_results() -> dict[str, Any]:
        # the results describe the whole benchmark: runs of earlier sittings outside this call's
        # plan (another k or seed) stay in the tables, from their committed records
        records = sorted(
            [done[i] for i in done] + _other_records(results, args.name, {r["name"] for r in runs}),
            key=_record_order,
        )
        agg = aggregate(records)
        meta = {
            "scale": args.scale,
            "preset": args.preset,
            "device": device,
            "commit": commit_hash(),
            "torch": torch.__version__,
            "jobs": args.jobs,
            "total_wall_time_s": sum(sum(r["wall_time_s"].values()) for r in records),
            "command": command,
            "complete": len(done) == len(runs),
            "missing": [r["name"] for i, r in enumerate(runs) if i not in done],
        }
        # rewritten after every run, so an interrupted benchmark keeps what it finished
        atomic_write_json(results / f"{args.name}.json", {"meta": meta, "aggregate": agg, "runs": records})
        md = markdown(agg, {**meta, "records": records})
        atomic_write_text(results / f"{args.name}.md", md)
        plot(agg, results / f"{args.name}.png")
        return md

    def finish(i: int, rec: dict[str, Any]) -> str:
        done[i] = rec
        atomic_write_json(run_record_path(results, args.name, runs[i]), rec)
        return write_results()

    for i, run in enumerate(runs):  # finished in an earlier sitting: not recomputed
        report_path = out / run["name"] / "report.json"
        rec = _committed_record(
            run_record_path(results, args.name, run), args.preset, run, extra, report_path
        )
        if rec is not None:
            done[i] = rec
            print(f"[quality] {run['name']}: committed result reused", flush=True)
    todo = [i for i in range(len(runs)) if i not in done]

    table = write_results() if done else ""
    if args.no_run:  # aggregate what finished; the rest is listed as missing
        for i in todo:
            rec = _finished_record(runs[i], out, extra, args.preset)
            if rec is not None:
                done[i] = rec
        table = write_results()
    elif args.jobs == 1:
        for i in todo:
            run = runs[i]
            print(
                f"[quality] run {i + 1}/{len(runs)}: {run['name']} ({', '.join(run['stages'])})", flush=True
            )
            table = finish(i, _run_one(run, out, args.preset, extra, progress=not args.no_progress))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        print(
            f"[quality] {len(runs)} runs, {args.jobs} at a time with {threads} torch thread(s) each",
            flush=True,
        )
        with ProcessPoolExecutor(
            args.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_set_threads,
            initargs=(threads,),
        ) as pool:
            # ablations reuse their DPT run's stages: they start once every other run is done
            for phase in (
                [i for i in todo if not runs[i].get("parent")],
                [i for i in todo if runs[i].get("parent")],
            ):
                futures = {pool.submit(_run_one, runs[i], out, args.preset, extra, False): i for i in phase}
                for fut in as_completed(futures):
                    i = futures[fut]
                    try:
                        rec = fut.result()
                    except Exception as e:  # the other runs go on; the run's own log.txt has the traceback
                        failed.append(runs[i]["name"])
                        print(
                            f"[quality] {runs[i]['name']} FAILED: {type(e).__name__}: {e}",
                            file=sys.stderr,
                            flush=True,
                        )
                        continue
                    table = finish(i, rec)
                    print(
                        f"[quality] finished {runs[i]['name']} ({len(done)}/{len(runs)}) in "
                        f"{rec['wall_time_this_call_s']:.0f} s",
                        flush=True,
                    )
    print(table)
    if failed:
        print(f"[quality] failed runs: {', '.join(failed)} (see <out>/<run>/log.txt)", file=sys.stderr)
        return 1
    return 0


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


if __name__ == "__main__":
    raise SystemExit(main())
