"""Classifier training for DPT's stages 1 and 3: FreeMatch, FixMatch, or supervised.

Learners (``cfg.learner``):

* ``fixmatch`` -- Sohn et al., "FixMatch", NeurIPS 2020. For an unlabeled image ``u`` with weak
  view ``alpha(u)`` and strong view ``A(u)``: ``q = softmax(f(alpha(u)))``, pseudo-label
  ``y^ = argmax q``, mask ``1[max q >= threshold]``, and
  ``L = CE_w(x, y) + lambda_u * mean_u(mask * CE(f(A(u)), y^))``.
* ``freematch`` -- Wang et al., "FreeMatch: Self-adaptive Thresholding for Semi-supervised
  Learning", ICLR 2023. Same consistency loss, but the threshold is self-adaptive
  (:class:`FreeMatchThresholds`), plus the self-adaptive fairness term ``lambda_ent * L_f``
  (:func:`freematch_fairness_loss`).
* ``supervised`` -- weighted CE on weakly augmented labeled images only.

``linear-probe`` (DPT's ImageNet recipe) is fit by :func:`dpt_engine.ssl.linear_probe.fit_linear_probe`;
the classifier stages choose between the two.

Common machinery (FixMatch's recipe): one forward over ``cat(labeled weak, unlabeled weak,
unlabeled strong)`` so BatchNorm sees the whole batch; SGD with (Nesterov) momentum and weight
decay on weights only (not BN / biases); learning rate ``lr * cos(7 pi k / (16 K))`` at step ``k``
of ``K``; an EMA teacher ``ema <- d * ema + (1 - d) * params`` with BN buffers copied, using
``d_k = min(ema_decay, (1 + k) / (10 + k))`` (the usual EMA warm-up, so short runs are not
dominated by the random init); evaluation, pseudo-labels and ``model.pt`` use the EMA model.

Labeled images are drawn in epochs without replacement (a fresh permutation each time the
labeled set is exhausted), unlabeled ones likewise, ``uratio * batch_size`` per step. All sampling
and augmentation randomness comes from one ``torch.Generator`` seeded from ``seed``.

Resumability: every ``cfg.checkpoint_every`` steps (and at the last step) a checkpoint
``work_dir/checkpoints/step-N/`` of the train state stage 2 uses too (``dpt_engine.train.state``
through ``dpt_engine.train.checkpoint``: an atomic directory, every file's sha256 and a signature
in its ``meta.json``, the newest one kept): the model, EMA, optimizer, FreeMatch state, sampler
positions, the generator state, the history and the metric accumulators (``trainer.pt``), the
global random states (``rng-rank0.pt``); re-running ``fit_classifier`` with the same arguments
resumes from it (a ``work_dir/checkpoint.pt`` of the earlier single-file format too). On CPU
an interrupted-and-resumed run ends with bit-identical EMA weights and history (except the
wall-clock ``time`` column) to an uninterrupted one. ``model.pt`` (the EMA state dict) and
``history.json`` are written at the end.

Test hook: with the environment variable ``DPT_TEST_INTERRUPT_AT_STEP=N``, the step loop
(``dpt_engine.train.loop``, shared with stage 2) raises ``KeyboardInterrupt`` right after the first
checkpoint at or after step ``N`` that is not the last, simulating a run killed at that point.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import ClassifierConfig
from ..data.base import DataError, ImageDataset, iterate_batches
from ..models.classifiers import create_classifier
from ..train.checkpoint import CheckpointManager
from ..train.ema import ema_decay_at
from ..train.loop import TrainingSteps
from ..train.state import TRAINER_FILE, TrainState, load_train_state, save_train_state
from ..utils import testhooks
from ..utils.io import atomic_torch_save, atomic_write_json, stable_hash
from ..utils.pixels import uint8_to_unit
from ..utils.precision import resolve_precision
from .augment import strong, weak

__all__ = [
    "INTERRUPT_ENV",
    "THRESHOLDS_FILE",
    "ClassifierData",
    "FitResult",
    "FreeMatchThresholds",
    "classifier_losses",
    "evaluate_top1",
    "final_thresholds",
    "fit_classifier",
    "fixmatch_loss",
    "fixmatch_mask",
    "freematch_fairness_loss",
    "freematch_loss",
    "predict_proba",
]

INTERRUPT_ENV = testhooks.INTERRUPT_AT_STEP_ENV
THRESHOLDS_FILE = "thresholds.pt"  # a FreeMatch run's final threshold state, beside model.pt
_CKPT_VERSION = 2  # 2: the shared train state (dpt_engine.train.state); 1 is resumed too
_MAX_DEVICE_STORE_BYTES = 2 << 30  # image stores up to 2 GiB live on the GPU
_MAX_MATERIALISE_BYTES = 8 << 30  # folder datasets up to 8 GiB are read into memory once


@dataclass
class ClassifierData:
    """What a classifier stage trains and evaluates on.

    ``labeled_idx`` indexes ``labeled`` (labels from ``labeled.labels``, all must be >= 0);
    ``unlabeled_idx`` indexes ``unlabeled`` (labels there are ignored, except as a diagnostic of
    pseudo-label accuracy where known); ``labeled_weight`` gives a per-example loss weight aligned
    with ``labeled_idx`` (stage 3: 1.0 for real images, ``pseudo_weight`` for generated ones).
    With ``absolute_weights`` the weighted labeled loss is divided by the batch's image count, not
    its total weight, so an image of weight 0.5 counts half as much as one of weight 1 whatever else
    is in the batch (and a batch of weight-0 images contributes nothing).

    ``pseudo_share`` (stage 3) fixes the composition of every labeled batch: the first
    ``num_real_labeled`` entries of ``labeled_idx`` are real images and the rest pseudo images,
    each drawn in its own random epochs, and ``round(batch_size * pseudo_share)`` slots of each
    labeled batch (at most all but one) go to pseudo images, the rest to real ones. Without it
    the labeled batch is drawn from all of ``labeled_idx`` alike.
    """

    labeled: ImageDataset
    labeled_idx: np.ndarray
    unlabeled: Optional[ImageDataset]
    unlabeled_idx: Optional[np.ndarray]
    test: Optional[ImageDataset]
    num_classes: int
    labeled_weight: Optional[np.ndarray] = None
    absolute_weights: bool = False
    pseudo_share: Optional[float] = None
    num_real_labeled: Optional[int] = None

    def validate(self, semi_supervised: bool) -> None:
        idx = np.asarray(self.labeled_idx)
        if idx.ndim != 1 or len(idx) == 0:
            raise DataError(f"labeled_idx must be a non-empty 1-D index array, got shape {idx.shape}")
        labels = self.labeled.labels[torch.as_tensor(idx, dtype=torch.long)]
        if (labels < 0).any() or (labels >= self.num_classes).any():
            bad = idx[((labels < 0) | (labels >= self.num_classes)).numpy()][:5].tolist()
            raise DataError(
                f"labeled examples must have labels in [0, {self.num_classes}); e.g. indices {bad}"
            )
        if self.labeled_weight is not None:
            w = np.asarray(self.labeled_weight)
            if w.shape != idx.shape or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
                raise DataError(
                    f"labeled_weight must be finite, >= 0, not all 0 and aligned with labeled_idx "
                    f"(shape {idx.shape}), got shape {w.shape}"
                )
        if self.pseudo_share is not None:
            n_real = self.num_real_labeled
            if not 0.0 <= self.pseudo_share <= 1.0 or n_real is None or not 0 < n_real <= len(idx):
                raise DataError(
                    f"pseudo_share must be in [0, 1] with 0 < num_real_labeled <= {len(idx)} "
                    f"(got pseudo_share={self.pseudo_share}, num_real_labeled={n_real})"
                )
        if semi_supervised and (
            self.unlabeled is None or self.unlabeled_idx is None or len(self.unlabeled_idx) == 0
        ):
            raise DataError("a semi-supervised learner needs unlabeled data (unlabeled and unlabeled_idx)")


@dataclass
class FitResult:
    """The trained model (EMA teacher, eval mode, on the training device) and its record."""

    model: nn.Module
    history: list[dict]
    test_top1: Optional[float]
    resumed_from: int


# --------------------------------------------------------------------------------------------
# Pseudo-label masks and the FreeMatch state
# --------------------------------------------------------------------------------------------


def fixmatch_mask(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """FixMatch's confidence mask: ``1[max_c probs[:, c] >= threshold]``, float ``(B,)``."""
    return (probs.max(dim=1).values >= threshold).to(probs.dtype)


