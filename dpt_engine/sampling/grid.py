"""The sample grid: one row per class of generated images, written as a PNG (atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..utils.io import atomic_path

__all__ = ["save_grid"]


def save_grid(
    images: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    per_class: int,
    path: Path,
    class_names: Optional[list[str]] = None,
) -> None:
    """A PNG grid, one row per class, ``per_class`` images each (blank where missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ch, h, w = images.shape[1:]
    pad = 1
    grid = np.full((num_classes * (h + pad) + pad, per_class * (w + pad) + pad, ch), 255, dtype=np.uint8)
    filled = [0] * num_classes
    for img, c in zip(images, classes.tolist()):
        if filled[c] >= per_class:
            continue
        r, k = c, filled[c]
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = (
            img.permute(1, 2, 0).numpy()
        )
        filled[c] += 1
    scale = max(1, 96 // max(h, w))
    fig_w = grid.shape[1] * scale / 100 + 1.5
    fig, ax = plt.subplots(figsize=(fig_w, grid.shape[0] * scale / 100 + 0.3))
    ax.imshow(
        grid[..., 0] if ch == 1 else grid,
        cmap="gray" if ch == 1 else None,
        interpolation="nearest",
        vmin=0,
        vmax=255,
    )
    ax.set_xticks([])
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(num_classes)])
    ax.set_yticklabels(class_names if class_names else [str(r) for r in range(num_classes)])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
