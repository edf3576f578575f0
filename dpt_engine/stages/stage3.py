"""Stage 3: retrain the classifier on the labeled real images plus the generated pseudo images.

The pseudo images come from an ImageFolder tree (``<class folder>/<image>``; stage 2 writes one
under ``<out>/sample/samples``) or any folder given as ``stage3.pseudo_dir``. With
``stage3.keep_unlabeled`` the real unlabeled images stay in the semi-supervised loss (DPT's
CIFAR-10 recipe); otherwise stage 3 is supervised on labeled real + pseudo images. Reports
top-1 on the test split next to stage 1's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config.base import to_dict
from ..data import ConcatImageDataset, DataError, DatasetSplits, FolderImageDataset, build_splits
from ..data.base import ImageDataset
from ..sampling import ShardDataset, is_shard_dir
from ..ssl import ClassifierData
from ..utils.io import atomic_write_json, read_json
from .common import StageContext, StageResult, run_stage
from .stage1 import classifier_fingerprint, fit_learner, load_classifier

log = logging.getLogger("dpt_engine")

__all__ = ["default_pseudo_dir", "load_pseudo_images", "run_stage3"]


def default_pseudo_dir(ctx: StageContext) -> Path:
    if ctx.cfg.stage3.pseudo_dir:
        return Path(ctx.cfg.stage3.pseudo_dir)
    if ctx.cfg.sample.output_dir:
        return Path(ctx.cfg.sample.output_dir)
    return ctx.out / "sample" / "samples"


# Generated sets up to this many bytes of pixels are decoded once into memory for training.
_IN_MEMORY_BYTES = 2 << 30


def load_pseudo_images(
    pseudo_dir: Path, splits: DatasetSplits, decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> ImageDataset:
    """The pseudo images: ``dpt sample`` output in any format (tar shards, ImageFolder, latents,
    read straight from the shards by ``ShardDataset``; ``decode`` maps autoencoder latents to
    uint8 images), or any ImageFolder tree."""
    if not pseudo_dir.is_dir():
        raise DataError(
            f"stage3: no pseudo images at '{pseudo_dir}': run stage 2 first (dpt stage2 / dpt run) or "
            "pass stage3.pseudo_dir=/path/to/imagefolder with one sub-folder per class"
        )
    if is_shard_dir(pseudo_dir):
        shards = ShardDataset(pseudo_dir, decode=decode)
        if shards.classes != list(splits.classes):
            raise DataError(
                f"stage3: '{pseudo_dir}' was generated for classes {shards.classes[:5]}..., not this dataset's "
                f"{list(splits.classes)[:5]}...; point stage3.pseudo_dir at a generation for this dataset"
            )
        if (shards.channels, shards.image_size) != (splits.channels, splits.image_size):
            raise DataError(
                f"stage3: '{pseudo_dir}' holds {shards.channels}x{shards.image_size}px images but the data is "
                f"{splits.channels}x{splits.image_size}px; generate at the data's size"
            )
        nbytes = len(shards) * shards.channels * shards.image_size**2
        return shards.to_memory() if nbytes <= _IN_MEMORY_BYTES else shards
    ds = FolderImageDataset.from_tree(
        pseudo_dir, classes=splits.classes, channels=splits.channels, image_size=splits.image_size
    )
    if len(ds) == 0:
        raise DataError(f"stage3: '{pseudo_dir}' holds no images; expected <class folder>/<image>.png")
    return ds


def _latent_decoder(
    ctx: StageContext, splits: DatasetSplits, pseudo_dir: Path
) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """For latent shards of an autoencoder: the stage-2 autoencoder's decode to uint8, else None."""
    from ..sampling.plan import CONFIG_FILE

    if not is_shard_dir(pseudo_dir):
        return None
    cfg = read_json(pseudo_dir / CONFIG_FILE).get("config", {})
    if cfg.get("format") != "latents" or cfg.get("latent_space") != "autoencoder":
        return None
    from ..generation import to_uint8
    from .stage2 import load_stage2_autoencoder

    ae = load_stage2_autoencoder(ctx, splits)

    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return to_uint8(ae.decode(z.to(ctx.device))).cpu()

    return decode


