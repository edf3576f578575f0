"""Bulk image input: a DALI pipeline (CPU here, nvJPEG ``mixed`` decoding on GPUs) and a PIL fallback.

Both decoders turn image files into the project's layout, uint8 ``(B, C, S, S)`` tensors, through
the *same* per-image geometry computed in Python (:class:`Geometry`): an optional crop box of the
decoded image, a resize, a crop of the resized image and an optional horizontal flip. The eval
geometry is the one :class:`~dpt_engine.data.imagefolder.FolderImageDataset` has always used
(shorter side -> ``size`` with antialiased bicubic, then a center crop with ``(n - size) // 2``
offsets); the training geometry is a random resized crop plus a random flip, drawn from a generator
seeded by ``(seed, epoch, image index)`` so every rank, batch size and decoder sees the same crops.

Why DALI is fed through ``external_source`` rather than ``fn.readers.file``: Python reads each
file's bytes and header (cheap, done on a prefetch thread), so the geometry, the order (shuffling
and rank sharding) and the handling of broken files are identical for both decoders, and one
pipeline serves any list of indices (``FolderImageDataset.get_batch``) without being rebuilt.
DALI still does the expensive part: decoding (nvJPEG on a GPU), resizing, cropping and flipping.

What agrees between the decoders (checked by ``tests/test_dali_input.py`` on real Fashion-MNIST
images written as JPEG and PNG):

* no resizing (image already ``size`` x ``size``): bit-identical for PNG and JPEG (both decode with
  libjpeg-turbo's default IDCT; channels=1 uses PIL's own RGB -> L integer formula in DALI);
* resizing: PIL resamples horizontally then vertically with a uint8 intermediate while DALI keeps
  float precision, so values differ by rounding: at most :data:`RESIZE_TOLERANCE_MAX` levels per
  pixel (clipped cubic overshoot at sharp edges, derived below) and :data:`RESIZE_TOLERANCE_MEAN`
  on average (the random-crop geometry is identical).

Broken files never stop a run: every file is first probed (PIL reads the header; JPEG and PNG must
also end with their end marker, which catches truncated downloads cheaply). A probe failure, or a
decode failure of either decoder, skips the file and records it in :attr:`ImageLoader.skipped`
(index, path, reason); DALI raises for a whole batch when one file is bad, so the batch is then
re-decoded file by file (on a fresh pipeline: an error invalidates the old one) to isolate it, and a
file DALI cannot decode but PIL can (e.g. GIF) is decoded by PIL instead.

Decoder choice: an explicit ``decoder=`` argument, then ``DPT_IMAGE_DECODER=auto|dali|pil``, then
``auto`` (DALI when ``nvidia.dali`` imports, else PIL). ``dali`` without DALI installed raises with
the install command; the choice is logged once.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional

import numpy as np
import torch

from .base import DataError

__all__ = [
    "DECODERS",
    "ENV_DECODER",
    "RESIZE_TOLERANCE_MAX",
    "RESIZE_TOLERANCE_MEAN",
    "CorruptImageError",
    "Geometry",
    "ImageBatch",
    "ImageLoader",
    "SkippedImage",
    "center_geometry",
    "dali_available",
    "decode_pil",
    "load_images",
    "probe_image",
    "random_resized_geometry",
    "resolve_image_decoder",
]

log = logging.getLogger(__name__)

DECODERS = ("auto", "dali", "pil")
ENV_DECODER = "DPT_IMAGE_DECODER"
# Agreement of the two decoders when images are resized (uint8 levels). Both use Keys' cubic
# (a = -0.5), widened by the scale when shrinking, in two separable passes; PIL clips and rounds
# the first pass to uint8, DALI keeps it in float. Away from sharp edges that is +-1 rounding
# (mean |diff| measured 0.12-0.17 on upscaled/downscaled Fashion-MNIST JPEG and PNG). At a
# 0 <-> 255 step the first pass overshoots by at most the kernel's negative weight (0.125 at
# worst phase) x 255 ~ 32 levels, which PIL clips and DALI keeps; the second pass (positive
# weights summing to at most 1.125) carries that into a difference of at most ~36 levels at
# those few pixels (max seen: 20).
RESIZE_TOLERANCE_MAX = 36
RESIZE_TOLERANCE_MEAN = 0.5
# Formats DALI's image decoder reads (PIL's names); anything else goes to PIL in the DALI decoder.
_DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
_logged: set[str] = set()
# The process that built a DALI pipeline. DALI's runtime does not survive fork(): a forked child
# (a DataLoader worker under the default start method) that builds a pipeline after its parent ran
# one crashes with SIGSEGV, so such a child decodes with PIL instead (see ImageLoader._use_dali).
_dali_pid: Optional[int] = None
_log_lock = threading.Lock()


def _log_once(level: int, msg: str, *args: Any) -> None:
    key = msg % args
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    log.log(level, msg, *args)


class CorruptImageError(DataError):
    """A file is not a decodable image (truncated, garbage, unsupported)."""


class SkippedImage(NamedTuple):
    """A file left out of a run: its index in the loader's file list, its path and why."""

    index: int
    path: str
    reason: str


