"""Datasets: readers for digits, MNIST, Fashion-MNIST, CIFAR-10 and image folders; label subsets.

The stages call :func:`build_splits` with a :class:`~dpt_engine.config.schema.DataConfig` and get
a :class:`DatasetSplits` (train, test, labeled indices, info).
"""

from .base import (
    ArrayImageDataset,
    ConcatImageDataset,
    DataError,
    DatasetSplits,
    ImageDataset,
    iterate_batches,
    worker_start_method,
)
from .cifar import CIFAR10_CLASSES, SafeUnpickler, load_cifar10, read_cifar_batch, safe_pickle_load
from .dali_input import ImageBatch, ImageLoader, SkippedImage, load_images, resolve_image_decoder
from .digits import DIGITS_CLASSES, load_digits
from .idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DEFAULT_ROOT, MNIST_CLASSES, load_mnist_like, read_idx
from .imagefolder import (
    IMAGE_EXTENSIONS,
    FolderImageDataset,
    class_dirnames,
    safe_class_dirname,
    scan_image_folder,
)
from .latent_store import LatentLoader, LatentStore, LatentStoreError, encode_to_store
from .registry import DATASETS, LoadedDataset, build_splits, register_dataset, take_subset
from .subsets import (
    read_index_file,
    read_subset_file,
    select_balanced,
    select_fraction,
    select_per_class,
    subset_file_lines,
    write_index_file,
)

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_ROOT",
    "IMAGE_EXTENSIONS",
    "MNIST_CLASSES",
    "ArrayImageDataset",
    "ConcatImageDataset",
    "DataError",
    "DatasetSplits",
    "FolderImageDataset",
    "ImageBatch",
    "ImageDataset",
    "ImageLoader",
    "LatentLoader",
    "LatentStore",
    "LatentStoreError",
    "LoadedDataset",
    "SafeUnpickler",
    "SkippedImage",
    "build_splits",
    "class_dirnames",
    "encode_to_store",
    "iterate_batches",
    "load_cifar10",
    "load_digits",
    "load_images",
    "load_mnist_like",
    "read_cifar_batch",
    "read_idx",
    "read_index_file",
    "read_subset_file",
    "register_dataset",
    "resolve_image_decoder",
    "safe_class_dirname",
    "safe_pickle_load",
    "scan_image_folder",
    "select_balanced",
    "select_fraction",
    "select_per_class",
    "subset_file_lines",
    "take_subset",
    "worker_start_method",
    "write_index_file",
]
