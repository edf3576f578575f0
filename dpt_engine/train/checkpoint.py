"""Atomic, rank-aware training checkpoints: one directory per step, keep the newest N.

Layout under ``root`` (e.g. ``stage2/checkpoints``)::

    step-00000500/          a complete checkpoint (renamed into place, so it is all or nothing)
        meta.json           written last, before the rename: step, backend, world size, files
        trainer.pt          rank 0: step, history, data generator, guard state, (backend state)
        rng-rank{r}.pt      every rank: torch / numpy / python (/ CUDA) random states
        ...                 backend files: DCP shards (fsdp2), DeepSpeed's files, EMA partitions
    .tmp-step-00000500-*/   a save in progress (or one killed mid-way): ignored, removed later

Why a directory rename: a sharded checkpoint is many files written by many ranks; writing them
into a temporary directory, fsyncing every file, and renaming the directory once is the only way
a crash (even ``kill -9``) at any moment leaves either the previous complete checkpoint or the
new one, never a mix. Ranks must share the file system (as they do for any multi-node
checkpoint).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..models.checkpoints import CheckpointError
from ..utils import testhooks
from ..utils.dist import barrier, broadcast_object, dist_info
from ..utils.io import atomic_write_json, file_sha256, read_json
from ..utils.trust import key_location, sign, signature_matches

log = logging.getLogger("dpt_engine")

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointIntegrityError",
    "CheckpointManager",
    "capture_rng_state",
    "restore_rng_state",
]

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def capture_rng_state() -> dict[str, Any]:
    """This process's global random states (torch CPU, CUDA if initialised, numpy, python)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the legacy global state is what we save)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # plain types and tensors only, so the file loads with torch.load(weights_only=True)
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002 (restores the legacy global state)
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# meta.json's "format": checkpoints that carry it also list every file's sha256, checked before
# anything is loaded from them
CHECKPOINT_FORMAT = "dpt-checkpoint-2"