@dataclass
class ImageBatch:
    """Decoded images (uint8 (B, C, S, S)), their labels (int64 (B,)) and file indices (int64 (B,)).

    ``B`` can be smaller than the requested batch when files were skipped.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.shape[0])


# ---------------------------------------------------------------------------------------- decoders
@functools.lru_cache(maxsize=1)
def dali_available() -> tuple[bool, Optional[str]]:
    """``(True, None)`` when ``nvidia.dali`` imports, else ``(False, reason)`` (checked once)."""
    try:
        import nvidia.dali.fn  # noqa: F401
    except ImportError as e:  # pragma: no cover - DALI is in the pinned stack
        return False, str(e)
    return True, None


class ImageBackendError(DataError, ValueError):
    """An image decoder that does not exist or cannot run here (a ValueError for older callers)."""


def resolve_image_decoder(decoder: Optional[str] = None) -> str:
    """``"dali"`` or ``"pil"`` for an explicit choice, else ``$DPT_IMAGE_DECODER``, else auto-detection."""
    choice = decoder if decoder is not None else os.environ.get(ENV_DECODER, "auto")
    choice = str(choice).strip().lower() or "auto"
    if choice not in DECODERS:
        src = "decoder=" if decoder is not None else f"{ENV_DECODER}="
        raise ImageBackendError(
            f"{src}{choice!r} is not an image decoder; choose one of {', '.join(DECODERS)} (or unset {ENV_DECODER})"
        )
    if choice == "pil":
        return "pil"
    ok, why = dali_available()
    if choice == "dali":
        if not ok:
            raise ImageBackendError(
                f"image decoder 'dali' requested but DALI does not import ({why}); install it with "
                "`pip install nvidia-dali-cuda120` or use decoder='pil'"
            )
        return "dali"
    if ok:
        _log_once(logging.INFO, "image input: DALI decoder (auto)")
        return "dali"
    _log_once(logging.INFO, "image input: PIL decoder (auto; DALI unavailable: %s)", why)
    return "pil"


# ---------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """How one decoded image of size (h, w) becomes the output, in pixel units.

    ``box`` (top, left, height, width) is cut from the decoded image first; it is resized to
    ``resize`` (height, width); ``crop`` (top, left, height, width) is cut from that; ``flip``
    mirrors it horizontally.
    """

    box: tuple[int, int, int, int]
    resize: tuple[int, int]
    crop: tuple[int, int, int, int]
    flip: bool = False


def center_geometry(width: int, height: int, size: int, flip: bool = False) -> Geometry:
    """Shorter side -> ``size`` (longer side rounded, at least ``size``), then a center crop."""
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    return Geometry(
        box=(0, 0, height, width),
        resize=(nh, nw),
        crop=((nh - size) // 2, (nw - size) // 2, size, size),
        flip=flip,
    )


def native_geometry(width: int, height: int, flip: bool = False) -> Geometry:
    """The image as it is (optionally mirrored)."""
    return Geometry(box=(0, 0, height, width), resize=(height, width), crop=(0, 0, height, width), flip=flip)


def random_resized_geometry(
    width: int,
    height: int,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = False,
) -> Geometry:
    """A random box of ``scale`` x the area and aspect ``ratio`` (log-uniform), resized to ``size``.

    Ten tries, as torchvision's RandomResizedCrop; if none fits, the largest centred box of the
    clamped aspect ratio.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(rng.integers(0, height - ch + 1))
            left = int(rng.integers(0, width - cw + 1))
            break
    else:
        aspect = width / height
        if aspect < ratio[0]:
            cw, ch = width, round(width / ratio[0])
        elif aspect > ratio[1]:
            ch, cw = height, round(height * ratio[1])
        else:
            cw, ch = width, height
        top, left = (height - ch) // 2, (width - cw) // 2
    return Geometry(box=(top, left, ch, cw), resize=(size, size), crop=(0, 0, size, size), flip=flip)


