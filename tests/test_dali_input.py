"""DALI image input vs the PIL reference on real images (Fashion-MNIST, or scikit-learn digits when
the Debian package is missing), upscaled and saved as JPEG and PNG of several sizes, with broken
files among them.

Agreement policy (see ``dpt_engine.data.dali_input``): bit-identical when no resize happens;
with resizing, mean |difference| <= RESIZE_TOLERANCE_MEAN and max <= RESIZE_TOLERANCE_MAX levels.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_engine.data import DataError, FolderImageDataset
from dpt_engine.data.dali_input import (
    RESIZE_TOLERANCE_MAX,
    RESIZE_TOLERANCE_MEAN,
    CorruptImageError,
    ImageLoader,
    center_geometry,
    decode_pil,
    load_images,
    probe_image,
    resolve_image_decoder,
)
from dpt_engine.data.idx import FASHION_MNIST_DEFAULT_ROOT

pytest.importorskip("nvidia.dali")

# (width, height) of the files: square and not, smaller and larger than the outputs
SIZES = [(28, 28), (40, 40), (57, 43), (96, 96), (33, 70), (120, 64), (32, 32), (50, 90)]


def _real_images(n: int) -> np.ndarray:
    """uint8 (n, 28, 28) Fashion-MNIST test images, or (n, 8, 8) digits if the package is absent."""
    f = Path(FASHION_MNIST_DEFAULT_ROOT) / "t10k-images-idx3-ubyte.gz"
    if f.is_file():
        with gzip.open(f) as fh:
            return np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n].copy()
    from sklearn.datasets import load_digits

    return (load_digits().images[:n] * (255 / 16)).round().astype(np.uint8)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        img.save(path, format="JPEG", quality=90)
    else:
        img.save(path)


def _write_tree(root: Path, n: int = 32, sizes=SIZES) -> list[str]:
    """``n`` real images, class folders by label parity; JPEG/PNG and L/RGB alternate."""
    imgs = _real_images(n)
    files = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        im = Image.fromarray(imgs[i]).resize((w, h), Image.Resampling.BICUBIC)
        if i % 3:
            # RGB with a colour cast, so colour -> gray conversion is exercised too
            a = np.asarray(im.convert("RGB")).copy()
            a[..., 0] = np.clip(a[..., 0].astype(int) + 30 * (i % 2), 0, 255)
            im = Image.fromarray(a)
        p = root / f"c{i % 2}" / f"{i:03d}.{'jpg' if i % 2 == 0 else 'png'}"
        _save(im, p)
        files.append(str(p))
    return files


def _add_broken(root: Path, good_jpg: str, good_png: str) -> dict[str, str]:
    """Broken files of each kind a long run meets; name -> the stage that must catch it."""
    d = root / "c0"
    j = Path(good_jpg).read_bytes()
    (d / "t_truncated.jpg").write_bytes(j[: int(len(j) * 0.8)])  # header intact, no EOI
    (d / "t_garbage.jpg").write_bytes(b"this is not an image at all" * 4)
    (d / "t_empty.png").write_bytes(b"")
    p = bytearray(Path(good_png).read_bytes())
    k = p.find(b"IDAT")
    p[k + 20 : k + 60] = b"\0" * 40  # header and IEND intact: only decoding finds it
    (d / "t_baddata.png").write_bytes(bytes(p))
    return {
        "t_truncated.jpg": "truncated",
        "t_garbage.jpg": "header",
        "t_empty.png": "empty",
        "t_baddata.png": "decode",
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, list[str], dict[str, str]]:
    root = tmp_path_factory.mktemp("imgs")
    files = _write_tree(root)
    broken = _add_broken(root, files[0], files[1])
    Image.open(files[3]).save(root / "c1" / "z_anim.gif")  # DALI has no GIF decoder: PIL decodes it
    return root, files, broken


def _all_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def _diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs()


def test_probe_catches_broken_headers_and_truncation(tree) -> None:
    root, files, _ = tree
    w, h, fmt = probe_image(Path(files[2]).read_bytes())
    assert (w, h, fmt) == (*SIZES[2], "JPEG")
    with pytest.raises(CorruptImageError, match="truncated JPEG"):
        probe_image((root / "c0" / "t_truncated.jpg").read_bytes())
    with pytest.raises(CorruptImageError, match="header"):
        probe_image((root / "c0" / "t_garbage.jpg").read_bytes())
    with pytest.raises(CorruptImageError, match="empty"):
        probe_image(b"")
    probe_image((root / "c0" / "t_baddata.png").read_bytes())  # passes: only decoding can tell


@pytest.mark.parametrize("channels", [1, 3])
def test_backends_identical_without_resize(tmp_path: Path, channels: int) -> None:
    files = _write_tree(tmp_path, n=12, sizes=[(32, 32)])
    out = {
        be: load_images(files, image_size=32, resize=False, channels=channels, batch_size=5, decoder=be)[0]
        for be in ("dali", "pil")
    }
    assert out["dali"].images.shape == (12, channels, 32, 32)
    assert torch.equal(out["dali"].images, out["pil"].images)  # JPEG and PNG, gray and colour
    ref = torch.stack(
        [decode_pil(Path(f).read_bytes(), channels, center_geometry(32, 32, 32)) for f in files]
    )
    assert torch.equal(out["pil"].images, ref)


@pytest.mark.parametrize(("channels", "size"), [(3, 24), (3, 48), (1, 32)])
def test_backends_agree_within_resize_tolerance(tree, channels: int, size: int) -> None:
    _, files, _ = tree
    dali, skipped_d = load_images(files, image_size=size, channels=channels, batch_size=8, decoder="dali")
    pil, skipped_p = load_images(files, image_size=size, channels=channels, batch_size=8, decoder="pil")
    assert not skipped_d and not skipped_p
    assert torch.equal(dali.indices, pil.indices) and dali.images.shape == (len(files), channels, size, size)
    d = _diff(dali.images, pil.images)
    assert float(d.float().mean()) <= RESIZE_TOLERANCE_MEAN
    assert int(d.max()) <= RESIZE_TOLERANCE_MAX
    assert float((d > 2).float().mean()) < 0.02  # large gaps only at clipped cubic overshoot
    for i in (0, 5):  # the PIL path is today's FolderImageDataset decoding, bit for bit
        g = center_geometry(*Image.open(files[i]).size, size)
        assert torch.equal(pil.images[i], decode_pil(Path(files[i]).read_bytes(), channels, g))


@pytest.mark.parametrize("decoder", ["dali", "pil"])
def test_broken_files_are_skipped_and_counted(tree, decoder: str) -> None:
    root, _, broken = tree
    all_files = _all_files(root)
    loader = ImageLoader(all_files, image_size=32, batch_size=6, decoder=decoder, rank=0, world_size=1)
    got = list(loader)
    kept = torch.cat([b.indices for b in got]).tolist()
    skipped = {Path(s.path).name: s.reason for s in loader.skipped}
    assert set(skipped) == set(broken)  # the same four files, whichever decoder
    assert "truncated" in skipped["t_truncated.jpg"] and "empty" in skipped["t_empty.png"]
    assert "cannot decode" in skipped["t_baddata.png"]
    assert sorted(kept) == [i for i, f in enumerate(all_files) if Path(f).name not in broken]
    assert sum(len(b) for b in got) == len(all_files) - 4
    gif = all_files.index(str(root / "c1" / "z_anim.gif"))
    assert gif in kept
    if decoder == "dali":
        assert loader.pil_fallbacks == []  # the GIF goes to PIL by format, no failed DALI run needed
    with pytest.raises(DataError, match=r"t_baddata\.png"):
        loader.load([all_files.index(str(root / "c0" / "t_baddata.png")), 0], on_error="raise")


def test_training_crops_shards_and_backends(tree) -> None:
    _, files, _ = tree
    kw = dict(image_size=24, batch_size=5, shuffle=True, random_crop=True, random_flip=True, seed=3)
    shards = {}
    for be in ("dali", "pil"):
        for rank in range(3):
            loader = ImageLoader(files, decoder=be, rank=rank, world_size=3, **kw)
            loader.set_epoch(2)
            shards[be, rank] = list(loader)
    for rank in range(3):
        for a, b in zip(shards["dali", rank], shards["pil", rank]):
            assert torch.equal(a.indices, b.indices)
            d = _diff(a.images, b.images)
            assert float(d.float().mean()) <= RESIZE_TOLERANCE_MEAN and int(d.max()) <= RESIZE_TOLERANCE_MAX
    idx = [torch.cat([b.indices for b in shards["pil", r]]) for r in range(3)]
    assert {len(i) for i in idx} == {11}  # 32 files padded to 33
    assert set(torch.cat(idx).tolist()) == set(range(len(files)))
    other = ImageLoader(files, decoder="pil", rank=0, world_size=3, **kw)
    other.set_epoch(3)
    assert not torch.equal(next(iter(other)).indices, shards["pil", 0][0].indices)
    # crops differ from the center crop but keep the geometry shared by the decoders
    center = load_images(files, image_size=24, decoder="pil")[0].images
    first = shards["pil", 0][0]
    assert not torch.equal(first.images, center[first.indices])


@pytest.mark.parametrize("decoder", ["dali", "pil"])
def test_folder_dataset_bulk_reads(tree, decoder: str) -> None:
    root, _, broken = tree
    ds = FolderImageDataset.from_tree(root, ["c0", "c1"], channels=3, image_size=32, decoder=decoder)
    good = [i for i, p in enumerate(ds.paths) if Path(p).name not in broken]
    bulk = ds.get_batch(good)  # >= BULK_MIN images: the bulk loader
    single = torch.stack([ds[i][0] for i in good])  # PIL, one by one
    d = _diff(bulk, single)
    if decoder == "pil":
        assert torch.equal(bulk, single)
    assert float(d.float().mean()) <= RESIZE_TOLERANCE_MEAN and int(d.max()) <= RESIZE_TOLERANCE_MAX
    with pytest.raises(DataError, match=r"4 unreadable image\(s\).*t_") as e:
        ds.get_batch(range(len(ds)))
    assert "delete or replace" in str(e.value)
    mem, kept, skipped = ds.preload(progress=False)
    assert kept.tolist() == good and len(mem) == len(good)
    assert torch.equal(mem.images, bulk) and torch.equal(mem.labels, ds.labels[good])
    assert sorted(Path(s.path).name for s in skipped) == sorted(broken)


def test_workers_after_dali_do_not_crash(tree, monkeypatch) -> None:
    """DALI does not survive fork(). The engine's DataLoader workers start from a clean server
    process (never a fork of this one, which ran DALI) and still decode within the resize
    tolerance; a dataset that finds itself in a fork of a DALI process (a user's own fork
    DataLoader) decodes with PIL instead of touching DALI's inherited state."""
    from dpt_engine.data import dali_input, iterate_batches, worker_start_method

    root, _, broken = tree
    ds = FolderImageDataset.from_tree(root, ["c0", "c1"], channels=3, image_size=32, decoder="dali")
    good = np.array([i for i, p in enumerate(ds.paths) if Path(p).name not in broken])
    parent = ds.get_batch(good)  # a DALI pipeline runs in this process
    assert worker_start_method() in ("forkserver", "spawn")
    got = list(iterate_batches(ds, good, 16, num_workers=2))
    images = torch.cat([g[0] for g in got])
    d = _diff(images, parent)
    assert images.shape == parent.shape
    assert float(d.float().mean()) <= RESIZE_TOLERANCE_MEAN and int(d.max()) <= RESIZE_TOLERANCE_MAX
    assert ds.bulk_loader()._use_dali()  # this process ran DALI itself: it keeps using it
    monkeypatch.setattr(dali_input, "_dali_pid", os.getpid() + 1)  # as seen from a fork of a DALI process
    assert not ds.bulk_loader()._use_dali()
    forked = ds.get_batch(good)
    d = _diff(forked, parent)
    assert float(d.float().mean()) <= RESIZE_TOLERANCE_MEAN and int(d.max()) <= RESIZE_TOLERANCE_MAX


