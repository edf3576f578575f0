"""Background encoding and writing, so the accelerator never waits on the disk.

The generation loop hands each finished batch (split at shard boundaries) to
:class:`ShardCommitter` and goes straight on to the next batch. ``workers`` encoder threads turn
pieces into bytes (PIL's PNG/JPEG encoders release the GIL, so threads run in parallel with each
other and with the network); one writer thread commits a shard once all of its pieces are
encoded (the disk is written sequentially, a shard at a time, in the order shards complete).

Queues are bounded: at most ``max_pieces`` pieces wait for an encoder and ``max_commits`` shards
for the writer; beyond that ``submit_piece`` / ``shard_done`` block, so a slow disk throttles
generation instead of filling memory. The first error in a background thread is re-raised in
the generation loop at its next call. With ``workers=0`` everything runs inline (the serial
design, for comparisons and debugging).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .formats import EncodedPiece, ShardFormat

__all__ = ["ShardCommitter"]


class ShardCommitter:
    def __init__(
        self, fmt: ShardFormat, workers: int = 4, max_pieces: int | None = None, max_commits: int = 2
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.fmt = fmt
        self.workers = workers
        # what each committed shard's record says about it, without its per-image lists (a
        # million images' offsets would otherwise accumulate here for the whole run)
        self.records: list[dict[str, Any]] = []
        self.encode_s = 0.0  # encoder-thread seconds (summed over threads)
        self.write_s = 0.0
        self.wait_s = 0.0  # seconds the generation loop blocked on full queues
        self._pending: dict[int, list[Future | EncodedPiece]] = {}
        self._commits: list[Future] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        if workers > 0:
            self._encoders = ThreadPoolExecutor(workers, thread_name_prefix="dpt-encode")
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="dpt-write")
            self._piece_slots = threading.BoundedSemaphore(max_pieces or 4 * workers)
            self._commit_slots = threading.BoundedSemaphore(max_commits)

    # -- errors ------------------------------------------------------------------------------
    def _fail(self, fut: Future) -> None:
        exc = fut.exception()
        if exc is not None:
            with self._lock:
                if self._error is None:
                    self._error = exc

    def check(self) -> None:
        """Re-raise the first error of a background thread."""
        if self._error is not None:
            raise RuntimeError(f"background shard writer failed: {self._error!r}") from self._error

    def _acquire(self, sem: threading.BoundedSemaphore) -> None:
        t0 = time.perf_counter()
        while not sem.acquire(timeout=0.5):
            self.check()
        self.wait_s += time.perf_counter() - t0

    # -- work ----------------------------------------------------------------------------------
    def submit_piece(
        self,
        shard: int,
        data: torch.Tensor,
        classes: Sequence[int],
        indices: Sequence[int],
        ready: Callable[[], None] | None = None,
    ) -> None:
        """Queue consecutive samples of ``shard`` (CPU tensor; ``ready()`` is called before
        reading it, e.g. to wait for its asynchronous device-to-host copy)."""
        self.check()
        if self.workers == 0:
            if ready is not None:
                ready()
            self._pending.setdefault(shard, []).append(self.fmt.encode(data, classes, indices))
            return
        self._acquire(self._piece_slots)

        def job() -> EncodedPiece:
            try:
                if ready is not None:
                    ready()
                return self.fmt.encode(data, classes, indices)
            finally:
                self._piece_slots.release()

        fut = self._encoders.submit(job)
        fut.add_done_callback(self._fail)
        self._pending.setdefault(shard, []).append(fut)

    def shard_done(self, shard: int) -> None:
        """Every piece of ``shard`` has been submitted: commit it once they are encoded."""
        self.check()
        parts = self._pending.pop(shard, [])
        if self.workers == 0:
            self._commit(shard, parts)  # type: ignore[arg-type]
            return
        self._acquire(self._commit_slots)

        def job() -> None:
            try:
                pieces = [f.result() for f in parts]  # type: ignore[union-attr]
                self._commit(shard, pieces)
            finally:
                self._commit_slots.release()

        fut = self._writer.submit(job)
        fut.add_done_callback(self._fail)
        # keep only the commits still queued or running: nothing accumulates per shard
        self._commits = [f for f in self._commits if not f.done()]
        self._commits.append(fut)

    def _commit(self, shard: int, pieces: list[EncodedPiece]) -> None:
        record = self.fmt.commit(shard, pieces)
        with self._lock:
            self.records.append({k: record[k] for k in ("shard", "count", "encode_s", "write_s")})
            self.encode_s += record["encode_s"]
            self.write_s += record["write_s"]

    def close(self) -> list[dict[str, Any]]:
        """Wait for every queued shard; return the records written (raises the first error)."""
        if self.workers > 0:
            for fut in self._commits:
                fut.exception()  # wait; errors are collected by _fail
            self._encoders.shutdown(wait=True)
            self._writer.shutdown(wait=True)
        self.check()
        return self.records

    def abort(self) -> None:
        """Stop after an error in the generation loop: queued work is dropped; a shard being
        written finishes or leaves only its temporary file (removed on the next start)."""
        if self.workers > 0:
            self._encoders.shutdown(wait=False, cancel_futures=True)
            self._writer.shutdown(wait=True, cancel_futures=True)
