"""MSN ViT encoders (Assran et al. 2022, facebookresearch/msn) as timm ViTs for DPT's linear probe.

DPT's ImageNet stage 1 extracts features with a frozen MSN encoder, ViT-B/4 (``vitb4_300ep.pth.tar``)
or ViT-L/7 (``vitl7_200ep.pth.tar``). An MSN checkpoint is a dict with ``encoder``,
``target_encoder`` (the EMA teacher, the one MSN's evaluation loads), ``prototypes``, ``opt``,
``epoch``, ``loss``, ``batch_size``, ``world_size`` and ``lr``; the encoders' keys carry DDP's
``module.`` prefix and use deit names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``) plus the projection
head ``fc.{fc1, bn1, fc2, bn2, fc3}`` that evaluation discards. Those deit names are timm's
``VisionTransformer`` names, so the weights load one to one after the checks below.

Architecture (MSN's ``deit_*``): pre-LN blocks with qkv bias, GELU MLP ratio 4, LayerNorm eps 1e-6,
a class token, and a learned position embedding of ``1 + (224 / p)^2`` rows added after the class
token is prepended. MSN interpolates ``pos_embed`` bicubically when the patch grid differs; here
that resampling happens once at load time (same maths) when the model is built for another size.

The probe feature is the CLS token of the last block *before* the final norm (MSN's
``forward_blocks(x, 1)``, used by DPT), which ``dpt_engine.ssl.linear_probe.probe_features`` takes
with a hook on ``blocks[-1]``. Inputs are MSN's evaluation view: ImageNet mean/std normalisation
and a centre crop to the network size after resizing the shorter side to ``size * 256 / 224``
(``Resize(256) + CenterCrop(224)``; a 256-px dataset image is only cropped).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import read_state_dict, verify_state_dict
from .timm_classifier import TimmClassifier

log = logging.getLogger("dpt_engine")

__all__ = [
    "MSN_ARCHS",
    "MSNArch",
    "MSNClassifier",
    "create_msn_classifier",
    "create_msn_vit",
    "load_msn_checkpoint",
    "msn_state_dict",
    "resample_pos_embed",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MSN_IMAGE_SIZE = 224  # MSN pre-training and evaluation crop
_RESIZE_RATIO = 256 / 224  # MSN's evaluation: Resize(256) then CenterCrop(224)
_HEAD_PREFIXES = ("fc.", "pred.")  # MSN's projection head / predictor: not part of the encoder


@dataclass(frozen=True)
class MSNArch:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    checkpoint: str  # the released file name (dl.fbaipublicfiles.com/msn/<checkpoint>)


MSN_ARCHS: dict[str, MSNArch] = {
    "vit_small_patch16": MSNArch(16, 384, 12, 6, "vits16_800ep.pth.tar"),  # MSN deit_small
    "vit_base_patch16": MSNArch(16, 768, 12, 12, "vitb16_600ep.pth.tar"),  # deit_base
    "vit_base_patch4": MSNArch(4, 768, 12, 12, "vitb4_300ep.pth.tar"),  # deit_base_p4 (DPT)
    "vit_large_patch16": MSNArch(16, 1024, 24, 16, "vitl16_600ep.pth.tar"),  # deit_large
    "vit_large_patch7": MSNArch(7, 1024, 24, 16, "vitl7_200ep.pth.tar"),  # deit_large_p7 (DPT)
}
_MSN_NAMES = {  # MSN / DPT config `model_name` -> ours
    "deit_small": "vit_small_patch16",
    "deit_base": "vit_base_patch16",
    "deit_base_p4": "vit_base_patch4",
    "deit_large": "vit_large_patch16",
    "deit_large_p7": "vit_large_patch7",
}


def _arch(name: str) -> MSNArch:
    key = _MSN_NAMES.get(name, name)
    if key not in MSN_ARCHS:
        valid = sorted(MSN_ARCHS) + sorted(_MSN_NAMES)
        raise ValueError(f"unknown MSN architecture {name!r}; valid: {', '.join(valid)}")
    return MSN_ARCHS[key]


def create_msn_vit(
    arch: str, img_size: int = MSN_IMAGE_SIZE, in_chans: int = 3, num_classes: int = 0, **overrides: Any
) -> nn.Module:
    """A timm ``VisionTransformer`` with MSN's ``arch`` (e.g. ``vit_base_patch4`` = ViT-B/4, or MSN's
    ``deit_base_p4``), random init. ``overrides`` replace ``patch_size`` / ``embed_dim`` / ``depth`` /
    ``num_heads`` (small test models). ``pretrained_cfg`` carries ImageNet mean/std so
    :class:`TimmClassifier` normalises inputs as MSN did."""
    from timm.models.vision_transformer import VisionTransformer

    a = _arch(arch)
    spec = {"patch_size": a.patch_size, "embed_dim": a.embed_dim, "depth": a.depth, "num_heads": a.num_heads}
    unknown = set(overrides) - set(spec)
    if unknown:
        raise ValueError(f"create_msn_vit: unknown overrides {sorted(unknown)}; allowed: {sorted(spec)}")
    spec.update(overrides)
    if img_size % spec["patch_size"]:
        raise ValueError(
            f"MSN {arch}: image size {img_size} is not a multiple of patch size {spec['patch_size']}"
        )
    vit = VisionTransformer(
        img_size=img_size,
        in_chans=in_chans,
        num_classes=num_classes,
        global_pool="token",
        mlp_ratio=4.0,
        qkv_bias=True,
        class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **spec,
    )
    vit.pretrained_cfg = {
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "input_size": (in_chans, img_size, img_size),
    }
    return vit


class MSNClassifier(TimmClassifier):
    """An MSN ViT behind the classifier registry contract (float images in [0, 1]).

    Inputs whose size differs from the network's are first given MSN's evaluation view: the
    shorter side resized to ``size * 256 / 224`` (bilinear, antialiased; skipped when already
    there) and a centre crop to ``size``.
    """

    def __init__(self, model: nn.Module, in_chans: int, img_size: int) -> None:
        super().__init__(model, in_chans)
        self.img_size = img_size

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, S, S), S = the network's image size."""
        s = self.img_size
        h, w = x.shape[-2:]
        if h == s and w == s:
            return x
        short = round(s * _RESIZE_RATIO)
        if min(h, w) != short:
            scale = short / min(h, w)
            size = (max(s, round(h * scale)), max(s, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            h, w = x.shape[-2:]
        top, left = (h - s) // 2, (w - s) // 2
        return x[..., top : top + s, left : left + s]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_tokens(self.eval_view(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.eval_view(x))


def create_msn_classifier(
    arch: str, num_classes: int, in_chans: int = 3, image_size: int = MSN_IMAGE_SIZE, **overrides: Any
) -> MSNClassifier:
    """The registry entry ``msn:<arch>``: the network runs at 224 px (MSN's size) for images of at
    least 224 px and at the image size for smaller (test) images."""
    img_size = min(int(image_size), MSN_IMAGE_SIZE)
    vit = create_msn_vit(arch, img_size=img_size, in_chans=in_chans, num_classes=num_classes, **overrides)
    return MSNClassifier(vit, in_chans, img_size)


def msn_state_dict(path: str | os.PathLike, entry: str = "target_encoder") -> dict[str, torch.Tensor]:
    """The encoder weights of an MSN checkpoint (``module.`` stripped, projection head dropped).
    ``entry="encoder"`` picks the online encoder instead of the EMA target encoder."""
    state = read_state_dict(path, entry=entry)
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): the class row kept, the patch rows interpolated
    bicubically on their square grid (MSN's ``interpolate_pos_encoding``, done once)."""
    cls_row, patches = pos_embed[:, :1], pos_embed[:, 1:]
    g = math.isqrt(patches.shape[1])
    if g * g != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch rows, not a square grid")
    d = patches.shape[-1]
    img = patches.reshape(1, g, g, d).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)  # (1, grid^2, D)
    return torch.cat([cls_row, patches], dim=1)


def load_msn_checkpoint(model: nn.Module, path: str | os.PathLike, entry: str = "target_encoder") -> None:
    """Load an MSN checkpoint's ``entry`` into ``model`` (an :class:`MSNClassifier` or a timm ViT).

    Keys and shapes are verified before anything is copied (the classifier head, absent from MSN
    checkpoints, is left as is); a position embedding for another patch grid is resampled.
    """
    vit = model.model if isinstance(model, TimmClassifier) else model
    state = msn_state_dict(path, entry)
    expected = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    pos = state.get("pos_embed")
    want = expected.get("pos_embed")
    if (
        pos is not None
        and want is not None
        and pos.dim() == 3
        and pos.shape[-1] == want.shape[-1]
        and pos.shape[1] != want.shape[1]
    ):
        grid = math.isqrt(want.shape[1] - 1)
        log.info("MSN: resampling pos_embed from %d to %d tokens", pos.shape[1], want.shape[1])
        state["pos_embed"] = resample_pos_embed(pos, grid)
    verify_state_dict(
        expected,
        state,
        path,
        f"MSN timm ViT embed_dim {vit.embed_dim}, depth {len(vit.blocks)}, "
        f"patch {vit.patch_embed.patch_size}",
        "pick the backbone that matches the checkpoint: msn:vit_base_patch4 for vitb4_300ep.pth.tar, "
        "msn:vit_large_patch7 for vitl7_200ep.pth.tar, msn:vit_base_patch16 / vit_large_patch16 / "
        "vit_small_patch16 for the /16 releases.",
    )
    missing, unexpected = vit.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
