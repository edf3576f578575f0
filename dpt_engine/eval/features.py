"""Images -> Inception pool3 features, in batches, from a tensor, an array or a Dataset."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.base import worker_start_method
from .inception import FEATURE_DIM, load_inception

__all__ = [
    "ImageSource",
    "UInt8ImageDataset",
    "extract_features",
    "iter_image_batches",
]

# An image source: uint8 (N, C, H, W) tensor or array, or a Dataset whose items are uint8 (C, H, W)
# tensors or (image, label) tuples.
ImageSource = Union[torch.Tensor, np.ndarray, Dataset]


# --------------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------------


class UInt8ImageDataset(Dataset):
    """Wrap any :data:`ImageSource` as a Dataset of uint8 (C, H, W) tensors (what torch-fidelity wants).

    Labels of ``(image, label)`` items are dropped.
    """

    def __init__(self, images: ImageSource) -> None:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if torch.is_tensor(images) and (images.dim() != 4 or images.dtype != torch.uint8):
            raise ValueError(f"expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.images[i]
        return item[0] if isinstance(item, (tuple, list)) else item


def _num_images(images: ImageSource) -> int:
    return int(images.shape[0]) if isinstance(images, (torch.Tensor, np.ndarray)) else len(images)


def iter_image_batches(images: ImageSource, batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Yield uint8 (B, C, H, W) CPU batches of ``images`` in order."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if torch.is_tensor(images):
        if images.dim() != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    if not isinstance(images, Dataset):
        raise TypeError(
            f"expected a uint8 tensor/array (N, C, H, W) or a Dataset, got {type(images).__name__}"
        )
    if getattr(images, "in_memory", False) and callable(getattr(images, "get_batch", None)):
        n = len(images)  # dpt_engine.data in-memory datasets: slice whole batches, no per-item loop
        for start in range(0, n, batch_size):
            yield images.get_batch(torch.arange(start, min(start + batch_size, n)))
        return
    loader = DataLoader(
        UInt8ImageDataset(images),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        multiprocessing_context=worker_start_method() if num_workers > 0 else None,
    )
    yield from loader


def extract_features(
    images: ImageSource,
    *,
    weights: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    num_workers: int = 0,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Pool3 features float32 (N, 2048) on the CPU of uint8 images (N, 1|3, H, W) of any size.

    Args:
        images: uint8 tensor/array (N, C, H, W) or a Dataset of uint8 (C, H, W) items (or
            ``(image, label)`` tuples); C is 1 (replicated to RGB) or 3.
        weights: Inception weights (see :func:`find_inception_weights`).
        batch_size: images per Inception forward.
        device: where the network runs.
        progress: tqdm bar; ``None`` shows it for sets of 1,024 images or more.
        num_workers: DataLoader workers for Datasets that are not in memory.
        model: an already-built extractor (e.g. ``load_inception(implementation="torchscript")``).
    """
    n = _num_images(images)
    if n == 0:
        raise ValueError("no images to extract features from")
    dev = torch.device(device)
    model = model if model is not None else load_inception(weights, device=dev)
    out = torch.empty((n, FEATURE_DIM), dtype=torch.float32)
    done = 0
    show = n >= 1024 if progress is None else progress
    with (
        torch.inference_mode(),
        tqdm(total=n, desc="Inception features", unit="img", disable=not show, leave=False) as bar,
    ):
        for batch in iter_image_batches(images, batch_size, num_workers):
            b = batch.shape[0]
            out[done : done + b] = model(batch.to(dev, non_blocking=True)).float().cpu()
            done += b
            bar.update(b)
    if done != n:
        raise RuntimeError(f"image source yielded {done} images, expected {n}")
    return out
