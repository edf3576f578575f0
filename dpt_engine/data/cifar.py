"""CIFAR-10 from the standard python-pickle batches (``cifar-10-python.tar.gz`` extracted).

The directory ``cifar-10-batches-py`` holds ``data_batch_1`` .. ``data_batch_5`` (10,000 images
each), ``test_batch`` and ``batches.meta``. Each batch is a pickled dict with ``b"data"``, a
uint8 array (10000, 3072) in channel-major order (1024 red, 1024 green, 1024 blue values of a
32x32 image), and ``b"labels"``, a list of ints.

Pickles are untrusted input: :class:`SafeUnpickler` resolves only the handful of globals needed
to rebuild a plain numpy array (and the latin-1 ``_codecs.encode`` that Python 3 uses to pickle
``bytes`` at protocol 2) and refuses everything else, so a crafted file cannot run code.
"""

from __future__ import annotations

import _codecs
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ArrayImageDataset, DataError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_HINT",
    "ForbiddenPickleError",
    "SafeUnpickler",
    "find_cifar10_dir",
    "load_cifar10",
    "read_cifar_batch",
    "safe_pickle_load",
]

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_HINT = (
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it and "
    "pass data.root=/path/to/cifar-10-batches-py"
)


class ForbiddenPickleError(pickle.UnpicklingError):
    """An untrusted pickle asked for a global (or a call) outside the allow-list."""


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to what pickle protocol 2 emits for ``bytes``: latin-1 of a str."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise ForbiddenPickleError(f"refusing _codecs.encode({type(obj).__name__}, {encoding!r})")
    return _codecs.encode(obj, "latin1", "strict")


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    """The numpy callables an ndarray pickle refers to, under numpy 1.x and 2.x module names."""
    try:  # numpy >= 2
        from numpy._core import multiarray as _ma
        from numpy._core import numeric as _num
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
        from numpy.core import numeric as _num  # type: ignore[no-redef]
    out: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = _ma._reconstruct
        if hasattr(_num, "_frombuffer"):
            out[(f"{mod}.numeric", "_frombuffer")] = _num._frombuffer
    return out


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that only rebuilds builtin containers/scalars and plain numpy arrays.

    Allowed globals: ``numpy.ndarray``, ``numpy.dtype``, numpy's ``_reconstruct`` and
    ``_frombuffer`` (both ``numpy.core`` and ``numpy._core`` spellings) and ``_codecs.encode``
    limited to latin-1. Any other global (``os.system``, ``builtins.eval``, ...) raises
    :class:`pickle.UnpicklingError`.
    """

    _ALLOWED: dict[tuple[str, str], Callable[..., Any]] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if SafeUnpickler._ALLOWED is None:
            allowed = _numpy_globals()
            allowed[("_codecs", "encode")] = _latin1_encode
            SafeUnpickler._ALLOWED = allowed
        try:
            return SafeUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise ForbiddenPickleError(
                f"refusing to load global {module}.{name} from an untrusted pickle"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenPickleError("refusing persistent ids in an untrusted pickle")


def safe_pickle_load(path: str | os.PathLike) -> Any:
    """Load a pickle file with :class:`SafeUnpickler` (``encoding="bytes"`` for Python 2 pickles).

    Raises :class:`DataError` if the file is unreadable, corrupt, or refers to a forbidden global.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except ForbiddenPickleError as e:
        raise DataError(f"{path}: unsafe pickle: {e}; this is not a genuine CIFAR batch file") from e
    except Exception as e:  # EOFError, ValueError, TypeError, ... from a damaged stream
        raise DataError(
            f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e}); re-download and extract it"
        ) from e


def _get(d: dict, key: str) -> Any:
    """``d[key]`` for a str/bytes-keyed dict (Python 2 pickles give bytes keys)."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> uint8 images (N, 3, 32, 32) and int64 labels (N,), validated."""
    path = Path(path)
    d = safe_pickle_load(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(d).__name__}; not a CIFAR batch file")
    data, labels = _get(d, "data"), _get(d, "labels")
    if data is None or labels is None:
        raise DataError(
            f"{path}: no 'data'/'labels' entries (keys: {sorted(map(str, d))}); not a CIFAR-10 batch"
        )
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 (N, 3072), got {desc}; the file is corrupt")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)  # (N,)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: 'labels' is not a list of integers; the file is corrupt") from e
    if y.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {y.shape[0]} labels; the file is corrupt")
    if y.size and (y.min() < 0 or y.max() >= 10):
        raise DataError(f"{path}: labels outside 0..9; the file is corrupt (or not CIFAR-10)")
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32))  # (N, 3, 32, 32) uint8
    return x, y


def find_cifar10_dir(root: str | os.PathLike) -> Path:
    """``root`` if it holds the batches, else ``root/cifar-10-batches-py``; DataError otherwise."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"cifar10: data directory {root} does not exist; {CIFAR10_HINT}")
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "test_batch").is_file() or (cand / "data_batch_1").is_file():
            missing = [n for n in [*CIFAR10_TRAIN_BATCHES, "test_batch"] if not (cand / n).is_file()]
            if missing:
                raise DataError(f"cifar10: {cand} lacks {', '.join(missing)}; {CIFAR10_HINT}")
            return cand
    raise DataError(
        f"cifar10: no data_batch_1..5 / test_batch in {root} or {root / 'cifar-10-batches-py'}; {CIFAR10_HINT}"
    )


def _class_names(directory: Path) -> list[str]:
    meta = directory / "batches.meta"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    d = safe_pickle_load(meta)
    names = _get(d, "label_names") if isinstance(d, dict) else None
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"{meta}: no list of 10 'label_names'; the file is corrupt")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar10(root: str | os.PathLike) -> tuple[ArrayImageDataset, ArrayImageDataset, Path]:
    """Official train (50k) / test (10k) splits as uint8 (N, 3, 32, 32); also the resolved directory."""
    directory = find_cifar10_dir(root)
    classes = _class_names(directory)
    parts = [read_cifar_batch(directory / n) for n in CIFAR10_TRAIN_BATCHES]
    x_train = torch.from_numpy(np.concatenate([p[0] for p in parts]))  # (50000, 3, 32, 32)
    y_train = torch.from_numpy(np.concatenate([p[1] for p in parts]))  # (50000,)
    x_test, y_test = read_cifar_batch(directory / "test_batch")
    train = ArrayImageDataset(x_train, y_train, classes, name="cifar10:train")
    test = ArrayImageDataset(torch.from_numpy(x_test), torch.from_numpy(y_test), classes, name="cifar10:test")
    return train, test, directory
