"""Classifier learners for DPT's stages 1 and 3.

* :func:`fit_classifier` -- FreeMatch / FixMatch / supervised training of a registry classifier
  (``trainer.py``), resumable from ``work_dir/checkpoints/``;
* :func:`fit_linear_probe` -- frozen backbone + multinomial logistic regression (DPT's ImageNet
  recipe, ``linear_probe.py``);
* :func:`predict_proba` / :func:`evaluate_top1` -- inference on any ``ImageDataset``;
* ``augment.py`` -- batched weak / strong (RandAugment + Cutout) augmentation.
"""

from .augment import strong, weak
from .linear_probe import LogisticRegressionL2, extract_features, fit_linear_probe
from .trainer import (
    ClassifierData,
    FitResult,
    FreeMatchThresholds,
    evaluate_top1,
    fit_classifier,
    fixmatch_loss,
    fixmatch_mask,
    freematch_fairness_loss,
    freematch_loss,
    predict_proba,
)

__all__ = [
    "ClassifierData",
    "FitResult",
    "FreeMatchThresholds",
    "LogisticRegressionL2",
    "evaluate_top1",
    "extract_features",
    "fit_classifier",
    "fit_linear_probe",
    "fixmatch_loss",
    "fixmatch_mask",
    "freematch_fairness_loss",
    "freematch_loss",
    "predict_proba",
    "strong",
    "weak",
]
