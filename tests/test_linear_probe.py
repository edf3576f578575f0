"""Linear probe: our L-BFGS logistic regression vs scikit-learn, features, checkpoints, the full fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpt_engine.config.schema import ClassifierConfig
from dpt_engine.data.base import ArrayImageDataset
from dpt_engine.models.classifiers import create_classifier
from dpt_engine.ssl import ClassifierData, extract_features, predict_proba
from dpt_engine.ssl.linear_probe import (
    LinearProbeClassifier,
    LogisticRegressionL2,
    center_normalize,
    fit_linear_probe,
    load_backbone_weights,
    probe_features,
)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    itr, ite = train_test_split(np.arange(len(d.target)), test_size=500, stratify=d.target, random_state=0)
    classes = [str(c) for c in range(10)]

    def make(idx: np.ndarray) -> ArrayImageDataset:
        return ArrayImageDataset(torch.from_numpy(images[idx]), torch.from_numpy(d.target[idx]), classes)

    return make(itr), make(ite)


def _pixel_features(train: ArrayImageDataset, test: ArrayImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    xtr = train.images.flatten(1).double() / 255.0
    xte = test.images.flatten(1).double() / 255.0
    mu = xtr.mean(0)
    return center_normalize(xtr, mu), center_normalize(xte, mu)


@pytest.mark.parametrize("l2", [1e-2, 1e-4])
def test_logistic_regression_matches_sklearn(digits, l2):
    from sklearn.linear_model import LogisticRegression

    train, test = digits
    ztr, zte = _pixel_features(train, test)
    n = len(ztr)
    ours = LogisticRegressionL2(l2, max_iter=1000, tol=1e-9).fit(ztr, train.labels, 10)
    ref = LogisticRegression(C=1.0 / (l2 * n), fit_intercept=False, max_iter=20000, tol=1e-10)
    ref.fit(ztr.numpy(), train.labels.numpy())  # multinomial lbfgs (sklearn's default for 10 classes)
    w_ref = torch.from_numpy(ref.coef_)
    assert ours.converged_
    obj_ref = ours._objective(w_ref, ztr, train.labels, None).item()
    assert ours.objective_ == pytest.approx(obj_ref, rel=1e-6)
    assert ((ours.coef_ - w_ref).norm() / w_ref.norm()).item() < 1e-3
    acc = (ours.predict(zte) == test.labels).double().mean().item() * 100
    acc_ref = (ref.predict(zte.numpy()) == test.labels.numpy()).mean() * 100
    assert abs(acc - acc_ref) <= 1.0
    assert acc > 90.0


def test_sample_weights_equal_duplication(digits):
    train, _ = digits
    z = _pixel_features(train, train)[0][:300]
    y = train.labels[:300]
    w = torch.ones(300, dtype=torch.float64)
    w[:100] = 2.0
    weighted = LogisticRegressionL2(1e-3, tol=1e-10).fit(z, y, 10, sample_weight=w)
    dup = LogisticRegressionL2(1e-3, tol=1e-10).fit(torch.cat([z, z[:100]]), torch.cat([y, y[:100]]), 10)
    torch.testing.assert_close(weighted.coef_, dup.coef_, rtol=1e-5, atol=1e-6)


def test_vit_features_are_cls_token_before_final_norm():
    torch.manual_seed(0)
    model = create_classifier("timm:vit_tiny_patch16_224", 10, 1, 16, patch_size=4, depth=2).eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        got = probe_features(model, x)
        ((_, prefix),) = model.model.forward_intermediates(
            model.norm(x),
            indices=1,
            norm=False,
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        post_norm_cls = model.model.forward_features(model.norm(x))[:, 0]
    assert got.shape == (3, 192)
    torch.testing.assert_close(got, prefix[:, 0])
    assert not torch.allclose(got, post_norm_cls)


def test_extract_features_cnn_and_pixels(digits):
    train, _ = digits
    model = create_classifier("cnn-small", 10, 1, 8)
    feats = extract_features(model, train, np.arange(37), batch_size=16)
    assert feats.shape == (37, model.num_features) and feats.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(feats, model.eval().forward_features(train.images[:37].float() / 255))


def test_load_backbone_weights(tmp_path):
    torch.manual_seed(0)
    src = create_classifier("cnn-small", 10, 1, 8)
    path = tmp_path / "ckpt.pt"
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        want = src.eval().forward_features(x)
    # DDP-style prefixes under "model"; a 10-class head into a 5-class model (the head is ignored)
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = create_classifier("cnn-small", 5, 1, 8)
    load_backbone_weights(dst, path)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval().forward_features(x), want)
    # MSN-style: the encoder under "target_encoder", no head at all
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    torch.save({"target_encoder": sd}, path)
    dst = create_classifier("cnn-small", 5, 1, 8)
    load_backbone_weights(dst, path)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval().forward_features(x), want)

    torch.save({k: v for k, v in sd.items() if "stages.2" not in k}, path)
    with pytest.raises(ValueError, match=r"missing keys.*stages\.2"):
        load_backbone_weights(dst, path)
    torch.save({**sd, "encoder.extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys.*encoder\.extra\.weight"):
        load_backbone_weights(dst, path)
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(dst, tmp_path / "nope.pt")


def test_fit_linear_probe_on_pixels(digits, tmp_path):
    train, test = digits
    rng = np.random.default_rng(0)
    lab = np.concatenate(
        [rng.choice(np.flatnonzero(train.labels.numpy() == c), 4, replace=False) for c in range(10)]
    )
    cfg = ClassifierConfig(learner="linear-probe", backbone="pixels", probe_l2=1e-3)
    data = ClassifierData(train, lab, train, np.arange(len(train)), test, 10)
    res = fit_linear_probe(cfg, data, tmp_path, torch.device("cpu"), seed=0, progress=False)
    assert isinstance(res.model, LinearProbeClassifier)
    assert res.test_top1 is not None and res.test_top1 > 60.0
    assert res.history[0]["converged"] and res.resumed_from == 0
    probs = predict_proba(res.model, test)
    assert probs.shape == (500, 10)
    assert (probs.argmax(1) == test.labels).double().mean().item() * 100 == pytest.approx(res.test_top1)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(saved) == {"center", "head.weight"} and saved["head.weight"].shape == (10, 64)

    # same result as fitting the pieces by hand
    feats = train.images[lab].flatten(1).float() / 255
    z = center_normalize(feats, feats.double().mean(0).float())
    lr = LogisticRegressionL2(1e-3, max_iter=cfg.probe_max_iter).fit(z, train.labels[lab], 10)
    torch.testing.assert_close(res.model.head.weight, lr.coef_.float())


def test_fit_linear_probe_with_checkpoint(digits, tmp_path):
    train, test = digits
    torch.manual_seed(1)
    src = create_classifier("timm:resnet10t", 10, 1, 8)
    torch.save({"state_dict": src.model.state_dict()}, tmp_path / "w.pt")
    cfg = ClassifierConfig(
        learner="linear-probe", backbone="timm:resnet10t", probe_checkpoint=str(tmp_path / "w.pt")
    )
    data = ClassifierData(train, np.arange(50), None, None, test.subset(np.arange(40)), 10)
    res = fit_linear_probe(cfg, data, tmp_path / "run", torch.device("cpu"), seed=0, progress=False)
    assert all(not p.requires_grad for p in res.model.backbone.parameters())
    res.model.train()
    assert not res.model.backbone.training
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(res.model.backbone.forward_features(x), src.eval().forward_features(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_logistic_regression_on_gpu_matches_cpu(digits):
    train, test = digits
    ztr, _ = _pixel_features(train, test)
    cpu = LogisticRegressionL2(1e-3, tol=1e-9).fit(ztr, train.labels, 10)
    gpu = LogisticRegressionL2(1e-3, tol=1e-9, device="cuda").fit(ztr, train.labels, 10)
    torch.testing.assert_close(gpu.coef_.cpu(), cpu.coef_, rtol=1e-4, atol=1e-5)
