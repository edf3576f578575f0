"""Linear probe on a frozen backbone: DPT's ImageNet stage-1 / stage-3 classifier.

Recipe (DPT, following MSN's logistic-regression evaluation, Assran et al. 2022):

1. features ``phi(x)`` of a frozen backbone -- for timm ViTs the CLS token of the last
   transformer block *before* the final LayerNorm (mean of the patch tokens for ViTs without a
   CLS token); for other registry models ``forward_features`` (pooled pre-logits); for the
   special backbone ``pixels`` the flattened pixel values in ``[0, 1]``;
2. centring by the mean ``mu`` of the *training* features (stored) and L2 normalisation:
   ``z = (phi - mu) / ||phi - mu||``;
3. multinomial logistic regression without intercept, ``W`` of shape ``(C, F)``::

       min_W  (1 / sum_i w_i) sum_i w_i CE(W z_i, y_i)  +  (l2 / 2) ||W||_F^2

   solved full-batch with L-BFGS (strong-Wolfe line search) to a gradient tolerance, on any
   device. With unit weights this is scikit-learn's ``LogisticRegression(C=1 / (l2 N),
   fit_intercept=False)`` objective up to the factor ``l2 N``. (MSN/DPT use ``l2 = 0.0025 / N``
   in this parameterisation; ``cfg.probe_l2`` is ``l2`` itself.)

The CLS token is taken with a forward hook on ``blocks[-1]`` (timm's ``forward_features`` runs
the blocks, then the final norm; the hook sees the block output before that norm).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import ClassifierConfig
from ..data.base import ImageDataset, iterate_batches
from ..models.classifiers import create_classifier
from ..models.timm_classifier import TimmClassifier
from ..utils.io import atomic_torch_save, atomic_write_json
from ..utils.pixels import uint8_to_unit
from .trainer import ClassifierData, FitResult, evaluate_top1

__all__ = [
    "LinearProbeClassifier",
    "LogisticRegressionL2",
    "PixelFeatures",
    "build_probe_backbone",
    "extract_features",
    "fit_linear_probe",
    "load_backbone_weights",
    "probe_features",
]

# unexpected checkpoint keys under these prefixes (projection heads, prototypes) are ignored
_IGNORABLE_PREFIXES = ("fc.", "head.", "prototypes", "projector.", "predictor.", "head_drop.")


class PixelFeatures(nn.Module):
    """The ``pixels`` backbone: flattened pixel values in ``[0, 1]``, ``(B, C*H*W)``."""

    def __init__(self, in_chans: int, image_size: int):
        super().__init__()
        self.num_features = in_chans * image_size * image_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens") and len(model.blocks) > 0


def probe_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Probe features ``(B, F)`` of float images ``x`` in ``[0, 1]`` (see the module docstring)."""
    if isinstance(backbone, TimmClassifier) and _is_vit(backbone.model):
        vit = backbone.model
        captured: dict[str, torch.Tensor] = {}
        hook = vit.blocks[-1].register_forward_hook(lambda _m, _i, out: captured.__setitem__("x", out))
        try:
            backbone.forward_tokens(x)
        finally:
            hook.remove()
        tokens = captured["x"]  # (B, N, D), before the final norm
        if getattr(vit, "cls_token", None) is not None:
            return tokens[:, 0]  # (B, D) CLS token
        return tokens[:, vit.num_prefix_tokens :].mean(dim=1)  # (B, D)
    return backbone.forward_features(x)


