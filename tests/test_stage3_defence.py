"""Stage 3 never silently makes things worse: the stage-1 agreement decides how much the pseudo
images count (``stage3.pseudo_weighting``), and stage 3 can start from stage 1's weights.

Two generators bracket the real ones: a *useless* one (every image filed under the wrong class,
the worst a generator can do) and a *perfect* one (real held-in training images under their true
class). Plain stage 3 collapses on the first; the defended stage 3 stays at stage 1 on the first
and keeps the gain on the second."""

from __future__ import annotations

import pytest

from benchmarks.quality.stage3_defence import BASE as DEFENCE_BASE
from benchmarks.quality.stage3_defence import write_generator
from dpt_engine.config.base import ConfigError
from dpt_engine.config.presets import resolve_config
from dpt_engine.data import build_splits
from dpt_engine.pipeline import setup_run
from dpt_engine.stages.stage1 import run_stage1
from dpt_engine.stages.stage3 import describe_stage3, run_stage3

BASE = [*DEFENCE_BASE, "run.threads=1"]  # the benchmark's digits setting (1 label/class)
PLAIN = ["stage3.pseudo_weighting=uniform", "stage3.init_from_stage1=false"]  # DPT as published
DEFENDED = ["stage3.pseudo_weighting=stage1-agreement", "stage3.init_from_stage1=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("defence")
    cfg = resolve_config("digits", overrides=BASE)
    splits = build_splits(cfg.data)
    s1 = run_stage1(setup_run(cfg, root / "run", progress=False), splits).summary["top1"]
    for name, kind in (("pseudo0", "perfect"), ("pseudo1", "useless"), ("pseudo_chance", "chance")):
        write_generator(root / name, splits, kind, per_class=50)
    return root, splits, s1


def _stage3(trained, shift: int | str, extra: list[str]) -> dict:
    root, splits, _ = trained
    cfg = resolve_config("digits", overrides=[*BASE, f"stage3.pseudo_dir={root / f'pseudo{shift}'}", *extra])
    return run_stage3(setup_run(cfg, root / "run", progress=False), splits).summary


def test_useless_generator_collapses_plain_stage3(trained):
    s3 = _stage3(trained, 1, PLAIN)
    assert s3["pseudo_stage1_agreement"] < 0.2
    assert s3["top1"] < trained[2] - 30  # what the defence exists for


def test_useless_generator_leaves_defended_stage3_at_stage1(trained):
    s3 = _stage3(trained, 1, DEFENDED)
    assert s3["pseudo_trust"] == 0.0 and s3["pseudo_kept"] == 0 and s3["init_from_stage1"]
    assert s3["top1"] >= trained[2] - 1.0
    assert "trained without the pseudo images" in s3["what_stage3_did"]


def test_chance_level_generator_leaves_defended_stage3_where_the_real_images_alone_put_it(trained):
    """Agreement a hair above chance gives a trust near 0: the pseudo images get (almost) no batch
    slots, so the real labeled images keep their full weight in every batch instead of being
    diluted by thousands of near-weightless pseudo images (which cost Fashion-MNIST 19.5 points
    when the trust scaled the pseudo images' loss weight instead)."""
    s3 = _stage3(trained, "_chance", DEFENDED)
    assert 0.0 <= s3["pseudo_trust"] < 0.1 and s3["pseudo_kept"] in (0, 500)
    assert s3.get("pseudo_batch_share", 0.0) < 0.5 / 64  # rounds to no pseudo slot in a batch of 64
    alone = _stage3(trained, 0, [*DEFENDED, "stage3.pseudo_weight=0"])
    assert s3["top1"] == pytest.approx(alone["top1"], abs=1e-9)  # the same draws: bit for bit
    assert s3["top1"] >= trained[2] - 1.0


def test_good_generator_keeps_the_gain_when_defended(trained):
    s3 = _stage3(trained, 0, DEFENDED)
    assert s3["pseudo_trust"] > 0.6 and s3["pseudo_kept"] == 500
    assert s3["pseudo_mean_weight"] == 1.0  # each counts fully; the trust sets how many per batch
    assert s3["pseudo_batch_share"] == pytest.approx(s3["pseudo_trust"] * 500 / 510)
    assert s3["top1"] >= trained[2] + 5.0
    st = s3["gain_stats"]  # paired over the same 500 test images: exact, with its noise
    assert st["gain"] == pytest.approx(s3["gain"]) and st["num_images"] == 500
    assert st["ci95"][0] < st["gain"] < st["ci95"][1] and st["only_new_right"] > st["only_old_right"]
    assert "of each labeled batch" in s3["what_stage3_did"]


def test_confidence_weights_are_per_image(trained):
    s3 = _stage3(trained, 1, ["stage3.pseudo_weighting=stage1-confidence", "stage3.init_from_stage1=true"])
    assert s3["pseudo_kept"] == 500 and s3["pseudo_mean_weight"] < 0.2
    assert s3["top1"] >= trained[2] - 2.0


def test_init_from_stage1_needs_the_same_backbone(trained):
    from dpt_engine.data import DataError

    with pytest.raises(DataError, match="same trainable backbone"):
        _stage3(trained, 0, ["stage3.init_from_stage1=true", "stage3.backbone=wrn-28-2"])


def test_description_reads_well():
    text = describe_stage3(
        {
            "pseudo_stage1_agreement": 0.09,
            "num_pseudo": 0,
            "pseudo_before_filter": 500,
            "pseudo_weighting": "stage1-agreement",
            "pseudo_trust": 0.0,
            "init_from_stage1": True,
        }
    )
    assert text.startswith("The stage-1 classifier put 9% of the 500 pseudo images")
    assert "stage 1's weights" in text


def test_pseudo_weight_zero_trains_on_the_real_images_alone(trained):
    """The ablation behind the benchmark's "no pseudo images" column: same schedule and start,
    every pseudo image left out (none takes a batch slot)."""
    s3 = _stage3(trained, 0, [*DEFENDED, "stage3.pseudo_weight=0"])
    assert s3["num_pseudo"] == 0 and s3["pseudo_kept"] == 0 and s3["pseudo_stage1_agreement"] > 0.6
    assert "trained on the real images alone" in s3["what_stage3_did"]
    assert s3["top1"] >= trained[2] - 2.0


def test_max_pseudo_share_caps_the_batch_share(trained):
    """``stage3.max_pseudo_share``: however faithful the generator, the pseudo images take at most
    that share of each labeled batch; the real labeled images keep the rest."""
    s3 = _stage3(trained, 0, [*DEFENDED, "stage3.max_pseudo_share=0.25"])
    assert s3["pseudo_trust"] > 0.6 and s3["pseudo_batch_share"] == 0.25 and s3["pseudo_share_capped"]
    assert "capped at stage3.max_pseudo_share=0.25" in s3["what_stage3_did"]
    free = _stage3(trained, 0, DEFENDED)
    assert "pseudo_share_capped" not in free and free["pseudo_batch_share"] > 0.6
    assert s3["top1"] != free["top1"]  # a different batch composition trains a different classifier
    with pytest.raises(
        ConfigError, match=r"^stage3\.max_pseudo_share caps .*stage1-agreement gives \(got 0\.5\)"
    ):
        resolve_config("digits", overrides=["stage3.pseudo_weighting=uniform", "stage3.max_pseudo_share=0.5"])


def test_stage3_can_start_from_given_backbone_weights(trained):
    """``stage3.init_checkpoint``: with a learning rate too small to move anything, stage 3 ends
    with the given backbone weights (stage 1's here) and a fresh head of its own."""
    import torch

    root = trained[0]
    weights = root / "run" / "stage1" / "model.pt"
    frozen = [*PLAIN, "stage3.lr=1e-12", f"stage3.init_checkpoint={weights}"]
    s3 = _stage3(trained, 0, frozen)
    assert s3["init_checkpoint"] == str(weights) and not s3["init_from_stage1"]
    got = torch.load(root / "run" / "stage3" / "model.pt", weights_only=True)
    ref = torch.load(weights, weights_only=True)
    params = [
        k for k in ref if ref[k].is_floating_point() and "running_" not in k
    ]  # BN statistics still move
    same = [k for k in params if torch.allclose(got[k], ref[k], atol=1e-6)]
    moved = [k for k in params if k not in same]
    assert len(same) > 4 and 1 <= len(moved) <= 2, moved  # all but the last layer's weight and bias


def test_stage3_can_start_from_stage1s_thresholds(trained):
    """``stage3.init_thresholds_from_stage1`` starts FreeMatch's thresholds where stage 1's ended
    (not at 1/C, where nearly every pseudo-label of a trained model passes), says so, and is another
    run than the default; without the fine-tuning it carries nothing and is refused up front."""
    from dpt_engine.ssl.trainer import final_thresholds

    root = trained[0]
    s1_tau = float(final_thresholds(root / "run" / "stage1")["tau"])
    carried = _stage3(trained, 0, [*DEFENDED, "stage3.init_thresholds_from_stage1=true"])
    assert carried["init_thresholds_from_stage1"] and carried["initial_global_threshold"] == pytest.approx(
        s1_tau
    )
    assert s1_tau > 0.5 and "thresholds started where stage 1's ended" in carried["what_stage3_did"]
    plain = _stage3(trained, 0, DEFENDED)
    assert not plain["init_thresholds_from_stage1"] and "initial_global_threshold" not in plain
    assert plain["resumed_from_step"] == 0  # not the carried run's checkpoint: another fingerprint
    with pytest.raises(ConfigError, match="init_thresholds_from_stage1"):
        resolve_config("digits", overrides=[*BASE, *PLAIN, "stage3.init_thresholds_from_stage1=true"])
    with pytest.raises(ConfigError, match="keep_unlabeled=False"):  # no FreeMatch runs without them
        resolve_config(
            "digits",
            overrides=[
                *BASE,
                *DEFENDED,
                "stage3.keep_unlabeled=false",
                "stage3.init_thresholds_from_stage1=true",
            ],
        )
