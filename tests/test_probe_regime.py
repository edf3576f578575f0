"""benchmarks/quality/probe_regime.py: DPT with a linear probe on SimCLR features, on held-out images."""

from __future__ import annotations

import pytest
import torch

from benchmarks.quality.probe_regime import main, nt_xent
from dpt_engine.utils.io import read_json

TINY = [
    "stage2.steps=4", "stage2.checkpoint_every=4", "sample.images_per_class=3", "sample.steps=2",
    "sample.fid=false",
]  # fmt: skip


def test_nt_xent_prefers_matching_views():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    twins = torch.cat([a, a + 0.01 * torch.randn(8, 16)])
    strangers = torch.cat([a, torch.randn(8, 16)])
    assert nt_xent(twins, 0.2) < nt_xent(strangers, 0.2)
    # perfectly aligned, well-separated views: the loss approaches its floor of 0
    e = torch.eye(8).repeat(2, 1) * 10
    assert nt_xent(e, 0.05) < 1e-3
    with pytest.raises(ValueError, match="even number"):
        nt_xent(torch.randn(5, 4), 0.2)


@pytest.mark.slow
def test_probe_regime_runs_dpt_with_linear_probes_and_resumes(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--preset", "digits", "--holdout", "100", "--seeds", "0", "--ssl-steps", "6", "--ssl-batch", "16",
            "--out", str(out), "--results", str(results), "--no-progress", "--set", *TINY]  # fmt: skip
    assert main(argv) == 0
    res = read_json(results / "probe_regime_digits.json")
    run = res["runs"]["0"]
    assert run["gain"] == pytest.approx(run["stage3"] - run["stage1"])
    assert run["ssl_wall_time_s"] > 0 and set(run["wall_time_s"]) >= {"stage1", "stage2", "sample", "stage3"}
    report = read_json(out / "s0_dpt" / "report.json")
    assert report["eval_split"] == "holdout of 100 training images"  # the test split is never read
    assert report["stage1"]["learner"] == "linear-probe"
    backbone = out / "s0_ssl" / "backbone.pt"
    assert backbone.is_file() and not (out / "s0_ssl" / "simclr_state.pt").exists()
    # the probe's backbone is the pretrained one: different from the same seed's random initialisation
    from dpt_engine.models.classifiers import create_classifier

    torch.manual_seed(0)
    fresh = create_classifier("cnn-small", 10, 1, 8).state_dict()
    trained = torch.load(backbone, weights_only=True)
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh if "fc" not in k)
    mtime = backbone.stat().st_mtime_ns
    assert main(argv) == 0  # a rerun reuses the pretraining and every finished stage
    assert backbone.stat().st_mtime_ns == mtime
    assert read_json(results / "probe_regime_digits.json")["runs"]["0"]["stage3"] == run["stage3"]
    assert "Mean gain of the probe's stage 3" in (results / "probe_regime_digits.md").read_text()


def test_simclr_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import benchmarks.quality.probe_regime as pr
    from dpt_engine.data.base import ArrayImageDataset

    gen = torch.Generator().manual_seed(1)
    images = ArrayImageDataset(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=gen),
                               torch.zeros(40, dtype=torch.long), classes=[str(i) for i in range(10)])  # fmt: skip
    kw = dict(steps=4, batch_size=8, bf16=False, checkpoint_every=2, progress=False)
    whole = pr.pretrain_simclr(images, "cnn-small", 10, tmp_path / "a", **kw)
    assert not (tmp_path / "a" / "simclr_state.pt").exists()

    calls = []

    def stop_at_step_3(z, t):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(z, t)

    real = pr.nt_xent
    monkeypatch.setattr(pr, "nt_xent", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pr.pretrain_simclr(images, "cnn-small", 10, tmp_path / "b", **kw)
    assert (tmp_path / "b" / "simclr_state.pt").is_file() and not (tmp_path / "b" / "backbone.pt").exists()
    resumed = []
    monkeypatch.setattr(pr, "nt_xent", lambda z, t: resumed.append(1) or real(z, t))
    part = pr.pretrain_simclr(images, "cnn-small", 10, tmp_path / "b", **kw)
    assert len(resumed) == 2  # steps 3 and 4 only: it continued from the step-2 checkpoint
    assert part["settings"] == whole["settings"]
    a = torch.load(tmp_path / "a" / "backbone.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "backbone.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
