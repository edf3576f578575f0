"""Variance-preserving (VP) noise schedules in continuous time.

Both schedules describe the forward process ``x_t = alpha_t * x_0 + sigma_t * eps`` with
``alpha_t**2 + sigma_t**2 = 1`` for ``t`` in ``[eps_t, T]`` (``T = 1``), through the quantities
DPM-Solver (Lu et al., 2022, arXiv:2206.00927 and arXiv:2211.01095) works with:

* ``marginal_log_mean_coeff(t) = log(alpha_t)``
* ``marginal_alpha(t) = alpha_t``, ``marginal_std(t) = sigma_t = sqrt(1 - alpha_t**2)``
* ``marginal_lambda(t) = lambda_t = log(alpha_t / sigma_t)`` (half the log-SNR, decreasing in t)
* ``inverse_lambda(lambda)``: the ``t`` with ``lambda_t = lambda``
* ``network_time(t)``: the timestep value the denoiser network was trained with.

``DiscreteVPSchedule`` wraps a 1000-step DDPM: step ``n`` (1-based, ``alpha_bar_n = prod_{k<=n}
(1 - beta_k)``) sits at ``t_n = n / N`` and ``log(alpha_t)`` is linearly interpolated in ``t``
between those knots (DPM-Solver's discrete-to-continuous wrapper), so ``t`` ranges over
``[1/N, 1]``. ``ContinuousVPSchedule`` is the linear VP-SDE of Song et al. (beta 0.1 -> 20).

All methods accept a float or a tensor and return a tensor of the input's floating dtype (a
float becomes a float64 tensor); the sampler builds its coefficient table in float64 on the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch

__all__ = [
    "SCHEDULE_NAMES",
    "ContinuousVPSchedule",
    "DiscreteVPSchedule",
    "NoiseSchedule",
    "make_betas",
    "make_schedule",
]

TensorLike = torch.Tensor | float


def _as_tensor(t: TensorLike) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.to(torch.float64)
    return torch.tensor(t, dtype=torch.float64)


def make_betas(
    kind: Literal["linear", "scaled_linear"],
    num_train_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> torch.Tensor:
    """DDPM ``beta_1 .. beta_N`` in float64.

    ``linear``: ``linspace(1e-4, 0.02, N)`` (Ho et al., 2020).
    ``scaled_linear``: ``linspace(sqrt(0.00085), sqrt(0.012), N) ** 2`` (Stable Diffusion; the
    schedule of U-ViT-H/2 on ImageNet-256 latents).
    """
    if kind == "linear":
        b0 = 1e-4 if beta_start is None else beta_start
        b1 = 0.02 if beta_end is None else beta_end
        return torch.linspace(b0, b1, num_train_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        b0 = 0.00085 if beta_start is None else beta_start
        b1 = 0.012 if beta_end is None else beta_end
        return torch.linspace(b0**0.5, b1**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {kind!r}; expected 'linear' or 'scaled_linear'")


class NoiseSchedule(ABC):
    """Shared VP maths; subclasses define ``marginal_log_mean_coeff``, ``inverse_lambda``,
    ``network_time`` and ``sample_time``."""

    T: float = 1.0
    eps_t: float

    @abstractmethod
    def marginal_log_mean_coeff(self, t: TensorLike) -> torch.Tensor: ...

    @abstractmethod
    def inverse_lambda(self, lamb: TensorLike) -> torch.Tensor: ...

    @abstractmethod
    def network_time(self, t: TensorLike) -> torch.Tensor: ...

    @abstractmethod
    def sample_time(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor: ...

    def marginal_alpha(self, t: TensorLike) -> torch.Tensor:
        """``alpha_t = exp(log alpha_t)``."""
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: TensorLike) -> torch.Tensor:
        """``sigma_t = sqrt(1 - alpha_t**2)``, computed as ``sqrt(-expm1(2 log alpha_t))``."""
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: TensorLike) -> torch.Tensor:
        """``lambda_t = log alpha_t - log sigma_t``."""
        log_mean = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(-torch.expm1(2.0 * log_mean))
        return log_mean - log_std

    @staticmethod
    def _log_alpha_from_lambda(lamb: torch.Tensor) -> torch.Tensor:
        # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -0.5 * log(1 + exp(-2 lambda))
        return -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha_t * x0 + sigma_t * noise`` for per-sample times ``t`` of shape (B,)."""
        t = t.to(device=x0.device, dtype=torch.float64 if x0.dtype == torch.float64 else torch.float32)
        shape = (-1,) + (1,) * (x0.dim() - 1)  # (B, 1, 1, 1)
        alpha = self.marginal_alpha(t).reshape(shape).to(x0.dtype)
        sigma = self.marginal_std(t).reshape(shape).to(x0.dtype)
        return alpha * x0 + sigma * noise


