"""Dataset readers on small files written in the real formats, plus sklearn digits and Fashion-MNIST."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_engine.config.schema import DataConfig
from dpt_engine.data import (
    DataError,
    FolderImageDataset,
    build_splits,
    class_dirnames,
    iterate_batches,
    load_cifar10,
    load_digits,
    read_cifar_batch,
    read_idx,
    safe_class_dirname,
    safe_pickle_load,
    scan_image_folder,
)
from dpt_engine.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DEFAULT_ROOT

# ---------------------------------------------------------------------------------------------
# idx (MNIST / Fashion-MNIST)


def _idx_bytes(arr: np.ndarray) -> bytes:
    """The real idx encoding: 0x0000, type 0x08 (ubyte), ndim, big-endian uint32 dims, data."""
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _write_idx_dir(root: Path, n_train: int = 30, n_test: int = 10, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3-ubyte", x), ("labels-idx1-ubyte", y)):
            name = f"{split}-{kind}"
            blob = _idx_bytes(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (root / name).write_bytes(blob)
        data[split] = (x, y)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_gz_and_plain(tmp_path: Path, gz: bool) -> None:
    data = _write_idx_dir(tmp_path / "mnist", gz=gz)
    splits = build_splits(DataConfig(name="mnist", root=str(tmp_path / "mnist"), labels_per_class=2))
    x_train, y_train = data["train"]
    assert len(splits.train) == 30 and len(splits.test) == 10
    assert splits.train.channels == 1 and splits.image_size == 28
    assert splits.train.images.shape == (30, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(x_train))
    assert torch.equal(splits.train.labels, torch.from_numpy(y_train.astype(np.int64)))
    assert len(splits.labeled_idx) == 20
    assert splits.info["num_labeled"] == 20 and splits.info["num_test"] == 10


def test_idx_header_parse(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "a-idx3-ubyte"
    p.write_bytes(_idx_bytes(arr))
    out = read_idx(p, 0x00000803)
    assert out.shape == (2, 3, 4) and np.array_equal(out, arr)
    with pytest.raises(DataError, match="magic"):
        read_idx(p, 0x00000801)  # an image file where labels are expected


def test_fashion_mnist_from_custom_root_uses_fashion_classes(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path / "fm", gz=False)
    s = build_splits(DataConfig(name="fashion-mnist", root=str(tmp_path / "fm"), labels_per_class=1))
    assert s.classes == FASHION_MNIST_CLASSES and s.classes[0] == "T-shirt/top"


def test_idx_truncated_is_data_error(tmp_path: Path) -> None:
    root = tmp_path / "mnist"
    _write_idx_dir(root, gz=False)
    p = root / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError) as e:
        build_splits(DataConfig(name="mnist", root=str(root), labels_per_class=1))
    msg = str(e.value)
    assert str(p) in msg and "truncated" in msg and "re-download" in msg


def test_idx_broken_gzip_is_data_error(tmp_path: Path) -> None:
    root = tmp_path / "mnist"
    _write_idx_dir(root, gz=True)
    p = root / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-12])  # cut off the gzip trailer and some data
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        build_splits(DataConfig(name="mnist", root=str(root), labels_per_class=1))


def test_idx_missing_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        build_splits(DataConfig(name="mnist", root=str(missing), labels_per_class=1))
    assert str(missing) in str(e.value) and "data.root" in str(e.value)
    with pytest.raises(DataError, match=r"data\.root"):
        build_splits(DataConfig(name="mnist", root=None, labels_per_class=1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        build_splits(DataConfig(name="fashion-mnist", root=str(tmp_path / "empty"), labels_per_class=1))
    assert "train-images-idx3-ubyte" in str(e.value) and "apt-get install dataset-fashion-mnist" in str(
        e.value
    )


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DEFAULT_ROOT),
    reason=f"{FASHION_MNIST_DEFAULT_ROOT} absent (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist() -> None:
    s = build_splits(DataConfig(name="fashion-mnist", labels_per_class=4, seed=1))
    assert len(s.train) == 60000 and len(s.test) == 10000
    assert s.train.images.shape == (60000, 1, 28, 28) and s.test.images.shape == (10000, 1, 28, 28)
    assert s.train.images.dtype == torch.uint8
    assert torch.bincount(s.train.labels).tolist() == [6000] * 10
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
    assert len(s.labeled_idx) == 40 and s.info["root"] == FASHION_MNIST_DEFAULT_ROOT
    assert 60 < float(s.train.images.float().mean()) < 80  # real clothes, not noise (mean ~72.9)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split() -> None:
    train, test = load_digits()
    assert len(train) == 1297 and len(test) == 500
    assert train.images.shape == (1297, 1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 48 and counts.max() <= 52  # stratified
    # the split is fixed (seed 0), independent of the label seed
    a = build_splits(DataConfig(name="digits", labels_per_class=1, seed=0))
    b = build_splits(DataConfig(name="digits", labels_per_class=1, seed=5))
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.train.labels, b.train.labels)
    assert not np.array_equal(a.labeled_idx, b.labeled_idx)
    from sklearn.datasets import load_digits as sk

    raw = sk()
    pix = np.round(raw.images * 255 / 16).astype(np.uint8)
    flat = {pix[i].tobytes() for i in range(len(pix))}
    assert all(test.images[i, 0].numpy().tobytes() in flat for i in range(0, 500, 50))


def test_max_train_balanced_and_deterministic() -> None:
    a = build_splits(DataConfig(name="digits", labels_per_class=2, max_train=300, seed=3))
    b = build_splits(DataConfig(name="digits", labels_per_class=2, max_train=300, seed=3))
    assert len(a.train) == 300 and torch.equal(a.train.images, b.train.images)
    assert torch.bincount(a.train.labels).tolist() == [30] * 10
    assert np.array_equal(a.labeled_idx, b.labeled_idx)
    assert a.info["num_train_full"] == 1297 and a.info["num_train"] == 300


def test_holdout_replaces_the_test_split_with_unseen_training_images() -> None:
    """data.holdout: a class-balanced part of the training set, the same for every label seed,
    becomes the evaluation split and leaves the training set."""
    full = build_splits(DataConfig(name="digits", labels_per_class=2, seed=0))
    a = build_splits(DataConfig(name="digits", labels_per_class=2, seed=0, holdout=200))
    b = build_splits(DataConfig(name="digits", labels_per_class=2, seed=5, holdout=200))
    assert len(a.test) == 200 and len(a.train) == len(full.train) - 200
    assert torch.bincount(a.test.labels).tolist() == [20] * 10
    assert torch.equal(a.test.images, b.test.images)  # independent of data.seed
    train_set = {a.train.images[i].numpy().tobytes() for i in range(len(a.train))}
    assert not any(a.test.images[i].numpy().tobytes() in train_set for i in range(len(a.test)))
    assert a.info["eval_split"] == "holdout of 200 training images" and full.info["eval_split"] == "test"
    with pytest.raises(Exception, match=r"data\.holdout must be >= 1"):
        build_splits(DataConfig(name="digits", labels_per_class=2, holdout=0))
    with pytest.raises(Exception, match="leaves no training images"):
        build_splits(DataConfig(name="digits", labels_per_class=2, holdout=5000))


def test_label_fraction_digits() -> None:
    s = build_splits(DataConfig(name="digits", labels_per_class=None, label_fraction=0.1))
    counts = torch.bincount(s.train.labels[torch.from_numpy(s.labeled_idx)], minlength=10)
    full = torch.bincount(s.train.labels, minlength=10)
    assert torch.equal(counts, torch.floor(full.double() * 0.1 + 0.5).long())  # round half up


def test_image_size_resizes_array_dataset() -> None:
    s = build_splits(DataConfig(name="digits", labels_per_class=1, image_size=16))
    assert s.image_size == 16 and s.train.images.shape[1:] == (1, 16, 16)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 pickles


def _write_cifar(root: Path, n_per_batch: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Batches in the real layout: dicts with bytes keys, b'data' uint8 (N, 3072), b'labels' list."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        d = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)],
        }
        (root / name).write_bytes(pickle.dumps(d, protocol=2))
        out[name] = data
    meta = {
        b"label_names": [
            c.encode() for c in "airplane automobile bird cat deer dog frog horse ship truck".split()
        ]
    }
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def test_cifar_reader_and_parent_dir(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path / "cifar-10-batches-py", tmp_path):
        train, test, directory = load_cifar10(root)
        assert directory == tmp_path / "cifar-10-batches-py"
        assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
        assert train.classes[0] == "airplane" and train.classes[-1] == "truck"
    img0 = written["data_batch_1"][0]
    # channel-major layout: first 1024 values are the red plane of a 32x32 image
    assert np.array_equal(train.images[0, 0].numpy().reshape(-1), img0[:1024])
    assert np.array_equal(train.images[0, 2].numpy().reshape(-1), img0[2048:])
    assert np.array_equal(test.images.reshape(20, -1).numpy(), written["test_batch"])


def test_cifar_numpy_protocol5_pickle(tmp_path: Path) -> None:
    p = tmp_path / "b"
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    p.write_bytes(pickle.dumps({"data": data, "labels": [1, 2]}, protocol=5))
    x, y = read_cifar_batch(p)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [1, 2]


class _Py2Pickler(pickle._Pickler):
    """Writes str/bytes as Python 2 ``str`` opcodes (BINSTRING), like the cPickle that made CIFAR-10."""

    def _save_py2_str(self, obj: str | bytes) -> None:
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(b)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + b)
        self.memoize(obj)

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def test_cifar_python2_style_pickle(tmp_path: Path) -> None:
    buf = io.BytesIO()
    data = (np.arange(2 * 3072) % 251).astype(np.uint8).reshape(2, 3072)
    _Py2Pickler(buf, protocol=2).dump(
        {"data": data, "labels": [3, 9], "batch_label": "training batch 1 of 5"}
    )
    # numpy 1.x module name, as in the published files
    blob = buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in blob and b"_codecs" not in blob
    (tmp_path / "data_batch_1").write_bytes(blob)
    x, y = read_cifar_batch(tmp_path / "data_batch_1")
    assert y.tolist() == [3, 9] and np.array_equal(x.reshape(2, -1), data)


def test_cifar_corrupt_pickle(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _write_cifar(root)
    p = root / "data_batch_3"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(DataError) as e:
        load_cifar10(root)
    assert str(p) in str(e.value) and "corrupt" in str(e.value)
    p.write_bytes(b"this is not a pickle at all")
    with pytest.raises(DataError, match="corrupt"):
        load_cifar10(root)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", [_Evil(), _EvalEvil()])
def test_malicious_pickle_refused(tmp_path: Path, payload: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="unsafe pickle"):
        safe_pickle_load(p)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_cifar_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        build_splits(DataConfig(name="cifar10", root=str(tmp_path / "absent"), labels_per_class=1))
    assert str(tmp_path / "absent") in str(e.value) and "data.root=" in str(e.value)
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar10(tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# image folders


def _write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(path)


def _make_imagenet(root: Path, size: tuple[int, int] = (16, 16), per_class: int = 3) -> list[str]:
    wnids = ["n01440764", "n01443537", "n01484850"]
    for ci, w in enumerate(wnids):
        for j in range(per_class):
            ext = ".JPEG" if j % 2 == 0 else ".png"
            _write_image(root / "train" / w / f"{w}_{100 + j}{ext}", size, seed=ci * 100 + j)
        _write_image(root / "val" / w / f"ILSVRC2012_val_{ci:08d}.JPEG", size, seed=999 + ci)
    return wnids


def test_imagefolder_layout(tmp_path: Path) -> None:
    wnids = _make_imagenet(tmp_path / "inet")
    s = build_splits(DataConfig(name="imagefolder", root=str(tmp_path / "inet"), labels_per_class=1))
    assert s.classes == wnids and len(s.train) == 9 and len(s.test) == 3
    assert s.channels == 3 and s.image_size == 16
    x, y = s.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 0
    assert s.train.describe(1) == "n01440764/n01440764_101.png"
    png = np.asarray(Image.open(tmp_path / "inet/train/n01440764/n01440764_101.png"))
    assert np.array_equal(s.train[1][0].permute(1, 2, 0).numpy(), png)  # PNG is lossless
    assert s.test.labels.tolist() == [0, 1, 2]
    clone = pickle.loads(pickle.dumps(s.train))  # DataLoader workers under spawn pickle the dataset
    assert torch.equal(clone.get_batch([0, 4]), s.train.get_batch([0, 4]))
    batches = list(iterate_batches(s.train, np.arange(9), 4, num_workers=2))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1] and batches[0][0].shape[1:] == (3, 16, 16)


def test_probe_file_finds_empty_garbage_and_truncated_files(tmp_path: Path) -> None:
    from dpt_engine.data.imagefolder import probe_file

    good_png, good_jpg = tmp_path / "a.png", tmp_path / "b.jpg"
    _write_image(good_png, (16, 16), 0)
    _write_image(good_jpg, (16, 16), 1)
    big = tmp_path / "big.png"  # larger than the header + tail reads: the tail decides
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 300 << 10
    assert probe_file(good_png) is None and probe_file(good_jpg) is None and probe_file(big) is None
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"<html>404</html>" * 10)
    (tmp_path / "cut.jpg").write_bytes(good_jpg.read_bytes()[:-40])
    (tmp_path / "cutbig.png").write_bytes(big.read_bytes()[: 350 << 10])
    assert "empty" in probe_file(tmp_path / "empty.png")
    assert "unreadable header" in probe_file(tmp_path / "junk.png")
    assert "truncated" in probe_file(tmp_path / "cut.jpg") and "truncated" in probe_file(
        tmp_path / "cutbig.png"
    )


def test_imagefolder_skips_and_lists_unreadable_files_up_to_a_threshold(tmp_path: Path) -> None:
    root = tmp_path / "inet"
    _make_imagenet(root, per_class=40)
    bad = root / "train" / "n01443537" / "n01443537_105.png"
    bad.write_bytes(bad.read_bytes()[:30])  # a half-finished download: 1 of 120 train files
    cfg = DataConfig(name="imagefolder", root=str(root), labels_per_class=1)
    s = build_splits(cfg)
    assert len(s.train) == 119
    info = s.info["unreadable_files"]
    assert info["count"] == 1 and info["train"] == 1 and info["test"] == 0
    assert info["files"][0]["path"] == str(bad) and info["files"][0]["split"] == "train"
    (root / "train" / "n01443537" / "n01443537_107.png").write_bytes(b"")
    with pytest.raises(
        DataError, match=r"2 of 120 train image files cannot be read .* data\.max_unreadable=0\.01"
    ):
        build_splits(cfg)
    cfg.max_unreadable = 0.05
    assert build_splits(cfg).info["unreadable_files"]["count"] == 2


def test_imagefolder_requires_same_square_size(tmp_path: Path) -> None:
    _make_imagenet(tmp_path / "inet", size=(20, 12))
    with pytest.raises(DataError, match=r"data\.image_size"):
        build_splits(DataConfig(name="imagefolder", root=str(tmp_path / "inet"), labels_per_class=1))
    s = build_splits(
        DataConfig(name="imagefolder", root=str(tmp_path / "inet"), labels_per_class=1, image_size=8)
    )
    assert s.train.get_batch([0, 1, 2]).shape == (3, 3, 8, 8)
    # a different size later in the set is caught on load
    root = tmp_path / "mixed"
    _write_image(root / "a" / "x.png", (16, 16), 0)
    _write_image(root / "b" / "y.png", (12, 12), 1)
    ds = scan_image_folder(root)
    assert ds.image_size == 16
    with pytest.raises(DataError, match=r"data\.image_size=16"):
        ds[1]


def test_resize_shorter_side_center_crop(tmp_path: Path) -> None:
    # a 40x20 image: left half black, middle white, right half black; the center crop is white
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, 10:30] = 255
    (tmp_path / "c").mkdir()
    Image.fromarray(arr, mode="L").save(tmp_path / "c" / "img.png")
    ds = FolderImageDataset.from_tree(tmp_path, ["c"], channels=1, image_size=10)
    x = ds[0][0]
    assert x.shape == (1, 10, 10) and int(x[:, :, 2:8].min()) > 200


def test_from_tree_with_safe_class_dirnames(tmp_path: Path) -> None:
    classes = FASHION_MNIST_CLASSES
    assert safe_class_dirname("T-shirt/top") == "T-shirt_top"
    assert safe_class_dirname("Ankle boot") == "Ankle_boot"
    assert len(set(class_dirnames(classes))) == 10
    for i, c in enumerate(classes[:4]):
        for j in range(2):
            _write_image(
                tmp_path / "gen" / safe_class_dirname(c) / f"{j:05d}.png", (8, 8), i * 10 + j, mode="L"
            )
    _write_image(tmp_path / "gen" / "Bag" / "00000.png", (8, 8), 77, mode="L")  # raw class name
    (tmp_path / "gen" / "manifest.json").write_text("{}")  # top-level files are ignored
    ds = FolderImageDataset.from_tree(tmp_path / "gen", classes, channels=1)
    assert len(ds) == 9 and ds.channels == 1 and ds.image_size == 8
    assert sorted(set(ds.labels.tolist())) == [0, 1, 2, 3, 8]
    assert ds.describe(ds.labels.tolist().index(0)).startswith("T-shirt_top/")
    assert ds.get_batch([0, 1]).shape == (2, 1, 8, 8)
    _write_image(tmp_path / "gen" / "Hat" / "0.png", (8, 8), 1, mode="L")
    with pytest.raises(DataError) as e:
        FolderImageDataset.from_tree(tmp_path / "gen", classes, channels=1)
    assert "'Hat'" in str(e.value) and "T-shirt_top" in str(e.value) and "Ankle_boot" in str(e.value)


def test_class_dirnames_unique_on_collision() -> None:
    names = class_dirnames(["a/b", "a_b", "a b"])
    assert len(set(names)) == 3 and names[1] == "a_b"
    assert names == [safe_class_dirname(c, ["a/b", "a_b", "a b"]) for c in ["a/b", "a_b", "a b"]]
    assert class_dirnames(["a/b", "a_b", "a b"]) == names  # deterministic
    assert safe_class_dirname("..") != ".." and "/" not in safe_class_dirname("../../etc")


def test_imagefolder_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        build_splits(DataConfig(name="imagefolder", root=str(tmp_path / "none"), labels_per_class=1))
    assert str(tmp_path / "none") in str(e.value)
    _make_imagenet(tmp_path / "inet")
    with pytest.raises(DataError, match=r"data\.test_split"):
        build_splits(
            DataConfig(name="imagefolder", root=str(tmp_path / "inet"), labels_per_class=1, test_split="test")
        )


def test_corrupt_image_file(tmp_path: Path) -> None:
    _write_image(tmp_path / "a" / "ok.png", (8, 8), 0)
    (tmp_path / "a" / "z_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = scan_image_folder(tmp_path)
    with pytest.raises(DataError, match=r"z_bad\.png"):
        ds[1]
