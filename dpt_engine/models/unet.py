"""A class-conditional convolutional U-Net denoiser for small images (the ADM / DDPM++ family).

DPT's own small-image recipe generates with a convolutional U-Net (EDM's DDPM++ on CIFAR-10);
the U-ViT stays the ImageNet model. On a CPU a U-Net is also the cheaper way to a class-faithful
28x28 generator: 3x3 convolutions see neighbouring pixels at every layer (no 4x4-patch
blockiness), and oneDNN runs them at a higher share of peak than small-token attention.

Same interface as :class:`~dpt_engine.models.uvit.UViT`: ``forward(x (B,C,H,W), t (B,), y (B,) |
None) -> eps``, labels in ``[0, num_classes]`` with row ``num_classes`` the null class used for
classifier-free guidance, and a ``cfg`` with ``num_classes`` / ``null_class_id``.

Architecture (per resolution level ``i`` with ``base_channels * channel_mult[i]`` channels):
``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3x3 conv; the time + class embedding enters
as a per-channel scale and shift after the second GroupNorm), self-attention at the resolutions in
``attn_resolutions``, a stride-2 conv between levels; a middle of ResBlock-attention-ResBlock; the
decoder mirrors it with ``num_res_blocks + 1`` blocks per level fed by the encoder's skips. Output
layers and residual branches end in zero-initialised convolutions, so the untrained network
predicts zero. ``space_to_depth = s`` folds each ``s x s`` pixel block into channels before the
first conv (and unfolds at the end): ``s^2`` times fewer FLOPs at the cost of the finest scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .uvit import timestep_embedding

__all__ = [
    "UNet",
    "UNetConfig",
    "create_unet",
    "flops_per_forward",
    "get_unet_config",
    "list_unets",
    "macs_per_forward",
]


@dataclass(frozen=True)
class UNetConfig:
    """U-Net hyperparameters; ``num_classes = 0`` is unconditional (no class embedding)."""

    img_size: int
    in_chans: int
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (7,)  # feature-map sizes (after space_to_depth) with attention
    num_heads: int = 4
    dropout: float = 0.0
    num_classes: int = 0
    null_class: bool = True
    space_to_depth: int = 1
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        # tuples survive YAML / JSON round trips as lists: normalise
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if self.space_to_depth < 1 or self.img_size % self.space_to_depth:
            raise ValueError(
                f"space_to_depth={self.space_to_depth} must be >= 1 and divide img_size={self.img_size}"
            )
        if not self.channel_mult or self.num_res_blocks < 1 or self.base_channels < 1:
            raise ValueError("channel_mult must be non-empty, num_res_blocks and base_channels >= 1")
        size = self.img_size // self.space_to_depth
        for level in range(len(self.channel_mult) - 1):
            if size % 2:
                raise ValueError(
                    f"level {level} of the U-Net is {size}x{size}, which a stride-2 downsample cannot halve "
                    f"exactly: use fewer levels (channel_mult) or another space_to_depth"
                )
            size //= 2
        for c in self.level_channels:
            if c % self.groups:
                raise ValueError(f"channels {c} not divisible by GroupNorm groups {self.groups}")
            if c % self.num_heads:
                raise ValueError(f"channels {c} not divisible by num_heads {self.num_heads}")

    @property
    def level_channels(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]

    @property
    def groups(self) -> int:
        """GroupNorm groups: 32 as in DDPM, fewer for narrow networks (at least 4 channels each)."""
        return max(1, min(32, self.base_channels // 4))

    @property
    def emb_dim(self) -> int:
        return 4 * self.base_channels

    @property
    def num_label_embeddings(self) -> int:
        return self.num_classes + (1 if self.null_class else 0) if self.num_classes > 0 else 0

    @property
    def null_class_id(self) -> int | None:
        return self.num_classes if self.num_classes > 0 and self.null_class else None


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, groups: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """Convolutional noise-prediction network: ``forward(x, t, y) -> eps`` (see the module doc)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.grad_checkpointing = cfg.grad_checkpointing
        ch, emb_dim, g = cfg.base_channels, cfg.emb_dim, cfg.groups
        s = cfg.space_to_depth
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes > 0:
            self.label_emb = nn.Embedding(cfg.num_label_embeddings, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_chans * s * s, ch, 3, padding=1)

        chans = cfg.level_channels
        size = cfg.img_size // s
        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, cout in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                blk = nn.ModuleList([ResBlock(cur, cout, emb_dim, g, cfg.dropout)])
                if size in cfg.attn_resolutions:
                    blk.append(AttnBlock(cout, g, cfg.num_heads))
                self.down.append(blk)
                cur = cout
                skips.append(cur)
            if level != len(chans) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                size //= 2
                skips.append(cur)
        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, emb_dim, g, cfg.dropout),
                AttnBlock(cur, g, cfg.num_heads),
                ResBlock(cur, cur, emb_dim, g, cfg.dropout),
            ]
        )
        self.up = nn.ModuleList()
        for level in reversed(range(len(chans))):
            cout = chans[level]
            for _ in range(cfg.num_res_blocks + 1):
                blk = nn.ModuleList([ResBlock(cur + skips.pop(), cout, emb_dim, g, cfg.dropout)])
                if size in cfg.attn_resolutions:
                    blk.append(AttnBlock(cout, g, cfg.num_heads))
                self.up.append(blk)
                cur = cout
            if level != 0:
                self.up.append(
                    nn.ModuleList(
                        [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)]
                    )
                )
                size *= 2
        assert not skips
        self.norm_out = nn.GroupNorm(g, cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_chans * s * s, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _block(self, blk: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        def run(h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            for m in blk:
                h = m(h, emb) if isinstance(m, (ResBlock, AttnBlock)) else m(h)
            return h

        if self.grad_checkpointing and torch.is_grad_enabled() and self.training:
            return torch.utils.checkpoint.checkpoint(run, h, emb, use_reentrant=False)
        return run(h, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        if x.shape[-1] != cfg.img_size or x.shape[-2] != cfg.img_size or x.shape[1] != cfg.in_chans:
            raise ValueError(
                f"expected ({cfg.in_chans}, {cfg.img_size}, {cfg.img_size}) inputs, got {tuple(x.shape)}"
            )
        if (y is None) != (cfg.num_classes == 0):
            raise ValueError(
                f"y must be given exactly when the model is class-conditional (num_classes={cfg.num_classes})"
            )
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels).to(self.time_mlp[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        s = cfg.space_to_depth
        h = F.pixel_unshuffle(x, s) if s > 1 else x
        h = self.conv_in(h)
        hs = [h]
        for blk in self.down:
            h = self._block(blk, h, emb)
            hs.append(h)
        h = self._block(self.mid, h, emb)
        for blk in self.up:
            if isinstance(blk[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._block(blk, h, emb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(h, s) if s > 1 else h


UNET_PRESETS: dict[str, UNetConfig] = {
    # 28x28x1 (MNIST / Fashion-MNIST), 1.2M params, 0.38 GFLOP: 28 -> 14 -> 7 at 32 / 64 / 64
    # channels, attention at 7x7
    "unet-tiny28": UNetConfig(
        img_size=28,
        in_chans=1,
        base_channels=32,
        channel_mult=(1, 2, 2),
        attn_resolutions=(7,),
        num_classes=10,
    ),
    # 28x28x1 folded to 4x14x14 (space_to_depth 2), 3.0M params, 0.40 GFLOP: 14 -> 7 at 64 / 128 channels
    "unet-s2d28": UNetConfig(
        img_size=28,
        in_chans=1,
        base_channels=64,
        channel_mult=(1, 2),
        attn_resolutions=(7,),
        space_to_depth=2,
        num_classes=10,
    ),
    # 28x28x1, 4.8M params, 1.5 GFLOP: 28 -> 14 -> 7 at 64 / 128 / 128 channels
    "unet-small28": UNetConfig(
        img_size=28,
        in_chans=1,
        base_channels=64,
        channel_mult=(1, 2, 2),
        attn_resolutions=(7,),
        num_classes=10,
    ),
    # 8x8x1 (sklearn digits): 8 -> 4 at 32 / 64 channels, attention at 4x4
    "unet-tiny8": UNetConfig(
        img_size=8,
        in_chans=1,
        base_channels=32,
        channel_mult=(1, 2),
        attn_resolutions=(4,),
        num_classes=10,
    ),
}


def list_unets() -> list[str]:
    return sorted(UNET_PRESETS)


def get_unet_config(name: str, **overrides) -> UNetConfig:
    if name not in UNET_PRESETS:
        raise KeyError(f"unknown U-Net preset {name!r}; choose from {list_unets()}")
    return dataclasses.replace(UNET_PRESETS[name], **overrides)


def create_unet(name: str, **overrides) -> UNet:
    return UNet(get_unet_config(name, **overrides))


def macs_per_forward(cfg: UNetConfig) -> int:
    """Multiply-accumulates of one forward pass for one image (convs, linears and attention)."""
    net = UNet(dataclasses.replace(cfg, grad_checkpointing=False)).to("meta")
    macs = 0
    hooks = []

    def conv_hook(m: nn.Conv2d, inp, out) -> None:
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs += out.shape[1] * out.shape[2] * out.shape[3] * k

    def attn_hook(m: AttnBlock, inp, out) -> None:
        nonlocal macs
        _, c, h, w = inp[0].shape
        macs += 2 * (h * w) ** 2 * c  # QK^T and AV

    def linear_hook(m: nn.Linear, inp, out) -> None:
        nonlocal macs
        macs += m.in_features * m.out_features

    for m in net.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, AttnBlock):
            hooks.append(m.register_forward_hook(attn_hook))
    s = cfg.img_size
    y = torch.zeros(1, dtype=torch.long, device="meta") if cfg.num_classes else None
    with torch.no_grad():
        net(torch.zeros(1, cfg.in_chans, s, s, device="meta"), torch.zeros(1, device="meta"), y)
    for h in hooks:
        h.remove()
    return int(macs)


def flops_per_forward(cfg: UNetConfig) -> int:
    """Forward FLOPs per image as ``2 x MACs`` (training step ~ 3x this)."""
    return 2 * macs_per_forward(cfg)
