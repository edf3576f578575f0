"""The stage-2 autoencoder interface on a tiny randomly initialised diffusers AutoencoderKL (CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from dpt_engine.models.autoencoder import (
    DEFAULT_SCALE_FACTOR,
    LOGVAR_MAX,
    LOGVAR_MIN,
    AutoencoderNotFoundError,
    IdentityAutoencoder,
    LatentAutoencoder,
)
from dpt_engine.models.autoencoder_loader import load_autoencoder
from dpt_engine.models.checkpoints import CheckpointError


@pytest.fixture(scope="module")
def ae() -> LatentAutoencoder:
    torch.manual_seed(0)
    return LatentAutoencoder.from_config()  # block_out_channels (32, 64): one 2x downsampling


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1  # (B, C, H, W) in [-1, 1]


def test_shapes_two_blocks(ae: LatentAutoencoder, images: torch.Tensor) -> None:
    assert ae.scale_factor == pytest.approx(DEFAULT_SCALE_FACTOR)
    # diffusers downsamples in every block but the last: 2 blocks -> f = 2, 4 blocks (SD) -> f = 8
    assert ae.downsample_factor == 2
    assert ae.latent_shape((2, 3, 32, 32)) == (2, 4, 16, 16)
    assert ae.latent_shape((3, 32, 32)) == (4, 16, 16)
    with torch.no_grad():
        mean, logvar = ae.encode_moments(images)
        z = ae.encode(images)
        x = ae.decode(z)
    assert mean.shape == logvar.shape == z.shape == (2, 4, 16, 16)
    assert x.shape == images.shape
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="divisible"):
        ae.latent_shape((3, 31, 32))


def test_three_blocks_downsample_by_four(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    ae3 = LatentAutoencoder.from_config(block_out_channels=(32, 32, 64))
    assert ae3.downsample_factor == 4
    with torch.no_grad():
        z = ae3.encode(images, sample=False)
    assert tuple(z.shape) == ae3.latent_shape(images.shape) == (2, 4, 8, 8)


def test_scale_factor_applied_and_paths_consistent(ae: LatentAutoencoder, images: torch.Tensor) -> None:
    with torch.no_grad():
        posterior = ae.vae.encode(images).latent_dist
        z = ae.encode(images, sample=False)
        torch.testing.assert_close(z, posterior.mean * DEFAULT_SCALE_FACTOR)
        # decode divides by the scale first: decode(encode(x)) == vae.decode(mean)
        torch.testing.assert_close(ae.decode(z, clamp=False), ae.vae.decode(posterior.mean).sample)
        torch.testing.assert_close(ae.decode(z), ae.vae.decode(posterior.mean).sample.clamp(-1, 1))
        # an explicit scale factor wins over the config's
        half = LatentAutoencoder(ae.vae, scale_factor=0.5)
        torch.testing.assert_close(half.encode(images, sample=False), posterior.mean * 0.5)
        torch.testing.assert_close(half.decode(z / DEFAULT_SCALE_FACTOR * 0.5), ae.decode(z))


def test_sample_uses_generator_and_scale(ae: LatentAutoencoder, images: torch.Tensor) -> None:
    with torch.no_grad():
        mean, logvar = ae.encode_moments(images)
        z1 = ae.sample(mean, logvar, torch.Generator().manual_seed(5))
        z2 = ae.sample(mean, logvar, torch.Generator().manual_seed(5))
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
        expected = (mean + torch.exp(0.5 * logvar) * eps) * ae.scale_factor
        z_enc = ae.encode(images, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z1, z2)
    torch.testing.assert_close(z1, expected)
    torch.testing.assert_close(z_enc, expected)


def test_logvar_clamped(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    ae = LatentAutoencoder.from_config()
    c = ae.latent_channels
    with torch.no_grad():
        qc = ae.vae.quant_conv  # 1x1 conv producing (mean, logvar) channels
        qc.weight[c:] = 0
        qc.bias[c:] = 100.0
        _, logvar = ae.encode_moments(images)
        assert logvar.max().item() == LOGVAR_MAX
        qc.bias[c:] = -100.0
        _, logvar = ae.encode_moments(images)
        assert logvar.min().item() == LOGVAR_MIN
        # sample() clamps a logvar it is handed directly as well: std = exp(10), not exp(50)
        mean = torch.zeros(1, c, 2, 2)
        z = ae.sample(mean, torch.full_like(mean, 100.0), torch.Generator().manual_seed(0))
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(z, eps * torch.exp(torch.tensor(10.0)) * ae.scale_factor)


def test_frozen(ae: LatentAutoencoder) -> None:
    assert not any(p.requires_grad for p in ae.parameters())
    ae.train()
    assert not ae.vae.training
    ae.eval()


def test_from_pretrained_dir_round_trip(ae: LatentAutoencoder, images: torch.Tensor, tmp_path) -> None:
    ae.save_pretrained(tmp_path / "vae_dir")
    loaded = LatentAutoencoder.from_pretrained_dir(tmp_path / "vae_dir")
    assert loaded.scale_factor == ae.scale_factor
    assert loaded.latent_channels == ae.latent_channels and loaded.downsample_factor == 2
    ref = ae.state_dict()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, ref[k], msg=k)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(images, sample=False), ae.encode(images, sample=False))
    # load_autoencoder on a directory, and a pipeline directory with the VAE under vae/
    assert isinstance(load_autoencoder(str(tmp_path / "vae_dir")), LatentAutoencoder)
    ae.save_pretrained(tmp_path / "pipeline" / "vae")
    assert isinstance(load_autoencoder(tmp_path / "pipeline"), LatentAutoencoder)


def test_missing_paths_raise_clear_errors(tmp_path) -> None:
    missing = tmp_path / "no_such_vae"
    with pytest.raises(AutoencoderNotFoundError, match="does not exist"):
        load_autoencoder(str(missing))
    with pytest.raises(AutoencoderNotFoundError, match="directory not found"):
        LatentAutoencoder.from_pretrained_dir(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AutoencoderNotFoundError, match=r"no config\.json"):
        load_autoencoder(tmp_path / "empty")
    (tmp_path / "weights.pth").write_bytes(b"")  # a file is read as an ldm-format checkpoint
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_autoencoder(tmp_path / "weights.pth")


def test_identity_autoencoder(images: torch.Tensor) -> None:
    ident = load_autoencoder("identity")
    assert isinstance(ident, IdentityAutoencoder)
    assert ident.scale_factor == 1.0 and ident.downsample_factor == 1
    assert ident.latent_shape((2, 3, 32, 32)) == (2, 3, 32, 32)
    mean, logvar = ident.encode_moments(images)
    assert torch.equal(mean, images) and torch.all(logvar == LOGVAR_MIN)
    assert torch.equal(ident.encode(images, generator=torch.Generator().manual_seed(0)), images)
    assert torch.equal(ident.decode(images * 2), (images * 2).clamp(-1, 1))
    assert torch.equal(ident.decode(images * 2, clamp=False), images * 2)