class FreeMatchThresholds:
    """FreeMatch's self-adaptive thresholds (Wang et al. 2023, Sec. 3.2), state on ``device``.

    With EMA momentum ``lambda`` (``cfg.tau_ema``) and the weak-view probabilities ``q_b`` of the
    unlabeled batch (``B`` rows, ``C`` classes), :meth:`update` does::

        tau_t   = lambda * tau_{t-1}   + (1 - lambda) * mean_b max_c q_b(c)          # global
        p~_t    = lambda * p~_{t-1}    + (1 - lambda) * mean_b q_b                     # (C,)
        h~_t    = lambda * h~_{t-1}    + (1 - lambda) * Hist_B(argmax_c q_b(c))       # (C,), sums to 1

    starting from ``tau_0 = 1 / C``, ``p~_0 = h~_0 = 1 / C``. The class-wise thresholds are
    ``tau_t(c) = MaxNorm(p~_t)(c) * tau_t = p~_t(c) / max_c' p~_t(c') * tau_t`` and
    :meth:`mask` is ``1[max_c q(c) >= tau_t(argmax_c q(c))]``. As in the reference implementation
    (USB), the trainer calls ``update`` with the current batch before ``mask``.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999, device: torch.device | str = "cpu"):
        self.num_classes = int(num_classes)
        self.momentum = float(momentum)
        self.tau = torch.tensor(1.0 / num_classes, device=device)  # () global threshold
        self.p_model = torch.full((num_classes,), 1.0 / num_classes, device=device)  # (C,)
        self.label_hist = torch.full((num_classes,), 1.0 / num_classes, device=device)  # (C,)

    @torch.no_grad()
    def update(self, probs_weak: torch.Tensor) -> None:
        """EMA update from the weak-view probabilities ``(B, C)`` of an unlabeled batch."""
        m = self.momentum
        max_probs, max_idx = probs_weak.float().max(dim=1)  # (B,), (B,)
        self.tau = m * self.tau + (1.0 - m) * max_probs.mean()
        self.p_model = m * self.p_model + (1.0 - m) * probs_weak.float().mean(dim=0)
        hist = torch.bincount(max_idx, minlength=self.num_classes).to(self.label_hist.dtype)
        self.label_hist = m * self.label_hist + (1.0 - m) * hist / hist.sum()

    def class_thresholds(self) -> torch.Tensor:
        """``tau_t(c) = p~_t(c) / max p~_t * tau_t``, shape ``(C,)``."""
        return self.p_model / self.p_model.max() * self.tau

    @torch.no_grad()
    def mask(self, probs: torch.Tensor) -> torch.Tensor:
        """``1[max_c q(c) >= tau_t(argmax_c q(c))]`` as float ``(B,)``."""
        max_probs, max_idx = probs.float().max(dim=1)
        return (max_probs >= self.class_thresholds()[max_idx]).to(probs.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "tau": self.tau.clone(),
            "p_model": self.p_model.clone(),
            "label_hist": self.label_hist.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        dev = self.p_model.device
        self.tau = state["tau"].to(dev)
        self.p_model = state["p_model"].to(dev)
        self.label_hist = state["label_hist"].to(dev)


def final_thresholds(work_dir: Path) -> Optional[dict[str, torch.Tensor]]:
    """The FreeMatch threshold state a finished run in ``work_dir`` ended with: its
    ``thresholds.pt``, or for a run from before that file its last step checkpoint's; ``None`` when
    neither holds one (another learner, or the checkpoints were removed)."""
    path = Path(work_dir) / THRESHOLDS_FILE
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        latest = CheckpointManager(Path(work_dir) / "checkpoints", keep=1).latest()
        if latest is None or not (latest / TRAINER_FILE).is_file():
            return None
        state = torch.load(latest / TRAINER_FILE, map_location="cpu", weights_only=True).get("thresholds")
    if not isinstance(state, dict) or set(state) != {"tau", "p_model", "label_hist"}:
        return None
    return {k: torch.as_tensor(v).float() for k, v in state.items()}


def _inv_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0 / x.clamp_min(1e-12), torch.zeros_like(x))


def freematch_fairness_loss(
    logits_strong: torch.Tensor, mask: torch.Tensor, p_model: torch.Tensor, label_hist: torch.Tensor
) -> torch.Tensor:
    """FreeMatch's self-adaptive fairness loss ``L_f`` (Wang et al. 2023, Eq. 11).

    Over the masked strong-view predictions ``p_b = softmax(f(A(u_b)))`` with mean ``p-`` and
    histogram ``h-`` of their argmax::

        L_f = -H(SumNorm(p~_t / h~_t), SumNorm(p- / h-)) = sum_c SumNorm(p~/h~)(c) log SumNorm(p-/h-)(c)

    where ``H`` is the cross-entropy and ``1/0`` is taken as 0. Returns 0 when nothing is masked.
    """
    sel = mask > 0
    if not bool(sel.any()):
        return logits_strong.new_zeros(())
    probs = logits_strong[sel].float().softmax(dim=1)  # (M, C)
    hist = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1]).to(probs.dtype)
    hist = hist / hist.sum()  # (C,)
    target = p_model * _inv_or_zero(label_hist)
    target = target / target.sum()
    mean_prob = probs.mean(dim=0) * _inv_or_zero(hist).detach()
    mean_prob = mean_prob / mean_prob.sum()
    return (target.detach() * torch.log(mean_prob + 1e-12)).sum()


# --------------------------------------------------------------------------------------------
# Data plumbing
# --------------------------------------------------------------------------------------------


class _ImageStore:
    """uint8 images at ``idx`` of ``dataset``, addressed by position ``0 .. len(idx) - 1``.

    In-memory data (and folder data up to 8 GiB, read once) is held as one tensor, on the GPU
    when it fits in 2 GiB; larger folder datasets are read per batch.
    """

    def __init__(self, dataset: ImageDataset, idx: np.ndarray, device: torch.device, num_workers: int = 0):
        self.dataset = dataset
        self.idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        self.device = device
        nbytes = len(self.idx) * dataset.channels * dataset.image_size**2
        self.images: Optional[torch.Tensor] = None
        if dataset.in_memory or nbytes <= _MAX_MATERIALISE_BYTES:
            if dataset.in_memory:
                images = dataset.get_batch(self.idx)
            else:
                images = torch.cat(
                    [b for b, _, _ in iterate_batches(dataset, self.idx, 256, num_workers=num_workers)]
                )
            on_device = device.type != "cpu" and nbytes <= _MAX_DEVICE_STORE_BYTES
            self.images = images.to(device) if on_device else images

    def __len__(self) -> int:
        return len(self.idx)

    def get(self, pos: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` on ``device`` for positions ``pos`` (CPU long tensor)."""
        if self.images is not None:
            out = self.images[pos.to(self.images.device)]
        else:
            out = self.dataset.get_batch(self.idx[pos])
        return out.to(self.device, non_blocking=True)


