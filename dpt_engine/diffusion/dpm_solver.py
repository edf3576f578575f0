"""DPM-Solver++ (Lu et al., 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095; DPM-Solver: arXiv:2206.00927) for VP schedules.

The probability-flow ODE of a VP diffusion, written with the data prediction
``x0_theta(x, t) = (x - sigma_t * eps_theta(x, t)) / alpha_t`` and ``lambda = log(alpha/sigma)``,
has the exact variation-of-constants solution from ``s`` to ``t`` (``h = lambda_t - lambda_s``)::

    x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^{lambda} x0_theta(lambda) dlambda.

Expanding ``x0_theta`` in ``lambda`` around ``lambda_s`` and integrating term by term gives, with
``phi_1 = expm1(-h)``, ``phi_2 = phi_1 / h + 1``, ``phi_3 = phi_2 / h - 1/2``::

    x_t = (sigma_t/sigma_s) x_s - alpha_t phi_1 x0 + alpha_t h phi_2 x0' - alpha_t h^2 phi_3 x0'' + ...

(``alpha_t (1 - e^{-h})``, ``alpha_t (h - 1 + e^{-h})`` and ``alpha_t (h^2/2 - h + 1 - e^{-h})`` are
the exact integrals of ``1``, ``(lambda - lambda_s)`` and ``(lambda - lambda_s)^2 / 2`` against
``sigma_t e^lambda``). The solvers differ in how the derivatives are estimated:

* order 1 (DDIM): ``x_t = (sigma_t/sigma_s) x_s - alpha_t phi_1 m_0``.
* multistep (``2M``/``3M``, one model call per step): derivatives from the previous data
  predictions ``m_0, m_1, m_2`` at ``lambda_{i}, lambda_{i-1}, lambda_{i-2}``, with step ratios
  ``r_0 = (lambda_i - lambda_{i-1}) / h`` and ``r_1 = (lambda_{i-1} - lambda_{i-2}) / h``::

      2M ("dpmsolver"): x_t = (sigma_t/sigma_s) x - alpha_t phi_1 (m_0 + (m_0 - m_1) / (2 r_0))
      2M ("taylor"):    x_t = (sigma_t/sigma_s) x - alpha_t phi_1 m_0 + alpha_t phi_2 (m_0 - m_1) / r_0
      3M:  D1_0 = (m_0 - m_1)/r_0, D1_1 = (m_1 - m_2)/r_1,
           D1 = D1_0 + r_0 (D1_0 - D1_1)/(r_0 + r_1),  D2 = (D1_0 - D1_1)/(r_0 + r_1),
           x_t = (sigma_t/sigma_s) x - alpha_t phi_1 m_0 + alpha_t phi_2 D1 - c alpha_t phi_3 D2

  where ``c = 1`` reproduces the reference DPM-Solver code and diffusers (``third_order="reference"``)
  and ``c = 2`` is the exact integral of the quadratic through the three points
  (``third_order="exact"``; ``D2`` is half the scaled second derivative). The first steps use
  lower orders while the history fills up (warm-up), and with ``lower_order_final`` the last
  steps drop to orders 1 and 2 when ``steps < lower_order_final_below`` (10 in DPM-Solver, 15 in
  diffusers).
* singlestep (``2S``/``3S``): intermediate points ``s_1, s_2`` at ``lambda_s + r_1 h`` and
  ``lambda_s + r_2 h`` are reached with lower-order updates and evaluated (DPM-Solver-3 /
  DPM-Solver++ singlestep). ``steps`` counts model evaluations; they are split into outer steps
  of orders ``[3, ..., 3, 2, 1]`` etc. exactly as DPM-Solver's "fast" schedule.

Multistep coefficients are computed once, on the host in float64, into ``coefficients`` of shape
``(steps, 6)`` with the columns ``COEF_COLUMNS``::

    x0_i     = inv_alpha_i * x_i - sigma_over_alpha_i * eps_i
    x_{i+1}  = x_scale_i * x_i + c_cur_i * x0_i + c_prev_i * x0_{i-1} + c_prev2_i * x0_{i-2}

so the sampling loop does tensor arithmetic only (no ``.item()``, no host-device syncs) and a
fused kernel can consume the same table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dpt_engine.diffusion.schedules import NoiseSchedule

__all__ = ["COEF_COLUMNS", "DPMSolverPP", "get_time_steps", "singlestep_orders"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SkipType = Literal["time_uniform", "logSNR", "time_quadratic"]

COEF_COLUMNS = ("x_scale", "c_cur", "c_prev", "c_prev2", "inv_alpha", "sigma_over_alpha")


def get_time_steps(
    schedule: NoiseSchedule, skip_type: SkipType, t_start: float, t_end: float, n: int
) -> torch.Tensor:
    """``n + 1`` decreasing float64 times from ``t_start`` to ``t_end``.

    ``time_uniform``: uniform in ``t``; ``logSNR``: uniform in ``lambda`` (mapped back with
    ``inverse_lambda``); ``time_quadratic``: uniform in ``sqrt(t)``.
    """
    if skip_type == "time_uniform":
        ts = torch.linspace(t_start, t_end, n + 1, dtype=torch.float64)
    elif skip_type == "logSNR":
        lam = schedule.marginal_lambda(torch.tensor([t_start, t_end], dtype=torch.float64))
        ts = schedule.inverse_lambda(torch.linspace(float(lam[0]), float(lam[1]), n + 1, dtype=torch.float64))
        ts[0], ts[-1] = t_start, t_end  # remove round-trip error at the ends
    elif skip_type == "time_quadratic":
        ts = torch.linspace(t_start**0.5, t_end**0.5, n + 1, dtype=torch.float64) ** 2
    else:
        raise ValueError(
            f"unknown skip_type {skip_type!r}; expected 'time_uniform', 'logSNR' or 'time_quadratic'"
        )
    return ts


def singlestep_orders(steps: int, order: int) -> list[int]:
    """Split ``steps`` model evaluations into singlestep orders (DPM-Solver "fast" split)::

    order 3: K = steps//3 + 1 -> [3]*(K-2)+[2,1] | [3]*(K-1)+[1] | [3]*(K-1)+[2]  (steps % 3 = 0|1|2)
    order 2: [2]*(steps//2) (+ [1] if steps is odd);  order 1: [1]*steps
    """
    if order == 3:
        k = steps // 3 + 1
        rem = steps % 3
        orders = [3] * (k - 2) + [2, 1] if rem == 0 else [3] * (k - 1) + ([1] if rem == 1 else [2])
    elif order == 2:
        orders = [2] * (steps // 2) + ([1] if steps % 2 else [])
    elif order == 1:
        orders = [1] * steps
    else:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    assert sum(orders) == steps
    return orders


@dataclass(frozen=True)
class _Node:
    """Schedule values at one evaluation time (Python floats, float64 maths)."""

    t: float
    alpha: float
    sigma: float
    lam: float


@dataclass(frozen=True)
class _SinglestepPlan:
    """One singlestep update. ``nodes`` are the evaluation times ``s, s_1, s_2`` (``order`` of
    them) and ``target`` the end time. Row ``j`` of ``mix`` gives the state after stage ``j``
    as coefficients over ``(x_s, m_s, m_s1, m_s2)``: rows 0..order-2 are ``x_{s_1}, x_{s_2}``,
    the last row is ``x_t``."""

    order: int
    nodes: tuple[_Node, ...]
    target: _Node
    mix: tuple[tuple[float, float, float, float], ...]


class DPMSolverPP:
    """DPM-Solver++ sampler (data prediction) for a noise-prediction model.

    Args:
        schedule: a ``DiscreteVPSchedule`` or ``ContinuousVPSchedule``.
        steps: multistep: number of steps (= model evaluations). Singlestep: number of model
            evaluations, split into outer steps by ``singlestep_orders``.
        order: 1, 2 or 3.
        method: ``"multistep"`` (DPM-Solver++(2M/3M), recommended for guided sampling) or
            ``"singlestep"`` (DPM-Solver++(2S/3S); order 3 with ``time_uniform`` is what U-ViT-H/2
            and DPT used).
        skip_type: ``"time_uniform"`` | ``"logSNR"`` | ``"time_quadratic"``.
        lower_order_final: use orders 1, 2 for the last steps when ``steps <
            lower_order_final_below`` (multistep only).
        solver_type: ``"dpmsolver"`` (diffusers' ``midpoint``) or ``"taylor"`` (diffusers'
            ``heun``); affects 2M, 2S and 3S.
        third_order: ``"reference"`` (DPM-Solver / diffusers 3M coefficients) or ``"exact"``
            (quadratic-interpolation coefficients), see the module docstring.
        t_start, t_end: integration interval (default ``schedule.T`` and ``schedule.eps_t``).
        timesteps: explicit decreasing continuous times (``steps + 1`` of them); overrides
            ``steps``/``skip_type``/``t_start``/``t_end``. Singlestep treats them as the evaluation grid.

    ``model_fn(x, t)`` receives ``x`` (B, ...) and continuous times ``t`` (B,) and returns the
    noise prediction; map ``t`` to the network's input with ``schedule.network_time``.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        order: int = 2,
        method: Literal["multistep", "singlestep"] = "multistep",
        skip_type: SkipType = "time_uniform",
        lower_order_final: bool = True,
        lower_order_final_below: int = 10,
        solver_type: Literal["dpmsolver", "taylor"] = "dpmsolver",
        third_order: Literal["reference", "exact"] = "reference",
        t_start: float | None = None,
        t_end: float | None = None,
        timesteps: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        if method not in ("multistep", "singlestep"):
            raise ValueError(f"method must be 'multistep' or 'singlestep', got {method!r}")
        if solver_type not in ("dpmsolver", "taylor"):
            raise ValueError(f"solver_type must be 'dpmsolver' or 'taylor', got {solver_type!r}")
        if third_order not in ("reference", "exact"):
            raise ValueError(f"third_order must be 'reference' or 'exact', got {third_order!r}")
        self.schedule = schedule
        self.order = order
        self.method = method
        self.skip_type = skip_type
        self.solver_type = solver_type
        self.third_order = third_order
        self.lower_order_final = lower_order_final
        self.lower_order_final_below = lower_order_final_below
        if timesteps is not None:
            grid = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
            if grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
                raise ValueError("timesteps must hold at least 2 strictly decreasing times")
            steps = grid.numel() - 1
            t0, t1 = float(grid[0]), float(grid[-1])
        else:
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            t0 = float(schedule.T if t_start is None else t_start)
            t1 = float(schedule.eps_t if t_end is None else t_end)
            if not t0 > t1:
                raise ValueError(f"need t_start > t_end, got {t0} and {t1}")
            grid = None
        self.steps = steps
        self.nfe = steps

        if method == "multistep":
            if grid is None:
                grid = get_time_steps(schedule, skip_type, t0, t1, steps)
            self.timesteps = grid  # (steps + 1,) float64
            self.orders = self._multistep_orders()
            self.coefficients = self._multistep_table()  # (steps, 6) float64
            self._rows = [tuple(float(v) for v in row) for row in self.coefficients.tolist()]
            self._times = [float(t) for t in self.timesteps.tolist()]  # host floats for the loop
            self._plans: list[_SinglestepPlan] = []
        else:
            self.orders = singlestep_orders(steps, order)
            self._plans, self.timesteps = self._singlestep_plans(grid, t0, t1)
            self.coefficients = torch.empty(0, len(COEF_COLUMNS), dtype=torch.float64)
            self._rows = []

    # ------------------------------------------------------------------ host-side planning
    def _node(self, t: float) -> _Node:
        tt = torch.tensor([t], dtype=torch.float64)
        return _Node(
            t=float(t),
            alpha=float(self.schedule.marginal_alpha(tt)[0]),
            sigma=float(self.schedule.marginal_std(tt)[0]),
            lam=float(self.schedule.marginal_lambda(tt)[0]),
        )

    def _multistep_orders(self) -> list[int]:
        orders = []
        for i in range(self.steps):
            k = min(self.order, i + 1)  # warm-up: only i + 1 data predictions are known
            if self.lower_order_final and self.steps < self.lower_order_final_below:
                k = min(k, self.steps - i)
            orders.append(k)
        return orders

    def _multistep_table(self) -> torch.Tensor:
        nodes = [self._node(float(t)) for t in self.timesteps]
        # Apply each update formula to unit vectors: the result is its coefficient vector over
        # (m_0, m_1, m_2), so the table is exactly the documented formula.
        m0, m1, m2 = np.eye(3)
        rows = []
        for i, k in enumerate(self.orders):
            s, t = nodes[i], nodes[i + 1]
            h = t.lam - s.lam
            phi_1 = math.expm1(-h)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            out = -t.alpha * phi_1 * m0
            if k == 2:
                r0 = (s.lam - nodes[i - 1].lam) / h
                d1 = (m0 - m1) / r0
                if self.solver_type == "dpmsolver":
                    out = out - 0.5 * t.alpha * phi_1 * d1
                else:
                    out = out + t.alpha * phi_2 * d1
            elif k == 3:
                r0 = (s.lam - nodes[i - 1].lam) / h
                r1 = (nodes[i - 1].lam - nodes[i - 2].lam) / h
                d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                c = 1.0 if self.third_order == "reference" else 2.0
                out = out + t.alpha * phi_2 * d1 - c * t.alpha * phi_3 * d2
            rows.append([t.sigma / s.sigma, *out.tolist(), 1.0 / s.alpha, s.sigma / s.alpha])
        return torch.tensor(rows, dtype=torch.float64)

    def _singlestep_plans(
        self, grid: torch.Tensor | None, t0: float, t1: float
    ) -> tuple[list[_SinglestepPlan], torch.Tensor]:
        orders = self.orders
        bounds = np.cumsum([0, *orders]).tolist()
        if grid is None and self.skip_type == "logSNR":
            # DPM-Solver: K equal logSNR intervals, inner points at r = 1/2 or 1/3, 2/3 in lambda.
            outer = get_time_steps(self.schedule, "logSNR", t0, t1, len(orders))
            inner = [
                get_time_steps(self.schedule, "logSNR", float(outer[j]), float(outer[j + 1]), k)
                for j, k in enumerate(orders)
            ]
        else:
            # Evaluation grid of `steps + 1` times; an order-k step spans k consecutive intervals
            # and evaluates at their left ends (DPM-Solver-fast / U-ViT-H and DPT sampling).
            if grid is None:
                grid = get_time_steps(self.schedule, self.skip_type, t0, t1, self.steps)
            outer = grid[bounds]
            inner = [grid[bounds[j] : bounds[j + 1] + 1] for j in range(len(orders))]
        plans = [self._singlestep_plan(k, [self._node(float(t)) for t in ts]) for k, ts in zip(orders, inner)]
        return plans, outer

    def _singlestep_plan(self, k: int, nodes: list[_Node]) -> _SinglestepPlan:
        s, t = nodes[0], nodes[-1]
        h = t.lam - s.lam
        # basis over (x_s, m_s, m_s1, m_s2)
        x, ms, ms1, ms2 = np.eye(4)

        def first(to: _Node) -> np.ndarray:  # DPM-Solver++-1 from s to `to`
            return to.sigma / s.sigma * x - to.alpha * math.expm1(-(to.lam - s.lam)) * ms

        phi_1 = math.expm1(-h)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        base = first(t)
        mix: list[np.ndarray] = []
        if k == 1:
            mix.append(base)
        elif k == 2:
            r1 = (nodes[1].lam - s.lam) / h
            mix.append(first(nodes[1]))
            if self.solver_type == "dpmsolver":
                mix.append(base - 0.5 / r1 * t.alpha * phi_1 * (ms1 - ms))
            else:
                mix.append(base + 1.0 / r1 * t.alpha * phi_2 * (ms1 - ms))
        else:
            s1, s2 = nodes[1], nodes[2]
            r1, r2 = (s1.lam - s.lam) / h, (s2.lam - s.lam) / h
            phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
            mix.append(first(s1))
            mix.append(first(s2) + r2 / r1 * s2.alpha * phi_22 * (ms1 - ms))
            if self.solver_type == "dpmsolver":
                mix.append(base + 1.0 / r2 * t.alpha * phi_2 * (ms2 - ms))
            else:
                d1_0, d1_1 = (ms1 - ms) / r1, (ms2 - ms) / r2
                d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
                d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
                mix.append(base + t.alpha * phi_2 * d1 - t.alpha * phi_3 * d2)
        return _SinglestepPlan(
            order=k, nodes=tuple(nodes[:k]), target=t, mix=tuple(tuple(float(v) for v in row) for row in mix)
        )

    # ------------------------------------------------------------------ device-side maths
    @staticmethod
    def _time_batch(t: float, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)  # (B,)

    def data_prediction(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Multistep: ``x0_i = (x_i - sigma_i eps_i) / alpha_i`` with table row ``i``."""
        row = self._rows[i]
        return x * row[4] - eps * row[5]

    def step(self, i: int, x: torch.Tensor, x0_history: Sequence[torch.Tensor]) -> torch.Tensor:
        """Multistep update ``x_i -> x_{i+1}`` from table row ``i``.

        ``x0_history[0]`` is the data prediction at ``t_i``, ``[1]`` at ``t_{i-1}``, ``[2]`` at
        ``t_{i-2}``; only the first ``self.orders[i]`` entries are read.
        """
        row = self._rows[i]
        out = x * row[0] + x0_history[0] * row[1]
        for j in range(1, self.orders[i]):
            out = out + x0_history[j] * row[1 + j]
        return out

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, x_T: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Integrate the probability-flow ODE from ``t_start`` to ``t_end``; returns ``x_{t_end}``.

        Keep ``x_T`` in float32 (or float64); the model may run in lower precision inside
        ``model_fn`` (e.g. under autocast) and its output is promoted.
        """
        x = x_T
        for x_next in self._iterate(model_fn, x_T, progress):
            x = x_next
        return x

    @torch.no_grad()
    def sample_trajectory(self, model_fn: ModelFn, x_T: torch.Tensor) -> list[torch.Tensor]:
        """Like ``sample`` but returns ``[x_T, x_{t_1}, ..., x_{t_end}]`` at ``self.timesteps``."""
        return [x_T, *self._iterate(model_fn, x_T, False)]

    def _iterate(self, model_fn: ModelFn, x: torch.Tensor, progress: bool):
        n = self.steps if self.method == "multistep" else len(self._plans)
        it = range(n)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"DPM-Solver++ {self.method} order {self.order}")
        if self.method == "multistep":
            times = [self._time_batch(t, x) for t in self._times[:-1]]
            history: list[torch.Tensor] = []  # newest first
            for i in it:
                x0 = self.data_prediction(i, x, model_fn(x, times[i]))
                history = [x0, *history[: self.order - 1]]
                x = self.step(i, x, history)
                yield x
        else:
            for j in it:
                x = self._singlestep(model_fn, x, self._plans[j])
                yield x

    def _singlestep(self, model_fn: ModelFn, x: torch.Tensor, plan: _SinglestepPlan) -> torch.Tensor:
        preds: list[torch.Tensor] = []  # m_s, m_s1, m_s2
        state = x
        for stage, node in enumerate(plan.nodes):
            eps = model_fn(state, self._time_batch(node.t, x))
            preds.append(state * (1.0 / node.alpha) - eps * (node.sigma / node.alpha))
            coef = plan.mix[stage]
            state = x * coef[0]
            for c, m in zip(coef[1:], preds):
                state = state + m * c
        return state

    def __repr__(self) -> str:
        return (
            f"DPMSolverPP({self.schedule!r}, steps={self.steps}, order={self.order}, "
            f"method={self.method!r}, skip_type={self.skip_type!r}, orders={self.orders})"
        )
