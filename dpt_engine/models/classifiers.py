"""Image classifiers for the classifier stages (1 and 3), behind one registry.

Every model built here follows one contract:

* input: float images in ``[0, 1]``, shape ``(B, C, H, W)``; the per-channel normalisation
  (``(x - mean) / std``) happens inside the model, so callers never need to know it;
* ``forward_features(x) -> (B, F)``: pooled features (pre-logits);
* ``head``: the final ``nn.Linear(F, num_classes)``; ``forward(x) == head(forward_features(x))``.

Names (``list_classifiers()`` gives the built-in ones):

* ``cnn-small``: a small, fast BatchNorm CNN for 8x8 .. 32x32 images (three stages of two
  3x3 convolutions, max-pool between stages, global average pool).
* ``wrn-28-2`` / ``wrn-28-8``: WideResNet as used by FixMatch / FreeMatch (Zagoruyko & Komodakis
  2016; Sohn et al. 2020): pre-activation basic blocks, leaky ReLU 0.1.
* ``timm:<model>``: any timm architecture, random init (``pretrained=False``); ``img_size`` is
  passed to models that accept it, other keyword arguments are forwarded to ``timm.create_model``.
* ``msn:<arch>``: an MSN ViT encoder (``vit_base_patch4`` = ViT-B/4, ``vit_large_patch7`` = ViT-L/7,
  ...; ``models/msn.py``) as a timm ViT with MSN's input normalisation and evaluation crop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import msn
from .timm_classifier import InputNorm, TimmClassifier, create_timm_classifier

__all__ = [
    "CNNSmall",
    "TimmClassifier",
    "WideResNet",
    "count_parameters",
    "create_classifier",
    "list_classifiers",
]


# --------------------------------------------------------------------------------------------
# cnn-small
# --------------------------------------------------------------------------------------------


def _conv_bn_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.1, inplace=True),
    )


class CNNSmall(nn.Module):
    """Three stages ``(w, 2w, 4w)`` of two conv3x3-BN-LeakyReLU, 2x2 max-pool between stages.

    Resolution path: 8 -> 4 -> 2 (digits), 28 -> 14 -> 7 (MNIST), 32 -> 16 -> 8 (CIFAR). Images
    larger than 32 px first go through stride-2 stem convolutions until they are <= 32 px.
    Features: global average pool of the last stage, ``F = 4w``.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, image_size: int = 32, width: int = 32):
        super().__init__()
        self.norm = InputNorm(in_chans)
        stem: list[nn.Module] = []
        cin, size = in_chans, image_size
        while size > 32:
            stem.append(_conv_bn_act(cin, width, stride=2))
            cin, size = width, (size + 1) // 2
        self.stem = nn.Sequential(*stem)
        widths = (width, 2 * width, 4 * width)
        stages: list[nn.Module] = []
        for i, w in enumerate(widths):
            layers: list[nn.Module] = []
            if i > 0 and size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            layers += [_conv_bn_act(cin, w), _conv_bn_act(w, w)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.num_features = widths[-1]
        self.head = nn.Linear(self.num_features, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.norm(x)))  # (B, 4w, h, w)
        return x.mean(dim=(2, 3))  # (B, 4w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# WideResNet (FixMatch variant)
# --------------------------------------------------------------------------------------------


class _WRNBlock(nn.Module):
    """Pre-activation block: BN-LReLU-conv3x3(stride)-BN-LReLU-conv3x3, plus the (1x1-projected) input."""

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool, bn_momentum: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.leaky_relu(self.bn1(x), 0.1)
        if (
            self.activate_before_residual
        ):  # FixMatch (TF): only the very first block's shortcut sees BN-LReLU(x)
            x = o
        y = self.conv1(o)
        y = self.conv2(F.leaky_relu(self.bn2(y), 0.1))
        return y + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-depth-widen (FixMatch's variant): 3 groups of ``(depth - 4) / 6`` blocks.

    Channels ``(16, 16k, 32k, 64k)``, strides ``(1, 2, 2)``, final BN-LReLU, global average pool.
    ``bn_momentum`` defaults to 0.01 (FixMatch uses 0.001 for 1M steps; our schedules are short,
    and the EMA teacher copies the BN statistics, so they must settle within a few hundred steps).
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 32,
        depth: int = 28,
        widen: int = 2,
        bn_momentum: float = 0.01,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        ch = (16, 16 * widen, 32 * widen, 64 * widen)
        self.norm = InputNorm(in_chans)
        self.conv1 = nn.Conv2d(in_chans, ch[0], 3, padding=1, bias=False)
        groups: list[nn.Module] = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [
                _WRNBlock(
                    ch[g] if i == 0 else ch[g + 1],
                    ch[g + 1],
                    stride if i == 0 else 1,
                    g == 0 and i == 0,
                    bn_momentum,
                )
                for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(ch[3], momentum=bn_momentum)
        self.num_features = ch[3]
        self.head = nn.Linear(ch[3], num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.conv1(self.norm(x)))  # (B, 64k, H/4, W/4)
        x = F.leaky_relu(self.bn(x), 0.1)
        return x.mean(dim=(2, 3))  # (B, 64k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _init_weights(model: nn.Module) -> None:
    """FixMatch's init: Kaiming-normal convs (fan_out, leaky ReLU), BN (1, 0), Xavier head."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cnn-small": lambda num_classes, in_chans, image_size, **kw: CNNSmall(
        num_classes, in_chans, image_size, **kw
    ),
    "wrn-28-2": lambda num_classes, in_chans, image_size, **kw: WideResNet(
        num_classes, in_chans, image_size, depth=28, widen=2, **kw
    ),
    "wrn-28-8": lambda num_classes, in_chans, image_size, **kw: WideResNet(
        num_classes, in_chans, image_size, depth=28, widen=8, **kw
    ),
}


def list_classifiers() -> list[str]:
    """Built-in classifier names. Any ``timm:<model>`` name is accepted as well."""
    return sorted(_REGISTRY)


def create_classifier(
    name: str, num_classes: int, in_chans: int, image_size: int, **kwargs: Any
) -> nn.Module:
    """Build classifier ``name`` for ``num_classes`` classes on ``(in_chans, image_size, image_size)``.

    ``kwargs`` go to the constructor (e.g. ``width`` for ``cnn-small``, ``patch_size`` or ``depth``
    for a timm ViT). Raises ``ValueError`` for an unknown name, listing the valid ones.
    """
    if num_classes < 1 or in_chans < 1 or image_size < 1:
        raise ValueError(f"bad classifier shape: {num_classes=} {in_chans=} {image_size=}")
    if name.startswith("timm:"):
        return create_timm_classifier(name[len("timm:") :], num_classes, in_chans, image_size, **kwargs)
    if name.startswith("msn:"):  # MSN ViT encoders (DPT's ImageNet stage 1), models/msn.py
        return msn.create_msn_classifier(name[len("msn:") :], num_classes, in_chans, image_size, **kwargs)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown classifier {name!r}; valid: {', '.join(list_classifiers())}, timm:<model>, "
            "or msn:<arch>"
        )
    return _REGISTRY[name](num_classes, in_chans, image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