class _EpochSampler:
    """Positions ``0 .. n - 1`` in random epochs without replacement; state = (perm, pos)."""

    def __init__(self, n: int):
        self.n = n
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self, k: int, gen: torch.Generator) -> torch.Tensor:
        parts, need = [], k
        while need > 0:
            if self.pos >= len(self.perm):
                self.perm, self.pos = torch.randperm(self.n, generator=gen), 0
            take = self.perm[self.pos : self.pos + need]
            self.pos += len(take)
            need -= len(take)
            parts.append(take)
        return torch.cat(parts)  # (k,)

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])


# --------------------------------------------------------------------------------------------
# Inference helpers
# --------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


_CHANNELS_LAST_MIN = 2048  # images: below this the layout change does not pay for the model copy


@torch.inference_mode()
def predict_proba(
    model: nn.Module,
    dataset: ImageDataset,
    indices: Optional[np.ndarray | torch.Tensor] = None,
    batch_size: int = 512,
    device: Optional[torch.device] = None,
    num_workers: int = 0,
) -> torch.Tensor:
    """Softmax probabilities ``(N, num_classes)`` float32 on CPU for ``dataset[indices]`` (all if None).

    The model takes float images in ``[0, 1]`` (the registry contract); it is put in eval mode.
    ``device`` defaults to the model's.
    """
    device = device or _model_device(model)
    model.eval()
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    if (
        device.type == "cpu"
        and len(idx) >= _CHANNELS_LAST_MIN
        and any(isinstance(m, nn.Conv2d) for m in model.modules())
    ):
        # oneDNN's convolutions run ~1.7x faster on NHWC (cnn-small: 1,300 -> 2,300 img/s), with the
        # same results to fp32 rounding; a copy, so the caller's (training) model keeps its layout
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = []
    for images, _, _ in iterate_batches(dataset, idx, batch_size, num_workers=num_workers):
        x = uint8_to_unit(images.to(device, non_blocking=True))  # (B, C, H, W) in [0, 1]
        out.append(model(x).float().softmax(dim=1).cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


def evaluate_top1(
    model: nn.Module,
    dataset: ImageDataset,
    indices: Optional[np.ndarray | torch.Tensor] = None,
    batch_size: int = 512,
    device: Optional[torch.device] = None,
    num_workers: int = 0,
) -> float:
    """Top-1 accuracy in percent of ``model`` on ``dataset[indices]`` (all if None); labels must be known."""
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    labels = dataset.labels[torch.as_tensor(idx, dtype=torch.long)]
    if (labels < 0).any():
        raise DataError("evaluate_top1 needs labels for every evaluated image (found -1)")
    probs = predict_proba(model, dataset, idx, batch_size, device, num_workers)
    return float((probs.argmax(dim=1) == labels).double().mean() * 100.0)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

# running sums kept between history rows: (loss, loss_x, loss_u, loss_f, mask, pl_correct, pl_known, steps)
_N_ACC = 8


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights (ndim >= 2) only, not on BN parameters or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(cfg: ClassifierConfig, k: int) -> float:
    """FixMatch's cosine decay ``lr * cos(7 pi k / (16 K))`` (or constant)."""
    if not cfg.cosine_schedule:
        return cfg.lr
    return cfg.lr * math.cos(7.0 * math.pi * k / (16.0 * cfg.steps))


def _array_digest(a: Optional[np.ndarray]) -> Optional[str]:
    if a is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()[:16]


def _state_digest(state: Optional[dict]) -> Optional[str]:
    if state is None:
        return None
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(np.ascontiguousarray(state[k].detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()[:16]


def _fingerprint(
    cfg: ClassifierConfig,
    data: ClassifierData,
    seed: int,
    init_state: Optional[dict] = None,
    init_thresholds: Optional[dict] = None,
) -> str:
    """What must match for a checkpoint to be resumed (not eval/checkpoint frequency)."""
    keys = (
        "learner backbone steps batch_size uratio lr momentum weight_decay nesterov cosine_schedule "
        "ema_decay threshold lambda_u lambda_ent tau_ema hflip"
    ).split()
    c = asdict(cfg)
    return stable_hash(
        {
            "cfg": {k: c[k] for k in keys},
            "seed": seed,
            "num_classes": data.num_classes,
            "shape": [data.labeled.channels, data.labeled.image_size],
            "labeled_idx": _array_digest(data.labeled_idx),
            "labeled_y": _array_digest(
                data.labeled.labels[torch.as_tensor(np.asarray(data.labeled_idx))].numpy()
            ),
            "labeled_weight": _array_digest(data.labeled_weight),
            **({"absolute_weights": True} if data.absolute_weights else {}),
            **(
                {"pseudo_share": float(data.pseudo_share), "num_real_labeled": int(data.num_real_labeled)}
                if data.pseudo_share is not None
                else {}
            ),
            "unlabeled_idx": _array_digest(data.unlabeled_idx),
            "unlabeled_len": None if data.unlabeled is None else len(data.unlabeled),
            **({"init": _state_digest(init_state)} if init_state is not None else {}),
            **({"init_thresholds": _state_digest(init_thresholds)} if init_thresholds is not None else {}),
        }
    )


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    from dpt_engine.kernels import ema_update_

    ema_update_(list(ema.parameters()), [p.detach() for p in model.parameters()], decay)
    with torch.no_grad():
        for eb, mb in zip(ema.buffers(), model.buffers()):
            eb.copy_(mb)


def _weighted_ce(
    logits: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor], absolute: bool = False
) -> torch.Tensor:
    """``sum_i w_i CE_i / sum_i w_i`` (plain mean when ``w`` is None); ``absolute``:
    ``sum_i w_i CE_i / B``."""
    ce = F.cross_entropy(logits.float(), y, reduction="none")  # (B,)
    if w is None:
        return ce.mean()
    if absolute:
        return (ce * w).sum() / ce.shape[0]
    return (ce * w).sum() / w.sum().clamp_min(1e-12)


class _Batches:
    """Draws each step's batch, all from one generator: the labeled positions (real, then pseudo
    when ``ClassifierData.pseudo_share`` fixes their shares), their weak augmentations, labels and
    weights, and for the semi-supervised learners the unlabeled images, weak and strong."""

    def __init__(self, cfg: ClassifierConfig, data: ClassifierData, device: torch.device, semi: bool):
        self.cfg, self.device, self.semi = cfg, device, semi
        self.store_l = _ImageStore(data.labeled, data.labeled_idx, device)
        self.labels_l = data.labeled.labels[self.store_l.idx].to(device)  # (n_l,)
        self.weights_l = None  # (n_l,) per-example CE weights
        if data.labeled_weight is not None:
            self.weights_l = torch.as_tensor(np.asarray(data.labeled_weight), dtype=torch.float32).to(device)
        self.store_u = _ImageStore(data.unlabeled, data.unlabeled_idx, device) if semi else None
        self.labels_u = data.unlabeled.labels[self.store_u.idx].to(device) if semi else None
        self.b_l, self.b_u = cfg.batch_size, cfg.uratio * cfg.batch_size
        self.n_real, self.b_p = len(self.store_l), 0  # labeled positions [0, n_real) come from sampler_l
        if data.pseudo_share is not None:  # real and pseudo images in fixed shares of each labeled batch
            self.n_real = int(data.num_real_labeled)
            if len(self.store_l) > self.n_real:
                self.b_p = min(self.b_l - 1, round(self.b_l * data.pseudo_share))
        self.sampler_l = _EpochSampler(self.n_real)
        self.sampler_p = _EpochSampler(len(self.store_l) - self.n_real) if self.b_p else None  # n_real + ...
        self.sampler_u = _EpochSampler(len(self.store_u)) if semi else None

    def next(self, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """``x`` (B_l [+ 2 B_u], C, H, W): labeled weak [+ unlabeled weak, strong]; ``y_l``, ``w_l``
        (or None) for the labeled part; ``y_u`` (true labels of the unlabeled part, -1 unknown)."""
        cfg = self.cfg
        pos_l = self.sampler_l.next(self.b_l - self.b_p, gen)  # (B_l,): real, then pseudo positions
        if self.sampler_p is not None:
            pos_l = torch.cat([pos_l, self.n_real + self.sampler_p.next(self.b_p, gen)])
        x = weak(uint8_to_unit(self.store_l.get(pos_l)), gen, cfg.hflip)  # (B_l, C, H, W)
        y_l = self.labels_l[pos_l.to(self.device)]
        w_l = None if self.weights_l is None else self.weights_l[pos_l.to(self.device)]
        y_u = None
        if self.semi:
            pos_u = self.sampler_u.next(self.b_u, gen)  # (B_u,)
            u = uint8_to_unit(self.store_u.get(pos_u))
            x = torch.cat([x, weak(u, gen, cfg.hflip), strong(u, gen, cfg.hflip)])  # (B_l + 2 B_u, C, H, W)
            y_u = self.labels_u[pos_u.to(self.device)]
        return x, y_l, w_l, y_u

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler_l": self.sampler_l.state_dict(),
            **({"sampler_p": self.sampler_p.state_dict()} if self.sampler_p is not None else {}),
            "sampler_u": None if self.sampler_u is None else self.sampler_u.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler_l.load_state_dict(state["sampler_l"])
        if self.sampler_p is not None:
            self.sampler_p.load_state_dict(state["sampler_p"])
        if self.sampler_u is not None:
            self.sampler_u.load_state_dict(state["sampler_u"])


@dataclass
class ConsistencyLoss:
    """The unlabeled part of a FixMatch / FreeMatch loss on one batch: ``loss_u`` (CE of the strong
    view against the weak view's pseudo-labels where the mask passes), ``loss_f`` (FreeMatch's
    fairness term, 0 for FixMatch), the ``mask`` and the ``pseudo``-labels (B_u,)."""

    loss_u: torch.Tensor
    loss_f: torch.Tensor
    mask: torch.Tensor
    pseudo: torch.Tensor


def fixmatch_loss(logits_uw: torch.Tensor, logits_us: torch.Tensor, threshold: float) -> ConsistencyLoss:
    """FixMatch's consistency loss: pseudo-labels from the weak view ``logits_uw`` (B_u, C), kept
    where their confidence reaches ``threshold``, taught to the strong view ``logits_us``."""
    probs_w = logits_uw.detach().softmax(dim=1)
    pseudo = probs_w.argmax(dim=1)
    mask = fixmatch_mask(probs_w, threshold)
    loss_u = (F.cross_entropy(logits_us, pseudo, reduction="none") * mask).mean()
    return ConsistencyLoss(loss_u, loss_u.new_zeros(()), mask, pseudo)


def freematch_loss(
    logits_uw: torch.Tensor, logits_us: torch.Tensor, thresholds: FreeMatchThresholds
) -> ConsistencyLoss:
    """FreeMatch's consistency loss: ``thresholds`` are first updated with the weak view's
    probabilities (their only side effect), then set the per-class mask; plus the fairness term
    ``loss_f`` (weighted by ``lambda_ent`` in :func:`classifier_losses`)."""
    probs_w = logits_uw.detach().softmax(dim=1)
    pseudo = probs_w.argmax(dim=1)
    thresholds.update(probs_w)
    mask = thresholds.mask(probs_w)
    loss_f = freematch_fairness_loss(logits_us, mask, thresholds.p_model, thresholds.label_hist)
    loss_u = (F.cross_entropy(logits_us, pseudo, reduction="none") * mask).mean()
    return ConsistencyLoss(loss_u, loss_f, mask, pseudo)


def classifier_losses(
    logits: torch.Tensor,
    y_l: torch.Tensor,
    w_l: Optional[torch.Tensor],
    y_u: Optional[torch.Tensor],
    cfg: ClassifierConfig,
    thresholds: Optional[FreeMatchThresholds],
    absolute_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's loss on one batch of logits ``(B_l [+ 2 B_u], C)`` (labeled, then unlabeled
    weak and strong views), and the logged terms ``(loss, loss_x, loss_u, loss_f, mask rate,
    correct pseudo-labels, known pseudo-labels, 1)``.

    ``supervised``: weighted CE on the labeled part. ``fixmatch``: + ``lambda_u`` x
    :func:`fixmatch_loss`. ``freematch``: + ``lambda_u`` x :func:`freematch_loss` + ``lambda_ent``
    x its fairness term."""
    b_l = len(y_l)
    loss_x = _weighted_ce(logits[:b_l], y_l, w_l, absolute_weights)
    zero = loss_x.new_zeros(())
    loss_u = loss_f = mask_rate = pl_correct = pl_known = zero
    loss = loss_x
    if cfg.learner != "supervised":
        logits_uw, logits_us = logits[b_l:].chunk(2)  # (B_u, C) each
        if cfg.learner == "fixmatch":
            c = fixmatch_loss(logits_uw, logits_us, cfg.threshold)
        else:
            c = freematch_loss(logits_uw, logits_us, thresholds)
        loss_u, loss_f = c.loss_u, c.loss_f
        loss = loss_x + cfg.lambda_u * loss_u + cfg.lambda_ent * loss_f
        known = (y_u >= 0).to(c.mask.dtype) * c.mask
        mask_rate, pl_known = c.mask.mean(), known.sum()
        pl_correct = ((c.pseudo == y_u).to(c.mask.dtype) * known).sum()
    terms = torch.stack(
        [loss, loss_x, loss_u, loss_f, mask_rate, pl_correct, pl_known, torch.ones_like(loss)]
    )
    return loss, terms.detach().double()


class _LogSums:
    """The running sums of the logged terms since the last history row, and the training time."""

    def __init__(self, device: torch.device) -> None:
        self.acc = torch.zeros(_N_ACC, dtype=torch.float64, device=device)
        self.elapsed = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"acc": self.acc.cpu(), "elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc = state["acc"].to(self.acc.device)
        self.elapsed = float(state["elapsed"])


def _train_state(
    cfg: ClassifierConfig,
    data: ClassifierData,
    batches: _Batches,
    device: torch.device,
    seed: int,
    init_state: Optional[dict],
) -> TrainState:
    """Everything a classifier run resumes from (``dpt_engine.train.state``): the step, history and
    data generator, and the parts model, EMA, optimizer, FreeMatch thresholds, batch samplers and
    logged sums."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_classifier(
            cfg.backbone, data.num_classes, data.labeled.channels, data.labeled.image_size
        )
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
    model = model.to(device)
    nesterov = cfg.nesterov and cfg.momentum > 0
    return TrainState(
        torch.Generator().manual_seed(seed),
        model=model,
        ema=copy.deepcopy(model).eval().requires_grad_(False),
        optimizer=torch.optim.SGD(
            _param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov
        ),
        thresholds=FreeMatchThresholds(data.num_classes, cfg.tau_ema, device),
        batches=batches,
        sums=_LogSums(device),
    )


def _upgrade(ck: dict[str, Any]) -> dict[str, Any]:
    """A payload of checkpoint version 1 (before the shared train state: samplers at the top level,
    ``gen``, ``acc`` / ``elapsed``) in the current layout."""
    if ck.get("version") == _CKPT_VERSION:
        return ck
    samplers = {k: ck[k] for k in ("sampler_l", "sampler_p", "sampler_u") if k in ck}
    keep = ("step", "history", "model", "ema", "optimizer", "thresholds")
    return {
        **{k: ck[k] for k in keep},
        "generator": ck["gen"],
        "batches": samplers,
        "sums": {"acc": ck["acc"], "elapsed": ck["elapsed"]},
    }


def _resume(ckpts: CheckpointManager, work_dir: Path, fingerprint: str, st: TrainState) -> None:
    """Resume ``st`` from the newest checkpoint (its files checked against its ``meta.json``), or
    from a ``checkpoint.pt`` of the earlier single-file format; nothing when there is none. A
    checkpoint of another configuration is an error."""

    def check(ck: dict[str, Any], path: Path) -> None:
        if ck.get("version") not in (1, _CKPT_VERSION) or ck.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{path} was written by a different configuration or data (fingerprint "
                f"{ck.get('fingerprint')} != {fingerprint}); delete it or use another work_dir"
            )

    latest = ckpts.latest()
    if latest is not None:
        load_train_state(latest, st, require_digests=False, check=check, upgrade=_upgrade)
        return
    legacy = work_dir / "checkpoint.pt"
    if legacy.exists():
        ck = torch.load(legacy, map_location="cpu", weights_only=True)
        check(ck, legacy)
        st.load_state_dict(_upgrade(ck))
        torch.set_rng_state(ck["torch_rng"])  # the single-file format's only copy of it
        device = _model_device(st.model)
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)


def _save_checkpoint(ckpts: CheckpointManager, work_dir: Path, fingerprint: str, st: TrainState) -> None:
    """A step checkpoint through the shared manager; a single-file checkpoint of the earlier format
    goes once a newer one exists."""
    header = {"version": _CKPT_VERSION, "fingerprint": fingerprint}
    save_train_state(ckpts, st, {"trainer": "classifier"}, header=header)
    (work_dir / "checkpoint.pt").unlink(missing_ok=True)


def fit_classifier(
    cfg: ClassifierConfig,
    data: ClassifierData,
    work_dir: Path,
    device: torch.device,
    seed: int,
    progress: bool = True,
    init_state: Optional[dict] = None,
    init_thresholds: Optional[dict[str, torch.Tensor]] = None,
) -> FitResult:
    """Train a classifier with ``cfg.learner``; resume from ``work_dir/checkpoints/`` if present.

    ``init_state`` (a state dict of the same backbone, e.g. stage 1's EMA weights) starts the model
    and its EMA from those weights instead of a random initialisation (stage 3's fine-tuning).

    Writes ``checkpoints/step-N/`` (every ``cfg.checkpoint_every`` steps and at the end), ``model.pt``
    (EMA state dict), ``thresholds.pt`` (FreeMatch's final threshold state) and ``history.json``
    into ``work_dir``. Returns the EMA model in eval mode.
    Raises ``ValueError`` if an existing checkpoint was written by a different configuration.
    """
    if cfg.learner not in ("fixmatch", "freematch", "supervised"):
        raise ValueError(
            f"unknown learner {cfg.learner!r} for fit_classifier; valid: freematch, fixmatch, supervised "
            "(linear-probe is fit by dpt_engine.ssl.linear_probe.fit_linear_probe)"
        )
    cfg.validate()
    data.validate(cfg.learner != "supervised")
    device, work_dir = torch.device(device), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpts = CheckpointManager(work_dir / "checkpoints", keep=1)
    ckpts.remove_partial()
    if init_thresholds is not None and cfg.learner != "freematch":
        raise ValueError(f"init_thresholds starts FreeMatch's thresholds; learner is {cfg.learner!r}")
    fingerprint = _fingerprint(cfg, data, seed, init_state, init_thresholds)
    batches = _Batches(cfg, data, device, semi=cfg.learner != "supervised")
    st = _train_state(cfg, data, batches, device, seed, init_state)
    if init_thresholds is not None:
        st.thresholds.load_state_dict(init_thresholds)
    _resume(ckpts, work_dir, fingerprint, st)
    start = st.step

    log_every = max(1, min(cfg.eval_every, 25))
    amp = resolve_precision(cfg.precision, device, "classifier precision") == "bf16"
    loop = TrainingSteps(
        start,
        cfg.steps,
        save=lambda _step: _save_checkpoint(ckpts, work_dir, fingerprint, st),
        checkpoint_every=cfg.checkpoint_every,
        desc=cfg.learner,
        progress=progress,
    )
    last_top1: Optional[float] = None
    t0 = time.perf_counter()
    st.model.train()
    for k in loop:
        step = k + 1
        lr = _lr_at(cfg, k)
        for g in st.optimizer.param_groups:
            g["lr"] = lr
        x, y_l, w_l, y_u = batches.next(st.gen)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = st.model(x).float()
        loss, terms = classifier_losses(logits, y_l, w_l, y_u, cfg, st.thresholds, data.absolute_weights)
        st.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        st.optimizer.step()
        _ema_update(st.ema, st.model, ema_decay_at(step, cfg.ema_decay))
        st.sums.acc += terms
        st.step = step

        # ---- log and evaluate (the loop checkpoints)
        is_eval = step % cfg.eval_every == 0 or step == cfg.steps
        if step % log_every == 0 or is_eval:
            now = time.perf_counter()
            st.sums.elapsed, t0 = st.sums.elapsed + (now - t0), now
            row = _history_row(step, st.sums.acc.tolist(), lr, st.sums.elapsed, cfg.learner)
            st.sums.acc.zero_()
            if is_eval and data.test is not None:
                row["test_top1"] = last_top1 = evaluate_top1(st.ema, data.test, device=device)
            st.history.append(row)
            loop.bar.set_postfix(_postfix(row, last_top1), refresh=False)

    ema, history = st.ema.eval(), st.history
    test_top1 = None
    if data.test is not None:
        test_top1 = history[-1].get("test_top1") if history and start < cfg.steps else None
        if test_top1 is None:
            test_top1 = evaluate_top1(ema, data.test, device=device)
    atomic_torch_save(work_dir / "model.pt", ema.state_dict())
    if cfg.learner == "freematch":
        atomic_torch_save(work_dir / THRESHOLDS_FILE, st.thresholds.state_dict())
    atomic_write_json(work_dir / "history.json", history)
    return FitResult(model=ema, history=history, test_top1=test_top1, resumed_from=start)


def _history_row(step: int, sums: list[float], lr: float, elapsed: float, learner: str) -> dict:
    loss, loss_x, loss_u, loss_f, mask, pl_correct, pl_known, n = sums
    n = max(n, 1.0)
    row = {
        "step": step,
        "loss": loss / n,
        "loss_x": loss_x / n,
        "loss_u": loss_u / n,
        "mask_rate": mask / n,
        "lr": lr,
        "time": elapsed,
    }
    if learner == "freematch":
        row["loss_f"] = loss_f / n
    if pl_known > 0:
        row["pseudo_acc"] = pl_correct / pl_known  # accuracy of the masked pseudo-labels with known truth
    return row


def _postfix(row: dict, top1: Optional[float]) -> dict[str, str]:
    out = {"loss": f"{row['loss']:.3f}", "mask": f"{row['mask_rate']:.2f}"}
    if top1 is not None:
        out["acc"] = f"{top1:.1f}"
    return out
