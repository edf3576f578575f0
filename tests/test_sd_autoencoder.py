"""The original (latent-diffusion) Stable Diffusion KL autoencoder format -> diffusers AutoencoderKL.

A small ldm-style KL autoencoder is written here in plain PyTorch from the published architecture
(Rombach et al. 2022: ResNet blocks GroupNorm(32, eps 1e-6) -> SiLU -> 3x3 conv twice, a 1x1
``nin_shortcut`` when the width changes; asymmetric-padded stride-2 downsampling; nearest 2x
upsampling + 3x3 conv; one single-head spatial self-attention of 1x1 convs in the middle;
``quant_conv`` / ``post_quant_conv``), with the original module names, so its ``state_dict()`` has
exactly the ``autoencoder_kl.pth`` layout. Its random weights are loaded through our loader and
the diffusers model must compute the same moments and decodings as this independent reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("diffusers")

from dpt_engine.models.autoencoder import DEFAULT_SCALE_FACTOR, LatentAutoencoder
from dpt_engine.models.autoencoder_loader import load_autoencoder
from dpt_engine.models.checkpoints import CheckpointError
from dpt_engine.models.sd_autoencoder import (
    export_ldm_autoencoder,
    infer_ldm_config,
    ldm_to_diffusers_state_dict,
    load_ldm_autoencoder,
)
from dpt_engine.models.uvit import create_uvit

# -- the reference: an ldm-style KL autoencoder ---------------------------------------------------


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class RefResnet(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class RefAttn(nn.Module):
    """Single-head attention over the H*W positions, q/k/v/proj as 1x1 convolutions."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).flatten(2)  # (B, C, HW)
        k = self.k(y).flatten(2)
        v = self.v(y).flatten(2)
        att = torch.softmax(q.transpose(1, 2) @ k / c**0.5, dim=-1)  # (B, HW_q, HW_k)
        out = (v @ att.transpose(1, 2)).view(b, c, h, w)  # (B, C, HW_q) -> (B, C, H, W)
        return x + self.proj_out(out)


class RefDownsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only


class RefUpsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = RefResnet(c, c), RefAttn(c), RefResnet(c, c)
    return mid


