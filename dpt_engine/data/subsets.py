"""Which training images carry labels: per-class sampling, fractions and subset files.

Selection is deterministic given the seed (a :func:`numpy.random.default_rng` stream consumed
in class order) and returns sorted int64 indices. Per class, the chosen images are a prefix of
one seeded permutation, so for a fixed seed the k=1 subset is contained in the k=2 subset, etc.

Subset files come in two formats, detected automatically (blank lines and ``#`` comments are
ignored):

* **DPT / MSN file names**: one ``nXXXXXXXX_NNNN.JPEG`` per line; the class is the prefix
  before the first ``_`` and the file is looked up by name among that class's images of a
  :class:`~dpt_engine.data.imagefolder.FolderImageDataset`. A line may also be a path relative
  to the train folder (``<class>/<file>``), which is what :func:`write_index_file` writes for
  files whose names do not start with their class. Any of the ImageNet subset files published
  with MSN / DPT works as is, e.g. ``1imgs_class.txt``, ``2imgs_class.txt``,
  ``5imgs_class.txt`` (1 / 2 / 5 images per class, several random splits) and
  ``1percent.txt`` / ``10percent.txt`` (1% and 10% of ImageNet): the number of labels is
  whatever the file lists.
* **Integer indices**: one index into the train set per line (for in-memory datasets, and the
  format :func:`write_index_file` uses for them). Indices refer to the train set after
  ``data.max_train`` has been applied.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..utils.io import atomic_write_text
from .base import DataError, ImageDataset
from .imagefolder import FolderImageDataset, class_folder_lookup

__all__ = [
    "read_index_file",
    "read_subset_file",
    "select_balanced",
    "select_fraction",
    "select_per_class",
    "subset_file_lines",
    "write_index_file",
]

_INT_LINE = re.compile(r"[0-9]+")


def _as_labels(labels: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _class_members(labels: np.ndarray, num_classes: Optional[int]) -> list[np.ndarray]:
    """Sorted indices of each class 0..C-1 (``-1`` labels are ignored)."""
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def _class_name(c: int, classes: Optional[Sequence[str]]) -> str:
    return f"{c} ({classes[c]!r})" if classes is not None and c < len(classes) else str(c)


def select_per_class(
    labels: np.ndarray | torch.Tensor | Sequence[int],
    k: int,
    seed: int,
    num_classes: Optional[int] = None,
    classes: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """Exactly ``k`` indices of each class 0..num_classes-1, chosen with ``seed``; sorted int64 (C*k,).

    Raises :class:`DataError` if a class has fewer than ``k`` images (naming the class and its
    size; lower data.labels_per_class).
    """
    if k < 1:
        raise DataError(f"labels_per_class must be >= 1, got {k}")
    y = _as_labels(labels)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for c, members in enumerate(_class_members(y, num_classes)):
        if len(members) < k:
            raise DataError(
                f"class {_class_name(c, classes)} has only {len(members)} training images, fewer than "
                f"labels_per_class={k}; lower data.labels_per_class to at most {len(members)}"
                + (" (or raise data.max_train)" if len(members) else "")
            )
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def select_fraction(
    labels: np.ndarray | torch.Tensor | Sequence[int],
    fraction: float,
    seed: int,
    num_classes: Optional[int] = None,
) -> np.ndarray:
    """``round(fraction * n_c)`` (at least 1) indices of every non-empty class c; sorted int64."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"label_fraction must be in (0, 1], got {fraction}")
    y = _as_labels(labels)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for members in _class_members(y, num_classes):
        if len(members) == 0:
            continue
        n = min(len(members), max(1, math.floor(fraction * len(members) + 0.5)))
        chosen.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def select_balanced(
    labels: np.ndarray | torch.Tensor | Sequence[int],
    n: int,
    seed: int,
    num_classes: Optional[int] = None,
) -> np.ndarray:
    """``min(n, #labeled)`` indices, as class-balanced as the class sizes allow; sorted int64.

    Water-filling: every class gets ``n // C`` images (small classes give their whole set and
    the rest is shared among the others); the last few images left over go to classes picked
    at random with ``seed``. Used for ``data.max_train``.
    """
    if n < 1:
        raise DataError(f"max_train must be >= 1, got {n}")
    y = _as_labels(labels)
    members = _class_members(y, num_classes)
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    rng = np.random.default_rng(seed)
    alloc = np.zeros_like(sizes)
    remaining = min(int(n), int(sizes.sum()))
    open_ = [c for c in range(len(sizes)) if sizes[c] > 0]
    while remaining > 0 and open_:
        share = remaining // len(open_)
        if share == 0:
            for c in rng.permutation(open_)[:remaining]:
                alloc[c] += 1
            remaining = 0
            break
        for c in open_:
            take = min(share, int(sizes[c] - alloc[c]))
            alloc[c] += take
            remaining -= take
        open_ = [c for c in open_ if alloc[c] < sizes[c]]
    chosen = [rng.permutation(m)[: alloc[c]] for c, m in enumerate(members)]
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


# --------------------------------------------------------------------------------------------
# subset files


