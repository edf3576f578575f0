"""Stage 2: train the class-conditional U-ViT on the pseudo-labels.

``stage2`` trains the diffusion model (``stage2/model.pt``: model and EMA weights;
``checkpoints/step-N/`` while training; ``history.json``; in latent space ``latents/``, the
memory-mapped latent store) on every training image with its stage-1 pseudo-label (or,
for comparisons, the true label or no label), optionally keeping only confident pseudo-labels
or weighting images by confidence. Generation is the ``sample`` stage (``stages/sample.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config.base import ConfigError, to_dict
from ..data import DatasetSplits
from ..data.latent_store import MomentsView, encode_to_store
from ..diffusion.trainer import DiffusionData, fit_diffusion
from ..models.autoencoder import BaseAutoencoder
from ..train.engine import setup_process_group
from ..utils.io import atomic_write_json
from ..utils.pixels import uint8_to_model_space
from ..utils.precision import resolve_precision
from .artifacts import build_uvit, load_stage2_autoencoder
from .common import StageContext, StageResult, data_fingerprint, run_stage

log = logging.getLogger("dpt_engine")

__all__ = ["encode_dataset", "run_stage2"]


@torch.no_grad()
def encode_dataset(
    ae: BaseAutoencoder, images: torch.Tensor, batch_size: int, device: torch.device, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) -> scaled posterior mean and std (N, c, h, w) each, on the CPU."""
    means, stds = [], []
    for s in tqdm(range(0, len(images), batch_size), desc="encoding latents", disable=not progress):
        x = uint8_to_model_space(images[s : s + batch_size]).to(device)
        mean, logvar = ae.encode_moments(x)
        means.append(((mean - ae.shift_factor) * ae.scale_factor).float().cpu())
        stds.append((torch.exp(0.5 * logvar) * ae.scale_factor).float().cpu())
    return torch.cat(means), torch.cat(stds)


