"""Shard formats: how one shard's samples are encoded and committed to disk.

Every format follows the same protocol, which is what makes a killed run safe to restart:

1. ``encode(data, classes, indices)`` turns a piece of a batch (uint8 images or float latents on
   the CPU) into bytes; pure and thread-safe, so background threads run it (PIL's PNG/JPEG
   encoders release the GIL).
2. ``commit(shard, pieces)`` writes the shard's data to temporary files and renames them into
   place, then writes the shard's record ``.shards/shard-NNNNNN.json`` atomically, last. A
   shard is complete if and only if its record exists, carries the output directory's
   fingerprint and its data files have the recorded sizes (:func:`completed_shards`).

Formats:

* ``tar``: ``shard-NNNNNN.tar`` in WebDataset layout (members ``{key}.png|jpg``, ``{key}.cls``
  with the class index as text, ``{key}.json`` with class, index, class name and noise seed). The
  record doubles as the shard's JSON index: every image's byte offset and size in the tar, so
  readers seek straight to an image instead of scanning.
* ``imagefolder``: ``<class folder>/<key>.png|jpg`` (the tree ``FolderImageDataset`` reads); the
  record lists its files. A killed shard may leave some of its files in the tree (each one
  complete, renamed atomically); they are not listed in any record and are rewritten, with the
  same bytes, when the shard is redone.
* ``latents``: ``shard-NNNNNN.npy``, the float32 (n, C, h, w) solver outputs before decoding;
  the record lists each row's class and index. Readers decode (see ``reader.py``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.imagefolder import class_dirnames
from ..diffusion.noise import sample_seed
from ..utils import testhooks
from ..utils.io import atomic_path, atomic_write_json, read_json
from .plan import ShardPlan

__all__ = [
    "FORMATS",
    "EncodedPiece",
    "ShardFormat",
    "completed_shards",
    "encode_image",
    "iter_shard_records",
    "make_format",
    "record_path",
    "shard_records",
]

RECORD_DIR = ".shards"
_TAR_MTIME = 1_700_000_000  # fixed member mtime: a shard's bytes depend only on its samples


def record_path(out_dir: Path, shard: int) -> Path:
    return Path(out_dir) / RECORD_DIR / f"shard-{shard:06d}.json"


def encode_image(img: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """uint8 (H, W, C) with C = 1 or 3 -> PNG or JPEG bytes."""
    from PIL import Image

    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    buf = io.BytesIO()
    if image_format == "png":
        pil.save(buf, format="PNG")
    elif image_format == "jpg":
        pil.save(buf, format="JPEG", quality=int(jpeg_quality))
    else:
        raise ValueError(f"unknown image format {image_format!r}; expected 'png' or 'jpg'")
    return buf.getvalue()


@dataclass
class EncodedPiece:
    """Consecutive samples of one shard, ready to be written."""

    classes: list[int]
    indices: list[int]
    payload: list[bytes] | np.ndarray  # encoded images, or float32 latents (n, C, h, w)
    encode_s: float


class ShardFormat(ABC):
    """Encodes and commits shards into ``out_dir`` (see the module docstring)."""

    name: str = ""
    kind: str = "images"  # what the sampler must produce: uint8 "images" or float "latents"

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: ShardPlan,
        fingerprint: str,
        class_names: Sequence[str],
        image_format: str = "png",
        jpeg_quality: int = 95,
        seed: int = 0,
    ):
        if image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
        if len(class_names) != plan.num_classes:
            raise ValueError(f"{len(class_names)} class names for a plan of {plan.num_classes} classes")
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.fingerprint = fingerprint
        self.class_names = list(class_names)
        self.image_format = image_format
        self.jpeg_quality = int(jpeg_quality)
        self.seed = int(seed)

    def encode(self, data: torch.Tensor, classes: Sequence[int], indices: Sequence[int]) -> EncodedPiece:
        """uint8 (n, C, H, W) CPU images -> encoded bytes (image formats)."""
        t0 = time.perf_counter()
        if data.dtype != torch.uint8:
            raise TypeError(f"the {self.name} format takes uint8 images, got {data.dtype}")
        arr = data.permute(0, 2, 3, 1).numpy()  # (n, H, W, C)
        payload = [encode_image(a, self.image_format, self.jpeg_quality) for a in arr]
        return EncodedPiece(list(classes), list(indices), payload, time.perf_counter() - t0)

    def commit(self, shard: int, pieces: Sequence[EncodedPiece]) -> dict[str, Any]:
        """Write the shard's data atomically, then its record (last); return the record."""
        start, stop = self.plan.shard_range(shard)
        classes = [c for p in pieces for c in p.classes]
        indices = [i for p in pieces for i in p.indices]
        want_c, want_i = self.plan.pairs(start, stop)
        if classes != want_c.tolist() or indices != want_i.tolist():
            raise RuntimeError(f"shard {shard}: pieces do not cover positions [{start}, {stop}) in order")
        t0 = time.perf_counter()
        body = self._write(shard, pieces, classes, indices)
        write_s = time.perf_counter() - t0
        counts = np.bincount(np.asarray(classes, dtype=np.int64), minlength=self.plan.num_classes)
        record = {
            "shard": shard,
            "fingerprint": self.fingerprint,
            "format": self.name,
            "start": start,
            "stop": stop,
            "count": stop - start,
            "class_counts": {str(c): int(n) for c, n in enumerate(counts) if n},
            "encode_s": sum(p.encode_s for p in pieces),
            "write_s": write_s,
            **body,
        }
        testhooks.record_sleep(shard)
        atomic_write_json(record_path(self.out_dir, shard), record)
        return record

    @abstractmethod
    def _write(
        self, shard: int, pieces: Sequence[EncodedPiece], classes: list[int], indices: list[int]
    ) -> dict[str, Any]:
        """Write the data files; return the record fields describing them (``files`` at least:
        a list of ``{"path": relative path, "bytes": size}``)."""

    def sample_json(self, c: int, i: int) -> bytes:
        return json.dumps(
            {
                "key": self.plan.key(c, i),
                "class": c,
                "index": i,
                "class_name": self.class_names[c],
                "noise_seed": sample_seed(self.seed, c, i),
            },
            sort_keys=True,
        ).encode("utf-8")


