"""MSN ViT checkpoints -> timm ViT for the linear probe, against an independent deit-style reference.

The reference below is a ViT written in plain PyTorch from the published deit / MSN architecture
(patch conv, class token, learned position embedding over 1 + grid^2 tokens, pre-LN blocks with
qkv bias and a GELU MLP, final LayerNorm eps 1e-6) with MSN's module names, so its state dict has
the layout of an MSN ``target_encoder``. A synthetic MSN checkpoint (``encoder``,
``target_encoder`` with ``module.`` prefixes and the ``fc`` projection head, ``prototypes``,
optimizer state, ``epoch`` ...) is loaded through the probe's backbone builder, and the probe
feature (CLS token of the last block before the final norm) must match the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("timm")

from dpt_engine.models.checkpoints import CheckpointError
from dpt_engine.models.msn import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MSN_ARCHS,
    create_msn_classifier,
    create_msn_vit,
    load_msn_checkpoint,
)
from dpt_engine.ssl.linear_probe import build_probe_backbone, probe_features

TINY = {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4}


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.attn.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class RefDeiT(nn.Module):
    def __init__(self, img: int, patch: int, d: int, depth: int, heads: int) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img // patch) ** 2, d) * 0.02)
        self.blocks = nn.ModuleList(RefBlock(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def cls_before_norm(self, x: torch.Tensor) -> torch.Tensor:
        """x: ImageNet-normalised (B, 3, H, W) -> (B, D), interpolating pos_embed as MSN does."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        pos = self.pos_embed
        n_old, n_new = pos.shape[1] - 1, x.shape[1] - 1
        if n_old != n_new:
            g = int(n_old**0.5)
            grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, scale_factor=(n_new / n_old) ** 0.5, mode="bicubic")
            pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, n_new, -1)], dim=1)
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        return x[:, 0]  # CLS of the last block, before self.norm


def _ref(seed: int, img: int = 16, **kw) -> RefDeiT:
    torch.manual_seed(seed)
    a = {**TINY, **kw}
    ref = RefDeiT(img, a["patch_size"], a["embed_dim"], a["depth"], a["num_heads"])
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return ref.eval()


def _msn_checkpoint(path, target: RefDeiT, online: RefDeiT) -> None:
    """The layout of MSN's saved checkpoints (src/msn_train.py save_dict)."""
    d = target.pos_embed.shape[-1]

    def ddp(state: dict) -> dict:
        return {f"module.{k}": v for k, v in state.items()}

    head = nn.Sequential()
    head.add_module("fc1", nn.Linear(d, 32))
    head.add_module("bn1", nn.BatchNorm1d(32))
    head.add_module("fc3", nn.Linear(32, 16))
    target_state = {**target.state_dict(), **{f"fc.{k}": v for k, v in head.state_dict().items()}}
    torch.save(
        {
            "encoder": ddp(online.state_dict()),
            "opt": {"state": {}, "param_groups": [{"lr": 1e-3, "WD_exclude": True, "params": [0, 1]}]},
            "prototypes": torch.randn(8, 16),
            "target_encoder": ddp(target_state),
            "epoch": 300,
            "loss": 1.25,
            "batch_size": 1024,
            "world_size": 32,
            "lr": 1e-3,
        },
        path,
    )


def _images(n: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(2))  # [0, 1]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _tiny_backbone(image_size: int = 16):
    return create_msn_classifier("vit_base_patch4", num_classes=5, in_chans=3, image_size=image_size, **TINY)


def test_probe_features_match_reference(tmp_path) -> None:
    target, online = _ref(0), _ref(1)
    path = tmp_path / "vitb4_300ep.pth.tar"
    _msn_checkpoint(path, target, online)
    backbone = _tiny_backbone()
    load_msn_checkpoint(backbone, path)
    x = _images()
    with torch.no_grad():
        got = probe_features(backbone.eval(), x)
        want = target.double().cls_before_norm(_normalise(x).double())
        other = online.double().cls_before_norm(_normalise(x).double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.double(), other, atol=1e-3)  # the EMA target encoder, not `encoder`
    backbone_online = _tiny_backbone()
    load_msn_checkpoint(backbone_online, path, entry="encoder")
    with torch.no_grad():
        torch.testing.assert_close(
            probe_features(backbone_online.eval(), x).double(), other, rtol=1e-5, atol=1e-5
        )


