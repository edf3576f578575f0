"""Sharded, resumable, multi-process generation: the loop every rank runs, and the manifest.

``run_generation`` is the entry point (the sample stage and the benchmark call it):

1. rank 0 claims the output directory for the config (``check_output_dir``: a different
   config is refused), removes temporary files left by a killed run, and lists the shards
   without a valid record; the list is broadcast, so every rank sees the same pending work;
2. each rank takes every ``world_size``-th pending shard (``ShardPlan.assign``) and streams
   their (class, index) pairs through the sampler in batches of ``batch_size``. Batches run
   across shard and class boundaries (no padding); the results are copied to the host
   asynchronously and handed to the background :class:`ShardCommitter`;
3. after a barrier rank 0 rebuilds ``manifest.json`` from the shard records (never written by
   two ranks: every shard has exactly one owner), checks that every (class, index) is present
   once, and adds the timing breakdown gathered from all ranks.

Every rank must call it (it contains collectives when a process group is initialised).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..utils import testhooks
from ..utils.dist import barrier, broadcast_object, dist_info
from ..utils.io import atomic_write_json
from .formats import RECORD_DIR, ShardFormat, make_format, shard_records
from .plan import SamplingConfigError, ShardPlan, check_output_dir
from .pool import ShardCommitter

log = logging.getLogger("dpt_engine")

__all__ = ["MANIFEST", "assemble_manifest", "generate_shards", "prepare_output", "run_generation"]

MANIFEST = "manifest.json"


def _remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the hidden ``.<name>.<random>.tmp`` files ``atomic_path`` leaves when a process is
    killed mid-write (in the output directory, its class folders and the record folder)."""
    n = 0
    for pattern in (".*.tmp", "*/.*.tmp"):
        for p in out_dir.glob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


def prepare_output(out_dir: Path, config: dict[str, Any], plan: ShardPlan) -> tuple[str, list[int]]:
    """(fingerprint, pending shards), decided on rank 0 and broadcast to every rank."""
    info = dist_info()
    result: tuple[str, Any, Any]
    if info.is_main:
        try:
            fp = check_output_dir(out_dir, {**config, "plan": plan.to_dict()})
            removed = _remove_stale_temporaries(Path(out_dir))
            if removed:
                log.info("sampling: removed %d temporary files of an interrupted run", removed)
            done = shard_records(out_dir, fp, plan, fields=())
            pending = [s for s in range(plan.num_shards) if s not in done]
            if done:
                log.info(
                    "sampling: %d of %d shards already complete in %s; %d to go",
                    len(done),
                    plan.num_shards,
                    out_dir,
                    len(pending),
                )
            result = ("ok", fp, pending)
        except SamplingConfigError as e:
            result = ("error", str(e), None)
    else:
        result = ("", "", None)
    status, fp_or_msg, pending = broadcast_object(result)
    if status == "error":
        raise SamplingConfigError(fp_or_msg)
    return fp_or_msg, pending