@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    dataset: ImageDataset,
    indices: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> torch.Tensor:
    """Probe features ``(N, F)`` float32 on CPU of ``dataset[indices]``; the backbone is put in eval mode."""
    device = torch.device(device)
    backbone = backbone.to(device).eval()
    out = []
    for images, _, _ in iterate_batches(dataset, indices, batch_size, num_workers=num_workers):
        x = uint8_to_unit(images.to(device, non_blocking=True))  # (B, C, H, W)
        out.append(probe_features(backbone, x).float().cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


class LogisticRegressionL2:
    """Multinomial logistic regression, no intercept, L2 penalty, full-batch L-BFGS.

    Objective ``J(W) = sum_i w_i CE(W x_i, y_i) / sum_i w_i + (l2 / 2) ||W||^2`` with ``W``
    ``(C, F)``, started at 0, minimised by ``torch.optim.LBFGS`` (strong-Wolfe line search) until
    ``max |grad J| <= tol``, no further progress (change below 1e-12), or ``max_iter``
    iterations. After ``fit``: ``coef_`` ``(C, F)``, ``n_iter_``, ``objective_``, ``grad_max_``,
    ``converged_`` (stopped by a tolerance rather than by ``max_iter``).
    """

    def __init__(
        self,
        l2: float,
        max_iter: int = 300,
        tol: float = 1e-6,
        history_size: int = 20,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ):
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.l2, self.max_iter, self.tol, self.history_size = (
            float(l2),
            int(max_iter),
            float(tol),
            int(history_size),
        )
        self.device, self.dtype = torch.device(device), dtype
        self.coef_: Optional[torch.Tensor] = None

    def _objective(
        self, W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor]
    ) -> torch.Tensor:
        ce = F.cross_entropy(X @ W.T, y, reduction="none")  # (N,)
        data = ce.mean() if w is None else (ce * w).sum() / w.sum()
        return data + 0.5 * self.l2 * (W * W).sum()

    def fit(
        self,
        X: torch.Tensor,
        y: torch.Tensor,
        num_classes: Optional[int] = None,
        sample_weight: Optional[torch.Tensor | np.ndarray] = None,
    ) -> LogisticRegressionL2:
        """Fit on features ``X`` ``(N, F)`` and labels ``y`` ``(N,)`` in ``[0, num_classes)``."""
        X = torch.as_tensor(X).to(self.device, self.dtype)
        y = torch.as_tensor(y).to(self.device, torch.long)
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"X must be (N, F) and y (N,), got {tuple(X.shape)} and {tuple(y.shape)}")
        num_classes = int(num_classes if num_classes is not None else int(y.max()) + 1)
        w = None if sample_weight is None else torch.as_tensor(sample_weight).to(self.device, self.dtype)
        W = torch.zeros(num_classes, X.shape[1], device=self.device, dtype=self.dtype, requires_grad=True)
        opt = torch.optim.LBFGS(
            [W],
            lr=1.0,
            max_iter=self.max_iter,
            max_eval=self.max_iter * 5 // 4 + 1,
            tolerance_grad=self.tol,
            tolerance_change=1e-12,
            history_size=self.history_size,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = self._objective(W, X, y, w)
            loss.backward()
            return loss

        opt.step(closure)
        loss = closure()
        self.n_iter_ = int(opt.state[W].get("n_iter", 0))
        self.objective_ = float(loss.detach())
        self.grad_max_ = float(W.grad.abs().max())
        # stopped by a tolerance (gradient, or no more progress) rather than by max_iter
        self.converged_ = self.grad_max_ <= self.tol or self.n_iter_ < self.max_iter
        self.coef_ = W.detach().clone()
        return self

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C) = X W^T``."""
        if self.coef_ is None:
            raise RuntimeError("call fit() first")
        return torch.as_tensor(X).to(self.device, self.dtype) @ self.coef_.T

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        return self.decision_function(X).softmax(dim=1)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        return self.decision_function(X).argmax(dim=1)


def center_normalize(features: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``(f - mu) / ||f - mu||`` row-wise, ``(N, F)``."""
    return F.normalize(features - center, dim=1)


