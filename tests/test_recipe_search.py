"""``benchmarks.quality.recipe_search``: every preset's candidates are valid configs, and the
search runs end to end on digits (a tiny budget), scoring generated images only."""

from __future__ import annotations

import pytest

from benchmarks.quality.recipe_search import RECIPES, main, probe_images_per_s
from dpt_engine.config.presets import resolve_config


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_candidates_resolve_and_differ(preset):
    names = [n for n, _ in RECIPES[preset]["candidates"]]
    assert len(set(names)) == len(names)
    seen = set()
    for _, overrides in RECIPES[preset]["candidates"]:
        cfg = resolve_config(
            preset, overrides=["stage2.label_source=true", *RECIPES[preset]["common"], *overrides]
        )
        key = (cfg.stage2.model, cfg.stage2.loss_weighting, cfg.stage2.lr, cfg.stage2.precision)
        assert key not in seen  # each candidate changes something
        seen.add(key)


def test_throughput_probe_uses_the_dataset_size():
    cfg = resolve_config("digits", overrides=["stage2.model=unet-tiny8", "stage2.batch_size=8"])
    assert probe_images_per_s(cfg, 8, 1, steps=1) > 0


def test_digits_search_end_to_end(tmp_path):
    from dpt_engine.utils.io import read_json

    out, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--preset", "digits", "--out", str(out), "--oracle-dir", str(out), "--results", str(results),
            "--minutes", "0.001", "--per-class", "4", "--oracle-steps", "20", "--only", "unet-tiny8+minsnr", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    res = read_json(results / "recipe_digits.json")
    (row,) = res["candidates"]
    assert res["meta"]["preset"] == "digits" and row["name"] == "unet-tiny8+minsnr"
    assert row["steps"] == 50 and 0.0 <= row["class_fidelity"] <= 100.0 and row["fid"] > 0
    assert "preset `digits`" in (results / "recipe_digits.md").read_text()
    assert (results / "recipe_digits.png").is_file()