# -------------------------------------------------------------------------------- probing, PIL
def _has_end_marker(data: bytes, fmt: str) -> bool:
    """JPEG: an EOI marker after the first start-of-scan; PNG: an IEND chunk. Other formats: True."""
    if fmt in ("JPEG", "MPO"):
        sos = data.find(b"\xff\xda")
        return sos >= 0 and data.rfind(b"\xff\xd9") > sos
    if fmt == "PNG":
        return data.rfind(b"IEND") > 8
    return True


def probe_image(data: bytes) -> tuple[int, int, str]:
    """``(width, height, PIL format)`` from the header; raises :class:`CorruptImageError` when the
    header does not parse, the size is empty, or a JPEG/PNG lacks its end marker (truncated)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise CorruptImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            fmt = img.format or "?"
    except UnidentifiedImageError:
        raise CorruptImageError("unreadable header (not a recognised image format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptImageError(f"unreadable header ({e})") from e
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"image has size {width}x{height}")
    if not _has_end_marker(data, fmt):
        raise CorruptImageError(f"truncated {fmt} (no end marker)")
    return width, height, fmt


def decode_pil(data: bytes, channels: int, geometry: Geometry) -> torch.Tensor:
    """The PIL reference: decode, convert (``L``/``RGB``), apply ``geometry`` -> uint8 (C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = img.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise CorruptImageError(f"cannot decode ({e})") from e
    img = apply_geometry_pil(img, geometry)
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W) or (H, W, 3), a writable copy
    if arr.ndim == 2:
        return arr.unsqueeze(0)  # (1, H, W)
    return arr.permute(2, 0, 1).contiguous()  # (C, H, W)


def apply_geometry_pil(img, geometry: Geometry):
    """``geometry`` on a PIL image (bicubic resize, antialiased when shrinking, as PIL always does)."""
    from PIL import Image

    top, left, h, w = geometry.box
    if (top, left, h, w) != (0, 0, img.size[1], img.size[0]):
        img = img.crop((left, top, left + w, top + h))
    rh, rw = geometry.resize
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    top, left, h, w = geometry.crop
    if (top, left, h, w) != (0, 0, img.size[1], img.size[0]):
        img = img.crop((left, top, left + w, top + h))
    if geometry.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


