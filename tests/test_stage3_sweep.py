"""benchmarks/quality/stage3_sweep.py: stage-3 candidates judged on held-out training images."""

from __future__ import annotations

import pytest

from benchmarks.quality.stage3_sweep import CANDIDATES, main
from dpt_engine.utils.io import read_json

TINY = [
    "stage1.steps=12", "stage1.eval_every=12", "stage1.checkpoint_every=12", "stage2.steps=4",
    "stage2.checkpoint_every=4", "sample.images_per_class=3", "sample.steps=2", "sample.fid=false",
    "stage3.steps=6", "stage3.eval_every=6", "stage3.checkpoint_every=6",
]  # fmt: skip


def _argv(out, results, *only: str) -> list[str]:
    """A digits sweep of label seed 0 at the tiny scale, 100 held-out images, the named candidates."""
    return ["--preset", "digits", "--holdout", "100", "--seeds", "0", "--out", str(out), "--results", str(results),
            "--only", *only, "--no-progress", "--set", *TINY]  # fmt: skip


@pytest.mark.slow
def test_sweep_shares_one_base_per_seed_and_never_reads_the_test_split(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = _argv(out, results, "preset", "no pseudo images (fine-tuning alone)")
    assert main(argv) == 0
    res = read_json(results / "stage3_sweep_digits.json")
    assert set(res["candidates"]) == {"preset", "no pseudo images (fine-tuning alone)"}
    for i in (0, 1):  # each candidate's stage 3 on the seed's one stage 1 and generator
        run = out / f"s0_c{i}"
        assert all((run / s).is_symlink() for s in ("stage1", "stage2", "sample"))
        report = read_json(run / "report.json")
        assert report["eval_split"] == "holdout of 100 training images" and report["num_eval"] == 100
    preset, alone = (
        res["candidates"]["preset"]["0"],
        res["candidates"]["no pseudo images (fine-tuning alone)"]["0"],
    )
    assert alone["overrides"] == CANDIDATES["no pseudo images (fine-tuning alone)"]
    s1 = res["stage1"]["0"]
    assert preset["gain"] == pytest.approx(preset["top1"] - s1) and alone["gain"] == pytest.approx(
        alone["top1"] - s1
    )
    base = res["base_wall_time_s"]["0"]
    assert set(base) == {"stage1", "stage2", "sample"} and all(t > 0 for t in base.values())
    assert preset["wall_time_s"] > 0 and alone["wall_time_s"] > 0
    assert res["wall_time_s"] == pytest.approx(
        sum(base.values()) + preset["wall_time_s"] + alone["wall_time_s"]
    )
    assert main(argv) == 0  # a rerun resumes every run: the times stay those the stages took
    assert read_json(results / "stage3_sweep_digits.json")["wall_time_s"] == pytest.approx(res["wall_time_s"])
    md = (results / "stage3_sweep_digits.md").read_text()
    assert "The test split is not used" in md and f"{preset['top1']:.2f} ({preset['gain']:+.2f}" in md
    # a later call for another seed and one candidate keeps what the earlier calls recorded
    one = list(argv)
    one[one.index("--seeds") + 1] = "1"
    i = one.index("--only")
    one[i + 1 : i + 3] = ["preset"]
    assert main(one) == 0
    grown = read_json(results / "stage3_sweep_digits.json")
    assert grown["seeds"] == [0, 1] and set(grown["stage1"]) == {"0", "1"}
    assert set(grown["candidates"]["preset"]) == {"0", "1"}
    assert (
        grown["candidates"]["no pseudo images (fine-tuning alone)"]
        == res["candidates"]["no pseudo images (fine-tuning alone)"]
    )
    assert grown["wall_time_s"] > res["wall_time_s"]
    with pytest.raises(SystemExit, match="unknown candidate"):
        main([*argv[: -len(TINY) - 1], "--only", "nonsense"])


def test_reused_stages_follow_what_a_candidate_changes():
    from benchmarks.quality.stage3_sweep import reused_stages

    assert reused_stages(["stage3.lr=0.003"]) == ("stage1", "stage2", "sample")
    assert reused_stages(["sample.guidance_scale=0.4", "stage3.steps=5"]) == ("stage1", "stage2")
    assert reused_stages(["stage2.model=unet-tiny8", "sample.steps=5"]) == ("stage1",)
    for bad in (["stage1.steps=5"], ["data.holdout=10"], ["run.seed=3"]):
        with pytest.raises(ValueError, match="cannot change"):
            reused_stages(bad)
    for name, overrides in CANDIDATES.items():  # every shipped candidate can share stage 1
        assert "stage1" in reused_stages(overrides), name


@pytest.mark.parametrize("preset", ["digits", "fashion-mnist"])
def test_every_candidate_is_a_valid_config(preset):
    from dpt_engine.config.presets import resolve_config

    for overrides in CANDIDATES.values():  # a typo'd key or bad value fails here, not hours in
        resolve_config(preset, overrides=["data.holdout=300", *overrides])


@pytest.mark.slow
def test_a_sampling_candidate_resamples_the_seeds_generator(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = [*_argv(out, results, "preset", "guidance 0.4"), "--name", "sweep_named"]
    assert main(argv) == 0
    assert not (results / "stage3_sweep_digits.json").exists()  # --name: its own results files
    assert (results / "sweep_named.md").is_file()
    run = out / f"s0_c{list(CANDIDATES).index('guidance 0.4')}"
    assert (run / "stage1").is_symlink() and (run / "stage2").is_symlink()
    assert (run / "sample").is_dir() and not (run / "sample").is_symlink()
    assert read_json(run / "sample" / "done.json")  # sampled here, from the base's generator
    cfg = (run / "config.yaml").read_text()
    assert "guidance_scale: 0.4" in cfg
    res = read_json(results / "sweep_named.json")
    g = res["candidates"]["guidance 0.4"]["0"]
    assert g["stages_run"] == ["sample", "stage3"] and g["wall_time_s"] > 0
    assert res["candidates"]["preset"]["0"]["stages_run"] == ["stage3"]