class RefEncoder(nn.Module):
    def __init__(self, in_ch: int, ch: int, mult: tuple[int, ...], nrb: int, z: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for level, m in enumerate(mult):
            lvl = nn.Module()
            lvl.block = nn.ModuleList()
            for _ in range(nrb):
                lvl.block.append(RefResnet(cin, ch * m))
                cin = ch * m
            if level != len(mult) - 1:
                lvl.downsample = RefDownsample(cin)
            self.down.append(lvl)
        self.mid = _mid(cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 2 * z, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for lvl in self.down:
            for blk in lvl.block:
                h = blk(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class RefDecoder(nn.Module):
    def __init__(self, out_ch: int, ch: int, mult: tuple[int, ...], nrb: int, z: int) -> None:
        super().__init__()
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        self.mid = _mid(cin)
        levels: list[nn.Module] = []
        for level in reversed(range(len(mult))):  # built from the lowest resolution up
            lvl = nn.Module()
            lvl.block = nn.ModuleList()
            for _ in range(nrb + 1):
                lvl.block.append(RefResnet(cin, ch * mult[level]))
                cin = ch * mult[level]
            if level != 0:
                lvl.upsample = RefUpsample(cin)
            levels.insert(0, lvl)  # up[level]: indexed by resolution level
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            for blk in self.up[level].block:
                h = blk(h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class RefKL(nn.Module):
    def __init__(self, in_ch=3, ch=32, mult=(1, 2), nrb=1, z=4, scale=DEFAULT_SCALE_FACTOR) -> None:
        super().__init__()
        self.encoder = RefEncoder(in_ch, ch, mult, nrb, z)
        self.decoder = RefDecoder(in_ch, ch, mult, nrb, z)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.scale = scale

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z_scaled: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_scaled / self.scale))


def _ref(seed: int = 0, **kw) -> RefKL:
    torch.manual_seed(seed)
    ref = RefKL(**kw)
    with torch.no_grad():  # non-trivial norms and biases so every tensor matters
        for m in ref.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return ref.eval()


CONFIGS = {
    "two-levels": {"in_ch": 3, "ch": 32, "mult": (1, 2), "nrb": 1, "z": 4},
    "three-levels-2-blocks": {"in_ch": 1, "ch": 32, "mult": (1, 2, 2), "nrb": 2, "z": 3},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_reference(tmp_path, name: str) -> None:
    kw = CONFIGS[name]
    ref = _ref(**kw)
    path = tmp_path / "autoencoder_kl.pth"
    torch.save(ref.state_dict(), path)  # the original format: a plain state dict
    ae = load_autoencoder(path)  # what stage2.autoencoder=<file> calls
    assert isinstance(ae, LatentAutoencoder)
    assert ae.scale_factor == pytest.approx(DEFAULT_SCALE_FACTOR)
    assert ae.downsample_factor == 2 ** (len(kw["mult"]) - 1)
    assert ae.latent_channels == kw["z"]

    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, kw["in_ch"], 16, 16, generator=g) * 2 - 1  # (B, C, H, W) in [-1, 1]
    ref64 = _ref(**kw).double()
    with torch.no_grad():
        mean, logvar = ae.encode_moments(x)
        r_mean, r_logvar = ref64.moments(x.double())
        torch.testing.assert_close(mean.double(), r_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logvar.double(), r_logvar, rtol=1e-5, atol=1e-5)
        z = ae.encode(x, sample=False)  # scaled posterior mean
        torch.testing.assert_close(z.double(), r_mean * DEFAULT_SCALE_FACTOR, rtol=1e-5, atol=1e-5)
        zz = torch.randn(z.shape, generator=g)
        torch.testing.assert_close(
            ae.decode(zz, clamp=False).double(), ref64.decode(zz.double()), rtol=1e-5, atol=1e-5
        )
    assert mean.shape == (2, kw["z"], 16 // ae.downsample_factor, 16 // ae.downsample_factor)


def test_inferred_config() -> None:
    ref = _ref(**CONFIGS["three-levels-2-blocks"])
    cfg = infer_ldm_config(ref.state_dict())
    assert cfg["block_out_channels"] == (32, 64, 64)
    assert cfg["layers_per_block"] == 2
    assert cfg["latent_channels"] == 3
    assert cfg["in_channels"] == cfg["out_channels"] == 1
    # the SD KL-f8 layout: ch 128, ch_mult (1, 2, 4, 4), 2 blocks, z 4 -> 83.65M parameters
    with torch.device("meta"):
        sd = RefKL(in_ch=3, ch=128, mult=(1, 2, 4, 4), nrb=2, z=4)
    cfg = infer_ldm_config(sd.state_dict())
    assert cfg["block_out_channels"] == (128, 256, 512, 512) and cfg["latent_channels"] == 4
    assert sum(p.numel() for p in sd.parameters()) == 83_653_863


def test_attention_weights_reshaped() -> None:
    state = _ref().state_dict()
    conv = ldm_to_diffusers_state_dict(state)
    assert conv["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    assert torch.equal(
        conv["decoder.mid_block.attentions.0.to_out.0.weight"],
        state["decoder.mid.attn_1.proj_out.weight"][..., 0, 0],
    )
    # decoder levels run in reverse: ldm up.0 (full resolution) is diffusers' last up block
    assert torch.equal(
        conv["decoder.up_blocks.1.resnets.0.conv1.weight"], state["decoder.up.0.block.0.conv1.weight"]
    )
    assert torch.equal(
        conv["decoder.up_blocks.0.upsamplers.0.conv.weight"], state["decoder.up.1.upsample.conv.weight"]
    )


@pytest.mark.parametrize("fmt,name", [("pth", "ae.pth"), ("safetensors", "ae.safetensors")])
def test_export_round_trip(tmp_path, fmt: str, name: str) -> None:
    ref = _ref(**CONFIGS["three-levels-2-blocks"])
    src = tmp_path / "autoencoder_kl.pth"
    torch.save(ref.state_dict(), src)
    out = tmp_path / name
    export_ldm_autoencoder(load_ldm_autoencoder(src), out, format=fmt)
    back = load_ldm_autoencoder(out)  # the exported file loads again
    assert isinstance(back, LatentAutoencoder)
    from dpt_engine.models.checkpoints import read_state_dict

    exported = read_state_dict(out)
    original = ref.state_dict()
    assert set(exported) == set(original)
    for k, v in original.items():
        assert torch.equal(exported[k], v), k


def test_full_sd_checkpoint(tmp_path) -> None:
    """A full SD checkpoint: the VAE under first_stage_model., plus UNet and loss weights."""
    ref = _ref()
    state = {f"first_stage_model.{k}": v for k, v in ref.state_dict().items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3, 3)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": state, "global_step": 470000}, path)
    ae = load_autoencoder(path)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ae.encode_moments(x)[0], ref.moments(x)[0], rtol=1e-5, atol=1e-5)


def test_wrong_shape_and_missing_key(tmp_path) -> None:
    state = _ref().state_dict()
    state["encoder.mid.block_1.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    del state["decoder.mid.attn_1.q.bias"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_autoencoder(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "missing keys (1): decoder.mid.attn_1.q.bias" in msg  # named as in the checkpoint
    assert "encoder.mid.block_1.conv1.weight: checkpoint (64, 64, 1, 1) vs model (64, 64, 3, 3)" in msg
    assert "Fix:" in msg


def test_truncated_file(tmp_path) -> None:
    path = tmp_path / "autoencoder_kl.pth"
    torch.save(_ref().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_autoencoder(path)


def test_unsupported_layouts(tmp_path) -> None:
    state = _ref().state_dict()
    state["encoder.down.0.attn.0.q.weight"] = torch.zeros(32, 32, 1, 1)  # attn_resolutions non-empty
    path = tmp_path / "attn.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="attention inside resolution levels"):
        load_autoencoder(path)
    uvit = tmp_path / "nnet.pth"
    torch.save(create_uvit("uvit-tiny8").state_dict(), uvit)
    with pytest.raises(CheckpointError, match="not an ldm KL autoencoder"):
        load_autoencoder(uvit)
