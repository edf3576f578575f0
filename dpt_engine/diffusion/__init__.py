"""Diffusion maths for stage 2: VP noise schedules, the DPM-Solver++ sampler, classifier-free
guidance wrappers and deterministic per-sample noise."""

from dpt_engine.diffusion.dpm_solver import COEF_COLUMNS, DPMSolverPP, get_time_steps, singlestep_orders
from dpt_engine.diffusion.guidance import cfg_combine, cfg_eps_fn, clip_denoised_fn, two_forward_eps_fn
from dpt_engine.diffusion.noise import initial_noise, sample_seed
from dpt_engine.diffusion.schedules import (
    SCHEDULE_NAMES,
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    NoiseSchedule,
    make_betas,
    make_schedule,
)

__all__ = [
    "COEF_COLUMNS",
    "SCHEDULE_NAMES",
    "ContinuousVPSchedule",
    "DPMSolverPP",
    "DiscreteVPSchedule",
    "NoiseSchedule",
    "cfg_combine",
    "cfg_eps_fn",
    "clip_denoised_fn",
    "get_time_steps",
    "initial_noise",
    "make_betas",
    "make_schedule",
    "sample_seed",
    "singlestep_orders",
    "two_forward_eps_fn",
]
