"""The paired gain statistic: exact counts, its interval against a brute-force bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from dpt_engine.eval.paired import paired_gain


def test_counts_and_gain_are_exact():
    labels = np.array([0, 1, 2, 3, 4])
    old = np.array([0, 1, 0, 0, 4])  # right on 0, 1, 4
    new = np.array([0, 0, 2, 3, 4])  # right on 0, 2, 3, 4
    st = paired_gain(old, new, labels)
    assert st["only_new_right"] == 2 and st["only_old_right"] == 1 and st["num_images"] == 5
    assert st["gain"] == pytest.approx(20.0) and st["one_image_points"] == pytest.approx(20.0)
    assert st["ci95"][0] < st["gain"] < st["ci95"][1]


def test_identical_classifiers_have_no_noise():
    y = np.arange(100) % 10
    st = paired_gain(y, y, y)
    assert st["gain"] == 0.0 and st["se"] == 0.0


def test_standard_error_matches_a_bootstrap():
    rng = np.random.default_rng(0)
    n = 500
    y = rng.integers(0, 10, n)
    old = np.where(rng.random(n) < 0.8, y, (y + 1) % 10)
    new = np.where(rng.random(n) < 0.85, y, (y + 2) % 10)
    st = paired_gain(old, new, y)
    d = (new == y).astype(float) - (old == y)
    boot = [d[rng.integers(0, n, n)].mean() * 100 for _ in range(4000)]
    assert st["se"] == pytest.approx(np.std(boot), rel=0.1)


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="same non-empty test set"):
        paired_gain(np.zeros(3), np.zeros(4), np.zeros(3))
