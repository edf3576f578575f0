"""Image-folder datasets: ImageNet-style trees and the generated pseudo-image trees of stage 2.

Layouts:

* ImageNet: ``root/train/<class>/<file>`` and ``root/<test_split>/<class>/<file>`` (test split
  ``val`` by default). Classes are the sorted sub-folder names of ``train``
  (:func:`scan_image_folder`); the test split maps its folders onto the same classes.
* Pseudo images: ``root/<safe_class_dirname(class)>/<anything>.png``, read with
  :meth:`FolderImageDataset.from_tree` against the known class list.

Images are decoded lazily (so the dataset is cheap to pickle into DataLoader workers),
converted to RGB (``L`` when ``channels == 1``) and, when ``image_size`` is given, resized so the
shorter side equals ``image_size`` and then center-cropped to a square. Without ``image_size``
every image must already be square and of one size: the size of the first image is read at
construction and each later image is checked against it.

Single images (``ds[i]``) decode with PIL. Bulk reads (``get_batch`` of at least
:data:`BULK_MIN` images, :meth:`FolderImageDataset.read_images`, :meth:`FolderImageDataset.preload`)
go through :mod:`dpt_engine.data.dali_input`: DALI when available (``decoder=`` / ``DPT_IMAGE_DECODER``),
else threaded PIL, with the same geometry. Without resizing both give identical tensors; with
resizing they agree within the resize tolerance stated in ``dali_input``. ``read_images`` and
``preload`` skip unreadable files and report them; ``get_batch`` must return every image it is
asked for, so it raises :class:`DataError` naming all the unreadable ones instead.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .base import ArrayImageDataset, DataError, ImageDataset
from .dali_input import ImageBatch, ImageLoader, SkippedImage, apply_geometry_pil, center_geometry

log = logging.getLogger(__name__)

__all__ = [
    "BULK_MIN",
    "IMAGE_EXTENSIONS",
    "FolderImageDataset",
    "class_dirnames",
    "class_folder_lookup",
    "list_images",
    "safe_class_dirname",
    "scan_image_folder",
]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".gif")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_DIRNAME = 100
BULK_MIN = 16  # get_batch of at least this many images uses the bulk (DALI / threaded PIL) loader


def _short_hash(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]


def _sanitize(name: str) -> str:
    """Replace every character outside ``[A-Za-z0-9._+-]`` (``/``, spaces, ...) by ``_``."""
    s = _UNSAFE.sub("_", name)
    if s.startswith("."):  # no hidden folders, no "." / ".."
        s = "_" + s[1:]
    if not s:
        s = "_"
    if len(s) > _MAX_DIRNAME:
        s = f"{s[: _MAX_DIRNAME - 9]}-{_short_hash(name)}"
    return s


def class_dirnames(classes: Sequence[str]) -> list[str]:
    """Filesystem-safe, pairwise distinct folder names for a class list (see :func:`safe_class_dirname`)."""
    plain = [_sanitize(c) for c in classes]
    raw = set(classes)
    out = []
    for c, s in zip(classes, plain):
        # a changed name that collides with another class's folder or raw name gets a hash suffix
        if s != c and (plain.count(s) > 1 or s in raw):
            s = f"{s[: _MAX_DIRNAME - 9]}-{_short_hash(c)}"
        out.append(s)
    if len(set(out)) != len(out):  # pragma: no cover - needs a sha1 prefix collision
        raise DataError(f"cannot make distinct folder names for classes {list(classes)}")
    return out


def safe_class_dirname(name: str, classes: Optional[Sequence[str]] = None) -> str:
    """A deterministic filesystem-safe folder name for class ``name``.

    Characters outside ``[A-Za-z0-9._+-]`` become ``_`` (``"T-shirt/top" -> "T-shirt_top"``,
    ``"Ankle boot" -> "Ankle_boot"``); a leading dot becomes ``_``. Names that are already safe
    are returned unchanged. Pass the full ``classes`` list to guarantee distinct names for
    distinct classes: a sanitised name that would collide with another class's gets an 8-hex
    sha1 suffix (``"a/b" -> "a_b-<hash>"`` when ``"a_b"`` is also a class).
    """
    if classes is None:
        return _sanitize(name)
    classes = list(classes)
    if name not in classes:
        raise DataError(f"class {name!r} is not one of {classes}")
    return class_dirnames(classes)[classes.index(name)]


def list_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursive, hidden entries skipped), sorted by path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / f)
    return sorted(found)


_HEAD_BYTES = 256 << 10  # enough for any header (large EXIF blocks included)
_TAIL_BYTES = 4 << 10  # where a complete JPEG's EOI / a PNG's IEND chunk sits


def probe_file(path: str | os.PathLike) -> Optional[str]:
    """Why the image file at ``path`` cannot be used (empty, unreadable header, truncated), or None.

    Cheap: the header and the last few KiB are read, not the pixels, so that a dataset of a million
    files is checked in minutes. A file that passes can still fail to decode (damaged pixel data);
    bulk reads skip those too."""
    from .dali_input import CorruptImageError, probe_image

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size <= _HEAD_BYTES + _TAIL_BYTES:
                probe_image(f.read())
                return None
            head = f.read(_HEAD_BYTES)
            f.seek(size - _TAIL_BYTES)
            tail = f.read()
    except CorruptImageError as e:
        return str(e)
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(head)) as img:
            width, height, fmt = *img.size, img.format
    except UnidentifiedImageError:
        return "unreadable header (not a recognised image format)"
    except (OSError, ValueError, SyntaxError) as e:
        return f"unreadable header ({e})"
    if width <= 0 or height <= 0:
        return f"image has size {width}x{height}"
    marker = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}.get(fmt or "")
    if marker is not None and marker not in tail:
        return f"truncated {fmt} (no end marker)"
    return None


def drop_unreadable(
    root: str | os.PathLike, paths: list[str], labels: list[int], what: str
) -> tuple[list[str], list[int], list[dict]]:
    """``paths`` without the files :func:`probe_file` rejects, and a record of each one dropped
    (``{"path", "reason"}``); probed by threads (the work is file I/O), with a progress bar for large
    folders."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    full = [os.path.join(str(root), p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as pool:
        reasons = list(
            tqdm(
                pool.map(probe_file, full, chunksize=256),
                total=len(full),
                desc=f"checking {what}",
                unit="file",
                disable=len(full) < 20_000,
                leave=False,
            )
        )
    bad = [i for i, r in enumerate(reasons) if r is not None]
    if not bad:
        return paths, labels, []
    skip = set(bad)
    skipped = [{"path": full[i], "reason": reasons[i]} for i in bad]
    for rec in skipped[:5]:
        log.warning("%s: skipping unreadable image %s: %s", what, rec["path"], rec["reason"])
    if len(skipped) > 5:
        log.warning("%s: ... and %d more unreadable images skipped", what, len(skipped) - 5)
    keep = [i for i in range(len(paths)) if i not in skip]
    return [paths[i] for i in keep], [labels[i] for i in keep], skipped


