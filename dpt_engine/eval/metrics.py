"""Metrics on Inception features: FID (the scipy reference and the fast exact form), and KID and
improved precision/recall computed by torch-fidelity itself (with this package's argument checks
and defaults, which are torch-fidelity's)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._requirements import missing_torch_fidelity

try:
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
except ImportError as _e:  # pragma: no cover - torch-fidelity is part of the [diffusion] extra
    raise missing_torch_fidelity() from _e

from ..utils.io import atomic_save_npz

__all__ = [
    "DEFAULT_KID_SEED",
    "FeatureStats",
    "compute_metrics_from_features",
    "frechet_distance",
    "frechet_distance_fast",
    "kernel_inception_distance",
    "precision_recall",
    "resolve_kid_subset_size",
    "resolve_prc_neighborhood",
]

_KID_DEFAULT_SUBSET_SIZE = 1000
_PRC_DEFAULT_NEIGHBORHOOD = 3
DEFAULT_KID_SEED = 2020  # torch-fidelity's rng_seed: same KID subsets, so the same KID numbers


# --------------------------------------------------------------------------------------------------
# Statistics and metrics on features
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set (float64 mu (D,), sigma (D, D)), optionally the features."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    features: np.ndarray | None = None  # float32 (N, D); KID and precision/recall need it

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray, keep_features: bool = True) -> FeatureStats:
        f = _as_numpy_features(features)
        if f.shape[0] < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
        f64 = f.astype(np.float64)
        return cls(
            mu=f64.mean(axis=0),
            sigma=np.cov(f64, rowvar=False),
            num_samples=int(f.shape[0]),
            features=f.astype(np.float32) if keep_features else None,
        )

    def save(self, path: str | os.PathLike, with_features: bool = True) -> None:
        """Write an ``.npz`` (keys mu, sigma, num_samples[, features]) atomically."""
        arrays: dict[str, np.ndarray] = {
            "mu": self.mu,
            "sigma": self.sigma,
            "num_samples": np.asarray(self.num_samples),
        }
        if with_features and self.features is not None:
            arrays["features"] = self.features
        atomic_save_npz(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read an ``.npz`` with ``mu`` and ``sigma`` (e.g. written by :meth:`save`; ``features`` optional)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"feature statistics file not found: {p}")
        with np.load(p) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"{p} has no 'mu'/'sigma' arrays (keys: {sorted(z.files)})")
            feats = z["features"] if "features" in z else None
            n = int(z["num_samples"]) if "num_samples" in z else (len(feats) if feats is not None else -1)
            return cls(
                mu=z["mu"].astype(np.float64),
                sigma=z["sigma"].astype(np.float64),
                num_samples=n,
                features=feats,
            )


def _as_numpy_features(f: torch.Tensor | np.ndarray) -> np.ndarray:
    a = f.detach().cpu().numpy() if torch.is_tensor(f) else np.asarray(f)
    if a.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {a.shape}")
    return a


def _check_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> tuple[np.ndarray, ...]:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Reference Fréchet distance ``|mu1-mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))``, computed by
    torch-fidelity (``fid_statistics_to_metric``: the eigenvalues of ``S1 S2``), in float64. Slow
    at d=2048 (~15-30 s on 2 CPU cores); :func:`frechet_distance_fast` gives the same number in
    ~1-3 s and is what :func:`compute_metrics_from_features` uses."""
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    out = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    return float(out["frechet_inception_distance"])


