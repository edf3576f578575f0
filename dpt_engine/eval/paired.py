"""How much of a gain in top-1 is noise: a paired comparison of two classifiers on one test set.

Both classifiers see the same images, so the difference of their accuracies depends only on the
images where exactly one of them is right: ``b`` (only the new one) and ``c`` (only the old one).
The gain is ``(b - c) / n``; its standard error, from the per-image differences d_i in {-1, 0, 1},
is ``sqrt((b + c) / n - gain^2) / sqrt(n)``. One image of a 500-image test set is 0.2 points.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["paired_gain"]


def paired_gain(old_pred: np.ndarray, new_pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Gain of ``new_pred`` over ``old_pred`` in points, its 95% interval and the discordant counts."""
    old_pred, new_pred, labels = (np.asarray(a).reshape(-1) for a in (old_pred, new_pred, labels))
    if not (len(old_pred) == len(new_pred) == len(labels)) or len(labels) == 0:
        raise ValueError(
            f"paired_gain needs predictions for the same non-empty test set "
            f"(got {len(old_pred)}, {len(new_pred)} predictions for {len(labels)} labels)"
        )
    old_ok, new_ok = old_pred == labels, new_pred == labels
    n = len(labels)
    b = int(np.sum(new_ok & ~old_ok))
    c = int(np.sum(old_ok & ~new_ok))
    gain = (b - c) / n
    var = max((b + c) / n - gain * gain, 0.0)
    se = math.sqrt(var / n) * 100.0
    return {
        "gain": gain * 100.0,
        "se": se,
        "ci95": [gain * 100.0 - 1.96 * se, gain * 100.0 + 1.96 * se],
        "only_new_right": b,
        "only_old_right": c,
        "num_images": n,
        "one_image_points": 100.0 / n,
    }