class DiscreteVPSchedule(NoiseSchedule):
    """A 1000-step DDPM seen as a continuous-time VP schedule (DPM-Solver's discrete wrapper).

    Knots ``t_n = n / N`` for ``n = 1..N`` carry ``log alpha_{t_n} = 0.5 * sum_{k<=n} log(1 -
    beta_k)``; between knots ``log alpha_t`` is piecewise linear in ``t`` (linear extrapolation
    outside ``[1/N, 1]``). ``eps_t = 1/N`` is the last sampling time.

    ``time_input`` chooses what the network sees for a continuous ``t``:

    * ``"uvit"`` (default): ``N * t``, i.e. the 1-based step ``n`` in ``{1..N}``. U-ViT-H/2 and DPT
      train with ``n`` drawn from ``{1..N}`` and sample with ``nnet(x, t_continuous * N)``, so the
      released discrete checkpoints need this.
    * ``"dpm_solver"``: ``N * (t - 1/N)``, the 0-based index ``n - 1`` (DPM-Solver's discrete
      wrapper; diffusers / Stable Diffusion / guided-diffusion convention).
    """

    def __init__(
        self,
        beta_schedule: Literal["linear", "scaled_linear"] = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        betas: torch.Tensor | None = None,
        time_input: Literal["uvit", "dpm_solver"] = "uvit",
    ) -> None:
        if betas is None:
            betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if time_input not in ("uvit", "dpm_solver"):
            raise ValueError(f"time_input must be 'uvit' or 'dpm_solver', got {time_input!r}")
        self.beta_schedule = beta_schedule
        self.time_input = time_input
        self.betas = betas  # (N,) beta_1..beta_N
        self.num_train_timesteps = n = betas.numel()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (N,) alpha_bar_1..alpha_bar_N
        self.log_alpha_array = 0.5 * torch.log(self.alphas_cumprod)  # (N,) decreasing
        self.t_array = torch.arange(1, n + 1, dtype=torch.float64) / n  # (N,) 1/N .. 1
        self.T = 1.0
        self.eps_t = 1.0 / n

    def __repr__(self) -> str:
        return (
            f"DiscreteVPSchedule({self.beta_schedule!r}, N={self.num_train_timesteps}, "
            f"time_input={self.time_input!r})"
        )

    @staticmethod
    def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
        """Piecewise-linear ``f(x)`` through knots ``(xp, fp)`` (``xp`` increasing), extrapolating
        linearly with the end segments. Differentiable and elementwise; keeps ``x``'s dtype."""
        xp = xp.to(device=x.device, dtype=x.dtype)
        fp = fp.to(device=x.device, dtype=x.dtype)
        idx = torch.searchsorted(xp, x.contiguous(), right=False).clamp(1, xp.numel() - 1)
        x0, x1 = xp[idx - 1], xp[idx]
        f0, f1 = fp[idx - 1], fp[idx]
        return f0 + (x - x0) * (f1 - f0) / (x1 - x0)

    def marginal_log_mean_coeff(self, t: TensorLike) -> torch.Tensor:
        """``log alpha_t`` by piecewise-linear interpolation of the knots ``(n/N, log alpha_n)``."""
        t = _as_tensor(t)
        return self._interp(t, self.t_array, self.log_alpha_array)

    def inverse_lambda(self, lamb: TensorLike) -> torch.Tensor:
        """Invert ``lambda_t``: map ``lambda -> log alpha`` in closed form, then interpolate
        ``t`` as a piecewise-linear function of ``log alpha`` (the exact inverse of the forward
        interpolation, since ``log alpha`` is strictly decreasing in ``t``)."""
        lamb = _as_tensor(lamb)
        log_alpha = self._log_alpha_from_lambda(lamb)
        return self._interp(log_alpha, self.log_alpha_array.flip(0), self.t_array.flip(0))

    def network_time(self, t: TensorLike) -> torch.Tensor:
        """Model timestep input: ``N t`` (``"uvit"``) or ``N (t - 1/N)`` (``"dpm_solver"``)."""
        t = _as_tensor(t)
        n = self.num_train_timesteps
        return t * n if self.time_input == "uvit" else (t - 1.0 / n) * n

    def sample_time(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Training times ``t = n / N`` with ``n`` uniform on ``{1..N}``; float32, shape (B,)."""
        n = torch.randint(
            1,
            self.num_train_timesteps + 1,
            (batch,),
            generator=generator,
            device=generator.device if generator is not None else device,
        )
        return (n.to(torch.float32) / self.num_train_timesteps).to(device)


class ContinuousVPSchedule(NoiseSchedule):
    """The linear VP-SDE: ``beta(t) = beta_0 + t (beta_1 - beta_0)`` on ``[0, 1]``.

    ``log alpha_t = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2``. The network sees
    ``time_scale * t`` (U-ViT-L/2 uses ``t * 999``). ``eps_t`` is the default last sampling time
    (DPM-Solver recommends 1e-3 for <= 15 steps and 1e-4 above; U-ViT-L sampled to 1e-4).
    """

    def __init__(
        self, beta_0: float = 0.1, beta_1: float = 20.0, eps_t: float = 1e-3, time_scale: float = 999.0
    ) -> None:
        self.beta_0 = float(beta_0)
        self.beta_1 = float(beta_1)
        self.eps_t = float(eps_t)
        self.time_scale = float(time_scale)
        self.T = 1.0

    def __repr__(self) -> str:
        return f"ContinuousVPSchedule(beta_0={self.beta_0}, beta_1={self.beta_1}, eps_t={self.eps_t})"

    def marginal_log_mean_coeff(self, t: TensorLike) -> torch.Tensor:
        t = _as_tensor(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lamb: TensorLike) -> torch.Tensor:
        """Solve ``(b1 - b0)/4 t^2 + b0/2 t - c = 0`` with ``c = -log alpha >= 0`` in the
        cancellation-free form ``t = 2c / (b0/2 + sqrt(b0^2/4 + (b1 - b0) c))``."""
        lamb = _as_tensor(lamb)
        c = -self._log_alpha_from_lambda(lamb)
        half_b0 = 0.5 * self.beta_0
        return 2.0 * c / (half_b0 + torch.sqrt(half_b0**2 + (self.beta_1 - self.beta_0) * c))

    def network_time(self, t: TensorLike) -> torch.Tensor:
        return _as_tensor(t) * self.time_scale

    def sample_time(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Training times uniform on ``[eps_t, T]``; float32, shape (B,)."""
        u = torch.rand(
            (batch,), generator=generator, device=generator.device if generator is not None else device
        )
        return (u * (self.T - self.eps_t) + self.eps_t).to(device)


SCHEDULE_NAMES = ("discrete-linear", "discrete-scaled-linear", "vp-linear")


def make_schedule(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by name: ``discrete-linear`` / ``discrete-scaled-linear`` (1000-step DDPM,
    ``DiscreteVPSchedule``) or ``vp-linear`` (``ContinuousVPSchedule``, beta 0.1 -> 20); ``kwargs``
    go to the constructor (e.g. ``time_input="dpm_solver"``, ``eps_t=1e-4``)."""
    if name == "discrete-linear":
        return DiscreteVPSchedule("linear", **kwargs)
    if name == "discrete-scaled-linear":
        return DiscreteVPSchedule("scaled_linear", **kwargs)
    if name == "vp-linear":
        return ContinuousVPSchedule(**kwargs)
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULE_NAMES)}")
