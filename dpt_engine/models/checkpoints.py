"""Reading, validating and exporting U-ViT checkpoints.

``UViT``'s state-dict keys match the original U-ViT repository's ``nnet.pth`` / ``nnet_ema.pth``,
so released checkpoints load directly. Files are read safely: safetensors, or ``torch.load`` with
``weights_only=True`` (never unpickling arbitrary objects). Every failure raises
:class:`CheckpointError` with the path, what is wrong and how to fix it.

The generic pieces (:func:`read_checkpoint`, :func:`read_state_dict`, :func:`verify_state_dict`,
:func:`save_state_dict`) are shared with the other original-artifact loaders: the Stable Diffusion
KL autoencoder (``models/sd_autoencoder.py``) and the MSN ViT encoders (``models/msn.py``). Shapes
are always checked against the target module *before* anything is copied, so a failed load leaves
the module untouched.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dpt_engine.utils.io import atomic_path, atomic_torch_save

__all__ = [
    "CheckpointError",
    "export_uvit_checkpoint",
    "load_uvit_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "save_state_dict",
    "verify_state_dict",
]

# Searched in this order: a training state holding both the raw and the EMA weights (ours:
# {"model", "ema", "step"}) yields the EMA weights, which is what sampling and export want.
_WRAPPER_KEYS = ("ema", "nnet", "model", "state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 10


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_tensor_dict(obj: object, depth: int = 3) -> dict | None:
    """``obj`` itself if it is a dict of tensors, else the first wrapper entry (in
    ``_WRAPPER_KEYS`` order, up to ``depth`` levels, e.g. ``{"state_dict": {"model": {...}}}``) that is."""
    if _is_tensor_dict(obj):
        return obj  # type: ignore[return-value]
    if depth == 0 or not isinstance(obj, dict):
        return None
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            found = _find_tensor_dict(obj[key], depth - 1)
            if found is not None:
                return found
    return None


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    found = _find_tensor_dict(obj)
    if found is None:
        kind = type(obj).__name__
        keys = sorted(map(str, obj))[:_SHOW] if isinstance(obj, dict) else []
        raise CheckpointError(
            f"{path}: does not hold a state dict of tensors (got {kind}"
            + (f" with keys {keys}" if keys else "")
            + f"); expected a plain state dict or one wrapped under one of {list(_WRAPPER_KEYS)}. "
            "Fix: save the model's state_dict() (e.g. with export_uvit_checkpoint)."
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in found.items():
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        out[name] = value
    return out


def read_checkpoint(path: str | os.PathLike) -> object:
    """The raw object stored in ``path``: a dict of tensors for ``.safetensors``, otherwise whatever
    ``torch.load(weights_only=True)`` returns (tensors in plain containers; arbitrary Python objects
    are refused). Missing, truncated or corrupt files raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint file not found. Fix: check the path (e.g. the nnet_ema.pth of the "
            "released U-ViT checkpoint directory) or download the checkpoint first."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError
            raise CheckpointError(
                f"{path}: safetensors file is truncated or corrupt ({type(exc).__name__}: {exc}). "
                "Fix: re-download or re-export the checkpoint."
            ) from exc
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # never relay torch's text: it suggests weights_only=False, i.e. running the file's code
        text = str(exc).lower()
        plain_pickle = not zipfile.is_zipfile(path) and _starts_like_pickle(path)
        if (
            "unsupported global" in text
            or "allowed global" in text
            or "unsupported class" in text
            or plain_pickle
        ):
            what = "a plain Python pickle" if plain_pickle else "a pickle with arbitrary Python objects"
            raise CheckpointError(
                f"{path}: the file is {what}, which is refused because loading it could run code "
                "(only tensors in plain containers are read, weights_only=True). Fix: from a trusted "
                "source, re-save only the weights, e.g. torch.save(model.state_dict(), path), or "
                "export to .safetensors."
            ) from None
        raise CheckpointError(
            f"{path}: checkpoint is truncated or corrupt (its pickle cannot be read safely). "
            "Fix: re-download or re-export the checkpoint."
        ) from None
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        struct.error,  # a file of a few bytes: torch's legacy reader unpacks a header it does not have
    ) as exc:
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
        raise CheckpointError(
            f"{path}: checkpoint is truncated or corrupt ({type(exc).__name__}: {first[:200]}). "
            "Fix: re-download or re-export the checkpoint (an interrupted copy leaves a partial file)."
        ) from None


