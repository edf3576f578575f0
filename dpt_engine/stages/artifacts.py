"""How a stage reads what another stage wrote: the classifier of stage 1 or 3 (``model.pt``), and
stage 2's autoencoder and denoiser (``stage2/model.pt`` or ``sample.checkpoint``). Stages import
these from here, never from each other's modules."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config.base import ConfigError
from ..config.schema import ClassifierConfig
from ..data import DatasetSplits
from ..models.autoencoder import BaseAutoencoder, IdentityAutoencoder
from ..models.autoencoder_loader import load_autoencoder
from ..models.denoisers import create_denoiser
from .common import StageContext

log = logging.getLogger("dpt_engine")

__all__ = ["build_uvit", "load_classifier", "load_diffusion_model", "load_stage2_autoencoder"]


def load_classifier(
    cfg: ClassifierConfig,
    work_dir: Path,
    num_classes: int,
    channels: int,
    image_size: int,
    seed: int,
    device: torch.device,
) -> torch.nn.Module:
    """Rebuild the classifier a stage saved in ``work_dir/model.pt`` (EMA weights), in eval mode."""
    from ..models.classifiers import create_classifier
    from ..ssl.linear_probe import LinearProbeClassifier, build_probe_backbone

    path = work_dir / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no trained classifier at {path}: run that stage first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if cfg.learner == "linear-probe":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a randomly initialised backbone is rebuilt identically
            backbone = build_probe_backbone(
                cfg.backbone, num_classes, channels, image_size, cfg.probe_checkpoint
            )
        model = LinearProbeClassifier(backbone, state["center"], state["head.weight"])
    else:
        model = create_classifier(cfg.backbone, num_classes, channels, image_size)
        model.load_state_dict(state)
    return model.to(device).eval()


def load_stage2_autoencoder(ctx: StageContext, splits: DatasetSplits) -> BaseAutoencoder:
    """The autoencoder of ``stage2.autoencoder`` (identity = pixel space), checked against the data."""
    spec = ctx.cfg.stage2.autoencoder
    ae = IdentityAutoencoder() if spec is None else load_autoencoder(spec)
    if spec is not None:
        ae = ae.to(ctx.device).eval()
        probe = torch.zeros(1, splits.channels, splits.image_size, splits.image_size, device=ctx.device)
        try:
            with torch.no_grad():
                out = ae.decode(ae.encode(probe, sample=False))
        except RuntimeError as e:
            raise ConfigError(
                f"stage2.autoencoder={spec} does not accept {splits.channels}-channel "
                f"{splits.image_size}px images: {e}"
            ) from None
        if tuple(out.shape[1:]) != tuple(probe.shape[1:]):
            raise ConfigError(
                f"stage2.autoencoder={spec} maps {tuple(probe.shape[1:])} images to {tuple(out.shape[1:])}; "
                "it must reproduce the dataset's channels and size"
            )
    return ae


def build_uvit(
    ctx: StageContext, splits: DatasetSplits, ae: BaseAutoencoder | None = None
) -> torch.nn.Module:
    """The stage-2 denoiser (``stage2.model``: a U-ViT or U-Net preset) for the data's (latent)
    shape and class count."""
    cfg = ctx.cfg.stage2
    ae = ae if ae is not None else load_stage2_autoencoder(ctx, splits)
    c, h, _ = ae.latent_shape((splits.channels, splits.image_size, splits.image_size))
    num_classes = 0 if cfg.label_source == "none" else splits.num_classes
    return create_denoiser(cfg.model, img_size=h, in_chans=c, num_classes=num_classes)


def load_diffusion_model(
    ctx: StageContext, splits: DatasetSplits, ae: BaseAutoencoder | None = None
) -> torch.nn.Module:
    """The U-ViT to sample from, in eval mode on ``ctx.device``.

    With ``sample.checkpoint`` set, the weights come from that file (an original U-ViT / DPT
    ``nnet_ema.pth``, our ``stage2/model.pt``, or an exported ``.safetensors``) and stage 2 need
    not have run; otherwise from stage 2's EMA weights. The network is built from ``stage2.model``
    and the data's (latent) shape and class count; keys and shapes are verified before copying.
    """
    from ..models.checkpoints import load_uvit_checkpoint

    net = build_uvit(ctx, splits, ae)
    external = ctx.cfg.sample.checkpoint
    path = Path(external).expanduser() if external else ctx.stage_dir("stage2") / "model.pt"
    if not external and not path.is_file():
        raise FileNotFoundError(
            f"no stage-2 model at {path}: run `dpt stage2` first, or sample from existing weights with "
            "`dpt sample --checkpoint PATH` (e.g. a released U-ViT nnet_ema.pth; sample.checkpoint=PATH)"
        )
    load_uvit_checkpoint(net, path)  # model.pt holds {"ema": ..., "step": ...}: the EMA weights are read
    if external:
        log.info("sample: U-ViT weights from %s (%s)", path, ctx.cfg.stage2.model)
    return net.to(ctx.device).eval()
