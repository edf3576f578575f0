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

from ..data import ConcatImageDataset, DataError, DatasetSplits, FolderImageDataset, build_splits
from ..data.base import ImageDataset
from ..eval.paired import paired_gain
from ..sampling import ShardDataset, is_shard_dir
from ..ssl import ClassifierData
from ..utils.io import atomic_write_json, read_json
from .artifacts import load_classifier
from .classifier_stage import (
    check_classifier,
    classifier_fingerprint,
    fit_learner,
    initial_weights,
    save_test_predictions,
)
from .common import StageContext, StageResult, data_fingerprint, run_stage

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
        pseudo_dir,
        classes=splits.classes,
        channels=splits.channels,
        image_size=splits.image_size,
        verify=True,
    )
    if ds.skipped_files:
        log.warning("stage3: %d unreadable pseudo images in %s skipped", len(ds.skipped_files), pseudo_dir)
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
    from ..utils.pixels import model_space_to_uint8
    from .artifacts import load_stage2_autoencoder

    ae = load_stage2_autoencoder(ctx, splits)

    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model_space_to_uint8(ae.decode(z.to(ctx.device))).cpu()

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


def _stage1_scores(
    ctx: StageContext, sp: DatasetSplits, pseudo: ImageDataset, limit: Optional[int] = None
) -> tuple[Optional[np.ndarray], Optional[np.ndarray], np.ndarray]:
    """How the stage-1 classifier sees the pseudo images ``idx`` (all, or ``limit`` chosen with a
    fixed seed): ``(agree, p, idx)`` with ``agree`` whether its top class is the class the image
    was generated for and ``p`` its probability of that class; both None when there is no stage-1
    classifier (``pseudo_dir`` given by hand)."""
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
        return None, None, idx
    probs = predict_proba(model, pseudo, idx, device=ctx.device, num_workers=ctx.cfg.run.num_workers)
    intended = pseudo.labels[torch.as_tensor(idx)]
    agree = (probs.argmax(1) == intended).numpy()
    p = probs.gather(1, intended.view(-1, 1)).squeeze(1).numpy().astype(np.float32)
    return agree, p, idx


def _stage1_agreement(
    ctx: StageContext, sp: DatasetSplits, pseudo: ImageDataset, limit: Optional[int] = None
) -> tuple[Optional[np.ndarray], np.ndarray]:
    """``(agree, idx)`` of :func:`_stage1_scores`."""
    agree, _, idx = _stage1_scores(ctx, sp, pseudo, limit)
    return agree, idx


def _needs_stage1(cfg) -> bool:
    s3 = cfg.stage3
    return s3.filter_pseudo or s3.pseudo_weighting != "uniform" or s3.init_from_stage1