def _entries(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank, non-comment lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"subset file {path}: cannot read ({e}); check data.subset_file") from e
    except UnicodeDecodeError as e:
        raise DataError(f"subset file {path}: not UTF-8 text ({e})") from e
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            out.append((lineno, s))
    return out


def _by_class_and_name(ds: FolderImageDataset) -> dict[tuple[int, str], list[int]]:
    table: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (p, y) in enumerate(zip(ds.paths, ds.labels.tolist())):
        table[(y, p.rsplit("/", 1)[-1])].append(i)
    return table


def _normalise_rel(s: str) -> str:
    rel = s.replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    return rel


def read_subset_file(path: str | os.PathLike, dataset: ImageDataset, *, hint: str = "") -> np.ndarray:
    """The labeled indices listed in a subset file (format detected, see module doc); sorted int64.

    ``dataset`` is the train set the file refers to. Raises :class:`DataError` naming the line
    for an unknown class, a file missing from the train set, an index out of range or a
    duplicate. ``hint`` is appended to "not found" / "out of range" errors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"subset file {path} does not exist; fix data.subset_file")
    entries = _entries(path)
    if not entries:
        raise DataError(f"subset file {path} lists no images")
    extra = f" {hint}" if hint else ""
    seen: dict[int, int] = {}

    def add(i: int, lineno: int, line: str) -> None:
        if i in seen:
            raise DataError(f"{path}:{lineno}: {line!r} repeats line {seen[i]}")
        seen[i] = lineno

    if all(_INT_LINE.fullmatch(s) for _, s in entries):
        n = len(dataset)
        for lineno, s in entries:
            i = int(s)
            if i >= n:
                raise DataError(
                    f"{path}:{lineno}: index {i} out of range for a train set of {n} images.{extra}"
                )
            add(i, lineno, s)
        return np.array(sorted(seen), dtype=np.int64)

    if not isinstance(dataset, FolderImageDataset):
        bad_line, bad = next((ln, s) for ln, s in entries if not _INT_LINE.fullmatch(s))
        raise DataError(
            f"{path}:{bad_line}: {bad!r} is a file name, but this dataset is not an image folder; "
            "list integer indices into the train set (one per line) instead"
        )
    lookup = class_folder_lookup(dataset.classes)
    by_rel = {p: i for i, p in enumerate(dataset.paths)}
    by_name = _by_class_and_name(dataset)
    some = ", ".join(dataset.classes[:5]) + (", ..." if len(dataset.classes) > 5 else "")
    for lineno, s in entries:
        rel = _normalise_rel(s) if ("/" in s or "\\" in s) else None
        if rel is not None:
            cls_key = rel.split("/", 1)[0]
            if rel in by_rel:
                add(by_rel[rel], lineno, s)
                continue
            if cls_key not in lookup:
                raise DataError(f"{path}:{lineno}: unknown class {cls_key!r} in {s!r} (classes: {some})")
            raise DataError(f"{path}:{lineno}: {s!r} not found in the train set {dataset.root}.{extra}")
        cls_key = s.split("_", 1)[0]
        if cls_key not in lookup:
            raise DataError(
                f"{path}:{lineno}: unknown class {cls_key!r} (the prefix of {s!r} before '_'; classes: {some})"
            )
        hits = by_name.get((lookup[cls_key], s), [])
        if not hits:
            raise DataError(
                f"{path}:{lineno}: {s!r} not found in class {cls_key!r} of the train set {dataset.root}.{extra}"
            )
        if len(hits) > 1:
            raise DataError(
                f"{path}:{lineno}: {s!r} is ambiguous ({len(hits)} files of that name in class {cls_key!r}); "
                "list paths relative to the train folder instead"
            )
        add(hits[0], lineno, s)
    return np.array(sorted(seen), dtype=np.int64)


read_index_file = read_subset_file


def subset_file_lines(idx: np.ndarray | torch.Tensor | Sequence[int], dataset: ImageDataset) -> list[str]:
    """One line per labeled image: DPT file names for folder datasets, else integer indices."""
    idx_np = np.unique(_as_labels(idx))  # sorted, deduplicated
    if idx_np.size and (idx_np[0] < 0 or idx_np[-1] >= len(dataset)):
        raise DataError(f"labeled indices out of range for a train set of {len(dataset)} images")
    if not isinstance(dataset, FolderImageDataset):
        return [str(int(i)) for i in idx_np]
    lookup = class_folder_lookup(dataset.classes)
    by_name = _by_class_and_name(dataset)
    lines = []
    for i in idx_np.tolist():
        rel = dataset.paths[i]
        name = rel.rsplit("/", 1)[-1]
        y = int(dataset.labels[i])
        prefix_ok = lookup.get(name.split("_", 1)[0]) == y
        lines.append(name if prefix_ok and len(by_name[(y, name)]) == 1 else rel)
    return lines


def write_index_file(
    path: str | os.PathLike, idx: np.ndarray | torch.Tensor | Sequence[int], dataset: ImageDataset
) -> None:
    """Write the labeled subset atomically (see :func:`subset_file_lines`); readable by :func:`read_subset_file`."""
    lines = subset_file_lines(idx, dataset)
    atomic_write_text(path, "".join(f"{s}\n" for s in lines))
