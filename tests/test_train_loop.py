"""The step loop both trainers share (``dpt_engine.train.loop``)."""

from __future__ import annotations

import pytest

from dpt_engine.train import TrainingSteps
from dpt_engine.utils.testhooks import INTERRUPT_AT_STEP_ENV


def _run(start, total, every, body=None):
    saved, seen = [], []
    loop = TrainingSteps(start, total, save=saved.append, checkpoint_every=every, desc="t", progress=False)
    for k in loop:
        seen.append(k)
        if body:
            body(k)
    return seen, saved, loop


def test_steps_and_checkpoint_cadence():
    seen, saved, loop = _run(0, 10, 4)
    assert seen == list(range(10)) and saved == [4, 8, 10]  # every 4 steps and the last
    assert loop.bar.disable  # progress off
    seen, saved, _ = _run(8, 10, 4)  # resumed after the checkpoint of step 8
    assert seen == [8, 9] and saved == [10]
    seen, saved, _ = _run(10, 10, 4)  # a finished run: no step, no save
    assert seen == [] and saved == []


def test_simulated_kill_after_the_first_checkpoint_at_or_after_n(monkeypatch):
    monkeypatch.setenv(INTERRUPT_AT_STEP_ENV, "5")
    with pytest.raises(KeyboardInterrupt, match="after checkpoint 8"):
        _run(0, 10, 4)
    monkeypatch.setenv(INTERRUPT_AT_STEP_ENV, "10")  # the last step is never interrupted
    assert _run(0, 10, 4)[1] == [4, 8, 10]


def test_the_bar_closes_when_the_body_raises():
    loop = TrainingSteps(0, 5, save=lambda s: None, checkpoint_every=2, desc="t", progress=True)
    assert not loop.bar.disable  # open (tqdm's close() disables the bar)
    with pytest.raises(RuntimeError):
        for k in loop:
            if k == 2:
                raise RuntimeError("step failed")
    assert loop.bar.disable and loop.bar.n == 2