class TarFormat(ShardFormat):
    """WebDataset tar shards with the image offsets in the record."""

    name = "tar"

    def _write(self, shard, pieces, classes, indices):
        rel = f"shard-{shard:06d}.tar"
        images = [b for p in pieces for b in p.payload]
        ext = self.image_format
        members: list[list[Any]] = []
        half = len(images) // 2
        with atomic_path(self.out_dir / rel) as tmp:
            with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for n, (c, i, img) in enumerate(zip(classes, indices, images)):
                    if n == half:
                        f.flush()
                        testhooks.shard_write_sleep(shard)
                    key = self.plan.key(c, i)
                    for suffix, data in (
                        (ext, img),
                        ("cls", str(c).encode("ascii")),
                        ("json", self.sample_json(c, i)),
                    ):
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
                        tf.addfile(info, io.BytesIO(data))
                        if suffix == ext:  # data starts one padded payload before the new offset
                            members.append([key, c, i, tf.offset - _padded(len(data)), len(data)])
            size = tmp.stat().st_size
        return {"files": [{"path": rel, "bytes": size}], "image_ext": ext, "members": members}


def _padded(n: int) -> int:
    return (n + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


class ImageFolderFormat(ShardFormat):
    """``<class folder>/<key>.<ext>`` files (the ImageFolder tree stage 3 and people browse)."""

    name = "imagefolder"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dirs = class_dirnames(self.class_names)

    def _write(self, shard, pieces, classes, indices):
        images = [b for p in pieces for b in p.payload]
        files, entries = [], []
        half = len(images) // 2
        for n, (c, i, img) in enumerate(zip(classes, indices, images)):
            if n == half:
                testhooks.shard_write_sleep(shard)
            rel = f"{self.dirs[c]}/{self.plan.key(c, i)}.{self.image_format}"
            with atomic_path(self.out_dir / rel) as tmp:
                tmp.write_bytes(img)
            files.append({"path": rel, "bytes": len(img)})
            entries.append([rel, c, i])
        return {"files": files, "entries": entries}


class LatentFormat(ShardFormat):
    """Raw float32 solver outputs, one ``.npy`` per shard (memory-mapped by readers)."""

    name = "latents"
    kind = "latents"

    def encode(self, data: torch.Tensor, classes: Sequence[int], indices: Sequence[int]) -> EncodedPiece:
        if not data.is_floating_point():
            raise TypeError(f"the latents format takes float latents, got {data.dtype}")
        return EncodedPiece(list(classes), list(indices), data.float().numpy(), 0.0)

    def _write(self, shard, pieces, classes, indices):
        rel = f"shard-{shard:06d}.npy"
        arr = np.concatenate([p.payload for p in pieces])  # (n, C, h, w)
        with atomic_path(self.out_dir / rel) as tmp:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f,
                    {
                        "descr": np.lib.format.dtype_to_descr(arr.dtype),
                        "fortran_order": False,
                        "shape": arr.shape,
                    },
                )
                half = (len(arr) // 2) * int(np.prod(arr.shape[1:])) * arr.itemsize
                raw = np.ascontiguousarray(arr).tobytes()
                f.write(raw[:half])
                f.flush()
                testhooks.shard_write_sleep(shard)
                f.write(raw[half:])
            size = tmp.stat().st_size
        return {
            "files": [{"path": rel, "bytes": size}],
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "classes": classes,
            "indices": indices,
        }


FORMATS: dict[str, type[ShardFormat]] = {
    "tar": TarFormat,
    "imagefolder": ImageFolderFormat,
    "latents": LatentFormat,
}


def make_format(name: str, *args: Any, **kwargs: Any) -> ShardFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown sample format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name](*args, **kwargs)


