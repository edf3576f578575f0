"""The latent store: encoding round trip, resume after a crash, refusal of a foreign directory,
pseudo-labels by index, rank sharding, skipped corrupt images. Real data (scikit-learn digits)
through a real (tiny, randomly initialised) diffusers AutoencoderKL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_engine.data import ArrayImageDataset, FolderImageDataset, load_digits
from dpt_engine.data.latent_store import (
    LatentLoader,
    LatentStore,
    LatentStoreError,
    MomentsView,
    encode_to_store,
    sample_latents,
    shard_rows,
)
from dpt_engine.utils.pixels import uint8_to_model_space

pytest.importorskip("diffusers")
from dpt_engine.models.autoencoder import LatentAutoencoder


def _digits(n: int = 40) -> ArrayImageDataset:
    train, _ = load_digits()
    return train.subset(np.arange(n))  # uint8 (n, 1, 8, 8), real handwritten digits


def _ae(seed: int = 0) -> LatentAutoencoder:
    torch.manual_seed(seed)
    return LatentAutoencoder.from_config(in_channels=1, out_channels=1, scale_factor=0.5).float()


class _CrashAt(ArrayImageDataset):
    """A real dataset that dies (as a killed process would) when image ``crash_at`` is read."""

    def __init__(self, base: ArrayImageDataset, crash_at: int):
        super().__init__(base.images, base.labels, base.classes, base.name)
        self.crash_at = crash_at

    def get_batch(self, idx):
        if self.crash_at in [int(i) for i in idx]:
            raise KeyboardInterrupt("simulated crash")
        return super().get_batch(idx)


@pytest.fixture(scope="module")
def ae() -> LatentAutoencoder:
    return _ae(0)


def test_round_trip_moments_and_flips(tmp_path: Path, ae: LatentAutoencoder) -> None:
    ds = _digits(40)
    store = encode_to_store(
        tmp_path / "s", ds, ae, dtype="float32", chunk_size=16, batch_size=7, progress=False
    )
    assert store.complete and store.num_images == 40 and store.num_rows == 80
    assert store.latent_shape == (4, 4, 4) and store.kind == "moments"
    raw = np.load(tmp_path / "s" / "latents.npy", mmap_mode="r")  # a plain .npy memory map
    assert raw.shape == (80, 2, 4, 4, 4) and raw.dtype == np.float32
    with torch.no_grad():
        x = uint8_to_model_space(ds.images)
        mean, logvar = ae.encode_moments(x)
        fmean, flogvar = ae.encode_moments(x.flip(-1))
    torch.testing.assert_close(torch.from_numpy(raw[:40, 0].copy()), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(raw[:40, 1].copy()), logvar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(raw[40:, 0].copy()), fmean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(raw[40:, 1].copy()), flogvar, rtol=1e-5, atol=1e-5)
    assert np.array_equal(store.labels(), ds.labels.numpy())
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["scale_factor"] == 0.5 and meta["flip"] and "flips" in meta["layout"]

    # the stage-2 cache's formula (scaled mean and std) from the stored moments
    from dpt_engine.stages.stage2 import encode_dataset

    smean, sstd = encode_dataset(ae, ds.images, 16, torch.device("cpu"), progress=False)
    torch.testing.assert_close(torch.from_numpy(raw[:40, 0].copy()) * 0.5, smean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.exp(0.5 * torch.from_numpy(raw[:40, 1].copy())) * 0.5, sstd, rtol=1e-5, atol=1e-5
    )

    # training latents: the autoencoder's own posterior draw (the reference) with the same noise
    rows = np.array([3, 41, 0, 79])
    got = store.latents_for(rows, torch.Generator().manual_seed(5))
    m = torch.from_numpy(raw[rows, 0].copy())
    lv = torch.from_numpy(raw[rows, 1].copy())
    ref = ae.sample(m, lv, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_float16_store_and_sampled_kind(tmp_path: Path, ae: LatentAutoencoder) -> None:
    ds = _digits(20)
    s16 = encode_to_store(tmp_path / "h", ds, ae, dtype="float16", flip=False, chunk_size=8, progress=False)
    s32 = encode_to_store(tmp_path / "f", ds, ae, dtype="float32", flip=False, chunk_size=8, progress=False)
    assert s16.latents.dtype == np.float16 and s16.num_rows == 20
    a, b = s16.latents.astype(np.float32), np.asarray(s32.latents)
    assert np.abs(a - b).max() <= 1e-3 * max(1.0, np.abs(b).max())  # fp16 rounding only
    smp = encode_to_store(tmp_path / "z", ds, ae, kind="sample", dtype="float32", flip=False, progress=False)
    assert smp.latents.shape == (20, 4, 4, 4)
    z = np.asarray(smp.latents)
    mean = b[:, 0]
    std = np.exp(0.5 * b[:, 1])
    eps = (z - mean) / std  # the stored draw is mean + std * N(0, 1)
    assert abs(eps.mean()) < 0.15 and 0.8 < eps.std() < 1.2
    torch.testing.assert_close(smp.latents_for([2]), torch.from_numpy(z[2:3].copy()) * 0.5)


def test_resume_after_crash_gives_the_same_store(tmp_path: Path, ae: LatentAutoencoder) -> None:
    ds = _digits(40)
    ref = encode_to_store(tmp_path / "ref", ds, ae, chunk_size=10, progress=False)
    with pytest.raises(KeyboardInterrupt):
        encode_to_store(tmp_path / "s", _CrashAt(ds, 27), ae, chunk_size=10, progress=False)
    done = json.loads((tmp_path / "s" / "progress-rank0.json").read_text())["done"]
    assert done == [0, 1]  # chunk 2 (images 20..29) was not recorded
    with pytest.raises(LatentStoreError, match="unfinished"):
        LatentStore(tmp_path / "s")
    part = encode_to_store(tmp_path / "s", ds, ae, chunk_size=10, progress=False, max_chunks=1)
    assert not part.complete  # a time budget of one chunk: 3 of 4 done
    assert json.loads((tmp_path / "s" / "progress-rank0.json").read_text())["done"] == [0, 1, 2]
    store = encode_to_store(tmp_path / "s", ds, ae, chunk_size=10, progress=False)
    assert store.complete
    assert np.array_equal(np.asarray(store.latents), np.asarray(ref.latents))
    again = encode_to_store(tmp_path / "s", ds, ae, chunk_size=10, progress=False)  # complete: no work
    assert again.complete


def test_rank_split_encoding_matches_one_rank(tmp_path: Path, ae: LatentAutoencoder) -> None:
    ds = _digits(30)
    ref = encode_to_store(tmp_path / "ref", ds, ae, chunk_size=8, progress=False)
    first = encode_to_store(tmp_path / "s", ds, ae, chunk_size=8, progress=False, rank=1, world_size=2)
    assert not first.complete  # rank 1 did chunks 1 and 3 only
    second = encode_to_store(tmp_path / "s", ds, ae, chunk_size=8, progress=False, rank=0, world_size=2)
    assert second.complete
    assert np.array_equal(np.asarray(second.latents), np.asarray(ref.latents))


def test_refuses_another_source_or_autoencoder(tmp_path: Path, ae: LatentAutoencoder) -> None:
    ds = _digits(20)
    encode_to_store(tmp_path / "s", ds, ae, chunk_size=8, progress=False)
    with pytest.raises(LatentStoreError, match="autoencoder") as e:
        encode_to_store(tmp_path / "s", ds, _ae(1), chunk_size=8, progress=False)
    assert "new directory" in str(e.value)
    with pytest.raises(LatentStoreError, match="source"):
        encode_to_store(
            tmp_path / "s", _digits(20).subset(np.arange(19, -1, -1)), ae, chunk_size=8, progress=False
        )
    with pytest.raises(LatentStoreError, match="dtype"):
        encode_to_store(tmp_path / "s", ds, ae, chunk_size=8, dtype="float32", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(LatentStoreError, match="not empty"):
        encode_to_store(tmp_path / "other", ds, ae, progress=False)
    with pytest.raises(LatentStoreError, match="not a latent store"):
        LatentStore(tmp_path / "other")


def test_pseudo_labels_attach_by_index(tmp_path: Path, ae: LatentAutoencoder) -> None:
    ds = _digits(12)
    store = encode_to_store(tmp_path / "s", ds, ae, progress=False)
    with pytest.raises(LatentStoreError, match="no pseudo-labels"):
        store.row_labels("pseudo")
    with pytest.raises(LatentStoreError, match="12 source images"):
        store.attach_pseudo_labels(np.zeros(24, dtype=np.int64))
    pl = (ds.labels.numpy() + 1) % 10
    store.attach_pseudo_labels(pl)
    assert np.array_equal(store.row_labels("pseudo"), np.concatenate([pl, pl]))  # flips share labels
    store.attach_pseudo_labels(torch.zeros(12, dtype=torch.long))  # replaceable
    assert (LatentStore(tmp_path / "s").row_labels("pseudo") == 0).all()
    assert np.array_equal(store.row_labels("true")[12:], ds.labels.numpy())


def test_shard_rows_disjoint_equal_deterministic() -> None:
    rows = np.arange(103)
    shards = [shard_rows(rows, r, 4, epoch=3, seed=1) for r in range(4)]
    assert {len(s) for s in shards} == {26}  # 104 = 103 + 1 wrapped row
    together = np.concatenate(shards)
    assert set(together.tolist()) == set(rows.tolist()) and len(together) - len(set(together.tolist())) == 1
    assert np.array_equal(shard_rows(rows, 2, 4, epoch=3, seed=1), shards[2])
    assert not np.array_equal(shard_rows(rows, 2, 4, epoch=4, seed=1), shards[2])


def test_loader_shards_and_draws(tmp_path: Path, ae: LatentAutoencoder) -> None:
    ds = _digits(24)
    store = encode_to_store(tmp_path / "s", ds, ae, progress=False)
    store.attach_pseudo_labels(ds.labels.numpy())
    seen = []
    for rank in range(2):
        loader = LatentLoader(store, 5, rank=rank, world_size=2, seed=7)
        loader.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader) == 4  # 24 rows per rank, drop_last
        for b in batches:
            assert b.latents.shape == (5, 4, 4, 4) and b.latents.dtype == torch.float32
            assert torch.equal(b.labels, torch.from_numpy(store.row_labels("pseudo")[b.rows.numpy()]))
        seen.append(torch.cat([b.rows for b in batches]))
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    a = LatentLoader(store, 8, rank=0, world_size=1, seed=7)
    b = LatentLoader(store, 8, rank=0, world_size=1, seed=7)
    ba, bb = next(iter(a)), next(iter(b))
    assert torch.equal(ba.rows, bb.rows) and torch.equal(ba.latents, bb.latents)  # deterministic
    b.set_epoch(1)
    assert not torch.equal(next(iter(b)).rows, ba.rows)  # a new permutation per epoch
    moments = torch.from_numpy(store.read(ba.rows.numpy()).astype(np.float32))  # (8, 2, 4, 4, 4)
    eps = (ba.latents / 0.5 - moments[:, 0]) / torch.exp(0.5 * moments[:, 1])
    assert abs(float(eps.mean())) < 0.15 and 0.85 < float(eps.std()) < 1.15  # mean + std * N(0, 1)


def test_sample_latents_matches_autoencoder_sample(ae: LatentAutoencoder) -> None:
    mean, logvar = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4) * 20  # clamping matters
    got = sample_latents(mean, logvar, ae.scale_factor, 0.1, torch.Generator().manual_seed(3))
    ae.shift_factor = 0.1
    try:
        ref = ae.sample(mean, logvar, torch.Generator().manual_seed(3))
    finally:
        ae.shift_factor = 0.0
    torch.testing.assert_close(got, ref)


def test_folder_source_skips_corrupt_image(tmp_path: Path, ae: LatentAutoencoder) -> None:
    train, _ = load_digits()
    root = tmp_path / "imgs"
    for i in range(10):
        (root / str(int(train.labels[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(train.images[i, 0].numpy()).save(root / str(int(train.labels[i])) / f"{i:02d}.png")
    bad = root / "0" / "zz_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    ds = FolderImageDataset.from_tree(
        root, [str(c) for c in range(10)], channels=1, image_size=8, decoder="pil"
    )
    k = ds.paths.index("0/zz_bad.png")
    store = encode_to_store(tmp_path / "s", ds, ae, chunk_size=4, progress=False)
    assert store.complete and store.meta["num_skipped"] == 1
    assert store.meta["skipped"][0]["index"] == k and "zz_bad.png" in store.meta["skipped"][0]["path"]
    valid = store.valid_rows()
    assert k not in valid and (k + len(ds)) not in valid and len(valid) == 2 * (len(ds) - 1)
    rows = torch.cat([b.rows for b in LatentLoader(store, 3, labels="true", rank=0, world_size=1)])
    assert k not in rows.tolist()


def test_benchmark_writes_rows(tmp_path: Path) -> None:
    """``benchmarks/bench_latent_store.py`` runs at tiny settings and writes harness rows (no speed
    assertions: benchmarks are not tests)."""
    import sys

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.bench_latent_store import BASELINES, VARIANTS, main
    from benchmarks.harness import ROW_FIELDS

    out = tmp_path / "rows.json"
    argv = ["--rows", "64", "--shape", "4", "4", "4", "--batch", "8", "--batches", "2", "--repeats", "1"]
    returned = main(
        [*argv, "--json", str(out), "--png", str(tmp_path / "c.png"), "--workdir", str(tmp_path / "w")]
    )
    rows = json.loads(out.read_text())
    assert rows == returned and all(tuple(r) == ROW_FIELDS for r in rows)
    keys = {(r["variant"], r["metric"], r["baseline"]) for r in rows}
    assert all((v, "throughput", None) in keys for v in VARIANTS)
    assert all((v, "speedup", b) in keys for v, b in BASELINES.items())
    assert all(r["value"] > 0 for r in rows)


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        store = encode_to_store(Path(out) / "s", _digits(30), _ae(0), chunk_size=8, progress=False)
        assert store.complete
        loader = LatentLoader(store, 4, labels="true", seed=3)  # rank / world from the process group
        loader.set_epoch(1)
        rows = torch.cat([b.rows for b in loader]).tolist()
        (Path(out) / f"rows{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_process_encoding_and_sharded_reading(tmp_path: Path, ae: LatentAutoencoder) -> None:
    """Two gloo ranks encode disjoint chunks into one store (equal to a one-process encoding) and
    read disjoint, equal-length shards of it."""
    import torch.multiprocessing as mp

    from dpt_engine.utils.dist import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0, 0], f"worker exit codes {codes}"
    # the workers encode with 1 thread: so must the reference, for bit-identical conv results
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = encode_to_store(tmp_path / "ref", _digits(30), ae, chunk_size=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    store = LatentStore(tmp_path / "s")
    assert np.array_equal(np.asarray(store.latents), np.asarray(ref.latents))
    done = [
        set(json.loads((tmp_path / "s" / f"progress-rank{r}.json").read_text())["done"]) for r in range(2)
    ]
    assert done == [{0, 2}, {1, 3}]
    rows = [json.loads((tmp_path / f"rows{r}.json").read_text()) for r in range(2)]
    assert len(rows[0]) == len(rows[1]) == 28 and not set(rows[0]) & set(rows[1])  # 60 rows, drop_last


def test_memory_mapped_view_trains_like_the_in_memory_latents(tmp_path: Path, ae: LatentAutoencoder) -> None:
    """Stage 2 on a store larger than RAM indexes ``MomentsView``s; the values and a short training
    run must equal the in-memory tensors' exactly."""
    from dpt_engine.config.schema import DiffusionConfig
    from dpt_engine.diffusion.trainer import DiffusionData, fit_diffusion
    from dpt_engine.models.uvit import create_uvit

    store = encode_to_store(tmp_path / "s", _digits(24), ae, dtype="float32", progress=False)
    rows = store.valid_rows()
    mean, std = MomentsView(store, rows, "mean"), MomentsView(store, rows, "std")
    raw = torch.from_numpy(store.read(rows))
    assert mean.shape == (len(rows), *store.latent_shape)
    idx = torch.tensor([5, 0, 47, 5])
    assert torch.equal(mean[idx], (raw[idx, 0] - ae.shift_factor) * ae.scale_factor)
    assert torch.equal(std[idx], torch.exp(0.5 * raw[idx, 1].clamp(-30, 20)) * ae.scale_factor)

    labels = torch.from_numpy(store.row_labels("true")[rows])
    cfg = DiffusionConfig(
        model="uvit-tiny8", steps=3, batch_size=8, warmup_steps=1, log_every=1, checkpoint_every=3
    )
    losses = []
    for i, (x, x_std) in enumerate(
        [(mean, std), (mean[torch.arange(len(rows))], std[torch.arange(len(rows))])]
    ):
        torch.manual_seed(0)
        net = create_uvit("uvit-tiny8", img_size=4, in_chans=4, num_classes=10)
        data = DiffusionData(x=x, y=labels, weight=None, num_classes=10, x_std=x_std)
        fit = fit_diffusion(net, cfg, data, tmp_path / f"w{i}", torch.device("cpu"), seed=0, progress=False)
        losses.append([h["loss"] for h in fit.history])
    assert losses[0] == losses[1]