def _to_host(out: torch.Tensor) -> tuple[torch.Tensor, Optional[Callable[[], None]]]:
    """Start the device-to-host copy of ``out`` without waiting for it; the returned callable
    waits for that copy (the writer threads call it before reading the data)."""
    if out.device.type != "cuda":
        return out.detach(), None
    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    host.copy_(out, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event.synchronize


def generate_shards(
    sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    fmt: ShardFormat,
    shards: Sequence[int],
    batch_size: int,
    *,
    workers: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate and commit ``shards`` on this process; returns this process's statistics."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = fmt.plan
    queue = deque([shard, *plan.shard_range(shard)] for shard in shards)
    total = sum(stop - start for _, start, stop in queue)
    committer = ShardCommitter(fmt, workers=workers)
    info = dist_info()
    bar = tqdm(
        total=total,
        desc=f"generating (rank {info.rank}/{info.world_size})" if info.world_size > 1 else "generating",
        unit="img",
        disable=not progress or not info.is_main,
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    t_transfer = 0.0
    done = 0
    try:
        while queue:
            segments = []  # (shard, start, stop, last piece of the shard)
            need = batch_size
            while need and queue:
                head = queue[0]
                shard, pos, stop = head
                take = min(need, stop - pos)
                segments.append((shard, pos, pos + take, pos + take == stop))
                need -= take
                head[1] = pos + take
                if head[1] == stop:
                    queue.popleft()
            pairs = [plan.pairs(a, b) for _, a, b, _ in segments]
            classes = torch.cat([p[0] for p in pairs])
            indices = torch.cat([p[1] for p in pairs])
            out = sampler(classes, indices)
            t0 = time.perf_counter()
            host, ready = _to_host(out)
            t_transfer += time.perf_counter() - t0
            off = 0
            c_list, i_list = classes.tolist(), indices.tolist()
            for shard, a, b, last in segments:
                n = b - a
                committer.submit_piece(
                    shard, host[off : off + n], c_list[off : off + n], i_list[off : off + n], ready
                )
                off += n
                if last:
                    committer.shard_done(shard)
            done += len(classes)
            bar.update(len(classes))
            bar.set_postfix(img_s=f"{done / max(time.perf_counter() - t_start, 1e-9):.1f}")
        records = committer.close()
    except BaseException:
        committer.abort()
        bar.close()
        raise
    bar.close()
    wall = time.perf_counter() - t_start
    parts = sampler.timings() if hasattr(sampler, "timings") else {}
    return {
        "rank": info.rank,
        "generated": done,
        "shards": sorted(r["shard"] for r in records),
        "wall_s": wall,
        "seconds": {
            **parts,
            "transfer": t_transfer,
            "encode": committer.encode_s,
            "write": committer.write_s,
            "writer_wait": committer.wait_s,
        },
    }


def _gather(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def assemble_manifest(
    out_dir: Path,
    plan: ShardPlan,
    fingerprint: str,
    class_names: Sequence[str],
    rank_stats: Sequence[dict[str, Any]],
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Rebuild ``manifest.json`` from the shard records; raises if any shard is missing."""
    # counts and files only: the per-image lists of a million images stay on disk
    records = shard_records(
        out_dir, fingerprint, plan, fields=("count", "class_counts", "files", "format", "image_ext")
    )
    missing = [s for s in range(plan.num_shards) if s not in records]
    if missing:
        raise RuntimeError(
            f"{out_dir}: {len(missing)} of {plan.num_shards} shards are missing (first: {missing[:5]}); "
            "a process failed before finishing them: re-run the same command to generate them"
        )
    counts = np.zeros(plan.num_classes, dtype=np.int64)
    for rec in records.values():
        for c, n in rec["class_counts"].items():
            counts[int(c)] += n
    if not (counts == plan.per_class).all():
        bad = [(int(c), int(n)) for c, n in enumerate(counts) if n != plan.per_class][:5]
        raise RuntimeError(f"{out_dir}: shard records disagree with the plan (class, count): {bad}")
    first = next(iter(records.values()))
    generated = sum(s["generated"] for s in rank_stats)
    wall = max((s["wall_s"] for s in rank_stats), default=0.0)
    seconds: dict[str, float] = {}
    for s in rank_stats:
        for k, v in s["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + float(v)
    busy = sum(s["wall_s"] for s in rank_stats)  # process-seconds of this run
    manifest = {
        "fingerprint": fingerprint,
        "format": first["format"],
        "image_format": first.get("image_ext"),
        "num_images": int(counts.sum()),
        "num_shards": plan.num_shards,
        "plan": plan.to_dict(),
        "classes": list(class_names),
        "class_counts": counts.tolist(),
        "shards": [
            {"shard": s, "count": records[s]["count"], "files": [f["path"] for f in records[s]["files"]]}
            for s in range(plan.num_shards)
        ],
        "records": RECORD_DIR,
        "throughput": {
            "world_size": len(rank_stats),
            "generated": generated,
            "skipped_existing": int(counts.sum()) - generated,
            "wall_s": wall,
            "images_per_s": generated / wall if generated and wall > 0 else None,
            # summed over ranks; encode/write run on background threads, overlapping the rest
            "seconds": seconds,
            "share_of_wall": {k: v / busy for k, v in seconds.items()} if busy > 0 else {},
            "outside_model_share": (1 - seconds.get("model", 0.0) / busy) if busy > 0 else None,
        },
        **(extra or {}),
    }
    testhooks.manifest_sleep()
    atomic_write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def run_generation(
    sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    out_dir: str | os.PathLike,
    plan: ShardPlan,
    config: dict[str, Any],
    class_names: Sequence[str],
    *,
    format: str = "tar",
    image_format: str = "png",
    jpeg_quality: int = 95,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 4,
    progress: bool = True,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Generate every missing shard of ``plan`` into ``out_dir`` on all ranks; returns the
    manifest (on every rank). ``config`` identifies the generation (see ``check_output_dir``):
    everything that changes the written bytes belongs in it, execution details (batch size,
    workers, world size) do not."""
    out_dir = Path(out_dir)
    config = {
        **config,
        "format": format,
        "image_format": image_format if format != "latents" else None,
        "jpeg_quality": jpeg_quality if (format != "latents" and image_format == "jpg") else None,
        "seed": seed,
        "classes": list(class_names),
    }
    fp, pending = prepare_output(out_dir, config, plan)
    fmt = make_format(
        format,
        out_dir,
        plan,
        fp,
        class_names,
        image_format=image_format,
        jpeg_quality=jpeg_quality,
        seed=seed,
    )
    info = dist_info()
    mine = plan.assign(pending, info.rank, info.world_size)
    stats = generate_shards(sampler, fmt, mine, batch_size, workers=workers, progress=progress)
    all_stats = _gather(stats)
    manifest = None
    error = None
    if info.is_main:
        try:
            manifest = assemble_manifest(out_dir, plan, fp, class_names, all_stats, extra)
        except RuntimeError as e:
            error = str(e)
    manifest, error = broadcast_object((manifest, error))
    barrier()
    if error is not None:
        raise RuntimeError(error)
    return manifest
