"""The EMA warm-up shared by the trainers (stage 2's diffusion model, the classifiers of stages 1 and 3)."""

from __future__ import annotations

__all__ = ["ema_decay_at"]


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, ``min(decay, (1 + step) / (10 + step))``.

    Without it a short run's EMA stays close to the random initialisation (at 0.999 after 300
    steps, 74% of the EMA is still the initial weights); long runs are unaffected.
    """
    return min(decay, (1.0 + step) / (10.0 + step))
