"""A dataset's autoencoder latents in one memory-mapped array, encoded once, read by every rank.

The original DPT writes one small ``.npy`` file per image and per flip (2.56M files for ImageNet);
here a store is one directory:

* ``latents.npy``: a standard ``.npy`` file (``np.load(path, mmap_mode="r")`` reads it) of shape
  ``(R, 2, c, h, w)`` holding the posterior ``mean`` and (clamped) ``logvar`` per row
  (``kind="moments"``), or ``(R, c, h, w)`` holding one latent drawn at encoding time
  (``kind="sample"``). Values are in the autoencoder's raw space (not shifted or scaled);
  ``dtype`` float16 or float32. With ``flip=True`` rows ``[0, N)`` are the N images and rows
  ``[N, 2N)`` their horizontal flips (row ``N + i`` is image ``i`` mirrored); else ``R = N``.
* ``labels.npy``: int64 (N,) labels of the source images (``-1`` when unknown).
* ``pseudo_labels.npy``: int64 (N,), optional and replaceable (:meth:`LatentStore.attach_pseudo_labels`),
  indexed like the source dataset: stage 1's pseudo-labels attach by index, no re-encoding.
* ``valid.npy``: bool (N,), False for images that could not be decoded (their rows stay zero
  and readers never draw them; ``meta.json`` lists them under ``skipped``).
* ``meta.json``: format version, kind, dtype, shapes, flip layout, the autoencoder's identity
  and scale/shift factors, the source's identity hash, chunk size, ``complete``.
* ``progress-rank<r>.json``: the chunks rank ``r`` has finished (while encoding).

Encoding (:func:`encode_to_store`) is resumable and can be split over ranks: the N images are
cut into chunks of ``chunk_size``; rank ``r`` of ``W`` encodes chunks ``k`` with ``k % W == r``,
writes them into the memory map in place, flushes the map, and only then rewrites its progress
file atomically. A restart (any world size) reads every progress file and continues with the
first unfinished chunk. (Ranks write disjoint rows of one shared file: use a local or
POSIX-coherent file system, as for any shared memory map.) Re-running into a directory that holds another source, autoencoder or
layout is refused with a message naming the differing fields.

Reading: :class:`LatentStore` (metadata, memory maps, labels) and :class:`LatentLoader`, which
shards the valid rows across ranks (rank ``r`` of ``W`` gets a disjoint, deterministic,
epoch-seeded slice, all ranks the same length) and turns moments into training latents as U-ViT
does: ``z = (mean + exp(0.5 * clamp(logvar, -30, 20)) * eps - shift) * scale``.
:func:`sample_latents` is that formula on its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from ..models.autoencoder import LOGVAR_MAX, LOGVAR_MIN, BaseAutoencoder, IdentityAutoencoder
from ..utils.dist import barrier, broadcast_object, dist_info
from ..utils.io import atomic_path, atomic_write_json, read_json
from ..utils.pixels import uint8_to_model_space
from .base import DataError, ImageDataset

__all__ = [
    "FORMAT_VERSION",
    "LatentBatch",
    "LatentLoader",
    "LatentStore",
    "LatentStoreError",
    "MomentsView",
    "autoencoder_identity",
    "dataset_identity",
    "encode_to_store",
    "sample_latents",
    "shard_rows",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATENTS_FILE, LABELS_FILE, PSEUDO_FILE, VALID_FILE, META_FILE = (
    "latents.npy",
    "labels.npy",
    "pseudo_labels.npy",
    "valid.npy",
    "meta.json",
)
_DTYPES = {"float16": np.float16, "float32": np.float32}
# meta fields that must agree for a resume (or a re-run) to reuse a directory
_IDENTITY_FIELDS = (
    "format_version",
    "kind",
    "dtype",
    "flip",
    "num_images",
    "latent_shape",
    "chunk_size",
    "source",
    "autoencoder",
    "scale_factor",
    "shift_factor",
    "seed",
)


class LatentStoreError(DataError):
    """A latent store is missing, incomplete, or belongs to another source / autoencoder."""


# ---------------------------------------------------------------------------------------- identity
def dataset_identity(dataset: ImageDataset) -> str:
    """A hash naming the images a store was encoded from.

    Folder datasets: their relative paths, image size and resizing (not the root, so a moved
    dataset keeps its store; hashing millions of files' bytes would cost a full read; pass
    ``source_id`` to :func:`encode_to_store` to name a source yourself); in-memory datasets: the
    image bytes themselves.
    """
    h = hashlib.sha256()
    h.update(f"{len(dataset)}|{dataset.channels}|{dataset.image_size}|".encode())
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        h.update(f"{getattr(dataset, 'resize', '')}|".encode())
        for p in paths:
            h.update(p.encode("utf-8") + b"\0")
    elif getattr(dataset, "in_memory", False) and hasattr(dataset, "images"):
        h.update(dataset.images.contiguous().numpy().tobytes())
    else:
        for i in range(len(dataset)):
            h.update(dataset.describe(i).encode("utf-8") + b"\0")
    return h.hexdigest()[:32]


def autoencoder_identity(ae: BaseAutoencoder) -> str:
    """A hash of the autoencoder's class, factors and weights (``"identity"`` for pixel space)."""
    if isinstance(ae, IdentityAutoencoder):
        return "identity"
    h = hashlib.sha256()
    h.update(f"{type(ae).__name__}|{ae.scale_factor}|{ae.shift_factor}|{ae.latent_channels}|".encode())
    for name, t in sorted(ae.state_dict().items()):
        h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------- store
