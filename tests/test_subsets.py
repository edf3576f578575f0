"""Label-subset selection and DPT/MSN subset files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpt_engine.config.schema import DataConfig
from dpt_engine.data import (
    ArrayImageDataset,
    DataError,
    FolderImageDataset,
    build_splits,
    read_index_file,
    read_subset_file,
    scan_image_folder,
    select_balanced,
    select_fraction,
    select_per_class,
    subset_file_lines,
    write_index_file,
)


@pytest.fixture
def labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(10), [50, 40, 30, 60, 45, 35, 55, 42, 38, 47]))


def test_select_per_class_exact_and_deterministic(labels: np.ndarray) -> None:
    a = select_per_class(labels, 4, seed=0, num_classes=10)
    b = select_per_class(labels, 4, seed=0, num_classes=10)
    c = select_per_class(labels, 4, seed=1, num_classes=10)
    assert a.dtype == np.int64 and np.all(np.diff(a) > 0)  # sorted, unique
    assert np.bincount(labels[a], minlength=10).tolist() == [4] * 10
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # nested: k=1 is contained in k=4 for the same seed
    assert set(select_per_class(labels, 1, seed=0, num_classes=10)) <= set(a)


def test_select_per_class_too_large(labels: np.ndarray) -> None:
    with pytest.raises(DataError) as e:
        select_per_class(labels, 31, seed=0, num_classes=10, classes=[f"c{i}" for i in range(10)])
    msg = str(e.value)
    assert "c2" in msg and "30" in msg and "data.labels_per_class" in msg
    with pytest.raises(DataError, match="class 10"):
        select_per_class(labels, 1, seed=0, num_classes=11)  # an empty class


def test_select_fraction(labels: np.ndarray) -> None:
    idx = select_fraction(labels, 0.1, seed=0)
    # sizes 50 40 30 60 45 35 55 42 38 47; round half up: 4.5 -> 5, 3.5 -> 4
    assert np.bincount(labels[idx]).tolist() == [5, 4, 3, 6, 5, 4, 6, 4, 4, 5]
    tiny = select_fraction(labels, 0.001, seed=0)
    assert np.bincount(labels[tiny]).tolist() == [1] * 10  # at least one per class
    assert not np.array_equal(select_fraction(labels, 0.1, seed=1), idx)


def test_select_balanced(labels: np.ndarray) -> None:
    idx = select_balanced(labels, 355, seed=0)
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.sum() == 355
    assert counts[2] == 30 and counts[5] == 35  # small classes give everything they have
    others = np.delete(counts, [2, 5])
    assert others.min() >= 36 and others.max() - others.min() <= 1  # the rest is shared evenly
    assert np.array_equal(idx, select_balanced(labels, 355, seed=0))
    assert len(select_balanced(labels, 10_000, seed=0)) == len(labels)


# ---------------------------------------------------------------------------------------------
# subset files


WNIDS = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture
def inet_train(tmp_path: Path) -> FolderImageDataset:
    root = tmp_path / "train"
    for ci, w in enumerate(WNIDS):
        (root / w).mkdir(parents=True)
        for j in range(4):
            arr = np.full((8, 8, 3), ci * 40 + j, dtype=np.uint8)
            Image.fromarray(arr).save(root / w / f"{w}_{1000 + j}.JPEG", format="JPEG")
    return scan_image_folder(root)


def test_dpt_subset_file(tmp_path: Path, inet_train: FolderImageDataset) -> None:
    f = tmp_path / "2imgs_class.txt"
    f.write_text("n01440764_1001.JPEG\nn01443537_1000.JPEG\n\nn01484850_1003.JPEG\n")
    idx = read_subset_file(f, inet_train)
    assert [inet_train.describe(i) for i in idx] == [
        "n01440764/n01440764_1001.JPEG",
        "n01443537/n01443537_1000.JPEG",
        "n01484850/n01484850_1003.JPEG",
    ]


def test_subset_file_unknown_class(tmp_path: Path, inet_train: FolderImageDataset) -> None:
    f = tmp_path / "1imgs_class.txt"
    f.write_text("n01440764_1001.JPEG\nn09999999_1.JPEG\n")
    with pytest.raises(DataError) as e:
        read_subset_file(f, inet_train)
    assert ":2:" in str(e.value) and "n09999999" in str(e.value) and "unknown class" in str(e.value)


def test_subset_file_missing_image(tmp_path: Path, inet_train: FolderImageDataset) -> None:
    f = tmp_path / "10percent.txt"
    f.write_text("n01440764_1001.JPEG\nn01440764_5555.JPEG\n")
    with pytest.raises(DataError, match=r":2: 'n01440764_5555.JPEG' not found"):
        read_subset_file(f, inet_train)
    with pytest.raises(DataError, match="does not exist"):
        read_subset_file(tmp_path / "absent.txt", inet_train)


def test_dpt_round_trip(tmp_path: Path, inet_train: FolderImageDataset) -> None:
    idx = select_per_class(inet_train.labels, 2, seed=3, num_classes=3)
    out = tmp_path / "run" / "labeled.txt"
    write_index_file(out, idx, inet_train)
    lines = out.read_text().splitlines()
    assert len(lines) == 6 and all(s.startswith("n0") and s.endswith(".JPEG") and "/" not in s for s in lines)
    assert np.array_equal(read_index_file(out, inet_train), idx)
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary file


def test_round_trip_generic_folder_names(tmp_path: Path) -> None:
    # files that do not start with their class name are written as relative paths
    for c in ("cat", "dog"):
        (tmp_path / "t" / c).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "t" / c / f"img{j}.png")
    ds = scan_image_folder(tmp_path / "t")
    idx = np.array([1, 3, 5])
    assert subset_file_lines(idx, ds) == ["cat/img1.png", "dog/img0.png", "dog/img2.png"]
    write_index_file(tmp_path / "l.txt", idx, ds)
    assert np.array_equal(read_subset_file(tmp_path / "l.txt", ds), idx)


def test_index_file_round_trip_and_errors(tmp_path: Path) -> None:
    import torch

    ds = ArrayImageDataset(torch.zeros(20, 1, 4, 4, dtype=torch.uint8), torch.arange(20) % 4, list("abcd"))
    idx = np.array([0, 5, 7, 19])
    write_index_file(tmp_path / "i.txt", idx, ds)
    assert (tmp_path / "i.txt").read_text() == "0\n5\n7\n19\n"
    assert np.array_equal(read_index_file(tmp_path / "i.txt", ds), idx)
    (tmp_path / "bad.txt").write_text("1\n20\n")
    with pytest.raises(DataError, match=r":2: index 20 out of range"):
        read_subset_file(tmp_path / "bad.txt", ds)
    (tmp_path / "dup.txt").write_text("# comment\n1\n1\n")
    with pytest.raises(DataError, match="repeats line 2"):
        read_subset_file(tmp_path / "dup.txt", ds)
    (tmp_path / "names.txt").write_text("n01440764_1.JPEG\n")
    with pytest.raises(DataError, match="integer indices"):
        read_subset_file(tmp_path / "names.txt", ds)


def test_build_splits_with_subset_file(tmp_path: Path) -> None:
    base = build_splits(DataConfig(name="digits", labels_per_class=3, seed=7))
    write_index_file(tmp_path / "labeled.txt", base.labeled_idx, base.train)
    again = build_splits(
        DataConfig(name="digits", labels_per_class=None, subset_file=str(tmp_path / "labeled.txt"))
    )
    assert np.array_equal(again.labeled_idx, base.labeled_idx)
    assert again.info["label_selection"]["subset_file"].endswith("labeled.txt")
    assert again.info["labeled_per_class"] == [3] * 10
