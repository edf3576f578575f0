"""The ``sample`` stage: generate pseudo images with the stage-2 diffusion model.

Generates ``sample.images_per_class`` images per class with DPM-Solver++ and batched
classifier-free guidance through ``dpt_engine.sampling`` (sharded, resumable, multi-process:
``torchrun --nproc_per_node=N -m dpt_engine.cli sample ...`` splits the shards over N processes),
into ``sample/samples/`` (or ``sample.output_dir``) as an ImageFolder tree, WebDataset tar
shards or raw latents, with a manifest holding the per-class counts and a throughput breakdown.
Rank 0 then draws ``sample/sample_grid.png`` (one row per class) and computes FID/KID against
the real training images, reading the generated images straight from the shards.

Default format: ``imagefolder``. At the default presets' scale (a few thousand small images)
a plain tree is what people browse and what ``stage3.pseudo_dir`` has always accepted; it is
written shard by shard with the same records and resume as the other formats. For ImageNet
scale (128k-1M+ images) choose ``sample.format=tar`` (few large files, sequential reads) or
``latents``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..config.base import to_dict
from ..data import DatasetSplits
from ..diffusion.dpm_solver import DPMSolverPP
from ..diffusion.schedules import make_schedule
from ..sampling import BatchSampler, ShardDataset, ShardPlan, run_generation
from ..sampling.grid import save_grid
from ..utils.dist import dist_info, init_distributed
from ..utils.io import atomic_write_json
from ..utils.pixels import model_space_to_uint8
from .artifacts import load_diffusion_model, load_stage2_autoencoder
from .common import StageContext, StageResult, run_stage

log = logging.getLogger("dpt_engine")

__all__ = ["EXECUTION_ONLY", "run_sample", "sample_output_dir"]

# Settings that change how fast the images are made, not which images (beyond float rounding).
# settings that change speed but not what is generated (beyond float rounding): outside the fingerprint
EXECUTION_ONLY = ("batch_size", "writer_workers", "cuda_graph", "fid_cache", "guidance_forwards")


def sample_output_dir(ctx: StageContext) -> Path:
    out = ctx.cfg.sample.output_dir
    return Path(out) if out else ctx.stage_dir("sample") / "samples"


def _batch_sampler(ctx: StageContext, splits: DatasetSplits, net: torch.nn.Module, ae: Any) -> BatchSampler:
    """The sampler of ``sample.*``: DPM-Solver++ on stage 2's schedule, guidance, and in pixel space
    the clipped data prediction; latent models decode through the autoencoder."""
    scfg = ctx.cfg.sample
    schedule = make_schedule(ctx.cfg.stage2.schedule)
    solver = DPMSolverPP(
        schedule, steps=scfg.steps, order=scfg.order, method=scfg.method, skip_type=scfg.skip_type
    )
    pixel = ctx.cfg.stage2.autoencoder is None
    return BatchSampler(
        net,
        solver,
        schedule,
        ae.latent_shape((splits.channels, splits.image_size, splits.image_size)),
        splits.num_classes,
        conditional=ctx.cfg.stage2.label_source != "none",
        guidance_scale=scfg.guidance_scale,
        seed=scfg.seed,
        clip=scfg.clip_denoised and pixel,
        decode=None if pixel else ae.decode,
        output="latents" if scfg.format == "latents" else "images",
        device=ctx.device,
        precision=scfg.precision,
        cuda_graph=scfg.cuda_graph,
        guidance_forwards=scfg.guidance_forwards,
    )


def _generation_config(ctx: StageContext, sampler: BatchSampler, upstream: str | None) -> dict[str, Any]:
    """What the generated set depends on (the output directory's fingerprint)."""
    scfg = ctx.cfg.sample
    return {
        "stage2": upstream,
        "checkpoint": getattr(scfg, "checkpoint", None),  # external weights (sample.checkpoint)
        "steps": scfg.steps,
        "order": scfg.order,
        "method": scfg.method,
        "skip_type": scfg.skip_type,
        "guidance_scale": scfg.guidance_scale,
        "clip_denoised": sampler.clip,
        "precision": sampler.precision,
        "latent_space": "pixel" if ctx.cfg.stage2.autoencoder is None else "autoencoder",
        "autoencoder": ctx.cfg.stage2.autoencoder,
        "latent_shape": list(sampler.shape),
    }


def _grid_and_fid(ctx: StageContext, splits: DatasetSplits, out_dir: Path, ae: Any) -> dict[str, Any]:
    """Rank 0, after generation: the sample grid (``sample_grid.png``) and, with ``sample.fid``,
    FID/KID of the generated images against the real training images."""
    scfg = ctx.cfg.sample

    def decode(z: torch.Tensor) -> torch.Tensor:
        return model_space_to_uint8(ae.decode(z.to(ctx.device))).cpu()

    ds = ShardDataset(out_dir, decode=None if ctx.cfg.stage2.autoencoder is None else decode)
    per_row = min(scfg.grid_per_class, scfg.images_per_class)
    pos = [ds.position(c, i) for c in range(splits.num_classes) for i in range(per_row)]
    save_grid(
        ds.get_batch(pos),
        ds.labels[pos],
        splits.num_classes,
        per_row,
        ctx.stage_dir("sample") / "sample_grid.png",
        class_names=splits.classes,
    )
    return _fid(ctx, splits, ds) if scfg.fid else {}


def run_sample(ctx: StageContext, splits: DatasetSplits, upstream: str | None) -> StageResult:
    scfg = ctx.cfg.sample
    init_distributed()  # joins the torchrun process group; a no-op for a single process
    d = to_dict(scfg)
    for key in EXECUTION_ONLY:
        d.pop(key)
    fingerprint = {"sample": d, "stage2": upstream}

    loaded: dict[str, Any] = {}

    def precheck() -> None:  # bad weights or autoencoder fail here, before the run directory is touched
        loaded["ae"] = load_stage2_autoencoder(ctx, splits)
        loaded["net"] = load_diffusion_model(ctx, splits, loaded["ae"])
        if ctx.cfg.sample.fid and dist_info().is_main:
            check_fid_weights(ctx.cfg.sample.fid_weights)

    def body(stage_dir: Path) -> dict[str, Any]:
        ae = loaded.pop("ae") if "ae" in loaded else load_stage2_autoencoder(ctx, splits)
        net = loaded.pop("net") if "net" in loaded else load_diffusion_model(ctx, splits, ae)
        sampler = _batch_sampler(ctx, splits, net, ae)
        out_dir = sample_output_dir(ctx)
        gen_config = _generation_config(ctx, sampler, upstream)
        manifest = run_generation(
            sampler,
            out_dir,
            ShardPlan(splits.num_classes, scfg.images_per_class, scfg.shard_size),
            gen_config,
            splits.classes,
            format=scfg.format,
            image_format=scfg.image_format,
            jpeg_quality=scfg.jpeg_quality,
            seed=scfg.seed,
            batch_size=scfg.batch_size,
            workers=scfg.writer_workers,
            progress=ctx.progress,
            extra={"latent_space": gen_config["latent_space"], "images_per_class": scfg.images_per_class},
        )
        tp = manifest["throughput"]
        summary: dict[str, Any] = {
            "num_images": manifest["num_images"],
            "images_per_class": scfg.images_per_class,
            "steps": scfg.steps,
            "order": scfg.order,
            "guidance_scale": scfg.guidance_scale,
            "format": scfg.format,
            "output_dir": str(out_dir),
            **{k: tp[k] for k in ("world_size", "generated", "skipped_existing", "images_per_s", "seconds")},
        }
        if not dist_info().is_main:
            return summary  # rank 0 draws the grid, computes FID and finishes the stage
        summary.update(_grid_and_fid(ctx, splits, out_dir, ae))
        atomic_write_json(stage_dir / "summary.json", summary)
        return summary

    # every rank runs body (each generates its share of the shards); rank 0 keeps the stage's
    # bookkeeping, and draws the grid and computes FID inside body
    return run_stage(ctx, "sample", fingerprint, body, distributed=True, precheck=precheck)


def check_fid_weights(weights: str | None) -> None:
    """The FID Inception weights (``sample.fid_weights``, ``$DPT_FID_WEIGHTS`` or the packaged file)
    load, read safely (nothing in them runs): checked before sampling, not after it."""
    from ..config.base import ConfigError
    from ..eval.fid import find_inception_weights, load_inception

    try:
        load_inception(weights)
    except (RuntimeError, KeyError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(
            f"FID weights {find_inception_weights(weights)} are not the TF-FID Inception ({type(e).__name__}: "
            f"{first}); point sample.fid_weights / DPT_FID_WEIGHTS at default_1.pt or a torch-fidelity "
            "pt_inception state dict, or set sample.fid=false"
        ) from None


def _fid(ctx: StageContext, splits: DatasetSplits, generated: ShardDataset) -> dict[str, Any]:
    from ..eval.fid import compute_metrics

    scfg = ctx.cfg.sample
    g = torch.Generator().manual_seed(0)
    n_gen = min(scfg.fid_num_images, len(generated))
    n_real = min(scfg.fid_num_images, len(splits.train))
    gen_idx = torch.randperm(len(generated), generator=g)[:n_gen]
    real_idx = torch.randperm(len(splits.train), generator=g)[:n_real]
    log.info("sample: FID/KID of %d generated vs %d real training images", n_gen, n_real)
    m = compute_metrics(
        generated.get_batch(gen_idx),
        splits.train.get_batch(real_idx),
        fid=True,
        kid=True,
        weights=scfg.fid_weights,
        device=str(ctx.device),
        progress=ctx.progress,
        cache=Path(scfg.fid_cache)
        if scfg.fid_cache
        else ctx.out / "fid_cache",  # real-set statistics, reused
    )
    return {
        "fid": m.get("fid"),
        "kid": m.get("kid_mean"),
        "kid_std": m.get("kid_std"),
        "fid_num_generated": n_gen,
        "fid_num_real": n_real,
    }
