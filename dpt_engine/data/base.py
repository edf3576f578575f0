"""Dataset containers shared by every stage.

All datasets hand out images as ``uint8`` tensors of shape ``(C, H, W)`` (batches
``(B, C, H, W)``) and integer labels, ``-1`` where the label is unknown. Small datasets live in
memory (:class:`ArrayImageDataset`); image folders load files on demand
(:class:`FolderImageDataset` in ``imagefolder.py``).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

__all__ = [
    "ArrayImageDataset",
    "ConcatImageDataset",
    "DataError",
    "DatasetSplits",
    "ImageDataset",
    "iterate_batches",
    "worker_start_method",
]


def worker_start_method() -> str:
    """Start method for DataLoader workers: ``forkserver`` where the platform has it, else ``spawn``.

    Never ``fork``: by the time a stage reads an image folder the process holds OpenMP, DALI and
    gloo threads, and a forked copy of a threaded process can crash in the child (a DataLoader
    worker died with SIGSEGV in CI this way). Workers start from a clean server process instead;
    the datasets are picklable for that.
    """
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class DataError(RuntimeError):
    """A dataset is missing, corrupt or inconsistent. The message says what and how to fix it."""


class ImageDataset(torch.utils.data.Dataset):
    """Base class: ``ds[i] -> (uint8 (C,H,W) tensor, int label)``; ``labels`` is int64 (N,)."""

    classes: list[str]
    labels: torch.Tensor
    channels: int
    image_size: int  # square images; height == width == image_size

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def get_batch(self, idx: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """uint8 (B, C, H, W) images at ``idx``."""
        return torch.stack([self[int(i)][0] for i in idx])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_memory(self) -> bool:
        return False

    def describe(self, idx: int) -> str:
        """A human-readable identifier for image ``idx`` (a path for folders)."""
        return str(idx)


class ArrayImageDataset(ImageDataset):
    """An in-memory dataset: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], name: str = ""):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(
                f"{name}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
        if images.shape[2] != images.shape[3]:
            raise DataError(f"{name}: images must be square, got {tuple(images.shape[2:])}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)
        self.name = name
        self.channels = int(images.shape[1])
        self.image_size = int(images.shape[2])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def get_batch(self, idx: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self.images[torch.as_tensor(idx, dtype=torch.long)]

    @property
    def in_memory(self) -> bool:
        return True

    def subset(self, idx: np.ndarray | torch.Tensor) -> ArrayImageDataset:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return ArrayImageDataset(self.images[idx], self.labels[idx], self.classes, self.name)


@dataclass
class DatasetSplits:
    """A dataset's train and held-out test split plus the labeled-subset indices into train."""

    name: str
    train: ImageDataset
    test: ImageDataset
    labeled_idx: np.ndarray  # int64 indices into train
    classes: list[str]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.train.channels

    @property
    def image_size(self) -> int:
        return self.train.image_size


def iterate_batches(
    dataset: ImageDataset,
    indices: np.ndarray | torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(images uint8 (B,C,H,W), labels (B,), indices (B,))`` over ``indices`` once.

    In-memory datasets are sliced directly; folder datasets go through a DataLoader with
    ``num_workers`` workers.
    """
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    if shuffle:
        idx = idx[torch.randperm(len(idx), generator=generator)]
    chunks = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks = chunks[:-1]
    if dataset.in_memory or num_workers == 0:
        for c in chunks:
            yield dataset.get_batch(c), dataset.labels[c], c
        return
    loader = torch.utils.data.DataLoader(
        _ChunkDataset(dataset, chunks),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        multiprocessing_context=worker_start_method(),
    )
    for c, images in zip(chunks, loader):
        yield images, dataset.labels[c], c


class _ChunkDataset(torch.utils.data.Dataset):
    def __init__(self, dataset: ImageDataset, chunks: list[torch.Tensor]):
        self.dataset, self.chunks = dataset, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.get_batch(self.chunks[i])


class ConcatImageDataset(ImageDataset):
    """Several datasets with the same classes, channels and image size, end to end."""

    def __init__(self, parts: Sequence[ImageDataset]):
        if not parts:
            raise DataError("ConcatImageDataset needs at least one dataset")
        first = parts[0]
        for p in parts[1:]:
            if (p.channels, p.image_size) != (first.channels, first.image_size):
                raise DataError(
                    f"cannot combine datasets of shape {(first.channels, first.image_size)} and "
                    f"{(p.channels, p.image_size)}: resize the generated images to the real ones' size"
                )
            if p.num_classes != first.num_classes:
                raise DataError(
                    f"cannot combine datasets with {first.num_classes} and {p.num_classes} classes"
                )
        self.parts = list(parts)
        self.classes = list(first.classes)
        self.channels, self.image_size = first.channels, first.image_size
        self.labels = torch.cat([p.labels for p in parts])
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def _locate(self, i: int) -> tuple[int, int]:
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return part, i - int(self.offsets[part])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        part, j = self._locate(int(i))
        return self.parts[part][j]

    def get_batch(self, idx: torch.Tensor | Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = torch.empty((len(idx), self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        part_of = torch.as_tensor(np.searchsorted(self.offsets, idx.numpy(), side="right") - 1)
        for p in part_of.unique().tolist():
            sel = (part_of == p).nonzero().squeeze(1)
            out[sel] = self.parts[p].get_batch(idx[sel] - int(self.offsets[p]))
        return out

    @property
    def in_memory(self) -> bool:
        return all(p.in_memory for p in self.parts)

    def describe(self, idx: int) -> str:
        part, j = self._locate(int(idx))
        return self.parts[part].describe(j)
