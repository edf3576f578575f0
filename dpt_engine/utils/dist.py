"""Process-group helpers shared by the distributed trainer and the sharded sampler.

Launchers (``torchrun``, the ``deepspeed`` launcher, SLURM wrappers that export the same
variables) describe the job through ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. A plain
``python``/``dpt`` call has none of them and runs as the single process of a world of one, with
no process group: every helper below is then a cheap no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "barrier",
    "broadcast_object",
    "dist_info",
    "exit_process",
    "free_port",
    "init_distributed",
    "is_main_process",
    "main_process_first",
    "shutdown_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def dist_info() -> DistInfo:
    """Rank and world size: from the initialised process group, else from the launcher's env."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}: check the launcher's environment")
    return DistInfo(rank=rank, world_size=world, local_rank=_env_int("LOCAL_RANK", rank))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for MASTER_PORT of a local process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group the launcher describes (idempotent); a world of one joins nothing.

    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise. On CUDA the
    process is pinned to ``cuda:LOCAL_RANK`` first.
    """
    info = dist_info()
    if info.world_size == 1 or dist.is_initialized():
        return info
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={info.world_size} but {var} is not set: launch with torchrun "
                "(e.g. `torchrun --nproc_per_node=N -m dpt_engine.cli ...`) or export it"
            )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(
        backend=backend,
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist_info()


# True once this process has left a process group: torch may still run that group's threads.
_left_a_group = False


def shutdown_distributed() -> None:
    """Leave the process group if this process joined one (idempotent; no collective call, so a
    rank whose peer died still exits). A process that reaches interpreter exit with a live gloo /
    NCCL group can abort in the library's C++ destructors ("terminate called without an active
    exception", SIGABRT) after finishing its work, which a scheduler reads as a failed job; the
    command-line entry points end such a process through :func:`exit_process`."""
    global _left_a_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _left_a_group = True


def exit_process(code: int) -> None:
    """End a command-line process with ``code``; one that was in a process group skips C++ teardown.

    ``destroy_process_group`` does not always end the group: once a ``DistributedDataParallel``
    wrapper has been built over it, torch (2.11-2.14 at least) keeps references to the group past
    the wrapper's life, so gloo's worker threads are still running when the interpreter exits, and
    static destruction beside them aborts now and then (3 exits in 60 of a plain 2-process DDP
    script on this CPU, 1 CI run in ~30; ``benchmarks/exit_repeat.py --command train``). Such a process flushes its streams and log handlers and
    leaves with ``os._exit``; every file the engine writes is already closed and renamed into place
    by then. Any other process exits normally.
    """
    shutdown_distributed()  # a command that returned without leaving its group
    if not _left_a_group:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def is_main_process() -> bool:
    return dist_info().is_main


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity in a world of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), the other ranks after it finishes."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()
