"""Shard formats, readers, the work partition, and the host-sync-free sampling loop."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpt_engine.data import ArrayImageDataset, ConcatImageDataset, DatasetSplits, FolderImageDataset
from dpt_engine.data.base import DataError
from dpt_engine.sampling import ShardDataset, ShardPlan
from dpt_engine.stages.stage3 import load_pseudo_images
from dpt_engine.utils.pixels import model_space_to_uint8

sys.path.insert(0, str(Path(__file__).parent))
from test_sampling_dist import CLASSES, generate, read_images, tiny_sampler


def test_plan_partitions_the_work_for_any_world_size() -> None:
    plan = ShardPlan(num_classes=7, per_class=13, shard_size=10)  # 91 pairs, last shard of 1
    assert plan.num_shards == 10 and plan.shard_range(9) == (90, 91)
    c, i = plan.pairs(0, plan.total)
    assert len({(a, b) for a, b in zip(c.tolist(), i.tolist())}) == 91
    assert torch.equal(torch.cat([plan.shard_pairs(s)[0] for s in range(10)]), c)
    for world in (1, 2, 3, 4, 16):
        mine = [plan.assign(list(range(10)), r, world) for r in range(world)]
        flat = sorted(s for m in mine for s in m)
        assert flat == list(range(10))  # disjoint and complete
    assert plan.key(3, 17) == "0003_000017"
    assert "." not in ShardPlan(123456, 2, 1).key(99999, 1)
    with pytest.raises(ValueError, match="shard_size"):
        ShardPlan(3, 4, 0)


def test_formats_hold_the_same_images(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    got = {}
    for fmt in ("tar", "imagefolder", "latents"):
        generate(tmp_path / fmt, 10, fmt=fmt)
        got[fmt] = read_images(tmp_path / fmt)
    keys = set(got["tar"])
    assert len(keys) == 60
    for fmt in ("imagefolder", "latents"):
        assert set(got[fmt]) == keys and all(np.array_equal(got[fmt][k], got["tar"][k]) for k in keys), fmt
    generate(tmp_path / "jpg", 10, image_format="jpg", jpeg_quality=95)
    jpg = read_images(tmp_path / "jpg")
    err = np.mean([np.abs(jpg[k] - got["tar"][k]).mean() for k in keys])
    assert err < 4, f"JPEG q95 differs by {err:.2f} levels on average"
    # the ImageFolder output is a plain tree (class folders of <c>_<i>.png)
    tree = tmp_path / "imagefolder"
    assert sorted(p.name for p in tree.iterdir() if p.is_dir() and p.name[0] != ".") == [*CLASSES]
    plain = FolderImageDataset.from_tree(tree, classes=CLASSES, channels=1)
    assert len(plain) == 60 and torch.equal(
        plain.get_batch(range(60)), ShardDataset(tree).get_batch(range(60))
    )


def test_tar_shards_read_by_webdataset(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    torch.set_num_threads(1)
    out = tmp_path / "tar"
    generate(out, 16)
    ours = read_images(out)
    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    seen = set()
    for img, cls, meta, key in (
        wds.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("png", "cls", "json", "__key__")
    ):
        c, i = meta["class"], meta["index"]
        assert cls == c and key == f"{c:04d}_{i:06d}" and meta["class_name"] == CLASSES[c]
        assert isinstance(meta["noise_seed"], int)
        np.testing.assert_array_equal(np.asarray(img, dtype=np.int16)[None], ours[(c, i)])
        seen.add((c, i))
    assert seen == set(ours)


def _splits(n: int = 12) -> DatasetSplits:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 3
    ds = ArrayImageDataset(imgs, labels, CLASSES, "real")
    return DatasetSplits("toy", ds, ds, np.arange(3), CLASSES)


@pytest.mark.parametrize("fmt", ["tar", "latents"])
def test_stage3_reads_generated_shards(tmp_path: Path, fmt: str) -> None:
    torch.set_num_threads(1)
    out = tmp_path / fmt
    generate(out, 16, fmt=fmt)
    pseudo = load_pseudo_images(out, _splits())
    ref = ShardDataset(out)
    assert len(pseudo) == 60 and torch.equal(pseudo.labels, ref.labels)
    assert torch.equal(pseudo.get_batch(torch.arange(60)), ref.get_batch(range(60)))
    both = ConcatImageDataset([_splits().train, pseudo])
    assert len(both) == 72


def test_autoencoder_latents_need_a_decoder(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "lat"
    generate(out, 16, fmt="latents", latent_space="autoencoder")
    with pytest.raises(DataError, match="pass decode="):
        ShardDataset(out)
    ds = ShardDataset(out, decode=lambda z: model_space_to_uint8(-z))  # any latents -> uint8 decoder
    lat = ds.latents([0, 1, 59])
    assert lat.dtype == torch.float32 and lat.shape == (3, 1, 8, 8)
    assert torch.equal(ds.get_batch([0, 1, 59]), model_space_to_uint8(-lat))


class _SyncDetector(TorchDispatchMode):
    """Records the ops that force a device-to-host synchronisation on an accelerator (reading
    a tensor's value on the host, data-dependent output shapes)."""

    SYNCING: ClassVar[set[str]] = {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "nonzero",
        "masked_select",
        "unique",
        "equal",
    }

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCING:
            self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("clip", [False, True])
def test_sampling_loop_has_no_host_syncs(clip: bool) -> None:
    torch.set_num_threads(1)
    sampler = tiny_sampler(clip=clip)
    c, i = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 0, 1])
    x = sampler.noise(c, i)
    with torch.no_grad(), _SyncDetector() as det:
        out = sampler._run(x, c)  # solver loop (network + fused steps) and decode to uint8
    assert out.dtype == torch.uint8 and out.shape == (4, 1, 8, 8)
    assert det.hits == [], f"host syncs in the sampling loop: {sorted(set(det.hits))}"
    # the detector does catch a sync
    with _SyncDetector() as det:
        _ = float(x.sum())
    assert det.hits


