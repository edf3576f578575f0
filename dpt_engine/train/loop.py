"""The step loop both trainers run (stage 2's diffusion model, the classifiers of stages 1 and 3).

A trainer writes only its step body; :class:`TrainingSteps` owns what is the same for every
trainer: the progress bar, the checkpoint cadence (every ``checkpoint_every`` steps and at the
last step, through the trainer's ``save``), and the simulated kill of the test hook
``DPT_TEST_INTERRUPT_AT_STEP`` (``utils/testhooks.py``)::

    loop = TrainingSteps(start, cfg.steps, save=save, checkpoint_every=..., desc=..., progress=...)
    for k in loop:
        ...  # step k (0-based); the loop saves after step k + 1 where due; loop.bar.set_postfix(...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from tqdm.auto import tqdm

from ..utils import testhooks

__all__ = ["TrainingSteps"]


class TrainingSteps:
    """Iterate the 0-based steps ``start .. total - 1``. After step ``k``'s body has run, the loop
    calls ``save(k + 1)`` when ``k + 1`` is a checkpoint step (a multiple of ``checkpoint_every``,
    or the last). With ``DPT_TEST_INTERRUPT_AT_STEP=N`` it raises ``KeyboardInterrupt`` after the
    first save at or after step ``N`` that is not the last (a run killed there). ``bar`` is the
    progress bar, for the trainer's postfix; it is closed when the loop ends, however it ends."""

    def __init__(
        self,
        start: int,
        total: int,
        *,
        save: Callable[[int], None],
        checkpoint_every: int,
        desc: str,
        progress: bool = True,
    ) -> None:
        self.start, self.total = start, total
        self.save, self.checkpoint_every = save, checkpoint_every
        self.bar = tqdm(
            total=total, initial=start, desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0
        )

    def __iter__(self) -> Iterator[int]:
        interrupt_at = testhooks.interrupt_at_step()
        try:
            for k in range(self.start, self.total):
                yield k
                done = k + 1
                if done % self.checkpoint_every == 0 or done == self.total:
                    self.save(done)
                    if interrupt_at and interrupt_at <= done < self.total:
                        raise KeyboardInterrupt(
                            f"{testhooks.INTERRUPT_AT_STEP_ENV}={interrupt_at}: simulated kill after checkpoint {done}"
                        )
                self.bar.update(1)
        finally:
            self.bar.close()