class LinearProbeClassifier(nn.Module):
    """Frozen backbone -> probe features -> centre (training mean) -> L2-normalise -> linear head.

    Follows the registry contract (float images in ``[0, 1]``; ``forward_features`` gives the
    normalised features ``(B, F)``; ``head`` is a bias-free ``nn.Linear``), so ``predict_proba``
    works on it. The backbone stays in eval mode and has ``requires_grad=False``.
    """

    def __init__(self, backbone: nn.Module, center: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.register_buffer("center", center.detach().float().clone())  # (F,)
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(weight.float())  # (C, F)

    def train(self, mode: bool = True) -> LinearProbeClassifier:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return center_normalize(probe_features(self.backbone, x).float(), self.center)  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted part only (``center``, ``head.weight``), without the backbone's weights."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``backbone`` (into the timm model for ``timm:`` backbones).

    Accepts a state dict or a dict holding one under ``target_encoder`` / ``state_dict`` /
    ``model``; strips ``module.`` prefixes; ignores the classifier head (the probe never uses
    it, and its shape differs). Missing keys other than the classifier head, and
    unexpected keys other than projection heads (``fc.``, ``head.``, ``prototypes`` ...), raise
    ``ValueError`` naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe checkpoint {path} does not exist (no weights are downloaded)")
    from ..models.checkpoints import read_checkpoint  # safe: tensors only, a clear error otherwise

    sd: Any = read_checkpoint(path)
    for key in ("target_encoder", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(
            f"{path}: expected a state dict (or one under 'target_encoder'/'state_dict'/'model')"
        )
    clean = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module.") :]
        clean[k] = v
    target = backbone.model if isinstance(backbone, TimmClassifier) else backbone
    head = _head_of(target)
    head_keys = {f"{n}.{k}" for n, m in target.named_modules() if m is head and n for k in m.state_dict()}
    clean = {k: v for k, v in clean.items() if k not in head_keys}  # the classifier head is never used
    try:
        missing, unexpected = target.load_state_dict(clean, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path}: weights do not fit the backbone: {e}") from e
    missing = [k for k in missing if k not in head_keys]
    unexpected = [k for k in unexpected if not k.startswith(_IGNORABLE_PREFIXES)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the backbone: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}; unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )


def _head_of(model: nn.Module) -> Optional[nn.Module]:
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return getattr(model, "head", None)


def build_probe_backbone(
    name: str, num_classes: int, in_chans: int, image_size: int, checkpoint: Optional[str] = None
) -> nn.Module:
    """``pixels`` or a registry / ``timm:`` backbone, with ``checkpoint`` weights if given."""
    if name == "pixels":
        backbone: nn.Module = PixelFeatures(in_chans, image_size)
    else:
        backbone = create_classifier(name, num_classes, in_chans, image_size)
    if checkpoint:
        load_probe_weights(backbone, name, checkpoint)
    return backbone


def load_probe_weights(backbone: nn.Module, name: str, checkpoint: str) -> None:
    """Load ``checkpoint`` into the probe's ``name`` backbone (built by :func:`build_probe_backbone`)."""
    if name == "pixels":
        raise ValueError("the 'pixels' backbone takes no probe_checkpoint")
    if name.startswith("msn:"):  # MSN .pth.tar: target_encoder, exact key/shape checks
        from ..models.msn import load_msn_checkpoint

        load_msn_checkpoint(backbone, checkpoint)
    else:
        load_backbone_weights(backbone, checkpoint)


def fit_linear_probe(
    cfg: ClassifierConfig,
    data: ClassifierData,
    work_dir: Path,
    device: torch.device,
    seed: int,
    progress: bool = True,
) -> FitResult:
    """Fit the probe on ``data.labeled[labeled_idx]`` (weighted by ``labeled_weight``); unlabeled data is unused.

    Writes ``work_dir/model.pt`` (``center`` and ``head.weight`` only) and ``history.json``.
    The result's model is a :class:`LinearProbeClassifier` on ``device``. The fit is
    deterministic (``W`` starts at 0), so ``seed`` only seeds a randomly initialised backbone.
    """
    data.validate(semi_supervised=False)
    device = torch.device(device)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_probe_backbone(
            cfg.backbone,
            data.num_classes,
            data.labeled.channels,
            data.labeled.image_size,
            cfg.probe_checkpoint,
        )
    feats = extract_features(backbone, data.labeled, data.labeled_idx, cfg.probe_batch_size, device)  # (N, F)
    y = data.labeled.labels[torch.as_tensor(np.asarray(data.labeled_idx), dtype=torch.long)]
    center = feats.double().mean(dim=0).float()  # (F,)
    z = center_normalize(feats, center)
    # DPT/MSN's penalty is lambda = 0.0025 / N on the mean loss (probe_l2_per_sample=true)
    l2 = cfg.probe_l2 / len(z) if cfg.probe_l2_per_sample else cfg.probe_l2
    lr = LogisticRegressionL2(l2, cfg.probe_max_iter, device=device).fit(
        z, y, data.num_classes, sample_weight=data.labeled_weight
    )
    model = LinearProbeClassifier(backbone, center, lr.coef_).to(device).eval()
    row: dict[str, Any] = {
        "step": lr.n_iter_,
        "loss": lr.objective_,
        "grad_max": lr.grad_max_,
        "converged": lr.converged_,
        "num_features": int(feats.shape[1]),
        "num_train": int(feats.shape[0]),
        "time": time.perf_counter() - t0,
    }
    test_top1 = None
    if data.test is not None:
        test_top1 = row["test_top1"] = evaluate_top1(
            model, data.test, batch_size=cfg.probe_batch_size, device=device
        )
    if progress:
        acc = "" if test_top1 is None else f", test top-1 {test_top1:.2f}%"
        print(
            f"linear probe: {row['num_train']} x {row['num_features']} features, {lr.n_iter_} L-BFGS iterations{acc}"
        )
    history = [row]
    atomic_torch_save(work_dir / "model.pt", model.head_state_dict())
    atomic_write_json(work_dir / "history.json", history)
    return FitResult(model=model, history=history, test_top1=test_top1, resumed_from=0)
