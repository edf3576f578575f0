"""U-ViT (Bao et al., 2023, "All are Worth Words: A ViT Backbone for Diffusion Models"), the
stage-2 denoiser of DPT.

Tokens are ``[class token (conditional only), time token, patch tokens]`` (the original's order:
the label embedding is prepended last, so it sits at position 0), plus a learned position
embedding. The time token is the sinusoidal embedding of the network time (size ``D``, no MLP).
Pre-LN transformer blocks (no qkv bias, GELU MLP) are arranged as ``depth // 2`` in-blocks, one
mid block and ``depth // 2`` out-blocks; out-block ``j`` first maps ``concat(x, skip) -> D`` with
``skip_linear``, where ``skip`` is the output of in-block ``depth//2 - 1 - j`` (a U-Net-style long
skip). A final LayerNorm and ``decoder_pred`` map every token to ``p*p*C`` pixels, the patch
tokens are unpatchified and an optional 3x3 conv (``final_layer``) is applied.

Module and parameter names follow the public U-ViT implementation so its checkpoints load with
``load_state_dict`` (``patch_embed.proj``, ``pos_embed``, ``label_emb``, ``in_blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``mid_block``, ``out_blocks.N.skip_linear``,
``norm``, ``decoder_pred``, ``final_layer``). The class embedding has ``num_classes + 1`` rows;
row ``num_classes`` is the null class used for classifier-free guidance.

Attention runs through the ``dpt_engine.kernels.attention`` dispatch in the compute dtype (under
autocast q, k, v stay in bf16/fp16; the original upcast them to fp32): PyTorch's
``F.scaled_dot_product_attention`` on CPU, the Triton flash-attention kernel on CUDA (reading
q, k, v in place from the qkv projection), selectable with ``DPT_KERNELS``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dpt_engine import kernels

__all__ = [
    "UVIT_PRESETS",
    "UViT",
    "UViTConfig",
    "create_uvit",
    "flops_per_forward",
    "get_uvit_config",
    "list_uvits",
    "macs_per_forward",
    "timestep_embedding",
]


@dataclass(frozen=True)
class UViTConfig:
    """U-ViT hyperparameters. ``num_classes = 0`` builds an unconditional model (no class
    token); otherwise the class embedding has ``num_classes + 1`` rows when ``null_class`` (row
    ``num_classes`` = null class for CFG) and ``num_classes`` rows when not (the released
    ImageNet-64 pixel checkpoints)."""

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    num_classes: int = 0
    null_class: bool = True
    conv: bool = True
    skip: bool = True
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def extras(self) -> int:
        """Non-patch tokens: the time token, plus the class token when conditional."""
        return 2 if self.num_classes > 0 else 1

    @property
    def num_tokens(self) -> int:
        return self.extras + self.num_patches

    @property
    def num_label_embeddings(self) -> int:
        return self.num_classes + (1 if self.null_class else 0) if self.num_classes > 0 else 0

    @property
    def null_class_id(self) -> int | None:
        """The label of the null (unconditional) class, or None when there is none."""
        return self.num_classes if self.num_classes > 0 and self.null_class else None


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_k), sin(t f_k)]`` with ``f_k = max_period^(-k / (dim//2))``,
    computed in fp32 (t up to ~1000 needs it). ``timesteps`` (B,) may be fractional; -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # qkv features are laid out as (3, heads, head_dim), matching the original checkpoints
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        x = kernels.attention(q, k, v)  # (B, H, N, Dh); dispatch: SDPA on CPU, Triton flash on CUDA
        x = x.transpose(1, 2).reshape(b, n, d)  # (B, N, H*Dh)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block; with ``skip`` it first fuses the long skip:
    ``x = skip_linear(concat(x, skip))``, then ``x += attn(norm1(x))``, ``x += mlp(norm2(x))``."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False
    ) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, N, 2D) -> (B, N, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class UViT(nn.Module):
    """U-ViT noise-prediction network: ``forward(x (B,C,H,W), t (B,), y (B,) | None) -> eps``."""

    def __init__(self, cfg: UViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.embed_dim = d
        self.in_chans = cfg.in_chans
        self.patch_size = cfg.patch_size
        self.num_classes = cfg.num_classes
        self.extras = cfg.extras
        self.grad_checkpointing = cfg.grad_checkpointing
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        if cfg.num_classes > 0:
            self.label_emb = nn.Embedding(cfg.num_label_embeddings, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))

        def block(skip: bool = False) -> Block:
            return Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, skip=skip)

        self.in_blocks = nn.ModuleList([block() for _ in range(cfg.depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(skip=cfg.skip) for _ in range(cfg.depth // 2)])
        self.norm = nn.LayerNorm(d)
        self.patch_dim = cfg.patch_size**2 * cfg.in_chans
        self.decoder_pred = nn.Linear(d, self.patch_dim)
        self.final_layer = nn.Conv2d(cfg.in_chans, cfg.in_chans, 3, padding=1) if cfg.conv else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation: truncated normal (std 0.02) for ``pos_embed`` and Linear
        weights, zero Linear biases, unit LayerNorms; Embedding and Conv keep PyTorch defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h*w, p*p*C) with features ordered (p1, p2, C) -> (B, C, h*p, w*p)."""
        b, n, _ = x.shape
        p, c = self.patch_size, self.in_chans
        h = w = math.isqrt(n)
        x = x.view(b, h, w, p, p, c)  # (B, h, w, p1, p2, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p1, w, p2)
        return x.reshape(b, c, h * p, w * p)

    def _run(self, blk: Block, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and self.training:
            return torch.utils.checkpoint.checkpoint(blk, x, skip, use_reentrant=False)
        return blk(x, skip)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) network time (float or int); y: (B,) int64 labels in
        ``[0, num_classes]`` (``num_classes`` = null class) or None for unconditional models."""
        cfg = self.cfg
        if x.shape[-1] != cfg.img_size or x.shape[-2] != cfg.img_size:
            raise ValueError(f"expected {cfg.img_size}x{cfg.img_size} inputs, got {tuple(x.shape)}")
        if (y is None) != (cfg.num_classes == 0):
            raise ValueError(
                f"y must be given exactly when the model is class-conditional (num_classes={cfg.num_classes})"
            )
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        x = self.patch_embed(x)  # (B, L, D)
        n_patches = x.shape[1]
        time_token = timestep_embedding(t, self.embed_dim).to(x.dtype)[:, None]  # (B, 1, D)
        tokens = [time_token, x]
        if y is not None:
            tokens.insert(0, self.label_emb(y).to(x.dtype)[:, None])  # (B, 1, D)
        x = torch.cat(tokens, dim=1) + self.pos_embed  # (B, extras + L, D)

        skips = []
        for blk in self.in_blocks:
            x = self._run(blk, x)
            skips.append(x)
        x = self._run(self.mid_block, x)
        for blk in self.out_blocks:
            x = self._run(blk, x, skips.pop())

        x = self.decoder_pred(self.norm(x))  # (B, extras + L, p*p*C)
        x = x[:, self.extras :, :]  # (B, L, p*p*C)
        assert x.shape[1] == n_patches
        return self.final_layer(self.unpatchify(x))  # (B, C, H, W)


def _cfg(**kw) -> UViTConfig:
    return UViTConfig(**kw)


UVIT_PRESETS: dict[str, UViTConfig] = {
    # CIFAR-10 32px pixels (the released checkpoint is unconditional: override num_classes=0)
    "uvit-s2": _cfg(
        img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, num_classes=10
    ),
    # ImageNet-64 pixels (released checkpoints: null_class=False, i.e. 1000 label rows)
    "uvit-m4": _cfg(
        img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16, num_heads=12, num_classes=1000
    ),
    # ImageNet-256 latents (4x32x32): 286,763,172 params
    "uvit-l2": _cfg(
        img_size=32,
        patch_size=2,
        in_chans=4,
        embed_dim=1024,
        depth=20,
        num_heads=16,
        num_classes=1000,
        conv=True,
    ),
    # ImageNet-256 latents: 500,832,016 params (no final conv)
    "uvit-h2": _cfg(
        img_size=32,
        patch_size=2,
        in_chans=4,
        embed_dim=1152,
        depth=28,
        num_heads=16,
        num_classes=1000,
        conv=False,
    ),
    # ImageNet-512 latents (4x64x64), patch 4 -> 256 patch tokens
    "uvit-l4": _cfg(
        img_size=64,
        patch_size=4,
        in_chans=4,
        embed_dim=1024,
        depth=20,
        num_heads=16,
        num_classes=1000,
        conv=True,
    ),
    "uvit-h4": _cfg(
        img_size=64,
        patch_size=4,
        in_chans=4,
        embed_dim=1152,
        depth=28,
        num_heads=16,
        num_classes=1000,
        conv=False,
    ),
    # small CPU models: 8x8x1 (e.g. sklearn digits) and 28x28x1 (MNIST / Fashion-MNIST)
    "uvit-tiny8": _cfg(
        img_size=8, patch_size=2, in_chans=1, embed_dim=128, depth=6, num_heads=4, num_classes=10
    ),
    "uvit-tiny28": _cfg(
        img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=8, num_heads=3, num_classes=10
    ),
    # ~10k-parameter networks for measuring the generation pipeline around them
    # (benchmarks/bench_scale.py): 32x32 RGB pixels, and 4x8x8 latents; 1,000 classes
    "uvit-nano32": _cfg(
        img_size=32, patch_size=8, in_chans=3, embed_dim=8, depth=1, num_heads=1, num_classes=1000, conv=False
    ),
    "uvit-nano8": _cfg(
        img_size=8, patch_size=4, in_chans=4, embed_dim=8, depth=1, num_heads=1, num_classes=1000, conv=False
    ),
}


def list_uvits() -> list[str]:
    """Names of the registered presets."""
    return sorted(UVIT_PRESETS)


def get_uvit_config(name: str, **overrides) -> UViTConfig:
    """The preset ``name`` with dataclass field ``overrides`` applied."""
    if name not in UVIT_PRESETS:
        raise KeyError(f"unknown U-ViT preset {name!r}; choose from {list_uvits()}")
    return dataclasses.replace(UVIT_PRESETS[name], **overrides)


def create_uvit(name: str, **overrides) -> UViT:
    """Build preset ``name`` (see ``list_uvits()``); build under ``torch.device('meta')`` to count
    parameters without allocating."""
    return UViT(get_uvit_config(name, **overrides))


def macs_per_forward(cfg: UViTConfig) -> int:
    """Multiply-accumulates of one forward pass for one image (matmuls, convs and attention;
    norms, activations and adds are ignored)."""
    d, n, p2c = cfg.embed_dim, cfg.num_tokens, cfg.patch_size**2 * cfg.in_chans
    hidden = int(d * cfg.mlp_ratio)
    n_blocks = 2 * (cfg.depth // 2) + 1
    per_block = n * (3 * d * d + d * d + 2 * d * hidden) + 2 * n * n * d  # qkv, proj, mlp; QK^T, AV
    skip = (cfg.depth // 2) * n * 2 * d * d if cfg.skip else 0
    embed = cfg.num_patches * p2c * d
    decoder = n * d * p2c  # the original decodes every token, extras included
    conv = cfg.img_size**2 * cfg.in_chans * cfg.in_chans * 9 if cfg.conv else 0
    return n_blocks * per_block + skip + embed + decoder + conv


def flops_per_forward(cfg: UViTConfig) -> int:
    """Forward FLOPs per image as ``2 x MACs`` (training step ~ 3x this)."""
    return 2 * macs_per_forward(cfg)