def _fsync_tree(path: Path) -> dict[str, str]:
    """fsync every file and directory under ``path`` (so the rename publishes durable data); return
    every file's sha256 by relative path."""
    digests: dict[str, str] = {}
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            full = Path(dirpath, name)
            digests[str(full.relative_to(path))] = file_sha256(full)
            with open(full, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return digests


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint directory that dpt did not write, or whose files changed since it did."""


class CheckpointManager:
    """Saves and finds step checkpoints under ``root``; keeps the newest ``keep``."""

    def __init__(self, root: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, dir) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "meta.json").is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, decided on rank 0 and shared (every rank loads the same)."""
        found = self.complete() if dist_info().is_main else None
        found = broadcast_object(found)
        return found[-1][1] if found else None

    def remove_partial(self) -> None:
        """Rank 0 removes saves that never finished (``.tmp-*``, e.g. after ``kill -9``)."""
        if dist_info().is_main and self.root.is_dir():
            for p in self.root.glob(".tmp-step-*"):
                log.info("removing an unfinished checkpoint save %s", p)
                shutil.rmtree(p, ignore_errors=True)
        barrier()

    def save(self, step: int, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        """Every rank calls this; ``write(tmp_dir)`` writes this rank's files into ``tmp_dir``.

        Rank 0 then fsyncs the tree, writes ``meta.json`` and renames the directory into place,
        and prunes old checkpoints. Returns the final directory.
        """
        info = dist_info()
        tmp = None
        if info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".tmp-step-{step:08d}-{os.getpid()}-{time.time_ns()}"
            tmp.mkdir()
        tmp = Path(broadcast_object(str(tmp) if tmp is not None else None))
        try:
            write(tmp)
            with open(tmp / f"rng-rank{info.rank}.pt.tmp", "wb") as f:
                torch.save(capture_rng_state(), f)
            os.replace(tmp / f"rng-rank{info.rank}.pt.tmp", tmp / f"rng-rank{info.rank}.pt")
        except BaseException:
            # a full disk (or an interrupt) mid-save: the partial save is removed, the previous
            # checkpoint stays the newest, and the rerun resumes from it
            if info.world_size == 1:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier()
        final = self.step_dir(step)
        if info.is_main:
            testhooks.save_delay(step)
            digests = _fsync_tree(tmp)
            atomic_write_json(
                tmp / "meta.json",
                {
                    **meta,
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "world_size": info.world_size,
                    "files": sorted(digests),
                    "sha256": digests,
                    # proves the checkpoint was written under this account's key (utils/trust.py)
                    "signature": sign({"step": step, "sha256": digests}),
                },
            )
            if final.exists():  # a save of the same step (e.g. a rerun); replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            for _s, old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    @staticmethod
    def read_meta(ckpt: Path) -> dict[str, Any]:
        return read_json(ckpt / "meta.json")

    @staticmethod
    def verify(ckpt: Path, require_digests: bool) -> None:
        """:meth:`check` on rank 0, its verdict raised on every rank."""
        error = None
        if dist_info().is_main:
            try:
                CheckpointManager.check(ckpt, require_digests)
            except CheckpointIntegrityError as e:
                error = str(e)
        error = broadcast_object(error)
        if error is not None:
            raise CheckpointIntegrityError(error)

    @staticmethod
    def check(ckpt: Path, require_digests: bool) -> None:
        """Check that ``ckpt`` holds exactly the files its ``meta.json`` lists, with their sha256.

        DeepSpeed's loader and DCP's ``.metadata`` unpickle their files, so a sharded checkpoint is
        loaded only when this check passes: it proves the files are the ones this code wrote (not
        swapped, truncated or added since). ``require_digests``: refuse checkpoints without digests
        (written by dpt before they were recorded, or not by dpt). Raises
        :class:`CheckpointIntegrityError` naming the file and the fix.
        """
        fix = f"resume only from checkpoints this run wrote; to start the stage over, move {ckpt.parent} away"
        try:
            meta = read_json(ckpt / "meta.json")
        except (OSError, ValueError) as e:
            raise CheckpointIntegrityError(f"{ckpt}: unreadable meta.json ({e}); {fix}") from None
        digests = meta.get("sha256") if isinstance(meta, dict) else None
        if not isinstance(digests, dict):
            if require_digests:
                raise CheckpointIntegrityError(
                    f"{ckpt}: meta.json lists no file digests (format {meta.get('format', 'none')!r}, expected "
                    f"{CHECKPOINT_FORMAT!r}): it was not written by this version of dpt, and its files would be "
                    f"unpickled; {fix}"
                )
            return
        present = {f for f in _files(ckpt) if f != "meta.json"}
        listed = set(digests)
        if present != listed:
            extra, missing = sorted(present - listed), sorted(listed - present)
            raise CheckpointIntegrityError(
                f"{ckpt}: files differ from its meta.json (unlisted: {extra[:5]}, missing: {missing[:5]}); {fix}"
            )
        for name, digest in digests.items():
            if file_sha256(ckpt / name) != digest:
                raise CheckpointIntegrityError(
                    f"{ckpt}: {name} changed since it was written (sha256 differs); {fix}"
                )
        if require_digests and not signature_matches(
            {"step": meta.get("step"), "sha256": digests}, meta.get("signature")
        ):
            raise CheckpointIntegrityError(
                f"{ckpt}: not signed with this account's checkpoint key ({key_location()}), so it was not "
                "written here, and resuming would unpickle its files; to resume a run of your own from "
                "another machine, use that machine's key (DPT_CHECKPOINT_KEY or DPT_CHECKPOINT_KEY_FILE), "
                f"otherwise {fix}"
            )


def _files(root: Path) -> list[str]:
    return [str(Path(d, f).relative_to(root)) for d, _s, fs in os.walk(root) for f in fs]
