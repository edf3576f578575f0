"""The global work list, its fixed partition into shards, and the output directory's identity.

The work is every pair ``(class c, index i)`` with ``c < num_classes`` and ``i < per_class``,
in class-major order: global position ``g`` holds ``(g // per_class, g % per_class)``. Shard
``s`` always holds positions ``[s * shard_size, min((s + 1) * shard_size, N))``, so what a shard
contains depends only on the plan, never on the world size or the batch size. Shards are the
unit of distribution (ranks take disjoint subsets of the pending shards) and of resume (a shard
is either complete, with its record on disk, or redone from scratch).

The output directory carries ``sampling.json``: the fingerprint of everything that decides the
bytes written (model, seed, solver, guidance, format, shard size, ...). Restarting with the same
config resumes; a different config in the same directory is refused, so shards generated under
two configs never mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..utils.io import atomic_write_json, read_json, stable_hash

__all__ = ["SamplingConfigError", "ShardPlan", "check_output_dir", "fingerprint_diff"]

CONFIG_FILE = "sampling.json"


class SamplingConfigError(ValueError):
    """The output directory was started with a different generation config."""


@dataclass(frozen=True)
class ShardPlan:
    """``num_classes x per_class`` samples cut into shards of ``shard_size`` consecutive pairs."""

    num_classes: int
    per_class: int
    shard_size: int

    def __post_init__(self) -> None:
        for name in ("num_classes", "per_class", "shard_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ShardPlan.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def total(self) -> int:
        return self.num_classes * self.per_class

    @property
    def num_shards(self) -> int:
        return math.ceil(self.total / self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Global positions ``[start, stop)`` of ``shard``."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} is outside 0..{self.num_shards - 1}")
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.total)

    def pairs(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes, indices), int64 (stop - start,) each, of global positions ``[start, stop)``."""
        g = torch.arange(start, stop, dtype=torch.int64)
        return g // self.per_class, g % self.per_class

    def shard_pairs(self, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs(*self.shard_range(shard))

    def key(self, cls: int, index: int) -> str:
        """The sample's name in every format (``0003_000017``): sortable, no dots (WebDataset
        splits a member name at its first dot), widened for very large plans."""
        wc = max(4, len(str(self.num_classes - 1)))
        wi = max(6, len(str(self.per_class - 1)))
        return f"{cls:0{wc}d}_{index:0{wi}d}"

    @staticmethod
    def assign(pending: list[int], rank: int, world_size: int) -> list[int]:
        """The shards rank ``rank`` generates: every ``world_size``-th pending shard (round robin
        balances a resumed run too: only the shards still missing are dealt out)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        return list(pending[rank::world_size])

    def to_dict(self) -> dict[str, int]:
        return {"num_classes": self.num_classes, "per_class": self.per_class, "shard_size": self.shard_size}


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_output_dir(out_dir: Path, config: dict[str, Any]) -> str:
    """Claim ``out_dir`` for ``config`` (JSON-serialisable) and return its fingerprint hash.

    A fresh directory gets ``sampling.json``; a directory holding the same fingerprint is
    resumed; one holding another raises :class:`SamplingConfigError` naming what changed.
    Call on one process only (rank 0).
    """
    out_dir = Path(out_dir)
    fp = stable_hash(config)
    path = out_dir / CONFIG_FILE
    if path.is_file():
        try:
            old = read_json(path)
        except (OSError, ValueError) as e:
            raise SamplingConfigError(
                f"{path} is unreadable ({e}); it identifies the generation in {out_dir}: "
                "restore it, or generate into a new directory"
            ) from None
        if old.get("fingerprint") != fp:
            changes = fingerprint_diff(old.get("config", {}), config)
            raise SamplingConfigError(
                f"{out_dir} holds samples generated with a different config ({'; '.join(changes) or 'unknown'}); "
                "re-run with the original settings to resume, or choose a new output directory "
                "(sample.output_dir=... / --out) or delete the old one"
            )
        return fp
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"fingerprint": fp, "config": config})
    return fp
