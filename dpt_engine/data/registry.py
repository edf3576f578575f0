"""Dataset registry and :func:`build_splits`, the one entry point the stages use.

``build_splits(cfg)`` loads the train and held-out test splits of ``cfg.name``, caps the train
set with ``cfg.max_train`` (class-balanced, seeded with ``cfg.seed``, before the label subset
is chosen), then picks the labeled indices from exactly one of ``cfg.labels_per_class``,
``cfg.label_fraction`` or ``cfg.subset_file``. The train set keeps its true labels: they are
only used to measure pseudo-label accuracy; the learners see labels at ``labeled_idx`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config.schema import DataConfig
from .base import ArrayImageDataset, DataError, DatasetSplits, ImageDataset
from .cifar import CIFAR10_HINT, load_cifar10
from .digits import load_digits
from .idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DEFAULT_ROOT, MNIST_CLASSES, load_mnist_like
from .imagefolder import FolderImageDataset, scan_image_folder
from .subsets import read_subset_file, select_balanced, select_fraction, select_per_class

__all__ = ["DATASETS", "DatasetBuilder", "LoadedDataset", "build_splits", "register_dataset", "take_subset"]


@dataclass
class LoadedDataset:
    """What a builder returns: both splits and the directory they were read from."""

    train: ImageDataset
    test: ImageDataset
    root: str


DatasetBuilder = Callable[[DataConfig], LoadedDataset]
DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator: ``@register_dataset("name")`` adds a builder ``(DataConfig) -> LoadedDataset``."""

    def deco(fn: DatasetBuilder) -> DatasetBuilder:
        DATASETS[name] = fn
        return fn

    return deco


