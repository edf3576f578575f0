"""DPM-Solver++ against closed-form Gaussian flows and against diffusers.

Gaussian data ``x0 ~ N(mu, diag(s^2))`` makes both the optimal noise predictor and the exact
probability-flow ODE solution analytic (per dimension, with ``v_t = alpha_t^2 s^2 + sigma_t^2``)::

    eps*(x, t) = E[eps | x_t = x] = sigma_t (x - alpha_t mu) / v_t
    x_t = alpha_t mu + sqrt(v_t) z,   z = (x_T - alpha_T mu) / sqrt(v_T)   (the flow keeps z fixed)

Everything runs in float64, so the measured errors are pure discretisation error of the solver.
Max-abs errors measured on this problem (16 samples x 64 dims, mu in [-1, 1], s in [0.25, 1.5]),
worst over the three schedules (discrete scaled_linear / linear, continuous linear VP):

    logSNR steps, 20 -> 50 steps     order 1          order 2          order 3
      multistep                 4.4e-1 -> 1.8e-1  5.1e-2 -> 8.9e-3  2.9e-2 -> 3.4e-3
      singlestep                4.4e-1 -> 1.8e-1  1.8e-1 -> 3.3e-2  2.4e-3 -> 4.0e-4
    time_uniform steps
      multistep                 3.1e-1 -> 1.3e-1  3.3e-1 -> 9.4e-2  5.9e-1 -> 8.6e-2
      singlestep                3.1e-1 -> 1.3e-1  7.8e-2 -> 2.1e-2  9.1e-2 -> 2.5e-2

Observed convergence rates (20 -> 50 steps, logSNR): ~1.0 for order 1 and ~1.9-2.4 for orders 2
and 3. The reference third-order multistep (DPM-Solver / diffusers coefficients) converges at
~2: its D2 term carries half the weight of the exact quadratic integral (see
``dpt_engine.diffusion.dpm_solver``); ``third_order="exact"`` converges at ~4 where the lower-order
warm-up is harmless. With time-uniform steps the last step spans a large lambda interval (e.g.
lambda 1.7 -> 4.6 at 20 steps for the continuous schedule), so at 20 steps the solver is not yet in
its asymptotic regime and multistep order 2/3 are no better than order 1; from 50 steps on the
higher orders win. The bounds below are the measured values with ~1.5-2x margin.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpt_engine.diffusion import (
    COEF_COLUMNS,
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    DPMSolverPP,
    singlestep_orders,
)

SCHEDULES = {
    "discrete-scaled_linear": lambda: DiscreteVPSchedule("scaled_linear"),
    "discrete-linear": lambda: DiscreteVPSchedule("linear"),
    "continuous": lambda: ContinuousVPSchedule(),
}


class Gaussian:
    def __init__(self, schedule, dims: int = 64, batch: int = 16) -> None:
        self.schedule = schedule
        self.mu = torch.linspace(-1.0, 1.0, dims, dtype=torch.float64)
        self.s = torch.linspace(0.25, 1.5, dims, dtype=torch.float64)
        self.x_T = torch.randn(batch, dims, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.schedule.marginal_alpha(t)[:, None]  # (B, 1)
        sg = self.schedule.marginal_std(t)[:, None]
        return sg * (x - a * self.mu) / (a * a * self.s**2 + sg * sg)

    def exact(self, t_start: float, t_end: float, x: torch.Tensor) -> torch.Tensor:
        a0, s0 = float(self.schedule.marginal_alpha(t_start)), float(self.schedule.marginal_std(t_start))
        a1, s1 = float(self.schedule.marginal_alpha(t_end)), float(self.schedule.marginal_std(t_end))
        z = (x - a0 * self.mu) / torch.sqrt(a0 * a0 * self.s**2 + s0 * s0)
        return a1 * self.mu + torch.sqrt(a1 * a1 * self.s**2 + s1 * s1) * z

    def error(self, solver: DPMSolverPP) -> float:
        out = solver.sample(self.eps, self.x_T)
        ref = self.exact(float(solver.timesteps[0]), float(solver.timesteps[-1]), self.x_T)
        return (out - ref).abs().max().item()


def _rate(e_coarse: float, e_fine: float, n_coarse: int = 20, n_fine: int = 50) -> float:
    return math.log(e_coarse / e_fine) / math.log(n_fine / n_coarse)


# max-abs error bounds at 50 steps (measured worst case x ~1.5-2)
LOGSNR_BOUND_50 = {"multistep": {1: 0.3, 2: 0.015, 3: 0.006}, "singlestep": {1: 0.3, 2: 0.05, 3: 8e-4}}
TIME_UNIFORM_BOUND_50 = {"multistep": {1: 0.2, 2: 0.15, 3: 0.13}, "singlestep": {1: 0.2, 2: 0.035, 3: 0.04}}


@pytest.mark.parametrize("method", ["multistep", "singlestep"])
@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_logsnr_converges_to_exact_flow(sched: str, method: str) -> None:
    g = Gaussian(SCHEDULES[sched]())
    err = {
        (k, n): g.error(DPMSolverPP(g.schedule, n, order=k, method=method, skip_type="logSNR"))
        for k in (1, 2, 3)
        for n in (20, 50)
    }
    for k in (1, 2, 3):
        assert err[k, 50] < LOGSNR_BOUND_50[method][k], (k, err)
        assert err[k, 50] < err[k, 20]
    for n in (20, 50):
        assert err[2, n] < 0.5 * err[1, n], err
        assert err[3, n] < err[2, n], err
    assert 0.85 < _rate(err[1, 20], err[1, 50]) < 1.15, err
    assert _rate(err[2, 20], err[2, 50]) > 1.7, err
    assert _rate(err[3, 20], err[3, 50]) > 1.8, err


@pytest.mark.parametrize("method", ["multistep", "singlestep"])
@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_time_uniform_converges(sched: str, method: str) -> None:
    g = Gaussian(SCHEDULES[sched]())
    err = {
        (k, n): g.error(DPMSolverPP(g.schedule, n, order=k, method=method, skip_type="time_uniform"))
        for k in (1, 2, 3)
        for n in (20, 50)
    }
    for k in (1, 2, 3):
        assert err[k, 50] < TIME_UNIFORM_BOUND_50[method][k], (k, err)
        assert err[k, 50] < 0.7 * err[k, 20], (k, err)
    assert err[2, 50] < err[1, 50] and err[3, 50] < err[1, 50], err
    assert 0.85 < _rate(err[1, 20], err[1, 50]) < 1.15, err


@pytest.mark.parametrize("sched", ["discrete-linear", "continuous"])
def test_exact_third_order_variant_is_fourth_order_here(sched: str) -> None:
    g = Gaussian(SCHEDULES[sched]())
    e = {
        (v, n): g.error(DPMSolverPP(g.schedule, n, order=3, skip_type="logSNR", third_order=v))
        for v in ("reference", "exact")
        for n in (20, 50)
    }
    assert _rate(e["exact", 20], e["exact", 50]) > 3.5, e  # measured 4.0
    assert _rate(e["reference", 20], e["reference", 50]) < 2.6, e  # measured 2.4: effectively 2nd order
    assert e["exact", 50] < e["reference", 50] / 5, e  # 2.7e-4 vs 3.3e-3


@pytest.mark.parametrize(
    "method,order",
    [("multistep", 1), ("multistep", 2), ("multistep", 3), ("singlestep", 2), ("singlestep", 3)],
)
@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_constant_data_prediction_is_integrated_exactly(sched: str, method: str, order: int) -> None:
    """If x0_theta == c, every order reduces to the exact solution
    x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - sigma_t alpha_s / (alpha_t sigma_s)) c."""
    schedule = SCHEDULES[sched]()
    c = torch.linspace(-1, 1, 8, dtype=torch.float64)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x - schedule.marginal_alpha(t)[:, None] * c) / schedule.marginal_std(t)[:, None]

    solver = DPMSolverPP(schedule, 12, order=order, method=method)
    x_T = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t0, t1 = solver.timesteps[0], solver.timesteps[-1]
    a0, s0, a1, s1 = (float(f(t)) for t in (t0, t1) for f in (schedule.marginal_alpha, schedule.marginal_std))
    expected = a1 * c + (s1 / s0) * (x_T - a0 * c)
    torch.testing.assert_close(solver.sample(eps_fn, x_T), expected, rtol=1e-10, atol=1e-10)


def test_first_order_step_is_ddim() -> None:
    """DPM-Solver++-1: x_t = alpha_t x0_hat + sigma_t eps_hat (DDIM, eta = 0)."""
    schedule = DiscreteVPSchedule("linear")
    solver = DPMSolverPP(schedule, 5, order=1)
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x0 = solver.data_prediction(0, x, eps)
    t0, t1 = solver.timesteps[0:2]
    torch.testing.assert_close(x0, (x - schedule.marginal_std(t0) * eps) / schedule.marginal_alpha(t0))
    ddim = schedule.marginal_alpha(t1) * x0 + schedule.marginal_std(t1) * eps
    torch.testing.assert_close(solver.step(0, x, [x0]), ddim)


def test_table_api_matches_sample_and_needs_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    g = Gaussian(DiscreteVPSchedule("scaled_linear"), dims=8, batch=4)
    solver = DPMSolverPP(g.schedule, 9, order=3)
    assert solver.coefficients.shape == (9, len(COEF_COLUMNS)) and solver.coefficients.dtype == torch.float64
    assert solver.orders == [1, 2, 3, 3, 3, 3, 3, 2, 1]  # warm-up, then lower_order_final (< 10 steps)
    assert (solver.coefficients[0, 2:4] == 0).all() and (solver.coefficients[1, 3] == 0)
    x, hist = g.x_T, []
    for i, t in enumerate(solver.timesteps[:-1]):
        x0 = solver.data_prediction(i, x, g.eps(x, t.expand(x.shape[0])))
        hist = [x0, *hist[:2]]
        x = solver.step(i, x, hist)

    def boom(*args, **kwargs):
        raise AssertionError("host sync inside the sampling loop")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, boom)

    def eps_fn(xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # no host reads of t either
        a = torch.exp(g.schedule.marginal_log_mean_coeff(t))[:, None]
        sg = torch.sqrt(1 - a * a)
        return sg * (xx - a * g.mu) / (a * a * g.s**2 + sg * sg)

    out = solver.sample(eps_fn, g.x_T)
    traj = solver.sample_trajectory(eps_fn, g.x_T)
    monkeypatch.undo()
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    assert len(traj) == 10 and torch.equal(traj[-1], out) and torch.equal(traj[0], g.x_T)


def test_time_grids_and_orders() -> None:
    disc, cont = DiscreteVPSchedule(), ContinuousVPSchedule()
    s = DPMSolverPP(disc, 20)
    assert s.timesteps[0] == 1.0 and s.timesteps[-1] == pytest.approx(1e-3)
    torch.testing.assert_close(s.timesteps, torch.linspace(1.0, 1e-3, 21, dtype=torch.float64))
    assert s.orders == [1] + [2] * 19  # no lower_order_final at >= 10 steps (DPM-Solver's rule)
    assert DPMSolverPP(disc, 20, lower_order_final_below=25).orders[-2:] == [2, 1]
    lam = cont.marginal_lambda(DPMSolverPP(cont, 10, skip_type="logSNR").timesteps)
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(10), rtol=1e-9, atol=1e-12)
    assert singlestep_orders(50, 3) == [3] * 16 + [2]
    assert singlestep_orders(21, 3) == [3] * 6 + [2, 1]
    assert singlestep_orders(22, 3) == [3] * 7 + [1]
    assert singlestep_orders(7, 2) == [2, 2, 2, 1]
    ss = DPMSolverPP(disc, 50, order=3, method="singlestep")
    assert ss.orders == singlestep_orders(50, 3) and ss.timesteps.numel() == 18
    with pytest.raises(ValueError):
        DPMSolverPP(disc, 10, order=4)
    with pytest.raises(ValueError):
        DPMSolverPP(disc, 10, timesteps=[0.5, 0.7])


# ------------------------------------------------------------------------ diffusers agreement
diffusers = pytest.importorskip("diffusers")


def _diffusers_run(schedule: DiscreteVPSchedule, order: int, steps: int, eps_fn, x_T: torch.Tensor):
    """Run diffusers' DPMSolverMultistepScheduler with the same betas and model.

    Timestep matching: diffusers' integer timestep k indexes alphas_cumprod[k] (0-based), which is
    our knot t = (k + 1) / N. Its 'linspace' spacing gives round(linspace(N - 1, 0, steps + 1))[:-1]
    plus a final sigma at k = 0 with final_sigmas_type='sigma_min'; we pass exactly those times
    ((k + 1) / N, then 1 / N) as our grid. When (N - 1) / steps is an integer (steps = 27, 37)
    no rounding happens and our native 'time_uniform' grid linspace(1, 1/N, steps + 1) coincides.
    Its lower-order final steps apply below 15 steps, so we set lower_order_final_below=15.
    """
    n = schedule.num_train_timesteps
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=n,
        trained_betas=schedule.betas.float().numpy(),
        solver_order=order,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="sigma_min",
        timestep_spacing="linspace",
        prediction_type="epsilon",
    )
    sched.set_timesteps(steps)
    x = x_T.clone()
    for k in sched.timesteps:
        t = torch.full((x.shape[0],), (int(k) + 1) / n, dtype=torch.float64)
        x = sched.step(eps_fn(x, t), k, x).prev_sample
    grid = [(int(k) + 1) / n for k in sched.timesteps] + [1.0 / n]
    return x, grid


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= notice inside diffusers
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
@pytest.mark.parametrize("steps", [10, 20, 27])
def test_matches_diffusers_multistep(beta_schedule: str, order: int, steps: int) -> None:
    schedule = DiscreteVPSchedule(beta_schedule)
    g = Gaussian(schedule, dims=32, batch=4)
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(4)) * 0.05

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # Gaussian eps + a nonlinear term
        out = g.eps(x.double(), t) + 0.1 * torch.tanh(x.double() @ w.double() + t[:, None])
        return out.to(x.dtype)

    x_T = g.x_T.float()
    ref, grid = _diffusers_run(schedule, order, steps, eps_fn, x_T)
    ours = DPMSolverPP(schedule, steps, order=order, timesteps=grid, lower_order_final_below=15)
    out = ours.sample(eps_fn, x_T)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel  # measured <= 1.2e-5 (diffusers runs in float32)
    if steps == 27:
        native = DPMSolverPP(schedule, steps, order=order, lower_order_final_below=15)
        torch.testing.assert_close(native.timesteps, torch.tensor(grid, dtype=torch.float64))
        assert ((native.sample(eps_fn, x_T) - ref).norm() / ref.norm()).item() < 1e-4
