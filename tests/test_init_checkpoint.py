"""``stage1.init_checkpoint`` / ``stage3.init_checkpoint``: a trainable learner starts from given
backbone weights (e.g. a self-supervised pretraining's) with a fresh classifier head."""

from __future__ import annotations

import pytest
import torch

from dpt_engine.config.base import ConfigError
from dpt_engine.config.presets import resolve_config
from dpt_engine.data import build_splits
from dpt_engine.models.classifiers import create_classifier
from dpt_engine.pipeline import setup_run
from dpt_engine.stages.classifier_stage import check_classifier, classifier_fingerprint, initial_weights
from dpt_engine.stages.stage1 import run_stage1

TINY = [
    "data.labels_per_class=1",
    "run.threads=1",
    "stage1.steps=60",
    "stage1.eval_every=60",
    "stage1.checkpoint_every=60",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A cnn-small trained with every digits training label: features the fresh head can use at once."""
    from dpt_engine.ssl import ClassifierData, fit_classifier

    root = tmp_path_factory.mktemp("init_ckpt")
    cfg = resolve_config("digits", overrides=TINY)
    sp = build_splits(cfg.data)
    data = ClassifierData(
        labeled=sp.train,
        labeled_idx=torch.arange(len(sp.train)).numpy(),
        unlabeled=None,
        unlabeled_idx=None,
        test=sp.test,
        num_classes=sp.num_classes,
    )
    sup = resolve_config(
        "digits", overrides=[*TINY, "stage1.learner=supervised", "stage1.steps=300", "stage1.batch_size=64"]
    ).stage1
    fit = fit_classifier(sup, data, root / "sup", torch.device("cpu"), 7, progress=False)
    path = root / "backbone.pt"
    torch.save({k: v.detach().cpu() for k, v in fit.model.state_dict().items()}, path)
    return root, sp, path, fit.test_top1


def test_config_rejects_init_checkpoint_where_it_cannot_apply(tmp_path):
    w = tmp_path / "w.pt"
    w.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"stage1\.init_checkpoint.*probe_checkpoint"):
        resolve_config("digits", overrides=["stage1.learner=linear-probe", f"stage1.init_checkpoint={w}"])
    with pytest.raises(ConfigError, match=r"stage3\.init_checkpoint and init_from_stage1"):
        resolve_config("digits", overrides=["stage3.init_from_stage1=true", f"stage3.init_checkpoint={w}"])


def test_initial_weights_take_the_backbone_and_keep_a_fresh_head(pretrained):
    _, sp, path, _ = pretrained
    cfg = resolve_config("digits", overrides=[*TINY, f"stage1.init_checkpoint={path}"]).stage1
    state = initial_weights(cfg, sp, seed=3)
    saved = torch.load(path, weights_only=True)
    torch.manual_seed(3)
    fresh = create_classifier(cfg.backbone, sp.num_classes, sp.channels, sp.image_size).state_dict()
    head = [k for k in state if not torch.equal(state[k], saved[k])]
    assert head and all(torch.equal(state[k], fresh[k]) for k in head)  # the head is the seed's own
    assert len(head) <= 2  # weight and bias of the last layer; everything else is the checkpoint's
    assert initial_weights(resolve_config("digits", overrides=TINY).stage1, sp, seed=3) is None


def test_bad_weights_fail_before_the_run_starts(pretrained, tmp_path):
    _, sp, _, _ = pretrained
    other = tmp_path / "other.pt"
    torch.save(create_classifier("wrn-28-2", 10, 1, 8).state_dict(), other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for bad in (other, junk):
        cfg = resolve_config("digits", overrides=[*TINY, f"stage1.init_checkpoint={bad}"])
        with pytest.raises(ConfigError, match=r"^stage1\.init_checkpoint=.*same stage1\.backbone"):
            check_classifier("stage1", cfg.stage1, sp)
        run = tmp_path / f"run_{bad.stem}"
        with pytest.raises(ConfigError):
            run_stage1(setup_run(cfg, run, progress=False), sp)
        assert not (run / "stage1" / "summary.json").exists()


def test_fingerprint_follows_the_weights_not_only_the_path(pretrained, tmp_path):
    _, _, path, _ = pretrained
    assert "init_checkpoint" not in classifier_fingerprint(resolve_config("digits", overrides=TINY).stage1)
    copy = tmp_path / "w.pt"
    copy.write_bytes(path.read_bytes())
    cfg = resolve_config("digits", overrides=[*TINY, f"stage1.init_checkpoint={copy}"]).stage1
    before = classifier_fingerprint(cfg)
    sd = torch.load(copy, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, copy)
    assert classifier_fingerprint(cfg) != before


def test_stage1_starts_from_the_weights(pretrained, tmp_path):
    """60 FreeMatch steps on 1 label per class: from the pretrained backbone the fresh head lands
    near the supervised model; from a random init the network is still far from it."""
    _, sp, path, sup_top1 = pretrained
    scratch = run_stage1(
        setup_run(resolve_config("digits", overrides=TINY), tmp_path / "a", progress=False), sp
    )
    cfg = resolve_config("digits", overrides=[*TINY, f"stage1.init_checkpoint={path}"])
    warm = run_stage1(setup_run(cfg, tmp_path / "b", progress=False), sp)
    print(
        f"supervised {sup_top1:.1f}, scratch {scratch.summary['top1']:.1f}, warm {warm.summary['top1']:.1f}"
    )
    assert warm.summary["top1"] > scratch.summary["top1"] + 10
    assert warm.summary["top1"] > sup_top1 - 5


def test_a_probe_checkpoint_that_does_not_fit_names_the_checkpoint_not_the_backbone(tmp_path):
    cfg = resolve_config("digits", overrides=TINY)
    sp = build_splits(cfg.data)
    other = tmp_path / "other.pt"
    torch.save(create_classifier("wrn-28-2", 10, 1, 8).state_dict(), other)
    probe = ["stage1.learner=linear-probe", "stage1.backbone=cnn-small"]
    good = tmp_path / "good.pt"
    torch.save(create_classifier("cnn-small", 10, 1, 8).state_dict(), good)
    check_classifier(
        "stage1", resolve_config("digits", overrides=[*probe, f"stage1.probe_checkpoint={good}"]).stage1, sp
    )
    bad = resolve_config("digits", overrides=[*probe, f"stage1.probe_checkpoint={other}"]).stage1
    with pytest.raises(
        ConfigError, match=r"^stage1\.probe_checkpoint=.*does not fit stage1\.backbone='cnn-small'"
    ):
        check_classifier("stage1", bad, sp)
    # a backbone that cannot be built is still reported as the backbone's fault
    vit = resolve_config("digits", overrides=[*probe, "stage1.backbone=msn:vit_small_patch16"]).stage1
    with pytest.raises(
        ConfigError, match=r"^stage1\.backbone='msn:vit_small_patch16' cannot be built for 1-channel 8px"
    ):
        check_classifier("stage1", vit, sp)
