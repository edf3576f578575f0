"""The convolutional U-Net denoiser, the stage-2 model registry and Min-SNR-gamma weighting."""

from __future__ import annotations

import json

import pytest
import torch

from dpt_engine.config.base import ConfigError
from dpt_engine.config.presets import resolve_config
from dpt_engine.diffusion.schedules import make_schedule
from dpt_engine.models.denoisers import create_denoiser, denoiser_flops, list_denoisers
from dpt_engine.models.unet import UNet, UNetConfig, create_unet, flops_per_forward, list_unets
from dpt_engine.train.batch import MicroBatch, min_snr_weight


@pytest.mark.parametrize("name", ["unet-tiny28", "unet-tiny8"])
def test_unet_shapes_and_zero_initial_prediction(name):
    torch.manual_seed(0)
    net = create_unet(name)
    s = net.cfg.img_size
    x = torch.randn(3, 1, s, s)
    y = torch.tensor([0, 5, net.cfg.null_class_id])
    out = net(x, torch.tensor([1.0, 500.0, 999.0]), y)
    assert out.shape == x.shape
    # zero-initialised output conv: the untrained network predicts exactly zero
    assert torch.count_nonzero(out) == 0


def test_unet_uses_time_class_and_input_after_a_step():
    torch.manual_seed(0)
    net = create_unet("unet-tiny8")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(8, 1, 8, 8)
    t = torch.rand(8) * 999
    y = torch.randint(0, 10, (8,))
    for _ in range(3):
        loss = (net(x, t, y) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        base = net(x, t, y)
        assert not torch.allclose(base, net(x, t * 0.5, y))  # time enters
        assert not torch.allclose(base, net(x, t, (y + 1) % 10))  # class enters
        assert not torch.allclose(base, net(x.flip(-1), t, y))  # the image enters


def test_space_to_depth_cuts_flops_and_keeps_shape():
    full = UNetConfig(img_size=28, in_chans=1, base_channels=32, channel_mult=(1, 2), attn_resolutions=(7,))
    folded = UNetConfig(
        img_size=28,
        in_chans=1,
        base_channels=32,
        channel_mult=(1, 2),
        attn_resolutions=(7,),
        space_to_depth=2,
    )
    assert flops_per_forward(folded) < flops_per_forward(full) / 3
    net = UNet(folded)
    assert net(torch.randn(2, 1, 28, 28), torch.ones(2)).shape == (2, 1, 28, 28)


def test_flops_count_one_conv_by_hand():
    # one level, no attention anywhere but the (always present) middle block: count the 3x3 conv_in by hand
    cfg = UNetConfig(img_size=8, in_chans=1, base_channels=8, channel_mult=(1,), attn_resolutions=())
    total = flops_per_forward(cfg)
    conv_in = 2 * 8 * 8 * 8 * 9 * 1
    mid_attention = 2 * 2 * (8 * 8) ** 2 * 8
    assert total > conv_in + mid_attention
    wider = UNetConfig(img_size=8, in_chans=1, base_channels=16, channel_mult=(1,), attn_resolutions=())
    assert 3.0 < flops_per_forward(wider) / total < 4.5  # conv FLOPs grow with width squared


def test_bad_unet_configs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="cannot halve"):
        UNetConfig(img_size=28, in_chans=1, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="space_to_depth"):
        UNetConfig(img_size=28, in_chans=1, space_to_depth=3)
    with pytest.raises(ValueError, match="num_classes"):
        UNetConfig(img_size=28, in_chans=1, num_classes=-1)


def test_registry_dispatches_and_counts_flops():
    names = list_denoisers()
    assert set(list_unets()) <= set(names) and "uvit-tiny28" in names
    unet = create_denoiser("unet-tiny28", num_classes=3)
    assert isinstance(unet, UNet) and unet.cfg.num_classes == 3
    assert denoiser_flops(unet) == flops_per_forward(unet.cfg)
    assert denoiser_flops(create_denoiser("uvit-tiny8")) > 0
    assert denoiser_flops(torch.nn.Linear(2, 2)) is None
    with pytest.raises(KeyError, match="choose from"):
        create_denoiser("unet-nope")


def test_unknown_stage2_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"stage2\.model='unet-nope'"):
        resolve_config("digits", overrides=["stage2.model=unet-nope"])
    assert resolve_config("digits", overrides=["stage2.model=unet-tiny8"]).stage2.model == "unet-tiny8"


def test_min_snr_weight():
    sched = make_schedule("discrete-linear")
    t = torch.linspace(0.001, 1.0, 200)
    w = min_snr_weight(sched, t, 5.0)
    snr = torch.exp(2 * sched.marginal_lambda(t))
    assert torch.all(w[snr <= 5.0] == 1.0)
    torch.testing.assert_close(w[snr > 5.0], 5.0 / snr[snr > 5.0])
    assert (snr > 5.0).any() and (snr <= 5.0).any()


def test_min_snr_weighting_changes_the_loss():
    from dpt_engine.train.batch import GlobalBatch, micro_loss

    pred, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    mb = MicroBatch(x0=noise, t=torch.zeros(2), noise=noise, y=None, weight=None)
    gb = GlobalBatch(torch.zeros(2, dtype=torch.long), None, None, torch.zeros(2), noise, None, None)
    assert float(micro_loss(pred, mb, gb, True)) == 1.0
    mb.time_weight = torch.tensor([1.0, 0.5])
    assert float(micro_loss(pred, mb, gb, True)) == 0.75


def test_unet_stage2_and_sampling_run_and_resume(tmp_path):
    """A U-Net with Min-SNR weighting through the real stage 2 and sample stages."""
    from dpt_engine.pipeline import run_pipeline

    base = [
        "data.labels_per_class=2",
        "stage2.model=unet-tiny8",
        "stage2.label_source=true",
        "stage2.loss_weighting=min-snr",
        "stage2.batch_size=16",
        "stage2.log_every=2",
        "stage2.checkpoint_every=2",
        "stage2.steps=4",
        "sample.images_per_class=2",
        "sample.steps=3",
        "sample.fid=false",
        "run.threads=1",
    ]
    out = tmp_path / "run"
    run_pipeline(resolve_config("digits", overrides=base), out, ["stage2", "sample"], progress=False)
    s2 = json.loads((out / "stage2" / "summary.json").read_text())
    assert s2["model"] == "unet-tiny8"
    hist = [h["loss"] for h in json.loads((out / "stage2" / "history.json").read_text())]
    assert len(hist) == 2 and all(h == h for h in hist)
    assert len(list((out / "sample" / "samples").rglob("*.png"))) == 20
