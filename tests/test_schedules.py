"""VP schedules: DDPM betas, knots, interpolation, inverses, network-time conventions, training helpers."""

from __future__ import annotations

import pytest
import torch

from dpt_engine.diffusion import (
    SCHEDULE_NAMES,
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    make_betas,
    make_schedule,
)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_betas_match_diffusers(kind: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=kind,
        beta_start={"linear": 1e-4, "scaled_linear": 0.00085}[kind],
        beta_end={"linear": 0.02, "scaled_linear": 0.012}[kind],
    )
    sched = DiscreteVPSchedule(kind)
    torch.testing.assert_close(sched.betas.float(), ref.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=0)


def test_beta_endpoints() -> None:
    b = make_betas("scaled_linear")
    assert b[0].item() == pytest.approx(0.00085) and b[-1].item() == pytest.approx(0.012)
    b = make_betas("linear")
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    with pytest.raises(ValueError):
        make_betas("cosine")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_discrete_knots_and_interpolation(kind: str) -> None:
    s = DiscreteVPSchedule(kind)
    n = torch.arange(1, 1001, dtype=torch.float64)
    # at t = n / N the schedule is exactly alpha_bar_n (1-based, betas 1..n)
    torch.testing.assert_close(s.marginal_alpha(n / 1000) ** 2, s.alphas_cumprod, rtol=1e-12, atol=0)
    # between knots log(alpha) is linear in t
    mid = s.marginal_log_mean_coeff((n[:-1] + 0.5) / 1000)
    torch.testing.assert_close(mid, 0.5 * (s.log_alpha_array[:-1] + s.log_alpha_array[1:]))
    t = torch.linspace(1e-3, 1.0, 777, dtype=torch.float64)
    torch.testing.assert_close(s.marginal_alpha(t) ** 2 + s.marginal_std(t) ** 2, torch.ones_like(t))
    assert (s.marginal_lambda(t).diff() < 0).all()
    assert s.T == 1.0 and s.eps_t == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "schedule",
    [DiscreteVPSchedule("linear"), DiscreteVPSchedule("scaled_linear"), ContinuousVPSchedule()],
    ids=repr,
)
def test_inverse_lambda_round_trip(schedule) -> None:
    t = torch.linspace(schedule.eps_t, 1.0, 1001, dtype=torch.float64)
    torch.testing.assert_close(schedule.inverse_lambda(schedule.marginal_lambda(t)), t, rtol=1e-9, atol=1e-12)
    # float32 inputs stay float32
    assert schedule.marginal_lambda(t.float()).dtype == torch.float32


def test_continuous_closed_form() -> None:
    s = ContinuousVPSchedule(beta_0=0.1, beta_1=20.0)
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    # log alpha_t = -1/2 int_0^t beta(u) du, by the trapezoid rule on a fine grid
    u = torch.linspace(0.0, 1.0, 200001, dtype=torch.float64)
    cum = torch.cumulative_trapezoid(0.1 + u * 19.9, u)
    idx = (t * 200000).round().long().clamp(min=1) - 1
    expect = torch.where(t > 0, -0.5 * cum[idx], torch.zeros_like(t))
    torch.testing.assert_close(s.marginal_log_mean_coeff(t), expect, rtol=1e-8, atol=1e-10)
    assert s.marginal_alpha(1.0).item() == pytest.approx(torch.exp(torch.tensor(-5.025)).item())


def test_network_time_conventions() -> None:
    t = torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64)
    # U-ViT / DPT discrete models take the 1-based step n = N t
    torch.testing.assert_close(DiscreteVPSchedule().network_time(t), t.new_tensor([1.0, 500.0, 1000.0]))
    # DPM-Solver / diffusers convention: the 0-based index n - 1
    torch.testing.assert_close(
        DiscreteVPSchedule(time_input="dpm_solver").network_time(t), t.new_tensor([0.0, 499.0, 999.0])
    )
    # U-ViT-L continuous: t * 999
    torch.testing.assert_close(ContinuousVPSchedule().network_time(t), t * 999)
    with pytest.raises(ValueError):
        DiscreteVPSchedule(time_input="zero")  # type: ignore[arg-type]


def test_sample_time_and_add_noise() -> None:
    disc, cont = DiscreteVPSchedule(), ContinuousVPSchedule()
    t = disc.sample_time(4096, torch.Generator().manual_seed(0))
    n = t * 1000
    assert t.dtype == torch.float32 and torch.allclose(n, n.round(), atol=1e-3)
    assert n.round().min() >= 1 and n.round().max() <= 1000 and n.round().unique().numel() > 900
    torch.testing.assert_close(t, disc.sample_time(4096, torch.Generator().manual_seed(0)))
    tc = cont.sample_time(4096, torch.Generator().manual_seed(0))
    assert tc.min() >= cont.eps_t and tc.max() <= 1.0

    x0 = torch.randn(5, 3, 4, 4)
    noise = torch.randn(5, 3, 4, 4)
    tt = torch.tensor([0.001, 0.1, 0.25, 0.7, 1.0])
    xt = disc.add_noise(x0, noise, tt)
    a = disc.marginal_alpha(tt.double()).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a * x0 + (1 - a**2).sqrt() * noise)
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    k = (tt * 1000).round().long() - 1  # diffusers' 0-based timestep for our knot t = (k + 1) / N
    torch.testing.assert_close(xt, ref.add_noise(x0, noise, k), rtol=1e-5, atol=1e-5)


def test_make_schedule() -> None:
    assert set(SCHEDULE_NAMES) == {"discrete-linear", "discrete-scaled-linear", "vp-linear"}
    assert make_schedule("discrete-linear").betas[-1].item() == pytest.approx(0.02)
    assert make_schedule("discrete-scaled-linear").betas[-1].item() == pytest.approx(0.012)
    s = make_schedule("vp-linear", eps_t=1e-4)
    assert isinstance(s, ContinuousVPSchedule) and s.eps_t == 1e-4
    with pytest.raises(ValueError, match="vp-linear"):
        make_schedule("cosine")