def _resize_shorter_center_crop(img, size: int):
    """Resize so the shorter side is ``size`` (bicubic, antialiased), then center-crop to square.

    The geometry is :func:`~dpt_engine.data.dali_input.center_geometry`, shared with the DALI path.
    """
    w, h = img.size
    return apply_geometry_pil(img, center_geometry(w, h, size))


class FolderImageDataset(ImageDataset):
    """Images read lazily from files: ``ds[i] -> (uint8 (C, H, W) tensor, label)``.

    ``paths`` are relative to ``root``; ``labels`` int64 (N,), ``-1`` if unknown. With
    ``image_size`` set, every image is resized (shorter side) and center-cropped to it
    (``resize`` is True); without it, ``image_size`` is the first image's side and every image
    must match it exactly. Picklable: it holds only strings, a tensor and ints (the bulk loader
    is rebuilt lazily in each process). ``decoder`` (``auto``/``dali``/``pil``, None: the
    ``DPT_IMAGE_DECODER`` environment variable, else auto) picks the bulk decoder.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        classes: Sequence[str],
        channels: int = 3,
        image_size: Optional[int] = None,
        name: str = "",
        decoder: Optional[str] = None,
    ):
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        self.root = str(root)
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)  # (N,)
        if len(self.paths) != self.labels.shape[0]:
            raise DataError(f"{self.root}: {len(self.paths)} paths but {self.labels.shape[0]} labels")
        if not self.paths:
            raise DataError(f"{self.root}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        self.classes = list(classes)
        self.channels = channels
        self.name = name or self.root
        self.decoder = decoder
        self._loader: Optional[ImageLoader] = None
        self.skipped_files: list[dict] = []  # files left out at construction (verify=True)
        self.resize = image_size is not None
        if image_size is not None:
            self.image_size = int(image_size)
        else:
            self.image_size = self._native_size(0)

    # -- construction helpers -------------------------------------------------------------
    @classmethod
    def from_tree(
        cls,
        root: str | os.PathLike,
        classes: Sequence[str],
        channels: int = 3,
        image_size: Optional[int] = None,
        name: str = "",
        decoder: Optional[str] = None,
        verify: bool = False,
    ) -> FolderImageDataset:
        """Read ``root/<class folder>/**/<image>`` with a known class list.

        A folder matches a class if it is named ``safe_class_dirname(class, classes)``,
        ``safe_class_dirname(class)`` (when unambiguous) or the class name itself. Classes
        without a folder are allowed (they simply have no images); a folder that matches no
        class raises :class:`DataError` listing the valid folder names. Top-level files and
        hidden entries are ignored.
        """
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        classes = list(classes)
        lookup = class_folder_lookup(classes)
        paths: list[str] = []
        labels: list[int] = []
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if entry.name not in lookup:
                valid = ", ".join(class_dirnames(classes))
                raise DataError(
                    f"{root}: folder {entry.name!r} matches no class; valid class folders are: {valid}"
                )
            label = lookup[entry.name]
            files = list_images(Path(entry.path))
            paths += [f.relative_to(root).as_posix() for f in files]
            labels += [label] * len(files)
        if not paths:
            raise DataError(f"{root}: no images in class sub-folders (expected {root}/<class>/<image>.png)")
        skipped: list[dict] = []
        if verify:
            paths, labels, skipped = drop_unreadable(root, paths, labels, name or str(root))
            if not paths:
                raise DataError(
                    f"{root}: none of the {len(skipped)} image files can be read ({skipped[0]['reason']})"
                )
        ds = cls(
            root, paths, labels, classes, channels=channels, image_size=image_size, name=name, decoder=decoder
        )
        ds.skipped_files = skipped
        return ds

    def subset(self, idx: np.ndarray | torch.Tensor | Sequence[int]) -> FolderImageDataset:
        """A new dataset with the images at ``idx`` (same root, classes, size and resizing)."""
        idx_np = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = copy.copy(self)
        out._loader = None
        out.paths = [self.paths[i] for i in idx_np]
        out.labels = self.labels[torch.from_numpy(idx_np)].clone()
        return out

    # -- loading ----------------------------------------------------------------------------
    def _open(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path = os.path.join(self.root, self.paths[i])
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("L" if self.channels == 1 else "RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(
                f"{path}: cannot decode image ({e}); the file is corrupt, delete or replace it"
            ) from e

    def _native_size(self, i: int) -> int:
        from PIL import Image, UnidentifiedImageError

        path = os.path.join(self.root, self.paths[i])
        try:
            with Image.open(path) as img:
                w, h = img.size
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(
                f"{path}: cannot read image ({e}); the file is corrupt, delete or replace it"
            ) from e
        if w != h:
            raise DataError(
                f"{path}: image is {w}x{h}, not square; set data.image_size=N to resize and center-crop "
                "every image to NxN"
            )
        return w

    def load_image(self, i: int) -> torch.Tensor:
        """Decode image ``i`` -> uint8 (C, H, W) with H == W == ``image_size``."""
        img = self._open(int(i))
        if self.resize:
            img = _resize_shorter_center_crop(img, self.image_size)
        elif img.size != (self.image_size, self.image_size):
            raise DataError(
                f"{os.path.join(self.root, self.paths[int(i)])}: image is {img.size[0]}x{img.size[1]} but "
                f"the first image is {self.image_size}x{self.image_size}; set data.image_size="
                f"{self.image_size} to resize and center-crop every image"
            )
        arr = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W) or (H, W, 3), a writable copy
        if arr.ndim == 2:
            return arr.unsqueeze(0)  # (1, H, W)
        return arr.permute(2, 0, 1).contiguous()  # (C, H, W)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load_image(int(i)), int(self.labels[int(i)])

    def get_batch(self, idx: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """uint8 (B, C, H, W) images at ``idx`` (bulk loader from :data:`BULK_MIN` images on)."""
        idx_list = [int(i) for i in idx]
        if len(idx_list) >= BULK_MIN:
            return self.bulk_loader().load(idx_list, on_error="raise").images
        out = torch.empty((len(idx_list), self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        for j, i in enumerate(idx_list):
            out[j] = self.load_image(i)
        return out

    def bulk_loader(self) -> ImageLoader:
        """The :class:`~dpt_engine.data.dali_input.ImageLoader` over all files (eval geometry),
        built on first use in each process; its decoder is :attr:`decoder` resolved."""
        if self._loader is None:
            self._loader = ImageLoader(
                [os.path.join(self.root, p) for p in self.paths],
                self.labels,
                image_size=self.image_size,
                resize=self.resize,
                channels=self.channels,
                decoder=self.decoder,
                rank=0,
                world_size=1,
            )
        return self._loader

    def read_images(
        self, idx: torch.Tensor | Sequence[int] | np.ndarray
    ) -> tuple[ImageBatch, list[SkippedImage]]:
        """Decode the images at ``idx``, leaving unreadable files out: ``(batch, skipped)``.

        ``batch.indices`` are the dataset indices that decoded; ``skipped`` lists the others
        (index, path, reason), and is also logged.
        """
        loader = self.bulk_loader()
        idx_np = np.asarray(idx, dtype=np.int64).reshape(-1)
        batch = loader.load(idx_np, on_error="skip")
        wanted = set(idx_np.tolist())
        return batch, [s for s in loader.skipped if s.index in wanted]

    def preload(self, progress: bool = True) -> tuple[ArrayImageDataset, np.ndarray, list[SkippedImage]]:
        """Every readable image in memory: ``(dataset, kept indices, skipped)``.

        The in-memory dataset holds the images at ``kept`` (int64 indices into this dataset), in
        order, with their labels; unreadable files are left out, listed in ``skipped`` and
        counted in the log, so a long run is not stopped by a few corrupt files.
        """
        from tqdm.auto import tqdm

        n = len(self)
        step = 1024
        parts, kept = [], []
        skipped: list[SkippedImage] = []
        for s in tqdm(range(0, n, step), desc=f"loading {self.name}", disable=not progress, unit="chunk"):
            batch, bad = self.read_images(np.arange(s, min(n, s + step)))
            parts.append(batch.images)
            kept.append(batch.indices)
            skipped += bad
        kept_idx = torch.cat(kept) if kept else torch.empty(0, dtype=torch.int64)
        if not len(kept_idx):
            raise DataError(
                f"{self.root}: none of the {n} images could be decoded (first: {skipped[0].reason})"
            )
        if skipped:
            log.warning("%s: skipped %d of %d unreadable images", self.name, len(skipped), n)
        ds = ArrayImageDataset(torch.cat(parts), self.labels[kept_idx].clone(), self.classes, self.name)
        return ds, kept_idx.numpy(), skipped

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_loader"] = None  # holds decoder threads / a DALI pipeline: rebuilt where it is used
        return state

    def describe(self, idx: int) -> str:
        """The image's path relative to ``root`` (POSIX separators)."""
        return self.paths[int(idx)]

    def __repr__(self) -> str:
        return (
            f"FolderImageDataset(root={self.root!r}, n={len(self)}, classes={len(self.classes)}, "
            f"channels={self.channels}, image_size={self.image_size})"
        )


