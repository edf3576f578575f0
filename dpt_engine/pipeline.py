"""``dpt run``: chain the DPT stages through artifacts in one run directory.

Stage 1 (semi-supervised classifier -> pseudo-labels), stage 2 (class-conditional diffusion on
the pseudo-labels -> pseudo images), stage 3 (classifier retrained on real + pseudo images).
Each stage is skipped when its artifacts exist for the same config, and resumes from its last
checkpoint when it was interrupted; re-running the same command after a crash continues.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .config.base import to_dict
from .config.schema import PipelineConfig
from .data import build_splits
from .report import write_report
from .stages.common import StageContext, environment_info, resolve_device, upstream_fingerprint
from .stages.sample import run_sample
from .stages.stage1 import run_stage1
from .stages.stage2 import run_stage2
from .stages.stage3 import run_stage3
from .utils.dist import dist_info

log = logging.getLogger("dpt_engine")

__all__ = ["STAGES", "discard_unused_run_dir", "run_pipeline", "run_single_stage", "setup_run"]

STAGES = ("stage1", "stage2", "sample", "stage3")


def _setup_logging(out: Path) -> None:
    root = logging.getLogger("dpt_engine")
    root.setLevel(logging.INFO)
    info = dist_info()
    # under a multi-process launcher every rank logs: tag the lines, and give each rank its own file
    tag = f"[rank {info.rank}] " if info.world_size > 1 else ""
    fmt = logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(message)s", "%H:%M:%S")
    for h in list(root.handlers):
        if getattr(h, "_dpt_run", False):
            root.removeHandler(h)
            h.close()
    ours = [h for h in root.handlers if getattr(h, "_dpt_stream", False)]
    for h in ours:  # the console may have changed since an earlier run in this process (notebooks, tests)
        h.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed
    if not ours and not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers
    ):
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh._dpt_stream = True  # type: ignore[attr-defined]
        root.addHandler(sh)
    fh = logging.FileHandler(out / ("log.txt" if info.is_main else f"log.rank{info.rank}.txt"))
    fh.setFormatter(fmt)
    fh._dpt_run = True  # type: ignore[attr-defined]
    root.addHandler(fh)


def discard_unused_run_dir(out: Path, created_top: Path | None = None) -> bool:
    """Remove ``out`` if this process created it and nothing but its log was written there (a
    command that failed on bad input before any stage started leaves no empty run directory
    behind), and the folders above it up to ``created_top`` (the topmost one this process
    created) while they are empty. Only in a single-process run: under a launcher other ranks
    may still be writing."""
    if dist_info().world_size > 1 or not out.is_dir():
        return False
    entries = list(out.iterdir())
    if any(not (p.is_file() and p.name.startswith("log") and p.suffix == ".txt") for p in entries):
        return False
    root = logging.getLogger("dpt_engine")
    for h in list(root.handlers):
        if getattr(h, "_dpt_run", False):
            root.removeHandler(h)
            h.close()
    for p in entries:
        p.unlink()
    out.rmdir()
    folder = out
    while created_top is not None and folder != created_top:
        folder = folder.parent
        folder.rmdir()  # empty ones only: anything written there meanwhile stays (OSError)
    return True


def _check_environment(device: torch.device) -> None:
    """Environment variables that choose implementations are checked before any work."""
    import os

    from .data.dali_input import ENV_DECODER, resolve_image_decoder
    from .kernels.dispatch import check_env

    check_env(device.type)
    if os.environ.get(ENV_DECODER, "").strip():
        resolve_image_decoder()


def setup_run(cfg: PipelineConfig, out: str | Path, progress: bool = True) -> StageContext:
    """Create the run directory, write the resolved config, set threads and pick the device."""
    from .config.schema import check_input_paths

    check_input_paths(cfg)  # before the run directory is created or touched
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    _check_environment(device)
    # config.yaml is written when a stage starts (StageContext.write_config), after the stage has
    # checked its inputs: a typo in a rerun leaves the finished run's config.yaml as it was
    return StageContext(cfg=cfg, out=out, device=device, progress=progress)


def run_pipeline(
    cfg: PipelineConfig, out: str | Path, stages: Iterable[str] = STAGES, progress: bool = True
) -> dict[str, Any]:
    stages = tuple(stages)
    # Load and validate the data before anything in the run directory is touched, so bad input
    # fails with earlier artifacts (and the previous config.yaml) intact.
    splits = build_splits(cfg.data)
    ctx = setup_run(cfg, out, progress)
    results: dict[str, Any] = {}
    try:
        if "stage1" in stages:
            results["stage1"] = run_stage1(ctx, splits)
        if "stage2" in stages:
            results["stage2"] = run_stage2(ctx, splits, upstream=upstream_fingerprint(ctx, "stage1"))
        if "sample" in stages:
            results["sample"] = run_sample(ctx, splits, upstream=upstream_fingerprint(ctx, "stage2"))
        if "stage3" in stages:
            s1 = results["stage1"].summary.get("top1") if "stage1" in results else None
            results["stage3"] = run_stage3(ctx, splits, stage1_top1=s1)
    except KeyboardInterrupt:
        log.error("interrupted: re-run the same command to resume from the last checkpoint")
        raise
    ctx.write_config()
    report = write_report(ctx.out, results, to_dict(cfg), environment_info(ctx.device))
    log.info("report written to %s", ctx.out / "report.md")
    return report


def run_single_stage(name: str, ctx: StageContext, splits) -> Any:
    """One stage on its own (``dpt stage1`` etc.), reading upstream artifacts from the run dir."""
    if name == "stage1":
        return run_stage1(ctx, splits)
    if name == "stage2":
        return run_stage2(ctx, splits, upstream=upstream_fingerprint(ctx, "stage1"))
    if name == "sample":
        return run_sample(ctx, splits, upstream=upstream_fingerprint(ctx, "stage2"))
    if name == "stage3":
        return run_stage3(ctx, splits)
    raise ValueError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