def _resize_array(ds: ImageDataset, size: int | None) -> ImageDataset:
    """Resize an in-memory dataset to ``size`` x ``size`` (antialiased bilinear) if it differs."""
    if size is None or size == ds.image_size or not isinstance(ds, ArrayImageDataset):
        return ds
    x = ds.images.float()  # (N, C, H, W)
    y = torch.nn.functional.interpolate(
        x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    images = y.round().clamp_(0, 255).to(torch.uint8)  # (N, C, size, size)
    return ArrayImageDataset(images, ds.labels, ds.classes, name=ds.name)


@register_dataset("digits")
def _build_digits(cfg: DataConfig) -> LoadedDataset:
    train, test = load_digits()
    return LoadedDataset(
        _resize_array(train, cfg.image_size),
        _resize_array(test, cfg.image_size),
        "sklearn.datasets.load_digits",
    )


@register_dataset("mnist")
def _build_mnist(cfg: DataConfig) -> LoadedDataset:
    hint = (
        "pass data.root=/path/to/mnist, a directory with train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
    )
    if cfg.root is None:
        raise DataError(f"mnist has no default location; {hint}")
    train, test = load_mnist_like(cfg.root, "mnist", MNIST_CLASSES, hint)
    return LoadedDataset(_resize_array(train, cfg.image_size), _resize_array(test, cfg.image_size), cfg.root)


@register_dataset("fashion-mnist")
def _build_fashion(cfg: DataConfig) -> LoadedDataset:
    root = cfg.root or FASHION_MNIST_DEFAULT_ROOT
    hint = (
        "install it with `apt-get install dataset-fashion-mnist` (files under "
        f"{FASHION_MNIST_DEFAULT_ROOT}) or pass data.root=/dir/with/the/idx/files"
    )
    train, test = load_mnist_like(root, "fashion-mnist", FASHION_MNIST_CLASSES, hint)
    return LoadedDataset(_resize_array(train, cfg.image_size), _resize_array(test, cfg.image_size), root)


@register_dataset("cifar10")
def _build_cifar10(cfg: DataConfig) -> LoadedDataset:
    if cfg.root is None:
        raise DataError(f"cifar10 has no default location; {CIFAR10_HINT}")
    train, test, directory = load_cifar10(cfg.root)
    return LoadedDataset(
        _resize_array(train, cfg.image_size), _resize_array(test, cfg.image_size), str(directory)
    )


@register_dataset("imagefolder")
def _build_imagefolder(cfg: DataConfig) -> LoadedDataset:
    layout = f"root/train/<class>/<image> and root/{cfg.test_split}/<class>/<image>"
    if cfg.root is None:
        raise DataError(f"imagefolder needs data.root=/path/to/dataset laid out as {layout}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"imagefolder: data directory {root} does not exist; pass data.root= a folder laid out as {layout}"
        )
    if not (root / "train").is_dir():
        raise DataError(f"imagefolder: {root} has no train/ folder; expected {layout}")
    if not (root / cfg.test_split).is_dir():
        raise DataError(
            f"imagefolder: {root} has no {cfg.test_split}/ folder for the held-out split; "
            "set data.test_split=<folder name> (e.g. val or test)"
        )
    # unreadable files (a half-finished download, a damaged disk) are skipped and listed
    train = scan_image_folder(
        root / "train", channels=3, image_size=cfg.image_size, name="imagefolder:train", verify=True
    )
    test = FolderImageDataset.from_tree(
        root / cfg.test_split,
        train.classes,
        channels=3,
        image_size=cfg.image_size,
        name=f"imagefolder:{cfg.test_split}",
        verify=True,
    )
    if test.image_size != train.image_size:
        raise DataError(
            f"imagefolder: {cfg.test_split}/ images are {test.image_size}px but train/ images are "
            f"{train.image_size}px; set data.image_size={train.image_size} to resize both"
        )
    return LoadedDataset(train, test, str(root))


def take_subset(ds: ImageDataset, idx: np.ndarray) -> ImageDataset:
    """``ds`` restricted to ``idx`` (in-memory and folder datasets)."""
    if isinstance(ds, (ArrayImageDataset, FolderImageDataset)):
        return ds.subset(idx)
    raise DataError(f"cannot take a subset of a {type(ds).__name__}")


# the held-out draw of data.holdout does not move with data.seed: every label seed of a recipe
# comparison is scored on the same images
HOLDOUT_SEED = 20_231_120


def _check_unreadable(cfg: DataConfig, train: ImageDataset, test: ImageDataset) -> dict:
    """The files a folder dataset skipped as unreadable: counted and listed (the first 100), or an
    error above ``data.max_unreadable`` of the files (then the dataset itself is damaged)."""
    out: dict = {"count": 0, "files": []}
    for split, ds in (("train", train), ("test", test)):
        skipped = list(getattr(ds, "skipped_files", []))
        total = len(ds) + len(skipped)
        if skipped and len(skipped) > cfg.max_unreadable * total:
            raise DataError(
                f"{cfg.name}: {len(skipped)} of {total} {split} image files cannot be read (first: "
                f"{skipped[0]['path']}: {skipped[0]['reason']}), more than data.max_unreadable="
                f"{cfg.max_unreadable:g}; the dataset looks incomplete or damaged: re-download or repair it"
            )
        out[split] = len(skipped)
        out["count"] += len(skipped)
        out["files"] += [{**r, "split": split} for r in skipped][: max(0, 100 - len(out["files"]))]
    return out


def build_splits(cfg: DataConfig) -> DatasetSplits:
    """Load ``cfg.name``, apply ``max_train``, choose the labeled subset; see the module doc."""
    cfg.validate()
    if cfg.name not in DATASETS:
        raise DataError(
            f"unknown dataset {cfg.name!r}; data.name must be one of {', '.join(sorted(DATASETS))}"
        )
    loaded = DATASETS[cfg.name](cfg)
    train, test = loaded.train, loaded.test
    if list(test.classes) != list(train.classes):
        raise DataError(f"{cfg.name}: train and test splits have different classes")
    num_classes = len(train.classes)
    unreadable = _check_unreadable(cfg, train, test)
    eval_split = "test"
    if cfg.holdout is not None:  # recipe choice: evaluate on training images no stage sees
        if cfg.holdout >= len(train):
            raise DataError(
                f"data.holdout={cfg.holdout} leaves no training images ({len(train)} in all); lower it"
            )
        hold = select_balanced(train.labels, cfg.holdout, HOLDOUT_SEED, num_classes)
        rest = np.setdiff1d(np.arange(len(train)), hold)
        train, test = take_subset(train, rest), take_subset(train, hold)
        eval_split = f"holdout of {len(hold)} training images"
    full_train = len(train)

    hint = ""
    if cfg.max_train is not None and cfg.max_train < full_train:
        keep = select_balanced(train.labels, cfg.max_train, cfg.seed, num_classes)
        train = take_subset(train, keep)
        hint = (
            f"data.max_train={cfg.max_train} kept {len(train)} of {full_train} train images; "
            "subset files refer to that reduced set: raise or unset data.max_train"
        )

    if cfg.labels_per_class is not None:
        labeled = select_per_class(train.labels, cfg.labels_per_class, cfg.seed, num_classes, train.classes)
        selection = {"labels_per_class": cfg.labels_per_class}
    elif cfg.label_fraction is not None:
        labeled = select_fraction(train.labels, cfg.label_fraction, cfg.seed, num_classes)
        selection = {"label_fraction": cfg.label_fraction}
    else:
        assert cfg.subset_file is not None  # guaranteed by cfg.validate()
        labeled = read_subset_file(cfg.subset_file, train, hint=hint)
        selection = {"subset_file": str(Path(cfg.subset_file).expanduser().resolve())}

    counts = np.bincount(train.labels.numpy()[labeled], minlength=num_classes)
    info = {
        "dataset": cfg.name,
        "root": loaded.root,
        "num_classes": num_classes,
        "classes": list(train.classes),
        "channels": train.channels,
        "image_size": train.image_size,
        "num_train": len(train),
        "num_train_full": full_train,
        "max_train": cfg.max_train,
        "num_test": len(test),
        "eval_split": eval_split,
        "unreadable_files": unreadable,
        "holdout": cfg.holdout,
        "num_labeled": len(labeled),
        "labeled_per_class": counts.tolist(),
        "label_selection": selection,
        "seed": cfg.seed,
    }
    return DatasetSplits(
        name=cfg.name,
        train=train,
        test=test,
        labeled_idx=labeled.astype(np.int64),
        classes=list(train.classes),
        info=info,
    )
