"""The train state both trainers checkpoint and resume (stage 2's diffusion model, the classifiers of
stages 1 and 3), and the one way it goes into and out of a step checkpoint.

A :class:`TrainState` holds what every trainer has, the step, the history rows and the generator
that draws the data (batches, noise, augmentations), plus the trainer's named *parts*: anything
with ``state_dict`` / ``load_state_dict`` (model, EMA, optimizer, FreeMatch thresholds, batch
samplers, the bad-step guard). The lr schedule is a function of the step, and the process's global
random states (torch, numpy, python, CUDA) go into the checkpoint manager's ``rng-rank{r}.pt``, so
neither is part of it::

    state = TrainState(gen, model=model, ema=ema, optimizer=opt)
    save_train_state(ckpts, state, meta={"trainer": "classifier"}, header={"fingerprint": fp})
    payload = load_train_state(ckpts.latest(), state, require_digests=False, check=check_fingerprint)

A trainer whose weights are sharded over ranks (stage 2 under FSDP2 / DeepSpeed) keeps them out of
the parts and passes ``write_files`` / ``read_files`` (its backend's own save and load) instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from ..utils.dist import dist_info
from .checkpoint import CheckpointManager, restore_rng_state

log = logging.getLogger("dpt_engine")

__all__ = ["TRAINER_FILE", "TrainState", "load_train_state", "save_train_state"]

TRAINER_FILE = "trainer.pt"  # rank 0's file of a step checkpoint: the train state and its header


class TrainState:
    """``step``, ``history``, ``gen`` and the named ``parts`` (reachable as attributes too:
    ``state.model``). ``state_dict()`` is ``{"step", "history", "generator", <part>: <its state>}``."""

    def __init__(self, gen: torch.Generator, **parts: Any) -> None:
        reserved = {"step", "history", "generator"} & set(parts)
        if reserved:
            raise ValueError(f"train-state parts may not be named {sorted(reserved)}")
        self.step = 0
        self.history: list[dict] = []
        self.gen = gen
        self.parts = parts

    def __getattr__(self, name: str) -> Any:
        parts = self.__dict__.get("parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or part {name!r}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "history": self.history,
            "generator": self.gen.get_state(),
            **{name: part.state_dict() for name, part in self.parts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("step", "history", "generator", *self.parts) if k not in state]
        if missing:
            raise KeyError(f"train state lacks {missing}")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        self.gen.set_state(state["generator"])
        self.history = list(state["history"])
        self.step = int(state["step"])


def save_train_state(
    ckpts: CheckpointManager,
    state: TrainState,
    meta: dict[str, Any],
    *,
    header: Optional[dict[str, Any]] = None,
    write_files: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Checkpoint ``state`` at ``state.step``: every rank runs ``write_files(tmp_dir)`` (a sharded
    backend's files) first, then rank 0 writes ``trainer.pt`` = ``header`` + ``state.state_dict()``;
    the manager adds the random states, digests and ``meta`` and renames the directory into place."""

    def write(tmp: Path) -> None:
        if write_files is not None:
            write_files(tmp)
        if dist_info().is_main:
            with open(tmp / TRAINER_FILE, "wb") as f:
                torch.save({**(header or {}), **state.state_dict()}, f)

    return ckpts.save(state.step, write, meta)


def load_train_state(
    ckpt: Path,
    state: TrainState,
    *,
    require_digests: bool,
    check: Optional[Callable[[dict[str, Any], Path], None]] = None,
    read_files: Optional[Callable[[Path], None]] = None,
    upgrade: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None,
) -> dict[str, Any]:
    """Resume ``state`` from the step checkpoint ``ckpt``; returns ``trainer.pt``'s payload.

    The files are checked against ``meta.json`` first (nothing unverified is loaded). ``check``
    sees the payload before anything is restored (e.g. refuse another configuration's checkpoint);
    ``upgrade`` maps a payload of an earlier layout to this one; ``read_files`` loads a sharded
    backend's files. This rank's random states are restored last."""
    CheckpointManager.verify(ckpt, require_digests=require_digests)
    payload = torch.load(ckpt / TRAINER_FILE, map_location="cpu", weights_only=True)
    if check is not None:
        check(payload, ckpt / TRAINER_FILE)
    if upgrade is not None:
        payload = upgrade(payload)
    if read_files is not None:
        read_files(ckpt)
    state.load_state_dict(payload)
    rng = ckpt / f"rng-rank{dist_info().rank}.pt"
    if rng.is_file():
        restore_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    else:
        log.warning("%s has no random state for rank %d (world size changed)", ckpt, dist_info().rank)
    return payload