def _tree_signature(root: Path) -> dict[str, Any]:
    """A cheap identity of a pseudo-image tree (file count and total size) for the fingerprint."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            m = read_json(manifest)
            return {"manifest": m.get("fingerprint") or m.get("num_images")}
        except (OSError, ValueError):
            pass
    n, size = 0, 0
    for p in root.rglob("*"):
        if p.is_file():
            n += 1
            size += p.stat().st_size
    return {"files": n, "bytes": size}


# the stage-1 agreement check reads at most this many pseudo images (ImageNet: 1.28M)
_AGREEMENT_SAMPLE = 2000
# warn when the stage-1 classifier puts fewer of the pseudo images into their intended class
_AGREEMENT_WARN = 0.5


def _stage1_agreement(
    ctx: StageContext, sp: DatasetSplits, pseudo: ImageDataset, limit: Optional[int] = None
) -> tuple[Optional[np.ndarray], np.ndarray]:
    """Whether the stage-1 classifier assigns each pseudo image to the class it was generated for.

    Returns ``(agree, idx)`` for the pseudo images ``idx`` (all, or ``limit`` chosen with a fixed
    seed); ``agree`` is None when there is no stage-1 classifier (``pseudo_dir`` given by hand).
    """
    from ..ssl import predict_proba

    idx = np.arange(len(pseudo))
    if limit is not None and len(idx) > limit:
        idx = np.sort(np.random.default_rng(0).choice(len(idx), limit, replace=False))
    try:
        model = load_classifier(
            ctx.cfg.stage1,
            ctx.stage_dir("stage1"),
            sp.num_classes,
            sp.channels,
            sp.image_size,
            ctx.cfg.run.seed,
            ctx.device,
        )
    except FileNotFoundError:
        return None, idx
    probs = predict_proba(model, pseudo, idx, device=ctx.device, num_workers=ctx.cfg.run.num_workers)
    return (probs.argmax(1) == pseudo.labels[torch.as_tensor(idx)]).numpy(), idx


def _filter_by_stage1(ctx: StageContext, sp: DatasetSplits, pseudo: FolderImageDataset):
    """Keep only the pseudo images that the stage-1 classifier assigns to their intended class."""
    agree, _ = _stage1_agreement(ctx, sp, pseudo)
    if agree is None:
        raise DataError(
            f"stage3.filter_pseudo=true needs stage 1's classifier at {ctx.stage_dir('stage1') / 'model.pt'}: "
            "run stage 1 first or set stage3.filter_pseudo=false"
        )
    if not agree.any():
        raise DataError("stage3.filter_pseudo: the stage-1 classifier rejects every pseudo image")
    kept = pseudo.subset(np.flatnonzero(agree))
    log.info("stage3: filter_pseudo keeps %d of %d pseudo images", len(kept), len(pseudo))
    info = {"pseudo_before_filter": len(pseudo), "pseudo_kept_fraction": float(agree.mean())}
    return kept, {**info, "pseudo_stage1_agreement": float(agree.mean())}


def _check_agreement(ctx: StageContext, sp: DatasetSplits, pseudo: ImageDataset) -> dict[str, Any]:
    """Log (and warn about) how many pseudo images stage 1 puts in their intended class."""
    agree, idx = _stage1_agreement(ctx, sp, pseudo, limit=_AGREEMENT_SAMPLE)
    if agree is None:
        return {}
    frac = float(agree.mean())
    log.info(
        "stage3: the stage-1 classifier puts %.1f%% of %d pseudo images into the class they were generated for",
        100 * frac,
        len(idx),
    )
    if frac < _AGREEMENT_WARN:
        log.warning(
            "stage3: only %.0f%% of the pseudo images look like their class to the stage-1 classifier "
            "(chance: %.0f%%): the generator is not class-faithful yet, and training on these labels can "
            "put stage 3 below stage 1. Train stage 2 longer (stage2.steps) or set "
            "stage3.filter_pseudo=true to keep only the images stage 1 agrees with",
            100 * frac,
            100 / sp.num_classes,
        )
    return {"pseudo_stage1_agreement": frac}


def run_stage3(
    ctx: StageContext, splits: DatasetSplits | None = None, stage1_top1: Optional[float] = None
) -> StageResult:
    cfg = ctx.cfg
    pseudo_dir = default_pseudo_dir(ctx)
    fingerprint = {
        "data": to_dict(cfg.data),
        "stage3": {
            **classifier_fingerprint(cfg.stage3),
            "keep_unlabeled": cfg.stage3.keep_unlabeled,
            "pseudo_weight": cfg.stage3.pseudo_weight,
        },
        "filter_pseudo": cfg.stage3.filter_pseudo,
        "pseudo_dir": str(pseudo_dir),
        "pseudo_images": _tree_signature(pseudo_dir) if pseudo_dir.is_dir() else None,
        "seed": cfg.run.seed,
    }

    def body(stage_dir: Path) -> dict[str, Any]:
        sp = splits if splits is not None else build_splits(cfg.data)
        pseudo = load_pseudo_images(pseudo_dir, sp, decode=_latent_decoder(ctx, sp, pseudo_dir))
        if cfg.stage3.filter_pseudo:
            pseudo, filter_info = _filter_by_stage1(ctx, sp, pseudo)
        else:
            filter_info = _check_agreement(ctx, sp, pseudo)
        real = sp.train
        combined = ConcatImageDataset([real, pseudo])
        pseudo_idx = len(real) + np.arange(len(pseudo))
        labeled_idx = np.concatenate([sp.labeled_idx, pseudo_idx])
        weight = np.concatenate(
            [np.ones(len(sp.labeled_idx)), np.full(len(pseudo), cfg.stage3.pseudo_weight)]
        ).astype(np.float32)
        semi = cfg.stage3.keep_unlabeled and cfg.stage3.learner in ("freematch", "fixmatch")
        data = ClassifierData(
            labeled=combined,
            labeled_idx=labeled_idx,
            unlabeled=combined if semi else None,
            unlabeled_idx=np.arange(len(real)) if semi else None,
            test=sp.test,
            num_classes=sp.num_classes,
            labeled_weight=weight,
        )
        counts = np.bincount(pseudo.labels.numpy(), minlength=sp.num_classes)
        log.info(
            "stage3: %s on %d labeled real + %d pseudo images (%s), %s",
            cfg.stage3.learner,
            len(sp.labeled_idx),
            len(pseudo),
            pseudo_dir,
            "with the real unlabeled images" if semi else "supervised",
        )
        fit = fit_learner(cfg.stage3, data, stage_dir, ctx, cfg.run.seed)
        atomic_write_json(stage_dir / "history.json", fit.history)
        s1 = stage1_top1
        if s1 is None:
            s1_summary = ctx.stage_dir("stage1") / "summary.json"
            s1 = read_json(s1_summary).get("top1") if s1_summary.is_file() else None
        summary = {
            "learner": cfg.stage3.learner,
            "backbone": cfg.stage3.backbone,
            "top1": fit.test_top1,
            "stage1_top1": s1,
            "gain": (fit.test_top1 - s1) if (fit.test_top1 is not None and s1 is not None) else None,
            "num_labeled_real": len(sp.labeled_idx),
            "num_pseudo": len(pseudo),
            "pseudo_per_class": {sp.classes[c]: int(counts[c]) for c in range(sp.num_classes)},
            "pseudo_dir": str(pseudo_dir),
            "keep_unlabeled": bool(semi),
            "resumed_from_step": fit.resumed_from,
            **filter_info,
        }
        atomic_write_json(stage_dir / "summary.json", summary)
        log.info("stage3: test top-1 %.2f%% (stage 1: %s)", fit.test_top1, s1)
        return summary

    return run_stage(ctx, "stage3", fingerprint, body)
