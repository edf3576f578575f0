"""What the two classifier stages (1 and 3) share: the fingerprint of a classifier config, the
learner dispatch, the up-front check that the backbone fits the data, and the saved test
predictions that stage 3's paired gain is computed from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.base import to_dict
from ..config.schema import ClassifierConfig
from ..data import DatasetSplits
from ..ssl import ClassifierData, FitResult, fit_classifier, fit_linear_probe, predict_proba
from ..utils.io import atomic_save_npz, file_sha256
from .common import StageContext

__all__ = [
    "check_classifier",
    "classifier_fingerprint",
    "fit_learner",
    "initial_weights",
    "save_test_predictions",
]

# Keys that change how often we log or checkpoint, not what is computed.
# The stage-3-only keys enter stage 3's fingerprint on their own.
_NON_SEMANTIC = (
    "eval_every",
    "checkpoint_every",
    "pseudo_dir",
    "keep_unlabeled",
    "pseudo_weight",
    "pseudo_weighting",
    "max_pseudo_share",
    "init_from_stage1",
)


def classifier_fingerprint(cfg: ClassifierConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    for k in _NON_SEMANTIC:
        d.pop(k, None)
    if (
        d.get("precision") == "auto"
    ):  # the behaviour before the field existed: old runs keep their fingerprint
        d.pop("precision")
    if not d.get("init_thresholds_from_stage1"):  # likewise (stage 3's fingerprint adds the state)
        d.pop("init_thresholds_from_stage1", None)
    if d.get("init_checkpoint") is None:  # likewise
        d.pop("init_checkpoint", None)
    elif Path(d["init_checkpoint"]).expanduser().is_file():  # new weights at the same path: a new run
        d["init_checkpoint_sha256"] = file_sha256(Path(d["init_checkpoint"]).expanduser())
    return d


def fit_learner(
    cfg: ClassifierConfig,
    data: ClassifierData,
    work_dir: Path,
    ctx: StageContext,
    seed: int,
    init_state: dict | None = None,
    init_thresholds: dict | None = None,
) -> FitResult:
    """Dispatch to the configured learner (semi-supervised, supervised or linear probe)."""
    if cfg.learner == "linear-probe":
        return fit_linear_probe(cfg, data, work_dir, ctx.device, seed)
    if cfg.learner in ("freematch", "fixmatch") and data.unlabeled is None:
        cfg = replace(cfg, learner="supervised")
    return fit_classifier(
        cfg,
        data,
        work_dir,
        ctx.device,
        seed,
        progress=ctx.progress,
        init_state=init_state,
        init_thresholds=init_thresholds,
    )


def initial_weights(cfg: ClassifierConfig, sp: DatasetSplits, seed: int) -> dict[str, torch.Tensor] | None:
    """The state a trainable learner starts from when ``cfg.init_checkpoint`` is set: the
    classifier as ``seed`` initialises it, its backbone replaced by the checkpoint's weights (the
    head stays fresh). ``None`` without an ``init_checkpoint``."""
    if not cfg.init_checkpoint:
        return None
    from ..models.classifiers import create_classifier
    from ..ssl.linear_probe import load_backbone_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_classifier(cfg.backbone, sp.num_classes, sp.channels, sp.image_size)
    load_backbone_weights(model, Path(cfg.init_checkpoint).expanduser())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_classifier(key: str, cfg: ClassifierConfig, sp: DatasetSplits) -> None:
    """Build the stage's classifier for the dataset once (and read a linear probe's backbone
    weights, or the weights a trainable learner starts from) before the run directory is touched:
    a backbone that does not fit the images, or unusable weights, fail here with the setting to
    change."""
    from ..config.base import ConfigError
    from ..models.checkpoints import CheckpointError
    from ..models.classifiers import create_classifier
    from ..ssl.linear_probe import build_probe_backbone, load_probe_weights

    try:
        with torch.random.fork_rng(devices=[]):
            if cfg.learner == "linear-probe":
                backbone = build_probe_backbone(cfg.backbone, sp.num_classes, sp.channels, sp.image_size)
            else:
                create_classifier(cfg.backbone, sp.num_classes, sp.channels, sp.image_size)
    except CheckpointError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"{key}.backbone={cfg.backbone!r} cannot be built for {sp.channels}-channel {sp.image_size}px images "
            f"({first}); choose another {key}.backbone (or set data.image_size)"
        ) from None
    if cfg.learner == "linear-probe" and cfg.probe_checkpoint:
        # the backbone builds; weights that do not fit it are the checkpoint's fault, not the backbone's
        _weights_must_load(
            lambda: load_probe_weights(backbone, cfg.backbone, cfg.probe_checkpoint),
            f"{key}.probe_checkpoint={cfg.probe_checkpoint!r} does not fit {key}.backbone={cfg.backbone!r}",
            "give weights saved from that backbone, or name the backbone they came from",
        )
    if cfg.init_checkpoint and cfg.learner != "linear-probe":
        _weights_must_load(
            lambda: initial_weights(cfg, sp, 0),
            f"{key}.init_checkpoint={cfg.init_checkpoint!r} cannot start {key}.backbone={cfg.backbone!r}",
            f"give backbone weights saved from the same {key}.backbone",
        )


def _weights_must_load(load: Callable[[], Any], problem: str, fix: str) -> None:
    """Run ``load``; unusable weights become one ConfigError line: the problem, the loader's first
    line, the fix."""
    from ..config.base import ConfigError

    try:
        load()
    except (ValueError, RuntimeError, KeyError, TypeError) as e:  # CheckpointError is a ValueError
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{problem} ({first}); {fix}") from None


def save_test_predictions(
    stage_dir: Path, model: Any, sp: DatasetSplits, ctx: StageContext, batch: int
) -> None:
    """Each evaluation image's predicted class (``test_predictions.npz``: ``pred``, ``label``), so
    stage 3 can tell its gain over stage 1 from noise (``eval/paired.py``)."""
    probs = predict_proba(
        model, sp.test, None, batch_size=batch, device=ctx.device, num_workers=ctx.cfg.run.num_workers
    )
    atomic_save_npz(
        stage_dir / "test_predictions.npz",
        pred=probs.argmax(dim=1).numpy().astype(np.int32),
        label=sp.test.labels.numpy().astype(np.int32),
    )
