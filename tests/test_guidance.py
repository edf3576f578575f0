"""Classifier-free guidance wrappers and deterministic per-sample initial noise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpt_engine.diffusion import (
    DiscreteVPSchedule,
    DPMSolverPP,
    cfg_combine,
    cfg_eps_fn,
    initial_noise,
    sample_seed,
    two_forward_eps_fn,
)
from dpt_engine.diffusion.guidance import AUTO_GUIDANCE_FORWARDS, doubled_eps_fn, resolve_guidance_forwards
from dpt_engine.models.uvit import create_uvit


class Recorder(nn.Module):
    """Wraps a net and records the (batch size, labels, time) of every forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.calls.append((x.shape[0], y.clone() if y is not None else None, t.clone()))
        return self.net(x, t, y)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return create_uvit("uvit-tiny8").eval()


def _batch(net: nn.Module, b: int = 4):
    g = torch.Generator().manual_seed(1)
    cfg = net.cfg
    x = torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    y = torch.randint(0, cfg.num_classes, (b,), generator=g)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.999 + 1e-3
    return x, y, t


def test_batched_cfg_equals_two_forwards(net: nn.Module) -> None:
    sched = DiscreteVPSchedule()
    x, y, t = _batch(net)
    rec = Recorder(net)
    with torch.no_grad():
        batched = cfg_eps_fn(rec, y, 0.4, net.cfg.null_class_id, sched)(x, t)
        assert [c[0] for c in rec.calls] == [8]  # one forward of 2B
        _, labels, t_net = rec.calls[0]
        assert torch.equal(labels, torch.cat([y, torch.full_like(y, net.cfg.num_classes)]))
        torch.testing.assert_close(t_net, torch.cat([t, t]) * 1000)  # network time, both halves
        rec.calls.clear()
        two = two_forward_eps_fn(rec, y, 0.4, net.cfg.null_class_id, sched)(x, t)
        assert [c[0] for c in rec.calls] == [4, 4]
        cond = net(x, sched.network_time(t), y)
        uncond = net(x, sched.network_time(t), torch.full_like(y, net.cfg.null_class_id))
    torch.testing.assert_close(batched, two, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, cond + 0.4 * (cond - uncond), rtol=1e-6, atol=1e-6)


def test_guidance_forwards_choice_keeps_the_result(net: nn.Module) -> None:
    """``forwards="two"`` gives the doubled contract (``[cond; uncond]``, 2B rows) and the guided
    eps from two forwards of B; ``auto`` resolves per device type from the measured table."""
    sched = DiscreteVPSchedule()
    x, y, t = _batch(net)
    null = net.cfg.null_class_id
    rec = Recorder(net)
    with torch.no_grad():
        one = doubled_eps_fn(rec, y, null, sched)(x, t)
        assert [c[0] for c in rec.calls] == [8]
        rec.calls.clear()
        two = doubled_eps_fn(rec, y, null, sched, forwards="two")(x, t)
        assert [c[0] for c in rec.calls] == [4, 4]
        assert torch.equal(rec.calls[1][1], torch.full_like(y, null))
        rec.calls.clear()
        guided_two = cfg_eps_fn(rec, y, 0.4, null, sched, forwards="two")(x, t)
        assert [c[0] for c in rec.calls] == [4, 4]
    assert two.shape == one.shape == (8, *x.shape[1:])
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)
    cond, uncond = two.chunk(2)
    torch.testing.assert_close(guided_two, cond + 0.4 * (cond - uncond), rtol=1e-6, atol=1e-6)
    for device in ("cpu", "cuda"):
        assert resolve_guidance_forwards("auto", device) == AUTO_GUIDANCE_FORWARDS[device]
        assert resolve_guidance_forwards("two", device) == "two"
    with pytest.raises(ValueError, match="doubled"):
        resolve_guidance_forwards("three", "cpu")


def test_scale_zero_is_a_single_conditional_forward(net: nn.Module) -> None:
    sched = DiscreteVPSchedule()
    x, y, t = _batch(net)
    rec = Recorder(net)
    with torch.no_grad():
        out = cfg_eps_fn(rec, y, 0.0, net.cfg.null_class_id, sched)(x, t)
        assert [c[0] for c in rec.calls] == [4] and torch.equal(rec.calls[0][1], y)
        torch.testing.assert_close(out, net(x, sched.network_time(t), y))
        rec.calls.clear()
        two_forward_eps_fn(rec, y, 0.0, net.cfg.null_class_id, sched)(x, t)
        assert [c[0] for c in rec.calls] == [4]
    with pytest.raises(ValueError):
        cfg_eps_fn(net, None, 0.4, net.cfg.null_class_id, sched)


def test_combine_conventions() -> None:
    cond, uncond = torch.randn(3, 5), torch.randn(3, 5)
    w = 0.4
    torch.testing.assert_close(cfg_combine(cond, uncond, w), uncond + (1 + w) * (cond - uncond))
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), cond)


def test_guided_sampling_end_to_end(net: nn.Module) -> None:
    sched = DiscreteVPSchedule()
    _, y, _ = _batch(net)
    x_T = initial_noise(0, y, torch.arange(4), (1, 8, 8))
    solver = DPMSolverPP(sched, 6, order=2)
    with torch.no_grad():
        a = solver.sample(cfg_eps_fn(net, y, 0.4, net.cfg.null_class_id, sched), x_T)
        b = solver.sample(two_forward_eps_fn(net, y, 0.4, net.cfg.null_class_id, sched), x_T)
    assert a.shape == x_T.shape and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ deterministic initial noise
def test_sample_seed_is_a_stable_hash() -> None:
    s = sample_seed(0, 3, 7)
    assert s == sample_seed(0, 3, 7) and 0 <= s < 2**63
    seeds = {sample_seed(seed, c, i) for seed in range(3) for c in range(10) for i in range(50)}
    assert len(seeds) == 3 * 10 * 50
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)
    with pytest.raises(ValueError):
        sample_seed(0, -1, 0)


def test_initial_noise_rows_independent_of_batch() -> None:
    shape = (4, 8, 8)
    classes = torch.tensor([0, 0, 5, 9, 9, 3])
    indices = torch.tensor([0, 1, 17, 2, 3, 127])
    full = initial_noise(42, classes, indices, shape)
    assert full.shape == (6, *shape) and full.dtype == torch.float32
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled = initial_noise(42, classes[perm], indices[perm], shape)
    assert torch.equal(shuffled, full[perm])
    for b in range(6):  # batch of one
        assert torch.equal(initial_noise(42, classes[b : b + 1], indices[b : b + 1], shape)[0], full[b])
    assert torch.equal(initial_noise(42, [5, 9], [17, 2], shape), full[2:4])
    assert not torch.equal(initial_noise(43, classes, indices, shape), full)
    assert not torch.equal(full[0], full[1])
    half = initial_noise(42, classes, indices, shape, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.bfloat16())
    assert abs(full.mean().item()) < 0.1 and abs(full.std().item() - 1) < 0.1