def test_eval_view_crop_and_pos_embed_resampling(tmp_path) -> None:
    """A 18-px image is MSN's Resize(18) view of a 16-px network: only centre-cropped. A checkpoint
    for a 4x4 patch grid loads into an 8x8-grid model with MSN's bicubic pos_embed interpolation."""
    target = _ref(0)
    path = tmp_path / "msn.pth.tar"
    _msn_checkpoint(path, target, _ref(1))
    backbone = _tiny_backbone()
    load_msn_checkpoint(backbone, path)
    x = _images(2, 18)
    with torch.no_grad():
        got = probe_features(backbone.eval(), x)
        want = target.double().cls_before_norm(_normalise(x[..., 1:17, 1:17]).double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    big = _tiny_backbone(image_size=32)  # 8x8 patch grid, checkpoint has 4x4
    load_msn_checkpoint(big, path)
    x32 = _images(2, 32)
    with torch.no_grad():
        got = probe_features(big.eval(), x32)
        want = target.double().cls_before_norm(_normalise(x32).double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_probe_backbone_builder_uses_msn_loader(tmp_path, monkeypatch) -> None:
    """``stage1.backbone=msn:<arch> stage1.probe_checkpoint=...`` goes through load_msn_checkpoint."""
    target = _ref(0)
    path = tmp_path / "msn.pth.tar"
    _msn_checkpoint(path, target, _ref(1))
    import dpt_engine.models.msn as msn

    real = msn.create_msn_classifier
    monkeypatch.setattr(msn, "create_msn_classifier", lambda *a, **k: real(*a, **{**TINY, **k}))
    backbone = build_probe_backbone("msn:deit_base_p4", 5, 3, 16, checkpoint=str(path))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(
            probe_features(backbone.eval(), x).double(),
            target.double().cls_before_norm(_normalise(x).double()),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("arch,tokens", [("vit_base_patch4", 1 + 56 * 56), ("vit_large_patch7", 1 + 32 * 32)])
def test_paper_sizes_have_the_reference_layout(arch: str, tokens: int) -> None:
    a = MSN_ARCHS[arch]
    with torch.device("meta"):
        ours = create_msn_vit(arch).state_dict()
        ref = RefDeiT(224, a.patch_size, a.embed_dim, a.depth, a.num_heads).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert ours["pos_embed"].shape == (1, tokens, a.embed_dim)


def test_wrong_size_truncated_and_missing_entry(tmp_path) -> None:
    path = tmp_path / "wide.pth.tar"
    _msn_checkpoint(path, _ref(0, embed_dim=96, num_heads=4, depth=3), _ref(1))
    backbone = _tiny_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_msn_checkpoint(backbone, path)
    msg = str(info.value)
    assert (
        "shape differences" in msg
        and "blocks.0.attn.qkv.weight: checkpoint (288, 96) vs model (192, 64)" in msg
    )
    assert "unexpected keys" in msg and "blocks.2." in msg
    assert "msn:vit_large_patch7" in msg
    for k, v in backbone.state_dict().items():  # nothing was copied
        assert torch.equal(v, before[k])

    good = tmp_path / "good.pth.tar"
    _msn_checkpoint(good, _ref(0), _ref(1))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_msn_checkpoint(backbone, good)

    plain = tmp_path / "plain.pth"
    torch.save(_ref(0).state_dict(), plain)
    with pytest.raises(CheckpointError, match="no entry 'target_encoder'"):
        load_msn_checkpoint(backbone, plain)


def test_unknown_arch() -> None:
    with pytest.raises(ValueError, match="unknown MSN architecture"):
        create_msn_vit("vit_giant")
