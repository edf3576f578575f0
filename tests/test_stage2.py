"""Stage 2: diffusion training (resume, label choices) and deterministic, resumable generation."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dpt_engine.config.presets import resolve_config
from dpt_engine.config.schema import DiffusionConfig
from dpt_engine.data import build_splits
from dpt_engine.data.latent_store import LatentStore
from dpt_engine.diffusion.dpm_solver import DPMSolverPP
from dpt_engine.diffusion.guidance import cfg_eps_fn, clip_denoised_fn
from dpt_engine.diffusion.noise import initial_noise
from dpt_engine.diffusion.schedules import make_schedule
from dpt_engine.diffusion.trainer import DiffusionData, fit_diffusion
from dpt_engine.models.uvit import create_uvit
from dpt_engine.pipeline import run_pipeline
from dpt_engine.stages.common import StageContext
from dpt_engine.stages.stage2 import _training_labels
from dpt_engine.train import ema_decay_at

CLASSES = ["a", "b", "c"]


def _tiny_net(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_uvit(
        "uvit-tiny8", img_size=8, in_chans=1, num_classes=num_classes, embed_dim=32, depth=2, num_heads=2
    ).eval()


def test_clip_denoised_keeps_data_prediction_in_range():
    schedule = make_schedule("discrete-linear")
    x = torch.randn(6, 1, 8, 8) * 3
    t = torch.full((6,), 0.5, dtype=torch.float64)

    def wild(x, t):
        return torch.randn_like(x) * 50

    eps = clip_denoised_fn(wild, schedule)(x, t)
    a, s = (
        schedule.marginal_alpha(t).float().view(-1, 1, 1, 1),
        schedule.marginal_std(t).float().view(-1, 1, 1, 1),
    )
    x0 = (x - s * eps) / a
    assert float(x0.abs().max()) <= 1.0 + 1e-4


def _tiny_diffusion_cfg(**kw) -> DiffusionConfig:
    base = dict(steps=6, batch_size=16, checkpoint_every=2, log_every=2, warmup_steps=2)
    base.update(kw)
    return DiffusionConfig(**base)


def test_diffusion_training_resumes_exactly(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = DiffusionData(
        x=torch.rand(50, 1, 8, 8, generator=g) * 2 - 1,
        y=torch.randint(0, 3, (50,), generator=g),
        weight=None,
        num_classes=3,
    )
    cfg = _tiny_diffusion_cfg()
    ref = fit_diffusion(_tiny_net(), cfg, data, tmp_path / "ref", torch.device("cpu"), seed=3, progress=False)
    (tmp_path / "ref").mkdir(exist_ok=True)
    work = tmp_path / "killed"
    work.mkdir()
    monkeypatch.setenv("DPT_TEST_INTERRUPT_AT_STEP", "4")
    with pytest.raises(KeyboardInterrupt):
        fit_diffusion(_tiny_net(), cfg, data, work, torch.device("cpu"), seed=3, progress=False)
    monkeypatch.delenv("DPT_TEST_INTERRUPT_AT_STEP")
    res = fit_diffusion(_tiny_net(), cfg, data, work, torch.device("cpu"), seed=3, progress=False)
    assert res.resumed_from == 4
    for (k, a), b in zip(ref.ema.state_dict().items(), res.ema.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["loss"] for r in res.history] == [r["loss"] for r in ref.history]


def test_diffusion_loss_decreases(tmp_path):
    splits = build_splits(resolve_config("digits").data)
    x = splits.train.get_batch(torch.arange(256)).float() / 127.5 - 1
    data = DiffusionData(x=x, y=splits.train.labels[:256], weight=None, num_classes=10)
    cfg = _tiny_diffusion_cfg(
        steps=120, batch_size=32, log_every=20, checkpoint_every=120, lr=2e-3, warmup_steps=10
    )
    net = create_uvit(
        "uvit-tiny8", img_size=8, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=2
    )
    fit = fit_diffusion(net, cfg, data, tmp_path, torch.device("cpu"), seed=0, progress=False)
    assert fit.history[-1]["loss"] < 0.7 * fit.history[0]["loss"]


def test_ema_warmup():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10**7, 0.999) == 0.999


def test_training_label_choices(tmp_path):
    cfg = resolve_config("digits")
    splits = build_splits(cfg.data)
    n = len(splits.train)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    conf = np.linspace(0.2, 1.0, n).astype(np.float32)
    np.savez(stage1 / "pseudo_labels.npz", label=np.zeros(n, dtype=np.int64), confidence=conf)

    def labels(**kw):
        c = replace(cfg, stage2=replace(cfg.stage2, **kw))
        return _training_labels(StageContext(cfg=c, out=tmp_path, device=torch.device("cpu")), splits)

    y, w, info = labels()
    assert (y == 0).all() and w is None and info["label_source"] == "pseudo"
    y, w, info = labels(confidence_threshold=0.6)
    assert torch.equal(w > 0, torch.from_numpy(conf >= 0.6))
    assert info["kept_by_threshold"] == int((conf >= 0.6).sum())
    y, w, _ = labels(confidence_weighting=True)
    assert torch.allclose(w, torch.from_numpy(conf))
    y, w, _ = labels(label_source="true")
    assert torch.equal(y, splits.train.labels)


def test_full_pipeline_tiny(tmp_path):
    overrides = [
        "stage1.steps=16",
        "stage1.batch_size=8",
        "stage1.uratio=2",
        "stage1.eval_every=16",
        "stage1.checkpoint_every=16",
        "stage2.steps=30",
        "stage2.batch_size=32",
        "stage2.log_every=10",
        "stage2.checkpoint_every=10",
        "sample.images_per_class=3",
        "sample.steps=4",
        "sample.fid_num_images=24",
        "stage3.steps=8",
        "stage3.batch_size=8",
        "stage3.uratio=2",
        "stage3.eval_every=8",
        "stage3.checkpoint_every=8",
        "stage3.filter_pseudo=true",
        "run.threads=1",
    ]
    out = tmp_path / "run"
    report = run_pipeline(resolve_config("digits", overrides=overrides), out, progress=False)
    r = json.loads((out / "report.json").read_text())
    assert r == json.loads(json.dumps(report))
    for key in ("stage1.top1", "pseudo_labels.accuracy", "generation.fid", "stage3.top1", "stage3.gain"):
        assert r["metrics"][key] is not None, key
    assert r["generation"]["fid"] > 0
    assert (out / "sample" / "sample_grid.png").is_file()
    assert "sample/sample_grid.png" in r["plots"]
    assert len(list((out / "sample" / "samples").rglob("*.png"))) == 30
    manifest = json.loads((out / "sample" / "samples" / "manifest.json").read_text())
    assert manifest["num_images"] == 30
    assert set(r["wall_time_s"]) == {"stage1", "stage2", "sample", "stage3"}


def test_latent_space_stage2_and_sampling(tmp_path):
    """Stage 2 through a (tiny, randomly initialised) diffusers AutoencoderKL loaded from a directory."""
    from dpt_engine.models.autoencoder import LatentAutoencoder

    torch.manual_seed(0)
    ae_dir = tmp_path / "vae"
    LatentAutoencoder.from_config(in_channels=1, out_channels=1).save_pretrained(ae_dir)
    overrides = [
        "stage1.steps=4",
        "stage1.batch_size=8",
        "stage1.uratio=1",
        "stage1.eval_every=4",
        "stage1.checkpoint_every=4",
        f"stage2.autoencoder={ae_dir}",
        "stage2.hflip=true",
        "stage2.steps=6",
        "stage2.batch_size=16",
        "stage2.log_every=3",
        "stage2.checkpoint_every=3",
        "sample.images_per_class=2",
        "sample.steps=3",
        "sample.fid=false",
        "run.threads=1",
    ]
    out = tmp_path / "run"
    report = run_pipeline(
        resolve_config("digits", overrides=overrides),
        out,
        stages=("stage1", "stage2", "sample"),
        progress=False,
    )
    store = LatentStore(out / "stage2" / "latents")  # the memory-mapped latent store
    assert store.complete and store.latents.shape == (2 * 1297, 2, 4, 4, 4)  # images + flips, mean/logvar
    summary = json.loads((out / "stage2" / "summary.json").read_text())
    assert summary["latent_rows"] == 2 * 1297 and "unreadable_images_skipped" not in summary
    assert json.loads((out / "stage2" / "summary.json").read_text())["latent_shape"] == [4, 4, 4]
    imgs = list((out / "sample" / "samples").rglob("*.png"))
    assert len(imgs) == 20
    assert report["generation"]["num_images"] == 20


@pytest.mark.parametrize("order", [1, 2, 3])
def test_fused_guided_sampling_matches_eager(order):
    """The sample stage's fused path (guidance inside the solver step) equals the eager solve."""
    from dpt_engine.diffusion.guidance import doubled_eps_fn
    from dpt_engine.kernels.solver_step import sample_multistep_fused

    net = _tiny_net()
    schedule = make_schedule("discrete-linear")
    solver = DPMSolverPP(schedule, steps=6, order=order)
    c, i = torch.arange(3).repeat_interleave(4), torch.arange(4).repeat(3)  # every (class, index)
    x = initial_noise(1, c, i, (1, 8, 8), torch.float32, "cpu")
    with torch.no_grad():
        eager = solver.sample(cfg_eps_fn(net, c, 0.4, 3, schedule), x)
        fused = sample_multistep_fused(solver, doubled_eps_fn(net, c, 3, schedule), x, guidance_scale=0.4)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