@pytest.mark.parametrize("clip", [False, True])
def test_one_doubled_forward_and_two_forwards_give_the_same_images(clip: bool) -> None:
    """``guidance_forwards`` changes how the conditional and null-class outputs are computed, not
    what is sampled: both ways agree to float rounding (at most one uint8 level), fused (no clip)
    and unfused (clip) alike, and the "two" sampler really calls the net twice per step."""
    torch.set_num_threads(1)
    c, i = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 0, 0, 1, 1])
    out = {}
    for forwards in ("doubled", "two"):
        sampler = tiny_sampler(clip=clip, output="latents", guidance_forwards=forwards)
        assert sampler.guidance_forwards == forwards
        sizes: list[int] = []
        sampler.net.register_forward_pre_hook(lambda m, args, sizes=sizes: sizes.append(args[0].shape[0]))
        with torch.no_grad():
            out[forwards] = sampler._run(sampler.noise(c, i), c)
        assert set(sizes) == ({10} if forwards == "doubled" else {5}), forwards
    torch.testing.assert_close(out["two"], out["doubled"], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_and_bf16_sampling_match_eager() -> None:
    from dpt_engine.sampling import BatchSampler

    base = tiny_sampler()
    kw = dict(guidance_scale=0.4, seed=7, clip=True)
    net = base.net.cuda()
    eager = BatchSampler(net, base.solver, base.schedule, (1, 8, 8), 3, device="cuda", precision="fp32", **kw)
    graph = BatchSampler(
        net, base.solver, base.schedule, (1, 8, 8), 3, device="cuda", precision="fp32", cuda_graph=True, **kw
    )
    c, i = torch.arange(16) % 3, torch.arange(16)
    ref = eager(c, i)
    graph(c, i)  # eager warm-up batch
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = graph(c, i)  # captured, then replayed; no host syncs allowed
        out2 = graph(c, i + 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (out.int() - ref.int()).abs().max() <= 1
    assert torch.equal(eager(c, i + 16), out2) or (eager(c, i + 16).int() - out2.int()).abs().max() <= 1
    assert set(graph.timings()) == {"noise", "model", "solver", "decode"}
    bf16 = BatchSampler(net, base.solver, base.schedule, (1, 8, 8), 3, device="cuda", **kw)
    assert bf16.precision == "bf16"
    assert (bf16(c, i).float() - ref.float()).abs().mean() < 8


def test_generation_benchmark_smoke(tmp_path: Path) -> None:
    """The benchmark runs at tiny settings and writes its rows (no speed assertions)."""
    import json

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from benchmarks.bench_generation import VARIANTS, main

    argv = ["--classes", "2", "--per-class", "5", "--batch", "4", "--steps", "2", "--repeats", "1"]
    argv += ["--threads", "1", "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png")]
    rows = main(argv)
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    by = {(r["variant"], r["metric"]): r for r in rows}
    for v in VARIANTS:
        assert by[v, "throughput"]["value"] > 0
        assert 0 <= by[v, "outside_forward_fraction"]["value"] < 1
    assert by["dpt_engine", "speedup"]["baseline"] == "naive-original"
    assert set(by["dpt_engine", "throughput"]["config"]["breakdown_s"]) >= {
        "model",
        "solver",
        "encode",
        "write",
    }
