"""Stage 1: a semi-supervised classifier trained on the few labels pseudo-labels every image.

Artifacts in ``<out>/stage1/``:
- ``labeled.txt``: the labeled subset (DPT/MSN file names for image folders, indices otherwise);
- ``model.pt`` (+ ``checkpoints/step-N/`` while training): the EMA classifier;
- ``pseudo_labels.npz``: ``label`` (argmax, for every training image, labeled ones included, as
  in DPT), ``confidence`` (max softmax probability), ``true_label`` (-1 where unknown);
- ``pseudo_labels.tsv``: the same as text, one image per line with its identifier;
- ``history.json``: training curves; ``summary.json``: the numbers below.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import DatasetSplits, build_splits, write_index_file
from ..ssl import ClassifierData, predict_proba
from ..utils.io import atomic_save_npz, atomic_write_json, atomic_write_text
from .classifier_stage import (
    check_classifier,
    classifier_fingerprint,
    fit_learner,
    initial_weights,
    save_test_predictions,
)
from .common import StageContext, StageResult, data_fingerprint, run_stage

log = logging.getLogger("dpt_engine")

__all__ = ["pseudo_label_summary", "run_stage1", "stage1_fingerprint"]


def stage1_fingerprint(ctx: StageContext) -> dict[str, Any]:
    return {
        "data": data_fingerprint(ctx.cfg),
        "stage1": classifier_fingerprint(ctx.cfg.stage1),
        "seed": ctx.cfg.run.seed,
    }


def pseudo_label_summary(pred: np.ndarray, conf: np.ndarray, true: np.ndarray, classes: list[str]) -> dict:
    """Per-class counts and, where true labels are known, accuracy overall and per class."""
    num_classes = len(classes)
    counts = np.bincount(pred, minlength=num_classes)
    out: dict[str, Any] = {
        "num_images": len(pred),
        "mean_confidence": float(conf.mean()) if len(conf) else float("nan"),
        "per_class_count": {classes[c]: int(counts[c]) for c in range(num_classes)},
    }
    known = true >= 0
    if known.any():
        correct = pred[known] == true[known]
        out["accuracy"] = 100.0 * float(correct.mean())
        out["num_known"] = int(known.sum())
        per = {}
        for c in range(num_classes):
            sel = true[known] == c
            per[classes[c]] = 100.0 * float(correct[sel].mean()) if sel.any() else None
        out["per_class_accuracy"] = per
        # accuracy of the most confident half: how useful confidence is for filtering
        order = np.argsort(-conf[known])
        top = order[: max(1, len(order) // 2)]
        out["accuracy_top50pct_confidence"] = 100.0 * float(correct[top].mean())
    else:
        out["accuracy"] = None
    return out


def _write_pseudo_labels(stage_dir: Path, splits: DatasetSplits, probs: torch.Tensor) -> dict[str, Any]:
    conf_t, pred_t = probs.max(dim=1)
    pred, conf = pred_t.numpy().astype(np.int64), conf_t.numpy().astype(np.float32)
    true = splits.train.labels.numpy().astype(np.int64)
    is_labeled = np.zeros(len(pred), dtype=bool)
    is_labeled[splits.labeled_idx] = True
    atomic_save_npz(
        stage_dir / "pseudo_labels.npz",
        label=pred,
        confidence=conf,
        true_label=true,
        labeled=is_labeled,
        classes=np.array(splits.classes),
    )
    lines = ["index\tid\tlabel\tclass\tconfidence\tlabeled"]
    for i in range(len(pred)):
        lines.append(
            f"{i}\t{splits.train.describe(i)}\t{pred[i]}\t{splits.classes[pred[i]]}\t{conf[i]:.5f}\t{int(is_labeled[i])}"
        )
    atomic_write_text(stage_dir / "pseudo_labels.tsv", "\n".join(lines) + "\n")
    return pseudo_label_summary(pred, conf, true, splits.classes)


def run_stage1(ctx: StageContext, splits: DatasetSplits | None = None) -> StageResult:
    cfg = ctx.cfg

    def body(stage_dir: Path) -> dict[str, Any]:
        sp = splits if splits is not None else build_splits(cfg.data)
        write_index_file(stage_dir / "labeled.txt", sp.labeled_idx, sp.train)
        all_idx = np.arange(len(sp.train))
        data = ClassifierData(
            labeled=sp.train,
            labeled_idx=sp.labeled_idx,
            unlabeled=sp.train if cfg.stage1.learner in ("freematch", "fixmatch") else None,
            unlabeled_idx=all_idx if cfg.stage1.learner in ("freematch", "fixmatch") else None,
            test=sp.test,
            num_classes=sp.num_classes,
        )
        log.info(
            "stage1: %s on %s: %d labeled / %d train / %d test images, %d classes",
            cfg.stage1.learner,
            sp.name,
            len(sp.labeled_idx),
            len(sp.train),
            len(sp.test),
            sp.num_classes,
        )
        init_state = initial_weights(cfg.stage1, sp, cfg.run.seed)
        fit = fit_learner(cfg.stage1, data, stage_dir, ctx, cfg.run.seed, init_state=init_state)
        atomic_write_json(stage_dir / "history.json", fit.history)
        log.info("stage1: pseudo-labelling %d training images", len(sp.train))
        probs = predict_proba(
            fit.model,
            sp.train,
            all_idx,
            batch_size=cfg.stage1.probe_batch_size,
            device=ctx.device,
            num_workers=cfg.run.num_workers,
        )
        pl = _write_pseudo_labels(stage_dir, sp, probs)
        if fit.test_top1 is not None:
            save_test_predictions(stage_dir, fit.model, sp, ctx, cfg.stage1.probe_batch_size)
        summary = {
            "learner": cfg.stage1.learner,
            "backbone": cfg.stage1.backbone,
            "top1": fit.test_top1,
            "num_labeled": len(sp.labeled_idx),
            "num_train": len(sp.train),
            "num_test": len(sp.test),
            "resumed_from_step": fit.resumed_from,
            "pseudo_labels": pl,
            "dataset": sp.info,
        }
        atomic_write_json(stage_dir / "summary.json", summary)
        if pl.get("accuracy") is not None:
            log.info(
                "stage1: top-1 %.2f%% (%s), pseudo-label accuracy %.2f%%",
                fit.test_top1,
                sp.info.get("eval_split", "test"),
                pl["accuracy"],
            )
        return summary

    def precheck() -> None:
        check_classifier("stage1", cfg.stage1, splits if splits is not None else build_splits(cfg.data))

    return run_stage(ctx, "stage1", stage1_fingerprint(ctx), body, precheck=precheck)