def class_folder_lookup(classes: list[str]) -> dict[str, int]:
    """Folder name -> class index: the distinct dirname, the class name, the plain sanitised name."""
    lookup: dict[str, int] = {}
    ambiguous: set[str] = set()

    def add(key: str, i: int) -> None:
        if key in ambiguous:
            return
        if key in lookup and lookup[key] != i:
            ambiguous.add(key)
            del lookup[key]
            return
        lookup[key] = i

    distinct = class_dirnames(classes)
    for i, d in enumerate(distinct):  # these are unique, and win over everything else
        lookup[d] = i
    for i, c in enumerate(classes):
        if "/" not in c and c not in lookup:
            add(c, i)
        s = _sanitize(c)
        if s not in distinct:
            add(s, i)
    return lookup


def scan_image_folder(
    root: str | os.PathLike,
    channels: int = 3,
    image_size: Optional[int] = None,
    name: str = "",
    decoder: Optional[str] = None,
    verify: bool = False,
) -> FolderImageDataset:
    """An ImageNet-style split folder ``root/<class>/**/<image>``; classes = sorted sub-folder names.
    ``verify`` drops the files :func:`probe_file` rejects and lists them in ``skipped_files``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
    paths: list[str] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        files = list_images(root / c)
        paths += [f.relative_to(root).as_posix() for f in files]
        labels += [i] * len(files)
    skipped: list[dict] = []
    if verify and paths:
        paths, labels, skipped = drop_unreadable(root, paths, labels, name or str(root))
        if not paths:
            raise DataError(
                f"{root}: none of the {len(skipped)} image files can be read ({skipped[0]['reason']})"
            )
    ds = FolderImageDataset(
        root, paths, labels, classes, channels=channels, image_size=image_size, name=name, decoder=decoder
    )
    ds.skipped_files = skipped
    return ds