def _starts_like_pickle(path: Path) -> bool:
    """A pickle of protocol 2+ starts with the PROTO opcode (0x80) and its version byte."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_state_dict(path: str | os.PathLike, entry: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors in ``path`` (``.safetensors`` or a torch pickle), unwrapped from a
    ``model``/``state_dict``/``ema``/``nnet`` dict and with ``module.`` prefixes stripped.

    ``entry`` picks a named top-level entry first (e.g. ``"target_encoder"`` of an MSN checkpoint,
    which also holds ``encoder``, ``prototypes`` and the optimizer state); a missing entry is an
    error listing the entries that exist.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    if entry is not None:
        if not isinstance(obj, dict) or entry not in obj:
            have = sorted(map(str, obj))[:_SHOW] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(
                f"{path}: has no entry {entry!r} (top-level entries: {have}). Fix: pass the checkpoint "
                f"file that holds {entry!r} (e.g. the released .pth.tar, not a converted copy)."
            )
        obj = obj[entry]
    return _unwrap(obj, path)


def verify_state_dict(
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    path: str | os.PathLike,
    what: str,
    fix: str,
    rename: Callable[[str], str] | None = None,
) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``expected``'s keys and shapes.

    The message lists missing keys, unexpected keys and shape differences (``rename`` maps our
    key names back to the checkpoint's own naming for the listing), then ``fix``.
    """
    show = rename or (lambda k: k)
    missing = sorted(show(k) for k in expected if k not in state)
    unexpected = sorted(show(k) for k in state if k not in expected)
    shapes = [
        f"{show(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"{path}: checkpoint does not fit the model ({what})."]
        if missing:
            lines.append(_listing("missing keys", missing))
        if unexpected:
            lines.append(_listing("unexpected keys", unexpected))
        if shapes:
            lines.append(_listing("shape differences", shapes))
        lines.append(f"  Fix: {fix}")
        raise CheckpointError("\n".join(lines))


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, format: str = "pth") -> None:
    """Write a state dict atomically: ``"pth"`` (``torch.save`` of a plain dict, the original
    projects' format) or ``"safetensors"`` (no pickle at all; preferred for our own exports)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    if format == "pth":
        atomic_torch_save(path, state)
    elif format == "safetensors":
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
    else:
        raise ValueError(f"format must be 'pth' or 'safetensors', got {format!r}")


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_SHOW]
    more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"  {title} ({len(items)}): " + ", ".join(shown) + more


def load_uvit_checkpoint(net: nn.Module, path: str | os.PathLike) -> None:
    """Load ``path`` into ``net`` after checking that keys and shapes match exactly."""
    state = read_state_dict(path)
    cfg = getattr(net, "cfg", None)
    verify_state_dict(
        net.state_dict(),
        state,
        path,
        type(net).__name__ + (f"; model config: {cfg}" if cfg is not None else ""),
        "check the preset (uvit-h2 vs uvit-l2: embed_dim/depth, conv final layer), img_size "
        "and patch_size (pos_embed / patch_embed shapes), in_chans, and num_classes / null_class "
        "(label_emb rows: 1001 for ImageNet with the null class, 1000 for released checkpoints "
        "with null_class=False; num_classes=0 for unconditional models), e.g. "
        "create_uvit('uvit-m4', null_class=False).",
    )
    net.load_state_dict(state, strict=True)


def export_uvit_checkpoint(net: nn.Module, path: str | os.PathLike, format: str = "pth") -> None:
    """Write ``net``'s weights atomically: ``"pth"`` = a plain state dict saved with ``torch.save``
    (the original ``nnet_ema.pth`` format), or ``"safetensors"``."""
    save_state_dict(net.state_dict(), path, format)