def _select_and_weight(
    ctx: StageContext, sp: DatasetSplits, pseudo: ImageDataset
) -> tuple[ImageDataset, np.ndarray, dict[str, Any]]:
    """Stage 3's defence against pseudo images that do not show their class.

    The stage-1 classifier scores every pseudo image: with ``filter_pseudo`` only the images it
    assigns to their intended class are kept, and with ``pseudo_weighting=stage1-confidence`` each
    kept image's loss weight is ``pseudo_weight`` times stage 1's probability of that class. A
    useless generator then contributes few images and little weight, and stage 3 stays at stage
    1's accuracy instead of learning the generator's mistakes. Returns the kept images, their
    weights and a record of what was done."""
    s3 = ctx.cfg.stage3
    n0 = len(pseudo)
    info: dict[str, Any] = {}
    if not (s3.filter_pseudo or s3.pseudo_weighting != "uniform"):
        info.update(_check_agreement(ctx, sp, pseudo))
        if s3.pseudo_weight == 0:  # the real images alone (an ablation of the pseudo images)
            return pseudo.subset(np.arange(0)), np.zeros(0, dtype=np.float32), {**info, "pseudo_kept": 0}
        return pseudo, np.full(n0, s3.pseudo_weight, dtype=np.float32), info
    agree, p, _ = _stage1_scores(ctx, sp, pseudo)
    if agree is None:
        raise DataError(
            f"stage3.filter_pseudo / stage3.pseudo_weighting=stage1-confidence need stage 1's classifier at "
            f"{ctx.stage_dir('stage1') / 'model.pt'}: run stage 1 first, or set stage3.filter_pseudo=false "
            "and stage3.pseudo_weighting=uniform"
        )
    labels = pseudo.labels.numpy()
    info["pseudo_stage1_agreement"] = float(agree.mean())
    info["pseudo_before_filter"] = n0
    keep = np.flatnonzero(agree) if s3.filter_pseudo else np.arange(n0)
    if len(keep) == 0:
        log.warning(
            "stage3: the stage-1 classifier puts none of the %d pseudo images into their class: stage 3 "
            "trains on the real images alone",
            n0,
        )
    w = np.full(len(keep), s3.pseudo_weight, dtype=np.float32)
    chance = 1.0 / sp.num_classes
    trust = float(np.clip((agree.mean() - chance) / (1.0 - chance), 0.0, 1.0))
    if s3.pseudo_weighting == "stage1-confidence":
        w = w * p[keep]
    elif s3.pseudo_weighting == "stage1-agreement":  # trust sets their share of each batch (run_stage3)
        info["pseudo_trust"] = trust
        if trust == 0.0:
            log.warning(
                "stage3: the stage-1 classifier puts only %.0f%% of the pseudo images into their class (chance "
                "%.0f%%): the generator is not class-faithful, so stage 3 trains without them",
                100 * agree.mean(),
                100 * chance,
            )
            keep = keep[:0]
            w = w[:0]
    if len(w) and not (w > 0).all():  # weight 0 (stage3.pseudo_weight=0): the image takes no batch slot
        keep, w = keep[w > 0], w[w > 0]
    kept = pseudo.subset(keep) if len(keep) < n0 else pseudo  # may be empty: real images only
    nc = sp.num_classes
    info.update(
        {
            "pseudo_kept": len(keep),
            "pseudo_kept_fraction": float(len(keep) / max(n0, 1)),
            "pseudo_kept_per_class": np.bincount(labels[keep], minlength=nc).tolist(),
            "pseudo_mean_weight": float(w.mean()) if len(w) else 0.0,
        }
    )
    log.info(
        "stage3: stage 1 agrees with %.1f%% of %d pseudo images; kept %d (%s), mean loss weight %.3f (%s)",
        100 * info["pseudo_stage1_agreement"],
        n0,
        len(keep),
        "filter_pseudo" if s3.filter_pseudo else "no filter",
        info["pseudo_mean_weight"],
        s3.pseudo_weighting,
    )
    return kept, w, info


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