# ---------------------------------------------------------------------------------------- DALI
def _dali_reason(e: BaseException) -> str:
    """The informative line of a DALI pipeline error (the line after ``encountered:``)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for k, ln in enumerate(lines[:-1]):
        if ln.startswith("encountered"):
            return lines[k + 1]
    return lines[0] if lines else type(e).__name__


class _DaliDecoder:
    """One DALI pipeline fed with encoded bytes and per-image geometry; rebuilt after an error.

    ``device="cpu"`` builds a CPU pipeline (``device_id=None``); ``"cuda"`` decodes with the
    ``mixed`` (nvJPEG) decoder on the current CUDA device and returns CUDA tensors.
    """

    def __init__(self, max_batch: int, channels: int, device: str, num_threads: int, seed: int) -> None:
        self.max_batch, self.channels, self.device = max_batch, channels, device
        self.num_threads, self.seed = num_threads, seed
        self.pid = os.getpid()  # a forked DataLoader worker must not reuse the parent's threads
        self._pipe: Any = None

    def _build(self) -> Any:
        global _dali_pid
        from nvidia.dali import fn, pipeline_def, types

        _dali_pid = os.getpid()
        gpu = self.device == "cuda"
        device_id = torch.cuda.current_device() if gpu else None
        channels = self.channels

        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.num_threads,
            device_id=device_id,
            seed=self.seed,
            exec_async=False,
            exec_pipelined=False,
        )
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            box_anchor = fn.external_source(name="box_anchor", dtype=types.FLOAT, ndim=1)  # (top, left)
            box_shape = fn.external_source(name="box_shape", dtype=types.FLOAT, ndim=1)  # (h, w)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)  # (h, w)
            crop_anchor = fn.external_source(name="crop_anchor", dtype=types.FLOAT, ndim=1)
            crop_shape = fn.external_source(name="crop_shape", dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            img = fn.decoders.image(
                encoded, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False
            )  # (H, W, 3) uint8
            if channels == 1:  # PIL's ITU-R 601-2 luma in 16-bit fixed point, so "L" matches exactly
                rgb = fn.cast(img, dtype=types.INT32)
                luma = (rgb[:, :, 0] * 19595 + rgb[:, :, 1] * 38470 + rgb[:, :, 2] * 7471 + 32768) >> 16
                img = fn.cast(fn.expand_dims(luma, axes=[2], new_axis_names="C"), dtype=types.UINT8)
                img = fn.reshape(img, layout="HWC")  # (H, W, 1)
            img = fn.slice(
                img, box_anchor, box_shape, axes=[0, 1], normalized_anchor=False, normalized_shape=False
            )
            img = fn.resize(img, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
            img = fn.slice(
                img, crop_anchor, crop_shape, axes=[0, 1], normalized_anchor=False, normalized_shape=False
            )
            img = fn.flip(img, horizontal=flip)
            return fn.transpose(img, perm=[2, 0, 1])  # (C, S, S)

        p = pipe()
        p.build()
        return p

    def decode(self, data: Sequence[bytes], geometries: Sequence[Geometry]) -> torch.Tensor:
        """Decode ``data`` (at most ``max_batch`` files) -> uint8 (B, C, S, S); raises on any bad file."""
        if self._pipe is None:
            self._pipe = self._build()
        p = self._pipe
        f32 = np.float32
        try:
            p.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in data])
            p.feed_input("box_anchor", [np.array(g.box[:2], f32) for g in geometries])
            p.feed_input("box_shape", [np.array(g.box[2:], f32) for g in geometries])
            p.feed_input("size", [np.array(g.resize, f32) for g in geometries])
            p.feed_input("crop_anchor", [np.array(g.crop[:2], f32) for g in geometries])
            p.feed_input("crop_shape", [np.array(g.crop[2:], f32) for g in geometries])
            p.feed_input("flip", [np.array(int(g.flip), np.int32) for g in geometries])
            (out,) = p.run()
        except Exception:
            self._pipe = None  # DALI: "Current pipeline object is no longer valid" after an error
            raise
        if self.device == "cuda":  # pragma: no cover - needs a GPU
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = out.as_tensor()
            res = torch.empty(tuple(dense.shape()), dtype=torch.uint8, device="cuda")
            feed_ndarray(dense, res, cuda_stream=torch.cuda.current_stream())
            return res
        return torch.from_numpy(out.as_array())


# ---------------------------------------------------------------------------------------- loader
class _Item(NamedTuple):
    index: int
    data: bytes
    geometry: Geometry
    fmt: str


class ImageLoader:
    """Batches of decoded images from a file list, with either decoder and the same results.

    Args:
        files: image paths (any order; ``indices`` in the batches refer to positions in this list).
        labels: int labels per file (default ``-1``).
        image_size: output side ``S``.
        resize: True resizes every image (center crop, or random resized crop with
            ``random_crop``); False requires every image to be ``S`` x ``S`` already (others are
            skipped with the reason, or raise in :meth:`load` with ``on_error="raise"``).
        channels: 1 (PIL's ``L``) or 3 (RGB).
        batch_size: files per batch (fewer images when some are skipped).
        decoder: ``"auto"``, ``"dali"``, ``"pil"`` or None (``$DPT_IMAGE_DECODER``, else auto).
        device: ``"cpu"`` or ``"cuda"`` (DALI's nvJPEG ``mixed`` decoder; CUDA tensors out).
        shuffle: an epoch-seeded permutation (``seed``, :meth:`set_epoch`) instead of file order.
        random_crop / random_flip: training augmentation, drawn per image from
            ``(seed, epoch, index)``: independent of batch size, rank count and decoder.
        rank / world_size: this process's shard (default: :func:`~dpt_engine.utils.dist.dist_info`).
            The (shuffled) order is padded by wrapping to a multiple of ``world_size`` and rank
            ``r`` takes every ``world_size``-th file from ``r``: disjoint, equal-length shards.
        num_threads: DALI's CPU threads / the PIL decoder's decoding threads.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        labels: Optional[Sequence[int] | np.ndarray | torch.Tensor] = None,
        *,
        image_size: int,
        resize: bool = True,
        channels: int = 3,
        batch_size: int = 64,
        decoder: Optional[str] = None,
        device: str = "cpu",
        shuffle: bool = False,
        random_crop: bool = False,
        random_flip: bool = False,
        crop_scale: tuple[float, float] = (0.35, 1.0),
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = False,
        num_threads: Optional[int] = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 1 or batch_size < 1:
            raise ValueError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
        if random_crop and not resize:
            raise ValueError("random_crop needs resize=True (the crop is resized to image_size)")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.files = [str(f) for f in files]
        n = len(self.files)
        if labels is None:
            self.labels = torch.full((n,), -1, dtype=torch.int64)
        else:
            self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)
            if self.labels.shape[0] != n:
                raise ValueError(f"{n} files but {self.labels.shape[0]} labels")
        self.image_size, self.resize, self.channels = int(image_size), resize, channels
        self.batch_size, self.device = batch_size, device
        self.shuffle, self.random_crop, self.random_flip = shuffle, random_crop, random_flip
        self.crop_scale, self.seed, self.drop_last = crop_scale, seed, drop_last
        self.decoder = resolve_image_decoder(decoder)
        if device == "cuda" and self.decoder != "dali":
            raise ValueError("device='cuda' decodes with DALI's nvJPEG: use decoder='dali' (or auto)")
        if rank is None or world_size is None:
            from ..utils.dist import dist_info

            info = dist_info()
            rank = info.rank if rank is None else rank
            world_size = info.world_size if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self.epoch = 0
        self.skipped: list[SkippedImage] = []
        self.pil_fallbacks: list[str] = []  # files the DALI decoder had to hand to PIL
        self._skipped_idx: set[int] = set()
        self._decoder: Optional[_DaliDecoder] = None

    # -- order ------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the permutation and the augmentation draws of ``epoch``."""
        self.epoch = int(epoch)

    def shard_indices(self) -> np.ndarray:
        """This rank's file indices for the current epoch, in iteration order (int64)."""
        n = len(self.files)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        if self.world_size > 1 and n:
            total = -(-n // self.world_size) * self.world_size
            order = np.resize(order, total)  # wraps around: every rank gets the same count
        return order[self.rank :: self.world_size].astype(np.int64)

    def __len__(self) -> int:
        m = len(self.shard_indices())
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    # -- reading ----------------------------------------------------------------------------------
    def _geometry(self, index: int, width: int, height: int) -> Geometry:
        rng = None
        if self.random_crop or self.random_flip:
            rng = np.random.default_rng([self.seed, self.epoch, index])
        flip = bool(rng.integers(0, 2)) if (rng is not None and self.random_flip) else False
        if not self.resize:
            if (width, height) != (self.image_size, self.image_size):
                raise CorruptImageError(
                    f"image is {width}x{height} but the dataset's images are "
                    f"{self.image_size}x{self.image_size}; set data.image_size={self.image_size} to resize "
                    "and center-crop every image"
                )
            return native_geometry(width, height, flip)
        if self.random_crop:
            assert rng is not None
            return random_resized_geometry(width, height, self.image_size, rng, self.crop_scale, flip=flip)
        return center_geometry(width, height, self.image_size, flip)

    def _read(self, indices: Sequence[int]) -> tuple[list[_Item], list[SkippedImage]]:
        """Bytes, probe and geometry of each file; failures become :class:`SkippedImage`."""
        items, bad = [], []
        for i in indices:
            path = self.files[i]
            try:
                with open(path, "rb") as f:
                    data = f.read()
                width, height, fmt = probe_image(data)
                items.append(_Item(i, data, self._geometry(i, width, height), fmt))
            except CorruptImageError as e:
                bad.append(SkippedImage(i, path, str(e)))
            except OSError as e:
                bad.append(SkippedImage(i, path, f"cannot read ({e.strerror or e})"))
        return items, bad

    # -- decoding ---------------------------------------------------------------------------------
    def _dali(self) -> _DaliDecoder:
        if self._decoder is None or self._decoder.pid != os.getpid():
            self._decoder = _DaliDecoder(
                self.batch_size, self.channels, self.device, self.num_threads, self.seed
            )
        return self._decoder

    def _decode_pil_items(self, items: Sequence[_Item], pool: Optional[ThreadPoolExecutor]):
        def one(it: _Item) -> torch.Tensor | CorruptImageError:
            try:
                return decode_pil(it.data, self.channels, it.geometry)
            except CorruptImageError as e:
                return e

        return (
            list(pool.map(one, items)) if pool is not None and len(items) > 1 else [one(it) for it in items]
        )

    def _decode(
        self, items: list[_Item], pool: Optional[ThreadPoolExecutor]
    ) -> tuple[list[int], Optional[torch.Tensor], list[SkippedImage]]:
        """Decode ``items`` -> (kept file indices, uint8 (B, C, S, S) or None, skipped)."""
        if not items:
            return [], None, []
        results: list[torch.Tensor | CorruptImageError]
        if not self._use_dali():
            results = self._decode_pil_items(items, pool)
        else:
            dali_items = [it for it in items if it.fmt in _DALI_FORMATS]
            pil_items = [it for it in items if it.fmt not in _DALI_FORMATS]  # e.g. GIF
            by_index: dict[int, torch.Tensor | CorruptImageError] = {}
            for it, r in zip(pil_items, self._decode_pil_items(pil_items, pool)):
                by_index[it.index] = r if isinstance(r, CorruptImageError) else r.to(self.device)
            if dali_items:
                try:
                    out = self._dali().decode(
                        [it.data for it in dali_items], [it.geometry for it in dali_items]
                    )
                    for j, it in enumerate(dali_items):
                        by_index[it.index] = out[j]
                except RuntimeError:
                    by_index.update(self._isolate(dali_items))
            results = [by_index[it.index] for it in items]
        kept, tensors, bad = [], [], []
        for it, r in zip(items, results):
            if isinstance(r, CorruptImageError):
                bad.append(SkippedImage(it.index, self.files[it.index], str(r)))
            else:
                kept.append(it.index)
                tensors.append(r)
        return kept, (torch.stack(tensors) if tensors else None), bad

    def _use_dali(self) -> bool:
        """DALI decoder, unless this is a fork of a process that already ran DALI (it would crash)."""
        if self.decoder != "dali":
            return False
        if _dali_pid is not None and _dali_pid != os.getpid():
            if self.device == "cuda":
                raise RuntimeError(
                    "DALI ran in the parent of this forked process and cannot run here; use "
                    "num_workers=0 (DALI decodes with its own threads) or the 'spawn' start method"
                )
            _log_once(
                logging.WARNING,
                "process %d is a fork of %d, which already ran DALI (not fork-safe): decoding with PIL here. "
                "Use num_workers=0 with DALI (it has its own threads) or the 'spawn' start method",
                os.getpid(),
                _dali_pid,
            )
            return False
        return True

    def _isolate(self, items: Sequence[_Item]) -> dict[int, torch.Tensor | CorruptImageError]:
        """After a failed DALI batch: each file alone through DALI, then PIL for those DALI refuses."""
        out: dict[int, torch.Tensor | CorruptImageError] = {}
        for it in items:
            try:
                out[it.index] = self._dali().decode([it.data], [it.geometry])[0]
            except RuntimeError as e:
                why = _dali_reason(e)
                try:
                    res = decode_pil(it.data, self.channels, it.geometry)
                except CorruptImageError as pil_err:
                    out[it.index] = CorruptImageError(f"{pil_err} (DALI: {why})")
                    continue
                self.pil_fallbacks.append(self.files[it.index])
                log.warning("%s: DALI cannot decode it (%s); decoded with PIL", self.files[it.index], why)
                out[it.index] = res.to(self.device)
        return out

    def _record(self, bad: Sequence[SkippedImage]) -> None:
        for s in bad:
            if s.index not in self._skipped_idx:
                self._skipped_idx.add(s.index)
                self.skipped.append(s)
                log.warning("skipping image %s: %s", s.path, s.reason)

    def load(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, on_error: Literal["skip", "raise"] = "skip"
    ) -> ImageBatch:
        """Decode the files at ``indices`` (any number, no sharding) into one batch.

        ``on_error="skip"`` leaves broken files out (recorded in :attr:`skipped`); ``"raise"``
        raises :class:`DataError` naming every broken file in the request.
        """
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        kept_all: list[int] = []
        parts: list[torch.Tensor] = []
        bad_all: list[SkippedImage] = []
        with self._pool() as pool:
            for s in range(0, len(idx), self.batch_size):
                items, bad = self._read(idx[s : s + self.batch_size])
                kept, images, bad2 = self._decode(items, pool)
                bad_all += bad + bad2
                kept_all += kept
                if images is not None:
                    parts.append(images)
        if bad_all and on_error == "raise":
            lines = "; ".join(f"{b.path}: {b.reason}" for b in bad_all[:10])
            more = f" (and {len(bad_all) - 10} more)" if len(bad_all) > 10 else ""
            raise DataError(f"{len(bad_all)} unreadable image(s): {lines}{more}; delete or replace them")
        self._record(bad_all)
        return self._batch(kept_all, parts)

    def _batch(self, kept: list[int], parts: list[torch.Tensor]) -> ImageBatch:
        s = self.image_size
        dev = "cuda" if self.device == "cuda" else "cpu"
        images = (
            torch.cat(parts)
            if parts
            else torch.empty((0, self.channels, s, s), dtype=torch.uint8, device=dev)
        )
        idx = torch.as_tensor(kept, dtype=torch.int64)
        return ImageBatch(images, self.labels[idx], idx)

    def _pool(self) -> Any:
        if not self._use_dali() and self.num_threads > 1:
            return ThreadPoolExecutor(self.num_threads, thread_name_prefix="dpt-pil")
        return contextlib.nullcontext(None)

    def __iter__(self) -> Iterator[ImageBatch]:
        """This rank's batches for the current epoch; the next batch's files are read on a
        background thread while the current one decodes."""
        order = self.shard_indices()
        chunks = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks = chunks[:-1]
        if not chunks:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="dpt-read") as reader, self._pool() as pool:
            pending = reader.submit(self._read, chunks[0].tolist())
            for k in range(len(chunks)):
                items, bad = pending.result()
                if k + 1 < len(chunks):
                    pending = reader.submit(self._read, chunks[k + 1].tolist())
                kept, images, bad2 = self._decode(items, pool)
                self._record(bad + bad2)
                yield self._batch(kept, [images] if images is not None else [])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decoder"] = None  # DALI pipelines hold threads and are rebuilt in the new process
        return state


def load_images(
    files: Sequence[str | os.PathLike],
    labels: Optional[Sequence[int] | np.ndarray | torch.Tensor] = None,
    *,
    image_size: int,
    resize: bool = True,
    channels: int = 3,
    batch_size: int = 64,
    decoder: Optional[str] = None,
    device: str = "cpu",
    progress: bool = False,
    desc: str = "decoding images",
) -> tuple[ImageBatch, list[SkippedImage]]:
    """Decode every file (eval geometry), skipping broken ones: ``(batch, skipped)``.

    The preload of a dataset: the batch holds the images that decoded, with their indices into
    ``files``; the number skipped is logged.
    """
    from tqdm.auto import tqdm

    loader = ImageLoader(
        files,
        labels,
        image_size=image_size,
        resize=resize,
        channels=channels,
        batch_size=batch_size,
        decoder=decoder,
        device=device,
        rank=0,
        world_size=1,
    )
    parts, idx, labs = [], [], []
    for b in tqdm(loader, total=len(loader), desc=desc, disable=not progress, unit="batch"):
        parts.append(b.images)
        idx.append(b.indices)
        labs.append(b.labels)
    if loader.skipped:
        log.warning("%s: skipped %d of %d unreadable images", desc, len(loader.skipped), len(files))
    if not parts:
        return loader._batch([], []), loader.skipped
    return ImageBatch(torch.cat(parts), torch.cat(labs), torch.cat(idx)), loader.skipped