def _training_labels(
    ctx: StageContext, splits: DatasetSplits
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Labels and per-image weights for stage 2, plus a description of the choice."""
    cfg = ctx.cfg.stage2
    n = len(splits.train)
    if cfg.label_source == "true":
        labels = splits.train.labels.clone()
        if (labels < 0).any():
            raise ValueError("stage2.label_source=true but the training set has unknown labels")
        return labels, None, {"label_source": "true"}
    if cfg.label_source == "none":
        return torch.zeros(n, dtype=torch.long), None, {"label_source": "none"}
    pl_path = ctx.stage_dir("stage1") / "pseudo_labels.npz"
    if not pl_path.is_file():
        raise FileNotFoundError(f"stage2 needs stage 1's pseudo-labels at {pl_path}: run dpt stage1 first")
    pl = np.load(pl_path)
    labels = torch.from_numpy(pl["label"].astype(np.int64))
    conf = torch.from_numpy(pl["confidence"].astype(np.float32))
    if len(labels) != n:
        raise ValueError(f"{pl_path} has {len(labels)} labels for {n} training images: re-run stage 1")
    weight = conf.clone() if cfg.confidence_weighting else None
    info: dict[str, Any] = {"label_source": "pseudo", "confidence_weighting": cfg.confidence_weighting}
    if cfg.confidence_threshold is not None:
        keep = conf >= cfg.confidence_threshold
        info["kept_by_threshold"] = int(keep.sum())
        weight = (weight if weight is not None else torch.ones(n)) * keep.float()
    return labels, weight, info


# Latent stores up to this size are read into memory for training; larger ones (ImageNet: 2.56M
# rows) stay memory-mapped and each batch reads only its rows.
_IN_MEMORY_LATENT_BYTES = 4 << 30

# Settings that cannot change the trained model, or change it only by floating-point summation order
# (the global batch is drawn identically for every backend, world size and accumulation; the
# equivalence tests bound the difference): changing them resumes the stage instead of restarting it.
# precision stays in (bf16 trains a measurably different model), as do all optimisation settings.
_NOT_FINGERPRINTED = (
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "tensorboard",
    "max_bad_steps",
    "grad_checkpointing",
    "compile",
    "strategy",
    "zero_stage",
    "offload_optimizer",
    "grad_accum",
)


def run_stage2(ctx: StageContext, splits: DatasetSplits, upstream: str | None) -> StageResult:
    """Train stage 2 with ``stage2.strategy``; under ``torchrun`` every rank calls this (rank 0 writes)."""
    cfg = ctx.cfg.stage2
    d = to_dict(cfg)
    for k in _NOT_FINGERPRINTED:
        d.pop(k)
    # the precision that runs, not the word: "auto" and what it resolves to train the same model
    d["precision"] = resolve_precision(cfg.precision, ctx.device, "stage2.precision")
    fingerprint = {
        "data": data_fingerprint(ctx.cfg),
        "stage2": d,
        "stage1": upstream,
        "seed": ctx.cfg.run.seed,
    }
    # join the launcher's process group first: run_stage's barriers need it
    info = setup_process_group(cfg.strategy, ctx.device)

    loaded: dict[str, Any] = {}

    def precheck() -> None:  # missing pseudo-labels or a bad autoencoder fail before anything moves
        loaded["labels"] = _training_labels(ctx, splits)
        loaded["ae"] = load_stage2_autoencoder(ctx, splits)

    def body(stage_dir: Path) -> dict[str, Any]:
        labels, weight, label_info = (
            loaded.pop("labels") if "labels" in loaded else _training_labels(ctx, splits)
        )
        if weight is not None and float(weight.sum()) == 0:
            raise ConfigError("stage2: no training image passes stage2.confidence_threshold; lower it")
        ae = loaded.pop("ae") if "ae" in loaded else load_stage2_autoencoder(ctx, splits)
        x_std = None
        if cfg.autoencoder is None:
            x = uint8_to_model_space(splits.train.get_batch(torch.arange(len(splits.train))))  # (N, C, H, W)
        else:
            # every image (and its flip, as DPT does) encoded once into a memory-mapped latent store
            # (resumable; ranks encode disjoint chunks; unreadable images are skipped and recorded)
            store = encode_to_store(
                stage_dir / "latents",
                splits.train,
                ae,
                dtype=cfg.latent_dtype,
                flip=cfg.hflip,
                batch_size=64,
                device=ctx.device,
                progress=ctx.progress and info.is_main,
                autoencoder_id=str(cfg.autoencoder),
            )
            rows = store.valid_rows()
            src = torch.from_numpy(store.source_index(rows).astype(np.int64))  # image index of each row
            x, x_std = MomentsView(store, rows, "mean"), MomentsView(store, rows, "std")
            if store.latents.nbytes <= _IN_MEMORY_LATENT_BYTES:  # small: gather once, index in RAM
                everything = torch.arange(len(rows))
                x, x_std = x[everything], x_std[everything]
            labels = labels[src]
            weight = weight[src] if weight is not None else None
            label_info["latent_rows"] = len(rows)
            skipped = store.meta.get("skipped", [])
            if skipped:
                label_info["unreadable_images_skipped"] = len(skipped)
            label_info["latent_shape"] = list(x.shape[1:])
        # seed the initialisation: without it the initial weights depended on whatever consumed the
        # global RNG earlier in the process (e.g. stage 1 in `dpt run` vs a lone `dpt stage2`)
        torch.manual_seed(ctx.cfg.run.seed)
        net = build_uvit(ctx, splits, ae)
        n_params = sum(p.numel() for p in net.parameters())
        log.info(
            "stage2: %s (%.2fM params) on %d images, labels: %s",
            cfg.model,
            n_params / 1e6,
            len(x),
            label_info,
        )
        data = DiffusionData(
            x=x,
            y=labels,
            weight=weight,
            num_classes=0 if cfg.label_source == "none" else splits.num_classes,
            x_std=x_std,
        )
        fit = fit_diffusion(net, cfg, data, stage_dir, ctx.device, ctx.cfg.run.seed, progress=ctx.progress)
        if info.is_main:
            atomic_write_json(stage_dir / "history.json", fit.history)
        summary = {
            "model": cfg.model,
            "params": n_params,
            "final_loss": fit.history[-1]["loss"] if fit.history else None,
            "resumed_from_step": fit.resumed_from,
            "strategy": cfg.strategy,
            "world_size": info.world_size,
            **label_info,
        }
        if info.is_main:
            atomic_write_json(stage_dir / "summary.json", summary)
        return summary

    return run_stage(ctx, "stage2", fingerprint, body, distributed=True, precheck=precheck)
