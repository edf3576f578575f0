"""Training guards and single-process engine options: non-finite losses, OOM hints, MFU, TensorBoard,
gradient accumulation and checkpointing, config validation."""

from __future__ import annotations

import pytest
import torch

from dpt_engine.config.base import ConfigError
from dpt_engine.config.schema import DiffusionConfig
from dpt_engine.diffusion.schedules import make_schedule
from dpt_engine.diffusion.trainer import DiffusionData, fit_diffusion
from dpt_engine.models.uvit import create_uvit, flops_per_forward
from dpt_engine.train import (
    NonFiniteLossError,
    ThroughputMeter,
    draw_global_batch,
    oom_hint,
    peak_flops,
    setup_process_group,
)

CPU = torch.device("cpu")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_uvit(
        "uvit-tiny8", img_size=8, in_chans=1, num_classes=3, embed_dim=32, depth=2, num_heads=2
    )


def _data(n: int = 40) -> DiffusionData:
    g = torch.Generator().manual_seed(0)
    return DiffusionData(
        x=torch.rand(n, 1, 8, 8, generator=g) * 2 - 1,
        y=torch.randint(0, 3, (n,), generator=g),
        weight=None,
        num_classes=3,
    )


def _cfg(**kw) -> DiffusionConfig:
    base = dict(steps=6, batch_size=8, log_every=1, checkpoint_every=100, warmup_steps=1, lr=2e-3)
    base.update(kw)
    return DiffusionConfig(**base)


def test_non_finite_steps_are_skipped_exactly(tmp_path):
    """One NaN image: exactly the steps whose global batch draws it are skipped; weights stay finite."""
    data, cfg = _data(), _cfg(steps=8, max_bad_steps=8)
    # replay the generator's draws (they do not depend on pixel values) to know which steps draw
    # the poisoned image: the first image of step 0's batch
    gen, schedule = torch.Generator().manual_seed(1), make_schedule(cfg.schedule)
    draws = [
        draw_global_batch(data, 8, schedule, gen, cfg.hflip, cfg.label_dropout).idx for _ in range(cfg.steps)
    ]
    poisoned = int(draws[0][0])
    bad = [bool((idx == poisoned).any()) for idx in draws]
    data.x[poisoned] = float("nan")
    fit = fit_diffusion(_net(), cfg, data, tmp_path, CPU, seed=1, progress=False)
    assert 0 < sum(bad) < cfg.steps, "the seed must give both good and bad steps"
    assert fit.history[-1]["skipped_steps"] == sum(bad)
    for rec, b in zip(fit.history, bad):  # log_every=1: one record per step
        assert (rec["loss"] != rec["loss"]) == b  # NaN exactly on the skipped steps
    assert all(torch.isfinite(v).all() for v in fit.ema.state_dict().values())


def test_too_many_bad_steps_stop_with_a_clear_error(tmp_path):
    data = _data()
    data.x[:] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row.*stage2\.max_bad_steps"):
        fit_diffusion(_net(), _cfg(max_bad_steps=3), data, tmp_path, CPU, seed=0, progress=False)


def test_oom_hint_names_the_remedies():
    with pytest.raises(torch.OutOfMemoryError) as e:
        with oom_hint(micro_batch=32, global_batch=256, grad_accum=1, grad_checkpointing=False):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    msg = str(e.value)
    assert (
        "micro-batch of 32" in msg and "stage2.grad_accum" in msg and "stage2.grad_checkpointing=true" in msg
    )
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(ValueError, match="unrelated"):  # anything else passes through untouched
        with oom_hint(32, 256, 1, False):
            raise ValueError("unrelated")


def test_mfu_from_model_flops_and_peak(monkeypatch):
    cfg = create_uvit("uvit-tiny8").cfg
    meter = ThroughputMeter(3.0 * flops_per_forward(cfg), world_size=2, peak=1e12, peak_source="test")
    meter.add(1000)
    out = meter.read()
    expected = out["images_per_s"] * 3.0 * flops_per_forward(cfg) / 2e12
    assert out["mfu"] == pytest.approx(expected)
    assert ThroughputMeter(None, 1, None, "unknown").read()["mfu"] is None
    monkeypatch.setenv("DPT_PEAK_TFLOPS", "989")
    assert peak_flops(CPU, bf16=True) == (989e12, "DPT_PEAK_TFLOPS")
    monkeypatch.delenv("DPT_PEAK_TFLOPS")
    measured, source = peak_flops(CPU, bf16=False)
    assert measured > 1e8 and source == "measured CPU matmul"


def test_history_and_tensorboard_carry_throughput(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit = fit_diffusion(
        _net(), _cfg(steps=4, log_every=2, tensorboard=True), _data(), tmp_path, CPU, seed=0, progress=False
    )
    assert [r["step"] for r in fit.history] == [2, 4]
    assert all(r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0 for r in fit.history)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("stage2/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"])) for r in fit.history]


def test_grad_accumulation_and_checkpointing_match_plain_training(tmp_path):
    """grad_accum=4 sums four micro-batch gradients to the same step (fp rounding); activation
    checkpointing recomputes the same values (bit-identical on the CPU)."""
    data = _data()
    ref = fit_diffusion(_net(), _cfg(), data, tmp_path / "ref", CPU, seed=2, progress=False)
    acc = fit_diffusion(_net(), _cfg(grad_accum=4), data, tmp_path / "acc", CPU, seed=2, progress=False)
    ckp = fit_diffusion(
        _net(), _cfg(grad_checkpointing=True), data, tmp_path / "ckp", CPU, seed=2, progress=False
    )
    ref_loss = torch.tensor([r["loss"] for r in ref.history])
    torch.testing.assert_close(torch.tensor([r["loss"] for r in acc.history]), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        torch.tensor([r["grad_norm"] for r in acc.history]),
        torch.tensor([r["grad_norm"] for r in ref.history]),
        rtol=1e-5,
        atol=0,
    )
    assert torch.equal(torch.tensor([r["loss"] for r in ckp.history]), ref_loss)
    for k, v in ref.ema.state_dict().items():
        assert torch.equal(ckp.ema.state_dict()[k], v), k


def test_bad_settings_fail_clearly(monkeypatch):
    with pytest.raises(ConfigError, match=r"not divisible by stage2\.grad_accum"):
        DiffusionConfig(batch_size=10, grad_accum=4).validate()
    with pytest.raises(ConfigError, match=r"offload_optimizer=true needs stage2\.strategy=deepspeed"):
        DiffusionConfig(strategy="ddp", offload_optimizer=True).validate()
    with pytest.raises(ConfigError, match="zero_stage must be"):
        DiffusionConfig(strategy="deepspeed", zero_stage=4).validate()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ValueError, match=r"stage2\.strategy=single but this process is rank 1 of WORLD_SIZE=2"
    ):
        setup_process_group("single", CPU)
