"""Why does stage 3 gain (or not)? Diagnostics for the quality benchmark's finished runs.

For every run directory of ``run_quality`` (``<out>/k{k}_s{s}`` with a sample, and the
``true_labels`` reference) this measures, with an *oracle* classifier (the same ``cnn-small``
trained fully supervised on all 60,000 true Fashion-MNIST labels, cached in ``<out>/oracle``):

* class fidelity of the generated images: the share the oracle assigns to the class they were
  generated for (how many of stage 3's extra labeled images carry the right label), overall and
  per class; for the true-label model this is the ceiling the generator itself allows;
* how often a generated image the oracle puts in another class is put there by the stage-1
  classifier too (the generator reproducing stage 1's confusions: stage 3 cannot fix those);
* stage-1 and stage-3 test top-1 per class (where stage 3 gains and where it loses).

Writes ``<results>/quality_fashion_mnist_diagnosis.{json,md,png}``.

    python -m benchmarks.quality.diagnose --out runs/quality
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

__all__ = ["build_parser", "diagnose_run", "main", "merge_earlier", "train_oracle"]

# what must match for an earlier sitting's diagnosis to share a table with this one's
_ORACLE_KEYS = ("backbone", "dataset", "num_train", "steps", "batch_size")


def _per_class_acc(pred: np.ndarray, true: np.ndarray, num_classes: int) -> list[float]:
    return [
        float((pred[true == c] == c).mean() * 100.0) if (true == c).any() else float("nan")
        for c in range(num_classes)
    ]


def train_oracle(
    out: Path, preset: str, steps: int, progress: bool
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The fully supervised classifier on every true label (resumable in ``out/oracle``)."""
    from dpt_engine.config.presets import resolve_config
    from dpt_engine.data import build_splits
    from dpt_engine.ssl import ClassifierData
    from dpt_engine.ssl.trainer import fit_classifier

    cfg = resolve_config(preset, overrides=["data.labels_per_class=1"])
    splits = build_splits(cfg.data)
    ccfg = cfg.stage1
    ccfg.learner, ccfg.steps, ccfg.batch_size = "supervised", steps, 128
    ccfg.precision = "fp32"  # a fixed reference: the preset's classifier precision must not move it
    ccfg.eval_every = ccfg.checkpoint_every = max(1, steps // 4)
    data = ClassifierData(
        labeled=splits.train,
        labeled_idx=np.arange(len(splits.train)),
        unlabeled=None,
        unlabeled_idx=None,
        test=splits.test,
        num_classes=splits.num_classes,
    )
    res = fit_classifier(ccfg, data, out / "oracle", torch.device("cpu"), seed=0, progress=progress)
    info = {"test_top1": float(res.test_top1), "num_train": len(splits.train), "dataset": splits.name}
    return res.model, {**info, "steps": steps, "batch_size": 128, "backbone": ccfg.backbone}


def diagnose_run(run_dir: Path, oracle: torch.nn.Module) -> dict[str, Any]:
    """Class fidelity of a run's generated images and per-class stage-1 / stage-3 test accuracy."""
    from dpt_engine.config.presets import resolve_config
    from dpt_engine.data import build_splits
    from dpt_engine.ssl.trainer import predict_proba
    from dpt_engine.stages.artifacts import load_classifier
    from dpt_engine.stages.stage3 import load_pseudo_images

    cfg = resolve_config(config_file=str(run_dir / "config.yaml"))
    splits = build_splits(cfg.data)
    nc = splits.num_classes
    shape = (nc, splits.channels, splits.image_size)
    pseudo_dir = Path(cfg.sample.output_dir) if cfg.sample.output_dir else run_dir / "sample" / "samples"
    pseudo = load_pseudo_images(pseudo_dir, splits)
    intended = pseudo.labels.numpy()
    oracle_pred = predict_proba(oracle, pseudo).argmax(1).numpy()
    rec: dict[str, Any] = {
        "run": run_dir.name,
        "num_generated": len(pseudo),
        "class_fidelity": float((oracle_pred == intended).mean() * 100.0),
        "class_fidelity_per_class": _per_class_acc(oracle_pred, intended, nc),
    }
    test_labels = splits.test.labels.numpy()
    s1_dir = run_dir / "stage1"
    if (s1_dir / "model.pt").is_file():
        s1 = load_classifier(cfg.stage1, s1_dir, *shape, cfg.run.seed, torch.device("cpu"))
        s1_pseudo = predict_proba(s1, pseudo).argmax(1).numpy()
        wrong = oracle_pred != intended
        rec["stage1_agrees_with_label"] = float((s1_pseudo == intended).mean() * 100.0)
        # of the off-class images: the share the stage-1 classifier *also* puts in the intended class
        rec["off_class_that_stage1_calls_intended"] = (
            float((s1_pseudo[wrong] == intended[wrong]).mean() * 100.0) if wrong.any() else None
        )
        s1_test = predict_proba(s1, splits.test).argmax(1).numpy()
        rec["stage1_test_top1"] = float((s1_test == test_labels).mean() * 100.0)
        rec["stage1_test_per_class"] = _per_class_acc(s1_test, test_labels, nc)
    s3_dir = run_dir / "stage3"
    if (s3_dir / "model.pt").is_file():
        s3 = load_classifier(cfg.stage3, s3_dir, *shape, cfg.run.seed, torch.device("cpu"))
        s3_test = predict_proba(s3, splits.test).argmax(1).numpy()
        rec["stage3_test_top1"] = float((s3_test == test_labels).mean() * 100.0)
        rec["stage3_test_per_class"] = _per_class_acc(s3_test, test_labels, nc)
    rec.update(_label_precision(s1_dir / "pseudo_labels.npz", nc))
    rec["classes"] = list(splits.classes)
    return rec


def _label_precision(path: Path, nc: int, thresholds: tuple[float, ...] = (0.0, 0.95)) -> dict[str, Any]:
    """What stage 2 is conditioned on: per class, the share of the training images stage 1 labels
    c that truly are c (the stage-1 pseudo-labels' precision, from the training set's labels), for
    all images and for those above a confidence threshold (``stage2.confidence_threshold``).
    Diagnosis only: nothing is chosen from it."""
    if not path.is_file():
        return {}
    z = np.load(path)
    label, conf, true = z["label"], z["confidence"], z["true_label"]
    out: dict[str, Any] = {"label_precision": {}}
    for th in thresholds:
        keep = conf >= th
        prec = [float((true[keep & (label == c)] == c).mean() * 100.0) if (keep & (label == c)).any()
                else float("nan") for c in range(nc)]  # fmt: skip
        out["label_precision"][f"{th:g}"] = {"kept": float(keep.mean() * 100.0), "per_class": prec}
    return out


def checkpoint_sweep(
    run_dir: Path, oracle: torch.nn.Module, work: Path, per_class: int
) -> list[dict[str, Any]]:
    """Class fidelity of images sampled from each kept stage-2 checkpoint (EMA weights) of a run:
    does the generator's class fidelity still rise with training at the end of the schedule?"""
    from dpt_engine.config.presets import resolve_config
    from dpt_engine.data import build_splits
    from dpt_engine.pipeline import run_pipeline
    from dpt_engine.ssl.trainer import predict_proba
    from dpt_engine.stages.stage3 import load_pseudo_images

    ckpts = sorted((run_dir / "stage2" / "checkpoints").glob("step-*/model_optim.pt"))
    rows = []
    for ck in ckpts:
        step = int(ck.parent.name.split("-")[1])
        out = work / run_dir.name / f"step-{step:08d}"
        overrides = [
            f"sample.checkpoint={ck.resolve()}",
            f"sample.images_per_class={per_class}",
            "sample.fid=false",
            f"sample.output_dir={(out / 'samples').resolve()}",
        ]
        cfg = resolve_config(config_file=str(run_dir / "config.yaml"), overrides=overrides)
        run_pipeline(cfg, out, stages=["sample"], progress=False)
        splits = build_splits(cfg.data)
        images = load_pseudo_images(out / "samples", splits)
        pred = predict_proba(oracle, images).argmax(1).numpy()
        fid = float((pred == images.labels.numpy()).mean() * 100.0)
        print(f"[diagnose] {run_dir.name} stage-2 step {step}: class fidelity {fid:.1f}%", flush=True)
        rows.append({"run": run_dir.name, "step": step, "num_images": len(images), "class_fidelity": fid})
    return rows


def _run_order(name: str) -> tuple[int, int, int, str]:
    """k1_s0 < k1_s2 < k2_s0 < ... < the references (by name)."""
    import re

    m = re.fullmatch(r"k(\d+)_s(\d+)", name)
    return (0, int(m.group(1)), int(m.group(2)), "") if m else (1, 0, 0, name)


def merge_earlier(
    earlier: dict[str, Any] | None,
    oracle: dict[str, Any],
    recs: list[dict[str, Any]],
    sweep: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """Keep the committed diagnosis of runs whose directories are not here (an earlier sitting,
    maybe on another machine): the diagnosis, like the benchmark, describes every finished run, and
    a fresh checkout must not drop what it cannot recompute. Records diagnosed here replace the
    earlier ones of the same run. Every record names the test top-1 of the oracle that measured it
    (``oracle_test_top1``): the same oracle recipe trained on another CPU lands a few tenths of a
    point apart. Earlier records of another oracle *recipe* (backbone, steps, ...) are left out, and
    the returned note says so."""

    def ordered(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(rs, key=lambda r: _run_order(r["run"]))

    here = [{**r, "oracle_test_top1": r.get("oracle_test_top1", oracle["test_top1"])} for r in recs]
    if not earlier or not earlier.get("runs"):
        return ordered(here), sweep, None
    old = earlier.get("oracle", {})
    names = {r["run"] for r in here}
    kept = [
        {**r, "oracle_test_top1": r.get("oracle_test_top1", old.get("test_top1"))}
        for r in earlier["runs"]
        if r["run"] not in names
    ]
    if not all(old.get(k) == oracle.get(k) for k in _ORACLE_KEYS):
        note = (
            f"earlier diagnosis of {', '.join(r['run'] for r in kept) or 'no other run'} left out: its oracle "
            f"recipe ({', '.join(f'{k}={old.get(k)}' for k in _ORACLE_KEYS)}) differs from this one"
        )
        return ordered(here), sweep, note
    swept = {r["run"] for r in sweep}
    old_sweep = [r for r in earlier.get("checkpoint_sweep", []) if r["run"] not in swept]
    note = f"kept the earlier diagnosis of {', '.join(r['run'] for r in kept)}" if kept else None
    return ordered(here + kept), old_sweep + sweep, note


def markdown(oracle: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    lines = [
        "# Quality benchmark diagnosis: what stage 3 is trained on",
        "",
        f"Oracle: {oracle['backbone']} trained on all {oracle['num_train']:,} true {oracle['dataset']} labels "
        f"({oracle['steps']} steps at batch {oracle['batch_size']}), test top-1 {oracle['test_top1']:.1f}%"
        + (f" on {oracle['device']}" if oracle.get("device") else "")
        + ". Each row names the test top-1 of the oracle that measured it: runs diagnosed in an earlier "
        "sitting keep that sitting's oracle (the same recipe on another CPU lands a few tenths apart).",
        "",
        "| run | generated | class fidelity (oracle, %) | stage-1 agrees with label (%) "
        "| off-class images stage 1 also calls the intended class (%) | stage-1 top-1 | stage-3 top-1 "
        "| oracle top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.1f}"

    for r in recs:
        lines.append(
            f"| {r['run']} | {r['num_generated']} | {f(r['class_fidelity'])} | {f(r.get('stage1_agrees_with_label'))} "
            f"| {f(r.get('off_class_that_stage1_calls_intended'))} | {f(r.get('stage1_test_top1'))} "
            f"| {f(r.get('stage3_test_top1'))} | {f(r.get('oracle_test_top1'))} |"
        )
    per = [r for r in recs if "stage3_test_per_class" in r]
    if per:
        classes = per[0]["classes"]
        lines += [
            "",
            "Per class (test top-1 stage 1 -> stage 3, and class fidelity of the generated images):",
            "",
            "| class | " + " | ".join(r["run"] for r in per) + " |",
            "| --- | " + " | ".join("---" for _ in per) + " |",
        ]
        for c, name in enumerate(classes):
            cells = [
                f"{r['stage1_test_per_class'][c]:.0f} -> {r['stage3_test_per_class'][c]:.0f} "
                f"(fid. {r['class_fidelity_per_class'][c]:.0f})"
                for r in per
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    prec = [r for r in recs if r.get("label_precision")]
    if prec:
        ths = list(prec[0]["label_precision"])
        lines += [
            "",
            "What stage 2 learns each class from: the precision (%) of stage 1's pseudo-labels per class on "
            "the training images, all of them and those at confidence >= " + ths[-1] + " (kept share in "
            "the header). Where stage 1 is confidently wrong (low precision at both), the generator draws "
            "stage 1's belief and stage 3 cannot learn better from it; a confidence threshold helps little there "
            "for a quarter of the images.",
            "",
            "| class | "
            + " | ".join(
                f"{r['run']} all / >= {ths[-1]} ({r['label_precision'][ths[-1]]['kept']:.0f}% kept)"
                for r in prec
            )
            + " |",
            "| --- | " + " | ".join("---" for _ in prec) + " |",
        ]
        for c, name in enumerate(prec[0]["classes"]):
            cells = [" / ".join(f"{r['label_precision'][t]['per_class'][c]:.0f}" for t in (ths[0], ths[-1]))
                     for r in prec]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(recs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpt_engine.utils.io import atomic_path

    classes = recs[0]["classes"]
    x = np.arange(len(classes))
    width = 0.8 / len(recs)
    fig, ax = plt.subplots(figsize=(11, 4), layout="constrained")
    for j, r in enumerate(recs):
        ax.bar(
            x + j * width,
            r["class_fidelity_per_class"],
            width,
            label=f"{r['run']} ({r['class_fidelity']:.0f}%)",
        )
    ax.set_xticks(x + 0.4 - width / 2, classes, rotation=20)
    ax.set_ylabel("generated images the oracle puts in their class (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("Class fidelity of the pseudo images per class")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quality", help="the run_quality --out directory")
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--oracle-steps", type=int, default=1000, help="supervised steps at batch 128")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--name", default="quality_fashion_mnist_diagnosis")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--sweep",
        nargs="*",
        default=[],
        metavar="RUN",
        help="runs whose kept stage-2 checkpoints are each sampled (--sweep-per-class images per class) and scored",
    )
    p.add_argument("--sweep-per-class", type=int, default=20)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dpt_engine.utils.io import atomic_write_json, atomic_write_text

    out, results = Path(args.out), Path(args.results)
    runs = (
        sorted(
            d
            for d in out.iterdir()
            if d.is_dir()
            and (d / "sample" / "done.json").is_file()
            and d.name != "unconditional"
            and not (d / "sample").is_symlink()  # an ablation shares its DPT run's samples
        )
        if out.is_dir()
        else []
    )
    if not runs:
        raise SystemExit(
            f"no finished runs with generated images under '{out}': run benchmarks.quality.run_quality first"
        )
    oracle, oracle_info = train_oracle(out, args.preset, args.oracle_steps, not args.no_progress)
    from ..harness import device_name

    oracle_info["device"] = device_name("cpu")
    recs = []
    for d in runs:
        print(f"[diagnose] {d.name}", flush=True)
        recs.append(diagnose_run(d, oracle))
    sweep = []
    for name in args.sweep:
        sweep += checkpoint_sweep(out / name, oracle, out / "diagnosis", args.sweep_per_class)
    results.mkdir(parents=True, exist_ok=True)
    earlier_path = results / f"{args.name}.json"
    earlier = None
    if earlier_path.is_file():
        from dpt_engine.utils.io import read_json

        earlier = read_json(earlier_path)
    recs, sweep, note = merge_earlier(earlier, oracle_info, recs, sweep)
    if note:
        print(f"[diagnose] {note}", flush=True)
    atomic_write_json(
        results / f"{args.name}.json", {"oracle": oracle_info, "runs": recs, "checkpoint_sweep": sweep}
    )
    md = markdown(oracle_info, recs)
    if sweep:
        md += "\nClass fidelity over stage-2 training (EMA weights of the kept checkpoints):\n\n"
        md += "| run | stage-2 step | images | class fidelity (%) |\n| --- | --- | --- | --- |\n"
        md += "".join(
            f"| {r['run']} | {r['step']} | {r['num_images']} | {r['class_fidelity']:.1f} |\n" for r in sweep
        )
    atomic_write_text(results / f"{args.name}.md", md)
    plot(recs, results / f"{args.name}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
