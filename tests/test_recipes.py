"""The original DPT / U-ViT recipes as presets, and ``dpt sample --checkpoint`` end to end.

The preset values are checked against the published configurations (REFERENCE.md; ML-GSAI/DPT
configs/accelerate_b4_subset1_2img_k_128_{large,huge}.py, baofff/U-ViT configs). The CLI test runs
the real sample stage on CPU with ``--preset imagenet256-uvit-h2`` shrunk by overrides (digits,
uvit-tiny8, a tiny KL autoencoder written in the original ldm format) and a U-ViT checkpoint in
the original ``nnet_ema.pth`` format, without stage 2 having run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpt_engine.cli import main
from dpt_engine.config.presets import PRESETS, resolve_config
from dpt_engine.models.uvit import create_uvit

IMAGENET = [n for n in PRESETS if n.startswith("imagenet256-uvit-")]


def test_imagenet_presets_follow_the_published_configs() -> None:
    assert sorted(IMAGENET) == sorted(
        f"imagenet256-uvit-{s}{k}" for s in ("l2", "h2") for k in ("", "-1img", "-5img")
    )
    for name in IMAGENET:
        cfg = resolve_config(name)
        s2, sm = cfg.stage2, cfg.sample
        assert (s2.batch_size, s2.lr, s2.weight_decay, s2.beta1, s2.beta2) == (1024, 2e-4, 0.03, 0.99, 0.99)
        assert (s2.warmup_steps, s2.ema_decay, s2.grad_clip, s2.hflip) == (5000, 0.9999, None, True)
        assert (sm.images_per_class, sm.steps, sm.guidance_scale) == (128, 50, 0.4)
        assert (sm.method, sm.order) == ("singlestep", 3)
        assert cfg.data.image_size == 256 and cfg.data.name == "imagefolder"
        assert cfg.stage1.backbone == cfg.stage3.backbone == "msn:vit_base_patch4"
        assert cfg.stage1.probe_l2 == 0.0025 and cfg.stage1.probe_l2_per_sample
        k = {"": 2, "-1img": 1, "-5img": 5}[name.split("uvit-")[1][2:]]
        assert cfg.data.labels_per_class == k
        if "uvit-l2" in name:
            assert (s2.model, s2.schedule, s2.steps, s2.label_dropout) == (
                "uvit-l2",
                "vp-linear",
                300000,
                0.15,
            )
            assert s2.autoencoder.endswith("autoencoder_kl.pth") and sm.skip_type == "logSNR"
        else:
            assert (s2.model, s2.schedule, s2.steps, s2.label_dropout) == (
                "uvit-h2",
                "discrete-scaled-linear",
                500000,
                0.1,
            )
            assert s2.autoencoder.endswith("autoencoder_kl_ema.pth") and sm.skip_type == "time_uniform"


def test_cifar10_preset_follows_dpt() -> None:
    cfg = resolve_config("cifar10")
    for c in (cfg.stage1, cfg.stage3):
        assert (c.learner, c.backbone, c.steps, c.batch_size, c.uratio) == (
            "freematch",
            "wrn-28-2",
            2**20,
            64,
            7,
        )
        assert (c.lr, c.momentum, c.weight_decay, c.ema_decay, c.lambda_ent) == (0.03, 0.9, 5e-4, 0.999, 0.0)
    assert cfg.data.labels_per_class == 4
    assert cfg.stage2.model == "uvit-s2" and cfg.sample.images_per_class == 1000
    assert cfg.sample.guidance_scale == 0.0 and cfg.stage2.label_dropout == 0.0


def test_subset_file_override(tmp_path) -> None:
    f = tmp_path / "2imgs_class.txt"
    f.write_text("n01440764_10026.JPEG\n")
    cfg = resolve_config(
        "imagenet256-uvit-h2", overrides=[f"data.subset_file={f}", "data.labels_per_class=null"]
    )
    assert cfg.data.subset_file == str(f) and cfg.data.labels_per_class is None


# -- dpt sample --checkpoint, end to end ------------------------------------------------------------

SHRINK = [
    "data.name=digits",
    "data.image_size=null",
    "data.labels_per_class=4",
    "stage2.model=uvit-tiny8",
    "stage2.precision=fp32",
    "stage2.grad_checkpointing=false",
    "sample.images_per_class=2",
    "sample.steps=3",
    "sample.batch_size=8",
    "sample.fid=false",
    "sample.grid_per_class=2",
    "run.device=cpu",
    "run.num_workers=0",
]


@pytest.fixture(scope="module")
def tiny_ldm_autoencoder(tmp_path_factory) -> Path:
    """A 1-channel KL autoencoder (f = 2, 4 latent channels) saved with the ldm key names."""
    from dpt_engine.models.autoencoder import LatentAutoencoder
    from dpt_engine.models.sd_autoencoder import export_ldm_autoencoder

    torch.manual_seed(0)
    ae = LatentAutoencoder.from_config(in_channels=1, out_channels=1, block_out_channels=(32, 64))
    path = tmp_path_factory.mktemp("assets") / "autoencoder_kl_ema.pth"
    export_ldm_autoencoder(ae, path)
    assert "encoder.down.0.block.0.conv1.weight" in torch.load(path, weights_only=True)
    return path


def _nnet(seed: int, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    # the digits latent: 4 x 4 x 4 (8 px / f 2); 10 classes + the null class
    return create_uvit("uvit-tiny8", img_size=4, in_chans=4, num_classes=10, **kw).state_dict()


def _sample(out: Path, ckpt: Path, ae: Path, capsys) -> tuple[int, str]:
    argv = ["sample", "--preset", "imagenet256-uvit-h2", "--checkpoint", str(ckpt), "--out", str(out)]
    rc = main([*argv, "--no-progress", *SHRINK, f"stage2.autoencoder={ae}"])
    return rc, capsys.readouterr().err


def _pngs(out: Path) -> dict[str, bytes]:
    files = sorted((out / "sample").rglob("*.png"))
    return {str(p.relative_to(out)): p.read_bytes() for p in files if p.name != "sample_grid.png"}


def test_dpt_sample_with_original_checkpoint(tmp_path, tiny_ldm_autoencoder, capsys) -> None:
    nnet = tmp_path / "nnet_ema.pth"
    torch.save(_nnet(0), nnet)  # the original U-ViT / DPT format: a plain state dict
    rc, err = _sample(tmp_path / "orig", nnet, tiny_ldm_autoencoder, capsys)
    assert rc == 0, err
    images = _pngs(tmp_path / "orig")
    assert len(images) == 10 * 2
    assert not (tmp_path / "orig" / "stage2").exists()  # stage 2 never ran
    cfg_yaml = (tmp_path / "orig" / "config.yaml").read_text()
    assert f"checkpoint: {nnet.resolve()}" in cfg_yaml

    # our own stage-2 format (raw + EMA weights): the EMA weights are the ones sampled from
    ours = tmp_path / "model.pt"
    torch.save({"model": _nnet(7), "ema": _nnet(0), "step": 10}, ours)
    rc, err = _sample(tmp_path / "ours", ours, tiny_ldm_autoencoder, capsys)
    assert rc == 0, err
    assert list(_pngs(tmp_path / "ours").values()) == list(images.values())

    other = tmp_path / "other.pth"
    torch.save(_nnet(1), other)
    rc, err = _sample(tmp_path / "other", other, tiny_ldm_autoencoder, capsys)
    assert rc == 0, err
    assert list(_pngs(tmp_path / "other").values()) != list(images.values())


def test_dpt_sample_rejects_bad_checkpoints(tmp_path, tiny_ldm_autoencoder, capsys) -> None:
    wrong = tmp_path / "nnet_l2.pth"
    torch.save(_nnet(0, embed_dim=64), wrong)  # a different model size
    rc, err = _sample(tmp_path / "wrong", wrong, tiny_ldm_autoencoder, capsys)
    assert rc == 2
    assert "does not fit the model" in err and "pos_embed: checkpoint (1, 6, 64) vs model (1, 6, 128)" in err

    truncated = tmp_path / "nnet_ema.pth"
    torch.save(_nnet(0), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    rc, err = _sample(tmp_path / "trunc", truncated, tiny_ldm_autoencoder, capsys)
    assert rc == 2 and "truncated or corrupt" in err and str(truncated.resolve()) in err

    rc, err = _sample(tmp_path / "missing", tmp_path / "nope.pth", tiny_ldm_autoencoder, capsys)
    assert rc == 2 and "does not exist" in err
