"""Test hooks: environment variables that make a run stop or pause at a chosen point, so the
tests can interrupt or kill a real process mid-work. Read only here, each by one function, at the
place that honours it; unset, every hook does nothing.

* ``DPT_TEST_INTERRUPT_AT_STEP=N``: the trainers' step loop (``train.loop``, stage 2's
  ``fit_diffusion`` and the classifiers' ``fit_classifier``) raises ``KeyboardInterrupt`` right
  after its first checkpoint at or after step ``N`` that is not the last step (a run killed there).
* ``DPT_TEST_SAVE_DELAY=STEP:SECONDS``: ``train.checkpoint`` sleeps in the save of STEP after every
  rank's files are written and before the rename.
* ``DPT_TEST_SHARD_WRITE_SLEEP=SHARD:SECONDS``: ``sampling.formats`` sleeps half-way through
  writing that shard's data.
* ``DPT_TEST_RECORD_SLEEP=SHARD:SECONDS``: ``sampling.formats`` sleeps after that shard's data is
  in place and before its record is written.
* ``DPT_TEST_MANIFEST_SLEEP=SECONDS``: ``sampling.runner`` sleeps in the manifest rebuild, after
  reading the shard records and before writing ``manifest.json``.
"""

from __future__ import annotations

import os
import time

__all__ = [
    "INTERRUPT_AT_STEP_ENV",
    "MANIFEST_SLEEP_ENV",
    "RECORD_SLEEP_ENV",
    "SAVE_DELAY_ENV",
    "SHARD_WRITE_SLEEP_ENV",
    "interrupt_at_step",
    "manifest_sleep",
    "record_sleep",
    "save_delay",
    "shard_write_sleep",
]

INTERRUPT_AT_STEP_ENV = "DPT_TEST_INTERRUPT_AT_STEP"
SAVE_DELAY_ENV = "DPT_TEST_SAVE_DELAY"
SHARD_WRITE_SLEEP_ENV = "DPT_TEST_SHARD_WRITE_SLEEP"
RECORD_SLEEP_ENV = "DPT_TEST_RECORD_SLEEP"
MANIFEST_SLEEP_ENV = "DPT_TEST_MANIFEST_SLEEP"


def interrupt_at_step() -> int:
    """The step after whose checkpoint a trainer simulates a kill (0: never)."""
    return int(os.environ.get(INTERRUPT_AT_STEP_ENV, "0") or 0)


def _sleep_if_at(env_var: str, at: int) -> None:
    """Sleep SECONDS when ``env_var`` is ``AT:SECONDS`` with AT == ``at``."""
    spec = os.environ.get(env_var, "")
    if spec:
        target, seconds = spec.split(":")
        if int(target) == at:
            time.sleep(float(seconds))


def save_delay(step: int) -> None:
    """``DPT_TEST_SAVE_DELAY=STEP:SECONDS``: pause the checkpoint save of ``step``, so a test can
    ``kill -9`` the process mid-save."""
    _sleep_if_at(SAVE_DELAY_ENV, step)


def shard_write_sleep(shard: int) -> None:
    """``DPT_TEST_SHARD_WRITE_SLEEP=SHARD:SECONDS``: pause while ``shard`` is half written, so a
    test can kill the process mid-write."""
    _sleep_if_at(SHARD_WRITE_SLEEP_ENV, shard)


def record_sleep(shard: int) -> None:
    """``DPT_TEST_RECORD_SLEEP=SHARD:SECONDS``: pause between ``shard``'s data and its record."""
    _sleep_if_at(RECORD_SLEEP_ENV, shard)


def manifest_sleep() -> None:
    """``DPT_TEST_MANIFEST_SLEEP=SECONDS``: pause inside the manifest rebuild."""
    seconds = os.environ.get(MANIFEST_SLEEP_ENV, "")
    if seconds:
        time.sleep(float(seconds))
