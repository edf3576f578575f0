"""Pseudo-image generation: a global work list of (class, index) pairs, DPM-Solver++ with
batched classifier-free guidance, and writers behind one interface.

Sample ``(c, i)`` always starts from the same noise (seeded by ``(seed, c, i)``), so what is
generated does not depend on the batch size or the order of the work list. Batches mix classes,
so there is no per-class padding. A writer receives uint8 images with their (class, index) and
must make each write atomic; ``ImageFolderWriter`` writes ``<class folder>/<c>_<i>.png`` and
skips pairs already on disk, so an interrupted generation resumes.

This is the small single-process API (and the helpers ``to_uint8``, ``clip_denoised_fn``,
``save_grid``). The sample stage generates through ``dpt_engine.sampling`` instead: shards as
the unit of work and resume, many processes, background encoding, tar / ImageFolder / latent
output, a manifest with a throughput breakdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data.imagefolder import safe_class_dirname
from .utils.io import atomic_path, atomic_write_json
from .utils.pixels import model_space_to_uint8 as to_uint8  # the old name, still imported by callers

log = logging.getLogger("dpt_engine")

__all__ = [
    "ImageFolderWriter",
    "SampleWriter",
    "clip_denoised_fn",
    "generate",
    "save_grid",
    "to_uint8",
    "work_list",
]


class SampleWriter(Protocol):
    def done(self) -> set[tuple[int, int]]:
        """(class, index) pairs already written (skipped on resume)."""

    def write(self, images: torch.Tensor, classes: torch.Tensor, indices: torch.Tensor) -> None:
        """Write uint8 (B, C, H, W) images of the given classes and indices."""

    def close(self, summary: dict) -> None:
        """Finish (e.g. write the manifest)."""


class ImageFolderWriter:
    """PNG files in an ImageFolder tree: ``root/<class folder>/<class>_<index>.png``."""

    def __init__(self, root: Path, classes: list[str]):
        self.root = Path(root)
        self.classes = list(classes)
        self.dirs = [self.root / safe_class_dirname(c) for c in self.classes]
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)

    def _path(self, c: int, i: int) -> Path:
        return self.dirs[c] / f"{c:04d}_{i:06d}.png"

    def done(self) -> set[tuple[int, int]]:
        out = set()
        for c, d in enumerate(self.dirs):
            for p in d.glob("*.png"):
                try:
                    cc, ii = p.stem.split("_")
                    if int(cc) == c:
                        out.add((c, int(ii)))
                except ValueError:
                    continue
        return out

    def write(self, images: torch.Tensor, classes: torch.Tensor, indices: torch.Tensor) -> None:
        arr = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
        for img, c, i in zip(arr, classes.tolist(), indices.tolist()):
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            with atomic_path(self._path(c, i)) as tmp:
                pil.save(tmp, format="PNG")

    def close(self, summary: dict) -> None:
        atomic_write_json(self.root / "manifest.json", summary)


def clip_denoised_fn(model_fn: Callable, schedule, lo: float = -1.0, hi: float = 1.0) -> Callable:
    """Wrap ``model_fn(x, t) -> eps`` so the implied data prediction is clipped to [lo, hi].

    ``x0 = (x - sigma_t eps) / alpha_t`` is clipped, and the matching ``eps = (x - alpha_t x0) /
    sigma_t`` is returned: DPM-Solver++ (a data-prediction solver) then integrates with the
    clipped ``x0`` -- the static thresholding of Lu et al. 2022 for pixel-space models, which
    keeps a guided solve inside the data range. Tensor ops only (no host syncs).
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model_fn(x, t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        alpha = schedule.marginal_alpha(t).to(x.dtype).reshape(shape)
        sigma = schedule.marginal_std(t).to(x.dtype).reshape(shape)
        x0 = ((x - sigma * eps) / alpha).clamp(lo, hi)
        return (x - alpha * x0) / sigma

    return fn


def work_list(num_classes: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All (class, index) pairs, class-major: classes (N,), indices (N,)."""
    c = torch.arange(num_classes).repeat_interleave(per_class)
    i = torch.arange(per_class).repeat(num_classes)
    return c, i


@torch.no_grad()
def generate(
    sample_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    writer: SampleWriter,
    num_classes: int,
    per_class: int,
    batch_size: int,
    progress: bool = True,
    keep: Optional[list] = None,
) -> dict:
    """Generate every (class, index) pair not yet written.

    ``sample_batch(classes, indices) -> uint8 images`` runs noise -> solver -> decode for one
    batch. Returns timing and counts. When ``keep`` is a list, the uint8 batches are appended to
    it (for FID and the grid without reading the files back).
    """
    classes, indices = work_list(num_classes, per_class)
    done = writer.done()
    if done:
        pending = torch.tensor([(int(c), int(i)) not in done for c, i in zip(classes, indices)])
        classes, indices = classes[pending], indices[pending]
        log.info("generation: %d images already on disk, %d to go", len(done), len(classes))
    t_model = t_write = 0.0
    bar = tqdm(total=len(classes), desc="generating", unit="img", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(classes), batch_size):
        c, i = classes[s : s + batch_size], indices[s : s + batch_size]
        t0 = time.perf_counter()
        images = sample_batch(c, i)
        t1 = time.perf_counter()
        writer.write(images, c, i)
        t2 = time.perf_counter()
        t_model += t1 - t0
        t_write += t2 - t1
        if keep is not None:
            keep.append((images, c, i))
        bar.update(len(c))
        bar.set_postfix(img_s=f"{(s + len(c)) / max(t_model + t_write, 1e-9):.1f}")
    bar.close()
    total = t_model + t_write
    return {
        "generated": len(classes),
        "skipped_existing": len(done),
        "seconds_sampling": t_model,
        "seconds_writing": t_write,
        "images_per_s": len(classes) / total if total > 0 else None,
    }


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