def test_backend_choice(monkeypatch) -> None:
    monkeypatch.setenv("DPT_IMAGE_DECODER", "pil")
    assert resolve_image_decoder() == "pil" and resolve_image_decoder("dali") == "dali"  # explicit wins
    monkeypatch.setenv("DPT_IMAGE_DECODER", "auto")
    assert resolve_image_decoder() == "dali"  # DALI is installed here
    monkeypatch.setenv("DPT_IMAGE_DECODER", "nvjpeg")
    with pytest.raises(ValueError, match=r"DPT_IMAGE_DECODER='nvjpeg'.*auto, dali, pil"):
        resolve_image_decoder()
    with pytest.raises(ValueError, match="cuda"):
        ImageLoader(["x.png"], image_size=8, decoder="pil", device="cuda", rank=0, world_size=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG 'mixed' decoding)")
def test_mixed_decoder_on_gpu(tree) -> None:  # pragma: no cover - GPU machines only
    _, files, _ = tree
    cpu = load_images(files, image_size=32, decoder="dali")[0]
    gpu = load_images(files, image_size=32, decoder="dali", device="cuda")[0]
    assert gpu.images.is_cuda and torch.equal(gpu.indices, cpu.indices)
    d = _diff(gpu.images.cpu(), cpu.images)  # nvJPEG's IDCT differs from libjpeg-turbo's slightly
    assert float(d.float().mean()) <= RESIZE_TOLERANCE_MEAN and int(d.max()) <= RESIZE_TOLERANCE_MAX


def test_truncated_png_and_unreadable_path(tmp_path: Path) -> None:
    files = _write_tree(tmp_path, n=3, sizes=[(16, 16)])
    png = Path(files[1]).read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    missing = str(tmp_path / "gone.png")
    listing = [*files, str(tmp_path / "cut.png"), missing]
    batch, skipped = load_images(listing, image_size=16, decoder="dali")
    assert batch.indices.tolist() == [0, 1, 2]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert set(reasons) == {"cut.png", "gone.png"} and "cannot read" in reasons["gone.png"]
    assert os.path.basename(files[0]) not in reasons
    with pytest.raises(CorruptImageError):
        decode_pil(io.BytesIO(png[:40]).getvalue(), 3, center_geometry(16, 16, 16))
