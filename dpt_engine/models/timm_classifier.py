"""The normalising input layer shared by the classifiers, and timm models behind the classifier
registry's contract (``forward_features`` pooled, ``head``, ``num_features``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["InputNorm", "TimmClassifier", "create_timm_classifier"]


class InputNorm(nn.Module):
    """``(x - mean) / std`` per channel; constants (non-persistent buffers, not in state dicts)."""

    def __init__(
        self, channels: int, mean: Sequence[float] | float = 0.5, std: Sequence[float] | float = 0.5
    ):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        self.register_buffer(
            "mean", mean_t.expand(channels).reshape(1, channels, 1, 1).clone(), persistent=False
        )
        self.register_buffer(
            "std", std_t.expand(channels).reshape(1, channels, 1, 1).clone(), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


class TimmClassifier(nn.Module):
    """A timm model behind the registry contract; the timm model itself is ``self.model``.

    ``forward_features`` is timm's ``forward_head(forward_features(x), pre_logits=True)``
    (pooled, ``(B, F)``); ``head`` is ``model.get_classifier()``. Inputs are normalised with the
    model's ``pretrained_cfg`` mean/std when it has one per input channel, else 0.5 / 0.5.
    State-dict keys carry a ``model.`` prefix; load raw timm checkpoints into ``self.model``.
    """

    def __init__(self, model: nn.Module, in_chans: int):
        super().__init__()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", 0.5), cfg.get("std", 0.5)
        if len(torch.as_tensor(mean).flatten()) != in_chans:
            mean, std = 0.5, 0.5
        self.norm = InputNorm(in_chans, mean, std)
        self.model = model
        self.num_features = int(getattr(model, "num_features", 0))

    @property
    def head(self) -> nn.Module:
        return self.model.get_classifier()

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """timm's unpooled ``forward_features`` (``(B, N, D)`` for ViTs, ``(B, C, h, w)`` for CNNs)."""
        return self.model.forward_features(self.norm(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.forward_tokens(x), pre_logits=True)  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.norm(x))


def create_timm_classifier(
    name: str, num_classes: int, in_chans: int, image_size: int, **kwargs: Any
) -> nn.Module:
    import timm

    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    base = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    try:
        model = timm.create_model(name, img_size=image_size, **base)
    except TypeError as e:  # the architecture takes no img_size (CNNs): build it without
        if "img_size" not in str(e):
            raise
        model = timm.create_model(name, **base)
    return TimmClassifier(model, in_chans)