def frechet_distance_fast(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Exact Fréchet distance without a matrix square root.

    ``tr sqrtm(S1 S2) = sum_i sqrt(lambda_i(L^T S2 L))`` for any factor ``S1 = L L^T``, and ``L^T S2 L``
    is symmetric PSD, so its eigenvalues come from ``eigvalsh`` (no eigenvectors). ``L`` is a
    rank-revealing pivoted Cholesky factor (LAPACK ``?pstrf``), which is exact for the singular
    covariances of sets smaller than the feature dimension. Agrees with :func:`frechet_distance` to
    ~1e-5 absolute (the sqrtm of a singular product carries that much noise); float64 throughout.
    """
    from scipy.linalg import lapack

    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    tr_covmean = 0.0
    if np.trace(sigma1) > 0 and np.trace(sigma2) > 0:
        c, piv, rank, info = lapack.dpstrf(np.array(sigma1, order="F"), lower=1, tol=-1.0)
        if info < 0:
            raise ValueError(f"pivoted Cholesky failed (LAPACK info={info})")
        factor = np.tril(c)[:, :rank]  # (D, r): P^T S1 P = factor factor^T
        lower = np.empty_like(factor)
        lower[piv - 1] = factor  # undo the pivoting: S1 = lower lower^T
        lt = torch.from_numpy(lower)  # torch: MKL matmul/eigvalsh are much faster than numpy's here
        m = lt.T @ torch.from_numpy(sigma2) @ lt  # (r, r) symmetric PSD
        ev = torch.linalg.eigvalsh((m + m.T) * 0.5).numpy()
        tr_covmean = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def kernel_inception_distance(
    gen_features: torch.Tensor | np.ndarray,
    real_features: torch.Tensor | np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = DEFAULT_KID_SEED,
) -> tuple[float, float]:
    """KID (mean, std) over ``subsets`` random subsets, computed by torch-fidelity
    (``kid_features_to_metric``: unbiased MMD^2, cubic polynomial kernel ``(x.y / D + 1)^3``, subsets
    drawn from ``np.random.RandomState(seed)``). ``subset_size=None`` picks
    ``min(1000, N_gen, N_real)``; a size outside [2, min(N)] is an error naming the limit."""
    f1 = torch.as_tensor(_as_numpy_features(gen_features), dtype=torch.float64)
    f2 = torch.as_tensor(_as_numpy_features(real_features), dtype=torch.float64)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: {f1.shape[1]} vs {f2.shape[1]}")
    m = resolve_kid_subset_size(f1.shape[0], f2.shape[0], subset_size)
    out = kid_features_to_metric(f1, f2, kid_subsets=subsets, kid_subset_size=m, rng_seed=seed, verbose=False)
    return float(out["kernel_inception_distance_mean"]), float(out["kernel_inception_distance_std"])


def resolve_kid_subset_size(n_gen: int, n_real: int, subset_size: int | None) -> int:
    """The KID subset size to use: ``min(1000, n_gen, n_real)`` by default; must be in [2, min(N)]."""
    limit = min(n_gen, n_real)
    if subset_size is None:
        subset_size = min(_KID_DEFAULT_SUBSET_SIZE, limit)
    if subset_size < 2 or subset_size > limit:
        raise ValueError(
            f"KID subset size {subset_size} must be in [2, min(N_gen, N_real)] = [2, {limit}] "
            f"(N_gen={n_gen}, N_real={n_real}); pass kid_subset_size=None to choose it automatically"
        )
    return subset_size


def resolve_prc_neighborhood(n_gen: int, n_real: int, k: int | None) -> int:
    """The k of k-NN precision/recall: ``min(3, min(N) - 1)`` by default; must be in [1, min(N) - 1]."""
    limit = min(n_gen, n_real) - 1
    if k is None:
        k = min(_PRC_DEFAULT_NEIGHBORHOOD, limit)
    if k < 1 or k > limit:
        raise ValueError(
            f"precision/recall neighbourhood k={k} must be in [1, min(N_gen, N_real) - 1] = [1, {limit}] "
            f"(N_gen={n_gen}, N_real={n_real}); pass prc_neighborhood=None to choose it automatically"
        )
    return k


def precision_recall(
    gen_features: torch.Tensor | np.ndarray,
    real_features: torch.Tensor | np.ndarray,
    *,
    k: int | None = None,
    batch_size: int = 10000,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), computed by torch-fidelity
    (``prc_features_to_metric``): precision is the share of generated samples inside the k-NN ball
    of some real sample, recall the share of real samples inside the k-NN ball of some generated
    one. ``k=None``: ``min(3, min(N) - 1)``; ``batch_size`` rows per distance block."""
    g = torch.as_tensor(_as_numpy_features(gen_features), dtype=torch.float32)
    r = torch.as_tensor(_as_numpy_features(real_features), dtype=torch.float32)
    k = resolve_prc_neighborhood(g.shape[0], r.shape[0], k)
    out = prc_features_to_metric(
        g, r, prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=True, verbose=False
    )
    return float(out["precision"]), float(out["recall"])


def compute_metrics_from_features(
    gen: torch.Tensor | np.ndarray | FeatureStats,
    real: torch.Tensor | np.ndarray | FeatureStats,
    *,
    fid: bool = True,
    kid: bool = True,
    prc: bool = False,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    prc_neighborhood: int | None = None,
    seed: int = DEFAULT_KID_SEED,
) -> dict[str, float]:
    """The metrics of :func:`compute_metrics` from precomputed features (N, D) or :class:`FeatureStats`.

    Returns a dict with ``fid``; ``kid_mean``, ``kid_std``; ``precision``, ``recall`` for the requested
    metrics. KID and precision/recall need the features themselves (not only mu/sigma).
    """
    gs = gen if isinstance(gen, FeatureStats) else FeatureStats.from_features(gen)
    rs = real if isinstance(real, FeatureStats) else FeatureStats.from_features(real)
    out: dict[str, float] = {}
    if fid:
        out["fid"] = frechet_distance_fast(gs.mu, gs.sigma, rs.mu, rs.sigma)
    if kid or prc:
        if gs.features is None or rs.features is None:
            which = "generated" if gs.features is None else "real"
            raise ValueError(
                f"KID and precision/recall need the {which} features, but only mu/sigma are available"
            )
        if kid:
            out["kid_mean"], out["kid_std"] = kernel_inception_distance(
                gs.features, rs.features, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
            )
        if prc:
            out["precision"], out["recall"] = precision_recall(gs.features, rs.features, k=prc_neighborhood)
    return out