class LatentStore:
    """Read access to a store directory (see the module doc). Raises :class:`LatentStoreError`
    if the directory is not a store or (with ``require_complete``) is still being encoded."""

    def __init__(self, path: str | os.PathLike, require_complete: bool = True) -> None:
        self.path = Path(path).expanduser()
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise LatentStoreError(
                f"{self.path} is not a latent store (no {META_FILE}); create it with encode_to_store()"
            )
        self.meta: dict[str, Any] = read_json(meta_path)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise LatentStoreError(
                f"{self.path}: store format {self.meta.get('format_version')} but this code reads "
                f"format {FORMAT_VERSION}; re-encode it into a new directory"
            )
        if require_complete and not self.meta.get("complete"):
            done = len(_done_chunks(self.path))
            raise LatentStoreError(
                f"{self.path}: encoding is unfinished ({done} of {self.meta['num_chunks']} chunks); "
                "re-run encode_to_store() with the same arguments to finish it"
            )
        self._latents: Optional[np.ndarray] = None

    # -- shapes and metadata --------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def num_images(self) -> int:
        return int(self.meta["num_images"])

    @property
    def num_rows(self) -> int:
        return int(self.meta["num_rows"])

    @property
    def flip(self) -> bool:
        return bool(self.meta["flip"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(c, h, w)`` of one latent."""
        return tuple(int(v) for v in self.meta["latent_shape"])

    @property
    def scale_factor(self) -> float:
        return float(self.meta["scale_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.meta["shift_factor"])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def latents(self) -> np.ndarray:
        """The memory map, (R, 2, c, h, w) or (R, c, h, w), read-only."""
        if self._latents is None:
            self._latents = np.load(self.path / LATENTS_FILE, mmap_mode="r")
        return self._latents

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_latents"] = None  # reopened lazily in DataLoader workers
        return state

    def source_index(self, rows: np.ndarray) -> np.ndarray:
        """Source image index of each row (``row % N``)."""
        return np.asarray(rows, dtype=np.int64) % self.num_images

    def is_flipped(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64) >= self.num_images

    # -- labels -----------------------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        """int64 (N,) labels of the source images (``-1`` unknown)."""
        return np.load(self.path / LABELS_FILE)

    def pseudo_labels(self) -> Optional[np.ndarray]:
        """int64 (N,) attached pseudo-labels, or None."""
        p = self.path / PSEUDO_FILE
        return np.load(p) if p.is_file() else None

    def attach_pseudo_labels(self, labels: np.ndarray | torch.Tensor | Sequence[int]) -> None:
        """Write (or replace) the pseudo-labels, one per source image, atomically."""
        arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if arr.ndim != 1 or arr.shape[0] != self.num_images:
            raise LatentStoreError(
                f"{self.path}: got {arr.shape[0] if arr.ndim else 0} pseudo-labels of shape {arr.shape} for "
                f"{self.num_images} source images; pass one label per training image in dataset order"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise LatentStoreError(f"pseudo-labels must be integers, got dtype {arr.dtype}")
        with atomic_path(self.path / PSEUDO_FILE) as tmp, open(tmp, "wb") as f:
            np.save(f, arr.astype(np.int64))

    def row_labels(self, source: Literal["pseudo", "true"] = "pseudo") -> np.ndarray:
        """int64 (R,) label of every row from the pseudo-labels or the true labels."""
        if source == "pseudo":
            base = self.pseudo_labels()
            if base is None:
                raise LatentStoreError(
                    f"{self.path}: no pseudo-labels attached; call attach_pseudo_labels() with stage 1's "
                    "labels, or read source='true'"
                )
        elif source == "true":
            base = self.labels()
        else:
            raise ValueError(f"label source must be 'pseudo' or 'true', got {source!r}")
        return np.tile(base, self.num_rows // self.num_images)

    def valid_rows(self) -> np.ndarray:
        """int64 indices of the rows whose image decoded (all rows if none was skipped)."""
        p = self.path / VALID_FILE
        valid = np.load(p) if p.is_file() else np.ones(self.num_images, dtype=bool)
        return np.flatnonzero(np.tile(valid, self.num_rows // self.num_images)).astype(np.int64)

    # -- reading ----------------------------------------------------------------------------------
    def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored values of ``rows`` (a copy, in the given order); sorted reads keep the
        memory map's access pattern forward-only."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.latents.shape[1:]), dtype=self.latents.dtype)
        out[order] = self.latents[rows[order]]
        return out

    def latents_for(
        self, rows: Sequence[int] | np.ndarray, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Training latents of ``rows``: float32 (B, c, h, w), drawn and scaled (see the module doc)."""
        raw = torch.from_numpy(self.read(rows)).float()
        if self.kind == "moments":
            return sample_latents(raw[:, 0], raw[:, 1], self.scale_factor, self.shift_factor, generator)
        return (raw - self.shift_factor) * self.scale_factor

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (
            f"LatentStore({str(self.path)!r}, kind={self.kind}, images={self.num_images}, rows={self.num_rows}, "
            f"latent={self.latent_shape}, dtype={self.meta['dtype']}, complete={self.complete})"
        )


class MomentsView:
    """Rows of a ``moments`` store as the stage-2 trainer indexes its data, read on demand.

    ``view[idx]`` (idx: int64 tensor of positions in ``rows``) returns float32
    ``(mean - shift) * scale`` (``part="mean"``) or ``exp(0.5 * clamp(logvar, -30, 20)) * scale``
    (``part="std"``), i.e. the scaled posterior the trainer draws ``x0 = mean + std * eps`` from.
    Only the indexed rows are read from the memory map, so a store larger than RAM (ImageNet: 2.56M
    rows) trains without being loaded; ``shape`` is ``(len(rows), c, h, w)``.
    """

    def __init__(self, store: LatentStore, rows: np.ndarray, part: Literal["mean", "std"]) -> None:
        if store.kind != "moments":
            raise LatentStoreError(f"{store.path}: a '{store.kind}' store has no posterior moments")
        if part not in ("mean", "std"):
            raise ValueError(f"part must be 'mean' or 'std', got {part!r}")
        self.store, self.rows, self.part = store, np.asarray(rows, dtype=np.int64), part
        self.shape = torch.Size((len(self.rows), *store.latent_shape))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        pos = idx.numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        raw = torch.from_numpy(self.store.read(self.rows[pos])[:, 0 if self.part == "mean" else 1])
        raw = raw.float()
        if self.part == "mean":
            return (raw - self.store.shift_factor) * self.store.scale_factor
        return torch.exp(0.5 * raw.clamp(-30.0, 20.0)) * self.store.scale_factor


def sample_latents(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    scale_factor: float,
    shift_factor: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``(mean + exp(0.5 * clamp(logvar, -30, 20)) * eps - shift) * scale`` with ``eps ~ N(0, I)``."""
    std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return (mean + std * eps - shift_factor) * scale_factor


# ---------------------------------------------------------------------------------------- reader
def shard_rows(
    rows: np.ndarray, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool = True
) -> np.ndarray:
    """Rank ``rank``'s rows for ``epoch``: an epoch-seeded permutation (the same on every rank),
    wrapped to a multiple of ``world_size`` and strided, so shards are disjoint (up to the few
    wrapped rows) and of equal length."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    rows = np.asarray(rows, dtype=np.int64)
    order = rows[np.random.default_rng([seed, epoch]).permutation(len(rows))] if shuffle else rows
    if world_size > 1 and len(order):
        order = np.resize(order, -(-len(order) // world_size) * world_size)
    return order[rank::world_size]


@dataclass
class LatentBatch:
    """Training latents (float32 (B, c, h, w)), labels (int64 (B,)) and store rows (int64 (B,))."""

    latents: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor


class LatentLoader:
    """Batches of training latents from a complete store, sharded across ranks.

    Each epoch (:meth:`set_epoch`) permutes the valid rows with a generator seeded by
    ``(seed, epoch)``; rank ``r`` of ``W`` takes its strided slice (:func:`shard_rows`). The noise
    of batch ``k`` is seeded by ``(seed, epoch, rank, k)``, so a run is reproducible.

    Args:
        labels: ``"pseudo"`` (attached pseudo-labels), ``"true"`` or ``"none"`` (zeros).
        rank / world_size: default :func:`~dpt_engine.utils.dist.dist_info`.
    """

    def __init__(
        self,
        store: LatentStore,
        batch_size: int,
        *,
        labels: Literal["pseudo", "true", "none"] = "pseudo",
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        info = dist_info()
        self.store, self.batch_size = store, batch_size
        self.rank = info.rank if rank is None else rank
        self.world_size = info.world_size if world_size is None else world_size
        self.shuffle, self.drop_last, self.seed, self.epoch = shuffle, drop_last, seed, 0
        if labels == "none":
            self.row_labels = np.zeros(store.num_rows, dtype=np.int64)
        else:
            self.row_labels = store.row_labels(labels)
        self.rows = store.valid_rows()
        if len(self.rows) == 0:
            raise LatentStoreError(f"{store.path}: no valid rows to read")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self) -> np.ndarray:
        """This rank's rows for the current epoch."""
        return shard_rows(self.rows, self.rank, self.world_size, self.epoch, self.seed, self.shuffle)

    def __len__(self) -> int:
        m = len(self.shard())
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def __iter__(self) -> Iterator[LatentBatch]:
        rows = self.shard()
        for k in range(len(self)):
            r = rows[k * self.batch_size : (k + 1) * self.batch_size]
            g = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch, self.rank, k))
            yield LatentBatch(
                self.store.latents_for(r, g), torch.from_numpy(self.row_labels[r]), torch.from_numpy(r)
            )


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------------- encoding
def _done_chunks(path: Path) -> set[int]:
    done: set[int] = set()
    for p in path.glob("progress-rank*.json"):
        done.update(int(k) for k in read_json(p)["done"])
    return done


def _skipped_so_far(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in sorted(path.glob("progress-rank*.json")):
        out += read_json(p).get("skipped", [])
    return sorted(out, key=lambda s: s["index"])


def _check_same(path: Path, have: dict[str, Any], want: dict[str, Any]) -> None:
    diff = [k for k in _IDENTITY_FIELDS if have.get(k) != want.get(k)]
    if diff:
        details = "; ".join(f"{k}: stored {have.get(k)!r}, requested {want.get(k)!r}" for k in diff)
        raise LatentStoreError(
            f"{path} already holds a latent store of another source/autoencoder/layout ({details}). "
            "Encode into a new directory, or delete this one to re-encode"
        )


def _load_images(
    dataset: ImageDataset, idx: np.ndarray
) -> tuple[torch.Tensor, np.ndarray, list[dict[str, Any]]]:
    """uint8 images of ``idx`` that decode, their indices, and the skipped ones."""
    read_images = getattr(dataset, "read_images", None)
    if read_images is None:
        return dataset.get_batch(torch.from_numpy(idx)), idx, []
    batch, skipped = read_images(idx)
    kept = batch.indices.numpy()
    return batch.images, kept, [{"index": s.index, "path": s.path, "reason": s.reason} for s in skipped]


@torch.no_grad()
def _wanted_meta(
    dataset: ImageDataset,
    autoencoder: BaseAutoencoder,
    kind: str,
    dtype: str,
    flip: bool,
    chunk_size: int,
    seed: int,
    autoencoder_id: Optional[str],
    source_id: Optional[str],
) -> dict[str, Any]:
    """The ``meta.json`` a store of these settings has (an existing store must match it)."""
    n = len(dataset)
    num_rows = 2 * n if flip else n
    latent_shape = list(autoencoder.latent_shape((dataset.channels, dataset.image_size, dataset.image_size)))
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "dtype": dtype,
        "flip": flip,
        "layout": (
            "rows [0, N): images; rows [N, 2N): their horizontal flips" if flip else "rows [0, N): images"
        ),
        "num_images": n,
        "num_rows": num_rows,
        "latent_shape": latent_shape,
        "array_shape": [num_rows, *([2] if kind == "moments" else []), *latent_shape],
        "chunk_size": chunk_size,
        "num_chunks": -(-n // chunk_size),
        "source": source_id or dataset_identity(dataset),
        "source_name": getattr(dataset, "name", "") or type(dataset).__name__,
        "autoencoder": autoencoder_id or autoencoder_identity(autoencoder),
        "autoencoder_class": type(autoencoder).__name__,
        "scale_factor": float(autoencoder.scale_factor),
        "shift_factor": float(autoencoder.shift_factor),
        "seed": seed,
        "complete": False,
    }


def _encode_chunk(
    mm: np.ndarray,
    dataset: ImageDataset,
    autoencoder: BaseAutoencoder,
    lo: int,
    hi: int,
    kind: str,
    flip: bool,
    batch_size: int,
    device: str | torch.device,
    chunk_seed: int,
) -> list:
    """Encode images ``[lo, hi)`` (and their flips, rows ``N + i``) into the memory map ``mm``;
    return the unreadable files skipped. ``kind="sample"`` draws one posterior sample per row from
    a generator seeded by ``chunk_seed``."""
    n = len(dataset)
    g = torch.Generator(device="cpu").manual_seed(chunk_seed)
    skipped_all: list = []
    for s in range(lo, hi, batch_size):
        images, kept, skipped = _load_images(dataset, np.arange(s, min(hi, s + batch_size)))
        skipped_all += skipped
        if len(kept) == 0:
            continue
        x = uint8_to_model_space(images).to(device)  # (B, C, H, W) in [-1, 1]
        views = [(kept, x)] + ([(kept + n, x.flip(-1))] if flip else [])
        for rows, v in views:
            mean, logvar = autoencoder.encode_moments(v)  # (B, c, h, w) each, raw space
            if kind == "moments":
                val = torch.stack([mean, logvar], dim=1)  # (B, 2, c, h, w)
            else:
                std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
                val = mean + std * torch.randn(mean.shape, generator=g).to(mean.device, mean.dtype)
            mm[rows] = val.float().cpu().numpy().astype(mm.dtype)
    return skipped_all


def encode_to_store(
    path: str | os.PathLike,
    dataset: ImageDataset,
    autoencoder: BaseAutoencoder,
    *,
    kind: Literal["moments", "sample"] = "moments",
    dtype: Literal["float16", "float32"] = "float16",
    flip: bool = True,
    batch_size: int = 64,
    chunk_size: int = 4096,
    device: str | torch.device = "cpu",
    seed: int = 0,
    autoencoder_id: Optional[str] = None,
    source_id: Optional[str] = None,
    progress: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    max_chunks: Optional[int] = None,
) -> LatentStore:
    """Encode ``dataset`` (and its horizontal flips) once into a store at ``path``; resumable.

    Images go through ``uint8_to_model_space`` ([-1, 1]) and ``autoencoder.encode_moments``; the flip
    of image ``i`` is row ``N + i``. ``kind="sample"`` stores one posterior draw per row (seeded by
    ``(seed, row chunk)``). Folder datasets decode with the bulk loader (DALI or PIL) and skip
    unreadable files (recorded in ``meta.json`` and ``valid.npy``).

    ``autoencoder_id`` / ``source_id`` override the computed identities (e.g. a checkpoint name,
    cheaper than hashing the weights). ``rank``/``world_size`` (default: the process group) split
    the chunks; every rank must call this. ``max_chunks`` stops this call after that many chunks
    (a time budget; the next call continues). Returns the store; it is complete when every chunk
    is done (on every rank, after a barrier), else ``LatentStore(..., require_complete=False)``.
    """
    from tqdm.auto import tqdm

    if kind not in ("moments", "sample"):
        raise ValueError(f"kind must be 'moments' or 'sample', got {kind!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    info = dist_info()
    rank = info.rank if rank is None else rank
    world_size = info.world_size if world_size is None else world_size
    path = Path(path).expanduser()
    n = len(dataset)
    if n == 0:
        raise LatentStoreError("cannot encode an empty dataset")
    want = _wanted_meta(dataset, autoencoder, kind, dtype, flip, chunk_size, seed, autoencoder_id, source_id)
    num_chunks = want["num_chunks"]
    meta_path = path / META_FILE
    error: Optional[str] = None
    if rank == 0 or not _is_dist():  # without a process group, whichever rank comes first creates it
        try:
            _create_or_check(path, want, dataset)
        except LatentStoreError as e:
            error = str(e)
    if _is_dist():
        error = broadcast_object(error)  # every rank raises, none waits at a barrier for rank 0
    if error is not None:
        raise LatentStoreError(error)
    have = read_json(meta_path)
    _check_same(path, have, want)
    if have.get("complete"):
        return LatentStore(path)

    progress_path = path / f"progress-rank{rank}.json"
    mine = read_json(progress_path) if progress_path.is_file() else {"done": [], "skipped": []}
    done = _done_chunks(path)
    pending_chunks = [k for k in range(num_chunks) if k % world_size == rank and k not in done]
    if max_chunks is not None:
        pending_chunks = pending_chunks[:max_chunks]
    if done:
        log.info("latent store %s: resuming, %d of %d chunks done", path, len(done), num_chunks)
    mm = np.load(path / LATENTS_FILE, mmap_mode="r+")
    autoencoder = autoencoder.to(device).eval()
    bar = tqdm(
        total=len(pending_chunks), desc=f"encoding latents (rank {rank})", disable=not progress, unit="chunk"
    )
    for k in pending_chunks:
        lo, hi = k * chunk_size, min(n, (k + 1) * chunk_size)
        mine["skipped"] += _encode_chunk(
            mm, dataset, autoencoder, lo, hi, kind, flip, batch_size, device, _seed_of(seed, k)
        )
        mm.flush()  # the chunk's data reaches the file before the progress record says so
        mine["done"] = sorted(set(mine["done"]) | {k})
        atomic_write_json(progress_path, mine)
        bar.update(1)
    bar.close()
    del mm
    barrier()
    if _done_chunks(path) != set(range(num_chunks)):
        return LatentStore(path, require_complete=False)
    if rank == 0 or world_size == 1 or not _is_dist():
        _finalize(path, n)
    barrier()
    return LatentStore(path)


def _create_or_check(path: Path, want: dict[str, Any], dataset: ImageDataset) -> None:
    """Check an existing store against ``want``, or lay out a new one (zeros + labels + meta)."""
    meta_path = path / META_FILE
    if meta_path.is_file():
        _check_same(path, read_json(meta_path), want)
        return
    path.mkdir(parents=True, exist_ok=True)
    leftovers = [p.name for p in path.iterdir() if not p.name.startswith(".")]
    if leftovers:
        raise LatentStoreError(
            f"{path} is not empty ({', '.join(sorted(leftovers)[:5])}) and holds no latent store; "
            "pick an empty or new directory"
        )
    arr = np.lib.format.open_memmap(
        path / LATENTS_FILE, mode="w+", dtype=_DTYPES[want["dtype"]], shape=tuple(want["array_shape"])
    )
    del arr  # a sparse file of zeros with a valid .npy header
    with atomic_path(path / LABELS_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, dataset.labels.numpy().astype(np.int64))
    atomic_write_json(meta_path, want)  # last: its presence marks a usable directory


def _is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _finalize(path: Path, n: int) -> None:
    """All chunks done: write ``valid.npy`` and mark the store complete (idempotent)."""
    skipped = _skipped_so_far(path)
    valid = np.ones(n, dtype=bool)
    valid[[s["index"] for s in skipped]] = False
    with atomic_path(path / VALID_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, valid)
    meta = read_json(path / META_FILE)
    meta.update(complete=True, skipped=skipped, num_skipped=len(skipped))
    atomic_write_json(path / META_FILE, meta)
    if skipped:
        log.warning(
            "latent store %s: %d of %d images could not be decoded and were skipped", path, len(skipped), n
        )
