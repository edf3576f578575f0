"""Sample-quality evaluation: FID, KID and precision/recall with the TF-FID Inception, offline.

Everything lives in :mod:`dpt_engine.eval.fid`; the names below are re-exported lazily, so
``import dpt_engine.eval`` stays cheap and works without torch-fidelity until a name is used.
Importing :mod:`dpt_engine.eval.fid` registers the ``"dpt-inception-v3-tf"`` feature extractor
with torch-fidelity.
"""

from __future__ import annotations

import importlib
from typing import Any

_FID_NAMES = (
    "FEATURE_DIM",
    "FEATURE_EXTRACTOR_NAME",
    "WEIGHTS_ENV_VAR",
    "FeatureStats",
    "ImageSource",
    "InceptionWeightsNotFoundError",
    "TFInceptionV3Pool3",
    "TorchScriptInception",
    "UInt8ImageDataset",
    "compute_metrics",
    "compute_metrics_from_features",
    "extract_features",
    "find_inception_weights",
    "frechet_distance",
    "frechet_distance_fast",
    "images_to_uint8",
    "kernel_inception_distance",
    "load_inception",
    "precision_recall",
    "register_with_torch_fidelity",
    "resolve_kid_subset_size",
    "resolve_prc_neighborhood",
)

__all__ = list(_FID_NAMES)


def __getattr__(name: str) -> Any:
    if name in _FID_NAMES:
        return getattr(importlib.import_module(".fid", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_FID_NAMES))
