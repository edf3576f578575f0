"""The ``sample`` stage: generate pseudo images with the stage-2 diffusion model.

Generates ``sample.images_per_class`` images per class with DPM-Solver++ and batched
classifier-free guidance into ``sample/samples/`` (ImageFolder tree + manifest), draws
``sample/sample_grid.png`` (one row per class) and computes FID/KID against the real training
images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..config.base import to_dict
from ..data import DatasetSplits
from ..diffusion.dpm_solver import DPMSolverPP
from ..diffusion.guidance import cfg_eps_fn, doubled_eps_fn
from ..diffusion.noise import initial_noise
from ..diffusion.schedules import make_schedule
from ..generation import ImageFolderWriter, clip_denoised_fn, generate, save_grid, to_uint8
from ..kernels.solver_step import sample_multistep_fused, solver_step_table
from ..utils.io import atomic_write_json
from .common import StageContext, StageResult, run_stage
from .stage2 import load_diffusion_model, load_stage2_autoencoder

log = logging.getLogger("dpt_engine")

__all__ = ["run_sample"]


def run_sample(ctx: StageContext, splits: DatasetSplits, upstream: str | None) -> StageResult:
    scfg = ctx.cfg.sample
    d = to_dict(scfg)
    d.pop("batch_size")  # output does not depend on it beyond float rounding
    fingerprint = {"sample": d, "stage2": upstream}

    def body(stage_dir: Path) -> dict[str, Any]:
        ae = load_stage2_autoencoder(ctx, splits)
        net = load_diffusion_model(ctx, splits, ae)
        conditional = ctx.cfg.stage2.label_source != "none"
        num_classes = splits.num_classes
        schedule = make_schedule(ctx.cfg.stage2.schedule)
        solver = DPMSolverPP(
            schedule, steps=scfg.steps, order=scfg.order, method=scfg.method, skip_type=scfg.skip_type
        )
        shape = ae.latent_shape((splits.channels, splits.image_size, splits.image_size))

        clip = scfg.clip_denoised and ctx.cfg.stage2.autoencoder is None
        fused = scfg.method == "multistep"  # one fused solver step per model call (kernel dispatch)
        table = solver_step_table(solver, ctx.device) if fused else None

        def sample_batch(c: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            x_t = initial_noise(scfg.seed, c, i, shape, dtype=torch.float32, device=ctx.device)
            y = c.to(ctx.device) if conditional else None
            scale = scfg.guidance_scale if conditional else 0.0
            if fused and not clip and scale != 0:
                # the network returns [cond; uncond] for the doubled batch; guidance is fused
                fn = doubled_eps_fn(net, y, num_classes, schedule)
                x0 = sample_multistep_fused(solver, fn, x_t, guidance_scale=scale, table=table)
            else:
                fn = cfg_eps_fn(net, y, scale, num_classes if conditional else None, schedule)
                if clip:
                    fn = clip_denoised_fn(fn, schedule)
                if fused:
                    x0 = sample_multistep_fused(solver, fn, x_t, table=table)
                else:
                    x0 = solver.sample(fn, x_t)
            return to_uint8(ae.decode(x0)).cpu()

        root = ctx.stage_dir("sample") / "samples"
        writer = ImageFolderWriter(root, splits.classes)
        kept: list = []
        stats = generate(
            sample_batch,
            writer,
            num_classes,
            scfg.images_per_class,
            scfg.batch_size,
            progress=ctx.progress,
            keep=kept,
        )
        images, classes = _collect(kept, root, splits)
        grid = ctx.stage_dir("sample") / "sample_grid.png"
        save_grid(
            images,
            classes,
            num_classes,
            min(scfg.grid_per_class, scfg.images_per_class),
            grid,
            class_names=splits.classes,
        )
        summary: dict[str, Any] = {
            "num_images": num_classes * scfg.images_per_class,
            "images_per_class": scfg.images_per_class,
            "steps": scfg.steps,
            "order": scfg.order,
            "guidance_scale": scfg.guidance_scale,
            **stats,
        }
        if scfg.fid:
            summary.update(_fid(ctx, splits, images))
        writer.close({"fingerprint": fingerprint, **summary, "classes": splits.classes})
        atomic_write_json(stage_dir / "summary.json", summary)
        return summary

    return run_stage(ctx, "sample", fingerprint, body)


def _collect(kept: list, root: Path, splits: DatasetSplits) -> tuple[torch.Tensor, torch.Tensor]:
    """All generated images (from memory, plus files written by an earlier, interrupted run)."""
    from ..data import FolderImageDataset

    ds = FolderImageDataset.from_tree(
        root, classes=splits.classes, channels=splits.channels, image_size=splits.image_size
    )
    if kept and len(ds) == sum(len(k[1]) for k in kept):
        return torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept])
    return ds.get_batch(torch.arange(len(ds))), ds.labels.clone()


def _fid(ctx: StageContext, splits: DatasetSplits, generated: torch.Tensor) -> dict[str, Any]:
    from ..eval.fid import compute_metrics

    scfg = ctx.cfg.sample
    g = torch.Generator().manual_seed(0)
    n_gen = min(scfg.fid_num_images, len(generated))
    n_real = min(scfg.fid_num_images, len(splits.train))
    gen_idx = torch.randperm(len(generated), generator=g)[:n_gen]
    real_idx = torch.randperm(len(splits.train), generator=g)[:n_real]
    log.info("sample: FID/KID of %d generated vs %d real training images", n_gen, n_real)
    m = compute_metrics(
        generated[gen_idx],
        splits.train.get_batch(real_idx),
        fid=True,
        kid=True,
        weights=scfg.fid_weights,
        device=str(ctx.device),
        cache=ctx.out / "fid_cache",  # the real set's Inception statistics, reused across runs
    )
    return {
        "fid": m.get("fid"),
        "kid": m.get("kid_mean"),
        "kid_std": m.get("kid_std"),
        "fid_num_generated": n_gen,
        "fid_num_real": n_real,
    }
