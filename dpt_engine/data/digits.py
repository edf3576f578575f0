"""scikit-learn's digits: 1,797 real 8x8 grey-scale handwritten digits, shipped inside sklearn.

Pixel values 0..16 become uint8 via ``round(v * 255 / 16)``. The held-out test split is a
stratified 500-image split made with a FIXED seed (0), independent of the label-subset seed, so
every run and every label seed is evaluated on the same 500 images (1,297 train / 500 test).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import ArrayImageDataset, DataError

__all__ = ["DIGITS_CLASSES", "DIGITS_SPLIT_SEED", "DIGITS_TEST_SIZE", "digits_split_indices", "load_digits"]

DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_TEST_SIZE = 500
DIGITS_SPLIT_SEED = 0


def digits_split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices into sklearn's 1,797 digits: stratified, 500 test, seed 0."""
    from sklearn.model_selection import train_test_split

    all_idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        all_idx, test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    return np.sort(train_idx), np.sort(test_idx)


def load_digits() -> tuple[ArrayImageDataset, ArrayImageDataset]:
    """The (train 1,297, test 500) splits as uint8 images (N, 1, 8, 8) and int64 labels (N,).

    Both splits keep sklearn's original image order (the split indices are sorted).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = _sk_load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
    if pixels.shape[1:] != (8, 8) or pixels.shape[0] != labels.shape[0]:
        raise DataError(f"unexpected sklearn digits shape {pixels.shape}; reinstall scikit-learn")
    images = np.clip(np.round(pixels * 255.0 / 16.0), 0, 255).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    train_idx, test_idx = digits_split_indices(labels)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    train = ArrayImageDataset(x[train_idx], y[train_idx], DIGITS_CLASSES, name="digits:train")
    test = ArrayImageDataset(x[test_idx], y[test_idx], DIGITS_CLASSES, name="digits:test")
    return train, test