def _file_digest(path: Path) -> Optional[str]:
    import hashlib

    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _stage1_init(ctx: StageContext) -> dict:
    """Stage 1's EMA weights, to start stage 3 from (``stage3.init_from_stage1``)."""
    s1, s3 = ctx.cfg.stage1, ctx.cfg.stage3
    if s1.backbone != s3.backbone or "linear-probe" in (s1.learner, s3.learner):
        raise DataError(
            f"stage3.init_from_stage1=true needs the same trainable backbone in both stages (stage 1: "
            f"{s1.learner} / {s1.backbone}, stage 3: {s3.learner} / {s3.backbone}); set "
            "stage3.init_from_stage1=false or the same stage3.backbone"
        )
    path = ctx.stage_dir("stage1") / "model.pt"
    if not path.is_file():
        raise DataError(
            f"stage3.init_from_stage1=true needs stage 1's classifier at {path}: run stage 1 first"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _stage1_thresholds(ctx: StageContext) -> dict:
    """Stage 1's final FreeMatch thresholds, to start stage 3's from
    (``stage3.init_thresholds_from_stage1``)."""
    from ..ssl.trainer import final_thresholds

    if ctx.cfg.stage1.learner != "freematch":
        raise DataError(
            "stage3.init_thresholds_from_stage1=true needs a FreeMatch stage 1 (stage1.learner="
            f"{ctx.cfg.stage1.learner}); set stage3.init_thresholds_from_stage1=false"
        )
    state = final_thresholds(ctx.stage_dir("stage1"))
    if state is None:
        raise DataError(
            f"stage3.init_thresholds_from_stage1=true needs stage 1's thresholds ({ctx.stage_dir('stage1')}"
            "/thresholds.pt or its last checkpoint), and neither is there: rerun stage 1 or set "
            "stage3.init_thresholds_from_stage1=false"
        )
    return state


def describe_stage3(s: dict[str, Any]) -> str:
    """One paragraph for the report: what stage 3 trained on and why."""
    parts = []
    agree = s.get("pseudo_stage1_agreement")
    n0 = s.get("pseudo_before_filter", s.get("num_pseudo"))
    if agree is not None:
        parts.append(
            f"the stage-1 classifier put {100 * agree:.0f}% of the {n0} pseudo images into the class they were generated for"
        )
    if s.get("filter_pseudo"):
        parts.append(
            f"the {s.get('pseudo_kept', s.get('num_pseudo'))} it agreed with were kept and the rest dropped"
        )
    if s.get("pseudo_weight") == 0:
        parts.append("stage3.pseudo_weight=0 left them out: stage 3 trained on the real images alone")
    elif s.get("pseudo_weighting") == "stage1-agreement":
        trust = float(s.get("pseudo_trust", 0.0))
        if trust <= 0.0:
            parts.append("that is no better than chance, so stage 3 trained without the pseudo images")
        else:
            capped = (
                f", capped at stage3.max_pseudo_share={float(s.get('pseudo_batch_share', 0.0)):g}"
                if s.get("pseudo_share_capped")
                else ""
            )
            parts.append(
                f"so they filled {100 * float(s.get('pseudo_batch_share', 0.0)):.1f}% of each labeled batch "
                f"(their share of the labeled images times the trust {trust:.2f}, the agreement above chance{capped}) "
                "and real labeled images the rest"
            )
    if s.get("pseudo_weighting") == "stage1-confidence" and s.get("pseudo_weight") != 0:
        parts.append(
            f"each kept image was weighted by stage 1's probability of its class (mean weight "
            f"{s.get('pseudo_mean_weight', 0):.2f}, real labeled images 1.0)"
        )
    parts.append(
        "training started from stage 1's weights"
        if s.get("init_from_stage1")
        else "training started from scratch"
    )
    if s.get("init_thresholds_from_stage1") and s.get("initial_global_threshold") is not None:
        parts.append(
            f"FreeMatch's thresholds started where stage 1's ended (global {s['initial_global_threshold']:.2f}, "
            "not 1/C)"
        )
    text = "; ".join(parts) + "."
    if agree is not None and agree < _AGREEMENT_WARN:
        text += (
            " The generator is not class-faithful (few pseudo images show their class), so stage 3 leaned on the real "
            "images" + (" and stage 1's weights." if s.get("init_from_stage1") else ".")
        )
    return text[0].upper() + text[1:]


def _stage3_fingerprint(ctx: StageContext, pseudo_dir: Path) -> dict[str, Any]:
    cfg = ctx.cfg
    return {
        "data": data_fingerprint(cfg),
        "stage3": {
            **classifier_fingerprint(cfg.stage3),
            "keep_unlabeled": cfg.stage3.keep_unlabeled,
            "pseudo_weight": cfg.stage3.pseudo_weight,
        },
        "filter_pseudo": cfg.stage3.filter_pseudo,
        **(
            {
                "pseudo_weighting": cfg.stage3.pseudo_weighting,
                "init_from_stage1": cfg.stage3.init_from_stage1,
                # only when set: runs from before the cap keep their fingerprint
                **(
                    {"max_pseudo_share": cfg.stage3.max_pseudo_share}
                    if cfg.stage3.max_pseudo_share < 1
                    else {}
                ),
                "stage1_model": _file_digest(ctx.stage_dir("stage1") / "model.pt"),
            }
            if _needs_stage1(cfg)
            else {}
        ),
        "pseudo_dir": str(pseudo_dir),
        "pseudo_images": _tree_signature(pseudo_dir) if pseudo_dir.is_dir() else None,
        "seed": cfg.run.seed,
    }


def _stage3_data(
    ctx: StageContext, sp: DatasetSplits, pseudo: ImageDataset, pseudo_w: np.ndarray, info: dict[str, Any]
) -> ClassifierData:
    """The real labeled images followed by the kept pseudo images as the labeled set (the real
    unlabeled images as the unlabeled set when ``stage3.keep_unlabeled``); with
    ``stage1-agreement`` the pseudo images' share of each labeled batch is the trust times their
    share of the labeled images (recorded in ``info``)."""
    s3 = ctx.cfg.stage3
    real, n_real = sp.train, len(sp.labeled_idx)
    combined = ConcatImageDataset([real, pseudo]) if len(pseudo) else real
    share = None
    if s3.pseudo_weighting == "stage1-agreement" and len(pseudo):
        natural = len(pseudo) / (n_real + len(pseudo))  # what a uniform draw gives
        share = float(info["pseudo_trust"]) * natural
        if share > s3.max_pseudo_share:
            share, info["pseudo_share_capped"] = s3.max_pseudo_share, True
        info["pseudo_batch_share"] = share
    semi = s3.keep_unlabeled and s3.learner in ("freematch", "fixmatch")
    return ClassifierData(
        labeled=combined,
        labeled_idx=np.concatenate([sp.labeled_idx, len(real) + np.arange(len(pseudo))]),
        unlabeled=combined if semi else None,
        unlabeled_idx=np.arange(len(real)) if semi else None,
        test=sp.test,
        num_classes=sp.num_classes,
        labeled_weight=np.concatenate([np.ones(n_real), pseudo_w]).astype(np.float32),
        absolute_weights=s3.pseudo_weighting != "uniform",
        pseudo_share=share,
        num_real_labeled=n_real if share is not None else None,
    )


def _gain_over_stage1(
    ctx: StageContext, sp: DatasetSplits, stage_dir: Path, fit: Any, stage1_top1: Optional[float]
) -> tuple[Optional[float], Optional[dict[str, Any]]]:
    """Stage 1's top-1 and, where both stages saved predictions on the same evaluation images, the
    paired gain with its 95% interval (``eval/paired.py``)."""
    s1 = stage1_top1
    if s1 is None:
        s1_summary = ctx.stage_dir("stage1") / "summary.json"
        s1 = read_json(s1_summary).get("top1") if s1_summary.is_file() else None
    gain_stats = None
    s1_pred = ctx.stage_dir("stage1") / "test_predictions.npz"
    if fit.test_top1 is not None:
        save_test_predictions(stage_dir, fit.model, sp, ctx, ctx.cfg.stage3.probe_batch_size)
        if s1_pred.is_file():
            old, new = np.load(s1_pred), np.load(stage_dir / "test_predictions.npz")
            if np.array_equal(old["label"], new["label"]):  # the same evaluation images
                gain_stats = paired_gain(old["pred"], new["pred"], new["label"])
    return s1, gain_stats


def run_stage3(
    ctx: StageContext, splits: DatasetSplits | None = None, stage1_top1: Optional[float] = None
) -> StageResult:
    cfg = ctx.cfg
    pseudo_dir = default_pseudo_dir(ctx)
    loaded: dict[str, Any] = {}

    def precheck() -> None:  # missing or foreign pseudo images, or a stage 1 that cannot be fine-tuned,
        # fail here, before the run directory is touched
        sp = loaded["splits"] = splits if splits is not None else build_splits(cfg.data)
        check_classifier("stage3", cfg.stage3, sp)
        loaded["pseudo"] = load_pseudo_images(pseudo_dir, sp, decode=_latent_decoder(ctx, sp, pseudo_dir))
        if cfg.stage3.init_from_stage1:
            loaded["init"] = _stage1_init(ctx)
        if cfg.stage3.init_thresholds_from_stage1:
            loaded["thresholds"] = _stage1_thresholds(ctx)

    def body(stage_dir: Path) -> dict[str, Any]:
        sp = loaded.pop("splits", None) or (splits if splits is not None else build_splits(cfg.data))
        pseudo = (
            loaded.pop("pseudo")
            if "pseudo" in loaded
            else load_pseudo_images(pseudo_dir, sp, decode=_latent_decoder(ctx, sp, pseudo_dir))
        )
        pseudo, pseudo_w, filter_info = _select_and_weight(ctx, sp, pseudo)
        if "init" in loaded:
            init_state = loaded.pop("init")
        elif cfg.stage3.init_from_stage1:
            init_state = _stage1_init(ctx)
        else:
            init_state = initial_weights(cfg.stage3, sp, cfg.run.seed)
        init_thresholds = None
        if cfg.stage3.init_thresholds_from_stage1:
            init_thresholds = loaded.pop("thresholds", None) or _stage1_thresholds(ctx)
        data = _stage3_data(ctx, sp, pseudo, pseudo_w, filter_info)
        semi = data.unlabeled is not None
        log.info(
            "stage3: %s on %d labeled real + %d pseudo images (%s), %s",
            cfg.stage3.learner,
            len(sp.labeled_idx),
            len(pseudo),
            pseudo_dir,
            "with the real unlabeled images" if semi else "supervised",
        )
        fit = fit_learner(
            cfg.stage3,
            data,
            stage_dir,
            ctx,
            cfg.run.seed,
            init_state=init_state,
            init_thresholds=init_thresholds,
        )
        atomic_write_json(stage_dir / "history.json", fit.history)
        s1, gain_stats = _gain_over_stage1(ctx, sp, stage_dir, fit, stage1_top1)
        counts = np.bincount(pseudo.labels.numpy(), minlength=sp.num_classes)
        summary = {
            "learner": cfg.stage3.learner,
            "backbone": cfg.stage3.backbone,
            "top1": fit.test_top1,
            "eval_split": sp.info.get("eval_split", "test"),
            "num_eval": len(sp.test),
            "stage1_top1": s1,
            "gain": (fit.test_top1 - s1) if (fit.test_top1 is not None and s1 is not None) else None,
            "gain_stats": gain_stats,
            "num_labeled_real": len(sp.labeled_idx),
            "num_pseudo": len(pseudo),
            "pseudo_per_class": {sp.classes[c]: int(counts[c]) for c in range(sp.num_classes)},
            "pseudo_dir": str(pseudo_dir),
            "keep_unlabeled": bool(semi),
            "resumed_from_step": fit.resumed_from,
            "init_from_stage1": bool(cfg.stage3.init_from_stage1),
            "init_thresholds_from_stage1": bool(cfg.stage3.init_thresholds_from_stage1),
            **(
                {"initial_global_threshold": float(init_thresholds["tau"])}
                if init_thresholds is not None
                else {}
            ),
            "init_checkpoint": cfg.stage3.init_checkpoint,
            "pseudo_weighting": cfg.stage3.pseudo_weighting,
            "pseudo_weight": cfg.stage3.pseudo_weight,
            "filter_pseudo": cfg.stage3.filter_pseudo,
            **filter_info,
        }
        summary["what_stage3_did"] = describe_stage3(summary)
        atomic_write_json(stage_dir / "summary.json", summary)
        log.info(
            "stage3: top-1 %.2f%% (%s; stage 1: %s)", fit.test_top1, sp.info.get("eval_split", "test"), s1
        )
        return summary

    return run_stage(ctx, "stage3", _stage3_fingerprint(ctx, pseudo_dir), body, precheck=precheck)
