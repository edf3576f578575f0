"""The run report: ``report.json`` (machine-readable), ``report.md`` and PNG plots."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .utils.io import atomic_path, atomic_write_json, atomic_write_text, read_json

log = logging.getLogger("dpt_engine")

__all__ = ["plot_history", "write_report"]


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj


def plot_history(history: list[dict], path: Path, title: str) -> bool:
    """Loss and test-accuracy curves of a classifier fit, as one PNG. False if nothing to plot."""
    rows = [r for r in history if "step" in r]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [(r["step"], r["test_top1"]) for r in rows if r.get("test_top1") is not None]
    mask = [(r["step"], 100 * r["mask_rate"]) for r in rows if r.get("mask_rate") is not None]
    panels = 2 if (acc or mask) else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax1 = axes[0, 0]
    for key, label in (("loss", "total"), ("loss_x", "labeled"), ("loss_u", "unlabeled")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title(f"{title}: training loss")
    if panels == 2:
        ax2 = axes[0, 1]
        if acc:
            ax2.plot(*zip(*acc), marker="o", label="test top-1 (EMA)")
        if mask:
            ax2.plot(*zip(*mask), alpha=0.6, label="pseudo-label mask rate (%)")
        ax2.set_xlabel("step")
        ax2.set_ylabel("%")
        ax2.legend()
        ax2.set_title(f"{title}: accuracy")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def _plot_per_class(per_class: dict[str, Any], path: Path, title: str) -> bool:
    items = [(k, v) for k, v in per_class.items() if v is not None]
    if not items:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(items)), 3.4))
    names, vals = zip(*items)
    ax.bar(range(len(vals)), vals, color="tab:blue")
    ax.set_xticks(range(len(vals)), names, rotation=45 if len(names) > 10 else 0, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def _gain(s3: dict[str, Any]) -> str:
    """The stage-3 gain with the noise it carries (a paired 95% interval over the test images)."""
    st = s3.get("gain_stats")
    if not st:
        return _fmt(s3.get("gain"))
    lo, hi = st["ci95"]
    return (
        f"{st['gain']:+.2f} (95% interval {lo:+.2f} to {hi:+.2f}; stage 3 alone right on "
        f"{st['only_new_right']}, stage 1 alone on {st['only_old_right']} of {st['num_images']} images; "
        f"one image = {st['one_image_points']:.2f} points)"
    )


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_report(out: Path, results: dict[str, Any], config: dict[str, Any], env: dict[str, Any]) -> dict:
    """Write report.json / report.md / plots from the stage results (dicts of StageResult)."""
    stages = {name: r for name, r in results.items() if r is not None}
    s1 = stages.get("stage1").summary if "stage1" in stages else {}
    s2 = stages.get("sample").summary if "sample" in stages else {}
    s3 = stages.get("stage3").summary if "stage3" in stages else {}
    pl = s1.get("pseudo_labels", {})
    report: dict[str, Any] = {
        "preset": config.get("preset"),
        "dataset": config.get("data", {}).get("name"),
        # from stage 1, or from stage 3 where only it ran (its stage 1 from an earlier call)
        "eval_split": s1.get("dataset", {}).get("eval_split") or s3.get("eval_split", "test"),
        "num_eval": s1.get("num_test", s3.get("num_eval")),
        "unreadable_files": (s1.get("dataset") or {}).get("unreadable_files", {}).get("count", 0),
        "stage1": {
            "top1": s1.get("top1"),
            "learner": s1.get("learner"),
            "num_labeled": s1.get("num_labeled"),
        },
        "pseudo_labels": {
            "accuracy": pl.get("accuracy"),
            "mean_confidence": pl.get("mean_confidence"),
            "per_class_accuracy": pl.get("per_class_accuracy"),
            "per_class_count": pl.get("per_class_count"),
        },
        "generation": {k: s2.get(k) for k in ("fid", "kid", "num_images", "images_per_class")} if s2 else {},
        "stage3": {
            "top1": s3.get("top1"),
            "gain": s3.get("gain"),
            "gain_stats": s3.get("gain_stats"),
            "num_pseudo": s3.get("num_pseudo"),
            "pseudo_stage1_agreement": s3.get("pseudo_stage1_agreement"),
            "pseudo_kept": s3.get("pseudo_kept"),
            "what_stage3_did": s3.get("what_stage3_did"),
        },
        "wall_time_s": {name: r.wall_time_s for name, r in stages.items()},
        "skipped": {name: r.skipped for name, r in stages.items()},
        "stages_run": list(stages),
        "environment": env,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if s3.get("top1") is None and "stage3" not in stages:
        report["stage3"]["note"] = results.get("_stage3_note", "stage 3 did not run")
    flat: dict[str, Any] = {}
    for key in ("stage1", "pseudo_labels", "generation", "stage3", "wall_time_s"):
        _flatten(key, {k: v for k, v in report[key].items() if not isinstance(v, dict)}, flat)
    report["metrics"] = flat

    plots = out / "plots"
    made = []
    for name in ("stage1", "stage2", "stage3"):
        hist = out / name / "history.json"
        if hist.is_file() and plot_history(read_json(hist), plots / f"{name}_curves.png", name):
            made.append(f"plots/{name}_curves.png")
    if pl.get("per_class_accuracy") and _plot_per_class(
        pl["per_class_accuracy"], plots / "pseudo_label_accuracy.png", "Pseudo-label accuracy per class"
    ):
        made.append("plots/pseudo_label_accuracy.png")
    for extra in ("sample/sample_grid.png",):
        if (out / extra).is_file():
            made.append(extra)
    report["plots"] = made
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _markdown(report, results.get("_stage3_note")))
    return report


def _markdown(r: dict[str, Any], note: str | None) -> str:
    lines = [
        f"# DPT run report: preset `{r['preset']}` ({r['dataset']})",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| stage 1 top-1 (%) | {_fmt(r['stage1']['top1'])} |",
        f"| pseudo-label accuracy (%) | {_fmt(r['pseudo_labels']['accuracy'])} |",
        f"| generation FID | {_fmt(r['generation'].get('fid'))} |",
        f"| stage 3 top-1 (%) | {_fmt(r['stage3']['top1'])} |",
        f"| gain over stage 1 (points) | {_gain(r['stage3'])} |",
        f"| evaluated on | {r.get('eval_split', 'test')} split ({_fmt(r.get('num_eval'))} images) |",
        *(
            [f"| unreadable image files skipped | {r['unreadable_files']} (listed in stage1/summary.json) |"]
            if r.get("unreadable_files")
            else []
        ),
        "",
        "## Wall time",
        "",
        "| stage | seconds | skipped (up to date) |",
        "| --- | --- | --- |",
    ]
    for name, secs in r["wall_time_s"].items():
        lines.append(f"| {name} | {secs:.1f} | {r['skipped'].get(name)} |")
    if r["stage3"].get("what_stage3_did"):
        lines += ["", "## Stage 3", "", r["stage3"]["what_stage3_did"]]
    if note:
        lines += ["", f"> {note}"]
    if r["plots"]:
        lines += ["", "## Plots", ""]
        lines += [f"![{p}]({p})" for p in r["plots"]]
    env = r["environment"]
    lines += [
        "",
        f"Environment: torch {env.get('torch')}, device {env.get('device')}, Python {env.get('python')}.",
    ]
    return "\n".join(lines) + "\n"