def iter_shard_records(
    out_dir: str | os.PathLike, fingerprint: str, plan: ShardPlan
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(shard, record) of every complete shard (see the module docstring), in shard order, read
    one at a time: at a million images holding every record's per-image lists (tar offsets,
    latent rows) at once would cost hundreds of MB."""
    out_dir = Path(out_dir)
    rec_dir = out_dir / RECORD_DIR
    if not rec_dir.is_dir():
        return
    for p in sorted(rec_dir.glob("shard-*.json")):  # zero-padded names: sorted = shard order
        try:
            rec = read_json(p)
            shard = int(rec["shard"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: the shard is redone
        if rec.get("fingerprint") != fingerprint or not 0 <= shard < plan.num_shards:
            continue
        if (rec.get("start"), rec.get("stop")) != plan.shard_range(shard):
            continue
        ok = True
        for f in rec.get("files", []):
            fp = out_dir / f["path"]
            if not fp.is_file() or fp.stat().st_size != f["bytes"]:
                ok = False
                break
        if ok:
            yield shard, rec


def shard_records(
    out_dir: str | os.PathLike,
    fingerprint: str,
    plan: ShardPlan,
    fields: Sequence[str] | None = None,
) -> dict[int, dict[str, Any]]:
    """The records of every complete shard, by shard number; ``fields`` keeps only those keys
    of each record (the rest is dropped as each record is read)."""
    return {
        shard: rec if fields is None else {k: rec[k] for k in fields if k in rec}
        for shard, rec in iter_shard_records(out_dir, fingerprint, plan)
    }


def completed_shards(out_dir: str | os.PathLike, fingerprint: str, plan: ShardPlan) -> set[int]:
    return set(shard_records(out_dir, fingerprint, plan, fields=()))
