"""Read generated shards back, in any of the three formats, as an ``ImageDataset``.

Stage 3, FID and the sample grid read generated images through :class:`ShardDataset`: images
come straight out of the tar shards (one seek per image, offsets from the shard records), the
ImageFolder files, or the latent ``.npy`` shards (memory-mapped and decoded in batches by the
given decoder; pixel-space latents are mapped to uint8 directly), so nothing is re-encoded or
round-tripped through PNG on the way. Only shards with a valid record are read: a shard that a
killed run left half-written is invisible.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..data.base import ArrayImageDataset, DataError, ImageDataset
from ..utils.io import read_json
from ..utils.pixels import model_space_to_uint8
from .formats import iter_shard_records
from .plan import CONFIG_FILE, ShardPlan
from .runner import MANIFEST

__all__ = ["ShardDataset", "is_shard_dir"]


def is_shard_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds output of ``dpt_engine.sampling`` (its ``sampling.json``)."""
    return (Path(path) / CONFIG_FILE).is_file()


def _decode_image(data: bytes, channels: Optional[int]) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if channels is not None:
            img = img.convert("L" if channels == 1 else "RGB")
        arr = np.array(img, dtype=np.uint8)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()  # (C, H, W)


class ShardDataset(ImageDataset):
    """Generated samples: ``ds[k] -> (uint8 (C, H, W), class)`` in global (class, index) order.

    Args:
        root: the generation's output directory.
        decode: latents format only: float latents (B, c, h, w) -> uint8 images (B, C, H, W)
            (e.g. the stage-2 autoencoder's decode followed by ``model_space_to_uint8``). Pixel-space
            latents (manifest ``latent_space: pixel``) need none.
        allow_incomplete: read the complete shards of an unfinished generation (else a missing
            ``manifest.json`` is an error).
        decode_batch: latents decoded per call of ``decode``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        allow_incomplete: bool = False,
        decode_batch: int = 256,
    ):
        self.root = Path(root)
        if not is_shard_dir(self.root):
            raise DataError(
                f"{self.root} holds no generated shards ({CONFIG_FILE} is missing); run `dpt sample`"
            )
        cfg = read_json(self.root / CONFIG_FILE)
        manifest_path = self.root / MANIFEST
        self.manifest: dict[str, Any] = read_json(manifest_path) if manifest_path.is_file() else {}
        if not self.manifest and not allow_incomplete:
            raise DataError(
                f"{self.root}: the generation is not finished (no {MANIFEST}); re-run the same `dpt sample` "
                "command to complete it"
            )
        plan = ShardPlan(**cfg["config"]["plan"])
        self.plan = plan
        self.format = cfg["config"]["format"]
        self.classes = list(cfg["config"]["classes"])
        self.decode = decode
        self.decode_batch = decode_batch
        self.latent_space = self.manifest.get("latent_space", cfg["config"].get("latent_space"))
        # the index, as flat arrays (a million samples: ~30 MB, not ~300 MB of Python lists):
        # per sample its class, index, file (a position in self.paths), and the byte offset / size
        # in a tar, or the row in a latent shard
        self.paths: list[str] = []
        cols: list[np.ndarray] = []  # per shard: (n, 5) int64 = class, index, file, offset, size
        for _shard, rec in iter_shard_records(self.root, cfg["fingerprint"], plan):
            cols.append(self._index_record(rec))  # the record's lists are dropped once indexed
        if self.manifest and len(cols) != plan.num_shards:
            raise DataError(
                f"{self.root}: {MANIFEST} lists {plan.num_shards} shards but only {len(cols)} are intact; "
                "re-run the same `dpt sample` command to regenerate the missing ones"
            )
        table = np.concatenate(cols) if cols else np.zeros((0, 5), dtype=np.int64)
        cls, idx = table[:, 0], table[:, 1]
        self.file_ids = table[:, 2].astype(np.int32)
        self.offsets = table[:, 3].copy()
        self.sizes = table[:, 4].copy()
        self.labels = torch.from_numpy(cls.copy())
        self.indices = torch.from_numpy(idx.copy())
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        if len(self) == 0:
            self.channels, self.image_size = 0, 0
        else:
            first = self._load([0])[0]
            self.channels, self.image_size = int(first.shape[0]), int(first.shape[1])

    def _index_record(self, rec: dict[str, Any]) -> np.ndarray:
        """One shard record -> its samples' (class, index, file, offset, size) rows."""
        if self.format == "tar":
            self.paths.append(rec["files"][0]["path"])
            m = np.asarray([row[1:] for row in rec["members"]], dtype=np.int64).reshape(-1, 4)
            f = np.full(len(m), len(self.paths) - 1, dtype=np.int64)
            return np.column_stack([m[:, 0], m[:, 1], f, m[:, 2], m[:, 3]])
        if self.format == "imagefolder":
            rows = []
            for rel, c, i in rec["entries"]:
                self.paths.append(rel)
                rows.append((c, i, len(self.paths) - 1, 0, 0))
            return np.asarray(rows, dtype=np.int64).reshape(-1, 5)
        if self.format == "latents":
            self.paths.append(rec["files"][0]["path"])
            n = len(rec["classes"])
            return np.column_stack([
                np.asarray(rec["classes"], dtype=np.int64), np.asarray(rec["indices"], dtype=np.int64),
                np.full(n, len(self.paths) - 1, dtype=np.int64), np.arange(n, dtype=np.int64),
                np.zeros(n, dtype=np.int64),
            ]).reshape(-1, 5)  # fmt: skip
        raise DataError(f"{self.root}: unknown shard format {self.format!r}")

    def file(self, k: int) -> str:
        """The file (relative to the root) holding sample ``k``."""
        return self.paths[int(self.file_ids[k])]

    # -- pickling (DataLoader workers open their own files) -----------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _handle(self, rel: str) -> Any:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(rel)
        if h is None:
            path = self.root / rel
            h = np.load(path, mmap_mode="r") if self.format == "latents" else open(path, "rb")
            self._handles[rel] = h
        return h

    # -- loading -------------------------------------------------------------------------------
    def _decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.decode is not None:
            return self.decode
        if self.latent_space == "pixel":
            return model_space_to_uint8
        raise DataError(
            f"{self.root} holds latents of an autoencoder: pass decode= (the stage-2 autoencoder's decode "
            "followed by dpt_engine.utils.pixels.model_space_to_uint8) to read them as images"
        )

    def latents(self, idx: Sequence[int]) -> torch.Tensor:
        """Float latents (B, c, h, w) at ``idx`` (latents format only)."""
        if self.format != "latents":
            raise DataError(f"{self.root} holds {self.format} shards, not latents")
        rows = [np.asarray(self._handle(self.file(k))[self.offsets[k]]) for k in idx]
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0)

    def _load(self, idx: Sequence[int]) -> list[torch.Tensor]:
        ch = getattr(self, "channels", None) or None
        if self.format == "latents":
            dec = self._decoder()
            out: list[torch.Tensor] = []
            for s in range(0, len(idx), self.decode_batch):
                with torch.no_grad():
                    out += list(dec(self.latents(idx[s : s + self.decode_batch])).cpu())
            return out
        if self.format == "imagefolder":
            return [_decode_image((self.root / self.file(k)).read_bytes(), ch) for k in idx]
        images = []
        for k in idx:
            f = self._handle(self.file(k))
            f.seek(int(self.offsets[k]))
            images.append(_decode_image(f.read(int(self.sizes[k])), ch))
        return images

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        return self._load([int(k)])[0], int(self.labels[int(k)])

    def get_batch(self, idx: torch.Tensor | Sequence[int]) -> torch.Tensor:
        idx_list = [int(i) for i in idx]
        if not idx_list:
            return torch.empty((0, self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        order = sorted(range(len(idx_list)), key=lambda j: idx_list[j])  # read files sequentially
        loaded = self._load([idx_list[j] for j in order])
        out = torch.empty((len(idx_list), self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        for j, img in zip(order, loaded):
            out[j] = img
        return out

    def position(self, cls: int, index: int) -> int:
        """Dataset position of sample (cls, index) (KeyError if it is not on disk)."""
        if not hasattr(self, "_pos"):
            self._pos = {(int(c), int(i)): k for k, (c, i) in enumerate(zip(self.labels, self.indices))}
        return self._pos[(int(cls), int(index))]

    def subset(self, idx: np.ndarray | torch.Tensor | Sequence[int]) -> ShardDataset:
        sel = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = copy.copy(self)
        out._handles = {}
        out.file_ids = self.file_ids[sel]
        out.offsets = self.offsets[sel]
        out.sizes = self.sizes[sel]
        out.labels = self.labels[sel].clone()
        out.indices = self.indices[sel].clone()
        out.__dict__.pop("_pos", None)
        return out

    def to_memory(self, batch: int = 1024) -> ArrayImageDataset:
        """All images decoded into one uint8 tensor (for small sets: training reads them often)."""
        parts = [self.get_batch(range(s, min(s + batch, len(self)))) for s in range(0, len(self), batch)]
        images = (
            torch.cat(parts) if parts else torch.empty((0, self.channels, self.image_size, self.image_size))
        )
        return ArrayImageDataset(
            images.to(torch.uint8), self.labels.clone(), self.classes, name=str(self.root)
        )

    def describe(self, k: int) -> str:
        return f"{self.file(int(k))}#{self.plan.key(int(self.labels[int(k)]), int(self.indices[int(k)]))}"

    def __repr__(self) -> str:
        return f"ShardDataset(root={str(self.root)!r}, format={self.format!r}, n={len(self)})"
