"""MNIST and Fashion-MNIST from the standard idx files (gzipped or plain).

A directory holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally with a ``.gz``
suffix (the Kaggle spelling ``train-images.idx3-ubyte`` is accepted too). The idx header is
parsed and every size checked, so a truncated download fails with a :class:`DataError` naming
the file instead of producing garbage images.

idx format: 2 zero bytes, a type byte (0x08 = unsigned byte), a byte with the number of
dimensions, then one big-endian uint32 per dimension, then the data in C order. Images have
magic ``0x00000803`` (3 dims: N, rows, cols), labels ``0x00000801`` (1 dim: N).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .base import ArrayImageDataset, DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_ROOT",
    "MNIST_CLASSES",
    "find_idx_file",
    "load_idx_dataset",
    "load_mnist_like",
    "read_idx",
]

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

_REDOWNLOAD = "the file is corrupt or truncated: re-download it"


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed if it is gzipped (detected by the magic bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as g:
                    return g.read()
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: gzip stream is broken ({e}); {_REDOWNLOAD}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def read_idx(path: str | os.PathLike, expected_magic: Optional[int] = None) -> np.ndarray:
    """Read an idx file of unsigned bytes into a uint8 array of the header's shape.

    ``expected_magic`` (``0x00000803`` images, ``0x00000801`` labels) is checked if given.
    Raises :class:`DataError` for a wrong magic number or a size that disagrees with the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an idx header; {_REDOWNLOAD}")
    (magic,) = struct.unpack(">I", raw[:4])
    zero, dtype_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise DataError(
            f"{path}: bad idx magic number 0x{magic:08x} (expected an unsigned-byte idx file such as "
            f"0x{IDX_IMAGES_MAGIC:08x} for images or 0x{IDX_LABELS_MAGIC:08x} for labels); {_REDOWNLOAD}"
        )
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{path}: idx magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'}); is it the right file?"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: idx header truncated ({len(raw)} bytes); {_REDOWNLOAD}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(raw) - header_len
    if got != expected:
        raise DataError(
            f"{path}: header says shape {dims} ({expected} bytes of data) but the file holds {got}; {_REDOWNLOAD}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def find_idx_file(root: Path, stem: str, missing_hint: str = "") -> Path:
    """``root/<stem>`` or ``root/<stem>.gz`` (also the ``train-images.idx3-ubyte`` spelling)."""
    prefix, _, rest = stem.partition("-idx")
    candidates = [stem, f"{prefix}.idx{rest}"]
    for name in candidates:
        for suffix in (".gz", ""):
            p = root / f"{name}{suffix}"
            if p.is_file():
                return p
    hint = f"; {missing_hint}" if missing_hint else ""
    raise DataError(f"{root}: missing {stem}[.gz]{hint}")


def load_idx_dataset(
    root: Path, split: str, classes: list[str], name: str, missing_hint: str = ""
) -> ArrayImageDataset:
    """One split (``"train"`` or ``"t10k"``) as uint8 images (N, 1, 28, 28) + int64 labels (N,)."""
    img_path = find_idx_file(root, f"{split}-images-idx3-ubyte", missing_hint)
    lab_path = find_idx_file(root, f"{split}-labels-idx1-ubyte", missing_hint)
    images = read_idx(img_path, IDX_IMAGES_MAGIC)  # (N, H, W)
    labels = read_idx(lab_path, IDX_LABELS_MAGIC)  # (N,)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels; "
            "the files do not belong together: re-download them"
        )
    if labels.size and int(labels.max()) >= len(classes):
        raise DataError(
            f"{lab_path}: label {int(labels.max())} out of range for {len(classes)} classes; {_REDOWNLOAD}"
        )
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W) uint8
    y = torch.from_numpy(labels.astype(np.int64))  # (N,)
    return ArrayImageDataset(x, y, classes, name=f"{name}:{split}")


def load_mnist_like(
    root: str | os.PathLike, name: str, classes: list[str], missing_hint: str
) -> tuple[ArrayImageDataset, ArrayImageDataset]:
    """The official train (60k) and test (10k) splits from an idx directory.

    ``missing_hint`` is appended to the error raised when the directory or a file is missing.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{name}: data directory {root} does not exist; {missing_hint}")
    train = load_idx_dataset(root, "train", classes, name, missing_hint)
    test = load_idx_dataset(root, "t10k", classes, name, missing_hint)
    return train, test
