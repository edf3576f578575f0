"""The pipeline runner end to end on real data (digits), with tiny step counts.

Covers: artifacts and report keys, skipping an up-to-date stage, resuming an interrupted stage
bit-identically, stage 3 on a folder of images, and bad input failing cleanly without touching
what an earlier run wrote.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpt_engine.cli import main as cli_main
from dpt_engine.config.presets import resolve_config
from dpt_engine.data import DataError, build_splits
from dpt_engine.data.imagefolder import safe_class_dirname
from dpt_engine.pipeline import run_pipeline, setup_run
from dpt_engine.stages.stage1 import run_stage1
from dpt_engine.stages.stage3 import run_stage3

FAST = [
    "stage1.steps=24",
    "stage1.batch_size=8",
    "stage1.uratio=2",
    "stage1.eval_every=12",
    "stage1.checkpoint_every=8",
    "stage3.steps=12",
    "stage3.batch_size=8",
    "stage3.uratio=2",
    "stage3.eval_every=12",
    "stage3.checkpoint_every=6",
    "run.threads=1",
]
S1 = ("stage1",)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_pseudo_folder(root: Path, splits, per_class: int = 5, shift: int = 0) -> None:
    """Real held-in training images written as an ImageFolder tree (stands in for stage 2 output);
    ``shift`` files class c's images under class c + shift (a generator that ignores its labels)."""
    from PIL import Image

    labels = splits.train.labels.numpy()
    for c in range(len(splits.classes)):
        d = root / safe_class_dirname(splits.classes[(c + shift) % len(splits.classes)])
        d.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            Image.fromarray(splits.train[int(i)][0][0].numpy()).save(d / f"{c:04d}_{j:06d}.png")


def test_stage1_artifacts_and_skip(tmp_path):
    cfg = resolve_config("digits", overrides=FAST)
    out = tmp_path / "run"
    report = run_pipeline(cfg, out, stages=S1, progress=False)
    for f in (
        "config.yaml",
        "report.json",
        "report.md",
        "log.txt",
        "stage1/done.json",
        "stage1/model.pt",
        "stage1/pseudo_labels.npz",
        "stage1/pseudo_labels.tsv",
        "stage1/labeled.txt",
    ):
        assert (out / f).is_file(), f
    r = json.loads((out / "report.json").read_text())
    assert r["metrics"]["stage1.top1"] == report["stage1"]["top1"]
    assert 10.0 < r["stage1"]["top1"] <= 100.0
    assert r["pseudo_labels"]["accuracy"] is not None
    pl = np.load(out / "stage1" / "pseudo_labels.npz")
    assert len(pl["label"]) == 1297 and pl["labeled"].sum() == 10  # the preset: 1 label/class
    assert sum(r["pseudo_labels"]["per_class_count"].values()) == 1297
    assert (out / "plots" / "stage1_curves.png").is_file()
    tp = np.load(out / "stage1" / "test_predictions.npz")  # what stage 3's paired gain compares against
    assert len(tp["pred"]) == 500 and (tp["pred"] == tp["label"]).mean() * 100 == pytest.approx(
        r["stage1"]["top1"]
    )
    assert "evaluated on | test split (500 images)" in (out / "report.md").read_text()
    # second run: stage 1 is up to date and skipped; artifacts untouched
    before = _digest(out / "stage1" / "model.pt")
    again = run_pipeline(cfg, out, stages=S1, progress=False)
    assert again["skipped"]["stage1"] is True
    assert _digest(out / "stage1" / "model.pt") == before


def test_interrupted_stage_resumes_exactly(tmp_path, monkeypatch):
    cfg = resolve_config("digits", overrides=FAST)
    ref_out = tmp_path / "ref"
    ctx = setup_run(cfg, ref_out, progress=False)
    splits = build_splits(cfg.data)
    ref = run_stage1(ctx, splits)

    out = tmp_path / "killed"
    ctx = setup_run(cfg, out, progress=False)
    monkeypatch.setenv("DPT_TEST_INTERRUPT_AT_STEP", "16")
    with pytest.raises(KeyboardInterrupt):
        run_stage1(ctx, splits)
    assert (out / "stage1" / "checkpoints" / "step-00000016" / "meta.json").is_file()
    assert not (out / "stage1" / "done.json").exists()
    monkeypatch.delenv("DPT_TEST_INTERRUPT_AT_STEP")
    resumed = run_stage1(ctx, splits)
    assert resumed.summary["resumed_from_step"] == 16
    # the stage's cost counts the interrupted call up to its checkpoint, not only the resumed one
    done = json.loads((out / "stage1" / "done.json").read_text())
    assert done["wall_time_earlier_calls_s"] > 0 and not (out / "stage1" / "attempt.json").exists()
    assert resumed.wall_time_s == pytest.approx(
        done["wall_time_this_call_s"] + done["wall_time_earlier_calls_s"]
    )
    a = torch.load(ref_out / "stage1" / "model.pt", weights_only=True)
    b = torch.load(out / "stage1" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.summary["top1"] == ref.summary["top1"]
    pa = np.load(ref_out / "stage1" / "pseudo_labels.npz")
    pb = np.load(out / "stage1" / "pseudo_labels.npz")
    assert np.array_equal(pa["label"], pb["label"])


def test_wall_time_of_a_stage_resumed_over_several_calls(tmp_path):
    """Each interrupted call counts from its start to the newest file it left (its last
    checkpoint); what came after that is redone, so it does not count twice."""
    import os
    import time

    from dpt_engine.stages.common import run_stage

    ctx = setup_run(resolve_config("digits", overrides=FAST), tmp_path / "run", progress=False)

    def killed(stage_dir):
        ckpt = stage_dir / "ckpt"
        ckpt.write_text("step 1")
        started = json.loads((stage_dir / "attempt.json").read_text())["started"]
        os.utime(ckpt, (started + 40.0, started + 40.0))  # its last checkpoint 40 s after the start
        raise KeyboardInterrupt

    for _ in range(2):  # two calls killed, 40 s of useful work each
        with pytest.raises(KeyboardInterrupt):
            run_stage(ctx, "demo", {"x": 1}, killed)
    t0 = time.perf_counter()
    res = run_stage(ctx, "demo", {"x": 1}, lambda stage_dir: {"ok": True})
    this_call = time.perf_counter() - t0
    done = json.loads((ctx.stage_dir("demo") / "done.json").read_text())
    assert done["wall_time_earlier_calls_s"] == pytest.approx(80.0, abs=1.0)
    assert 0 <= done["wall_time_this_call_s"] <= this_call
    assert (
        res.wall_time_s
        == pytest.approx(done["wall_time_s"])
        == pytest.approx(80.0 + done["wall_time_this_call_s"])
    )
    again = run_stage(ctx, "demo", {"x": 1}, lambda stage_dir: {"ok": False})  # finished: skipped
    assert again.skipped and again.wall_time_s == pytest.approx(res.wall_time_s)
    fresh = run_stage(ctx, "other", {"x": 1}, lambda stage_dir: {"ok": True})  # never interrupted
    assert json.loads((ctx.stage_dir("other") / "done.json").read_text())["wall_time_earlier_calls_s"] == 0.0
    assert fresh.wall_time_s < 60


def test_stage3_on_image_folder(tmp_path):
    # a folder of images and no stage 1 at all: nothing to fine-tune from or to weigh the images by
    no_stage1 = ["stage3.init_from_stage1=false", "stage3.pseudo_weighting=uniform"]
    cfg = resolve_config("digits", overrides=[*FAST, *no_stage1, f"stage3.pseudo_dir={tmp_path / 'pseudo'}"])
    splits = build_splits(cfg.data)
    _write_pseudo_folder(tmp_path / "pseudo", splits)
    ctx = setup_run(cfg, tmp_path / "run", progress=False)
    res = run_stage3(ctx, splits, stage1_top1=50.0)
    assert res.summary["num_pseudo"] == 50
    assert all(v == 5 for v in res.summary["pseudo_per_class"].values())
    assert res.summary["top1"] is not None
    assert res.summary["gain"] == pytest.approx(res.summary["top1"] - 50.0)
    assert "pseudo_stage1_agreement" not in res.summary  # no stage-1 classifier in this run


def test_stage3_warns_when_pseudo_images_are_off_class(tmp_path, caplog):
    """Stage 3 measures how many pseudo images stage 1 puts in their intended class, and warns
    when a generator ignores its labels (the images of class c filed under class c + 1)."""
    s1 = [*FAST, "stage1.steps=60", "data.labels_per_class=4"]  # a stage 1 that tells digits apart
    cfg = resolve_config("digits", overrides=s1)
    splits = build_splits(cfg.data)
    ctx = setup_run(cfg, tmp_path / "run", progress=False)
    run_stage1(ctx, splits)
    agreement = {}
    for shift in (0, 1):
        pseudo = tmp_path / f"pseudo{shift}"
        _write_pseudo_folder(pseudo, splits, per_class=20, shift=shift)
        cfg_s = resolve_config("digits", overrides=[*s1, f"stage3.pseudo_dir={pseudo}"])
        caplog.clear()
        with caplog.at_level("INFO", logger="dpt_engine"):
            res = run_stage3(setup_run(cfg_s, tmp_path / "run", progress=False), splits)
        agreement[shift] = res.summary["pseudo_stage1_agreement"]
        warned = any(
            "not class-faithful" in r.getMessage() for r in caplog.records if r.levelname == "WARNING"
        )
        assert warned == (agreement[shift] < 0.5)
    assert agreement[0] > 0.6 and agreement[1] < 0.3  # stage 1 (60 steps) already tells the digits apart


def test_bad_input_fails_cleanly_and_keeps_artifacts(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = resolve_config("digits", overrides=FAST)
    run_pipeline(cfg, out, stages=S1, progress=False)
    snapshot = {p: _digest(p) for p in (out / "stage1").iterdir() if p.is_file()}

    # k larger than a class
    with pytest.raises(DataError, match="labels_per_class"):
        run_pipeline(
            resolve_config("digits", overrides=[*FAST, "data.labels_per_class=500"]),
            out,
            stages=S1,
            progress=False,
        )
    # missing dataset path
    with pytest.raises(DataError, match="/no/such/dir"):
        run_pipeline(
            resolve_config("cifar10", overrides=[*FAST, "data.root=/no/such/dir"]),
            out,
            stages=S1,
            progress=False,
        )
    # a subset file naming an unknown class
    bad = tmp_path / "subset.txt"
    bad.write_text("n99999999_0001.JPEG\n")
    rc = cli_main(
        [
            "run",
            "--out",
            str(out),
            "--no-progress",
            "data.labels_per_class=null",
            f"data.subset_file={bad}",
            *FAST,
        ]
    )
    assert rc == 2
    assert "error" in capsys.readouterr().err
    # the CLI names an unknown key
    assert cli_main(["run", "--out", str(out), "stage1.stepz=1"]) == 2
    assert "stage1.stepz" in capsys.readouterr().err

    after = {p: _digest(p) for p in (out / "stage1").iterdir() if p.is_file()}
    assert after == snapshot
    assert not any(p.name.startswith("stage1.stale") for p in out.iterdir())


def test_stage3_trains_from_tar_shards_without_extracting(tmp_path, monkeypatch):
    """Stage 3 on `dpt sample`'s tar shards read in place (ShardDataset: one seek + decode per
    image, what a million-image set gets) trains exactly as on the same images in memory."""
    from dpt_engine.sampling import ShardDataset, ShardPlan, run_generation
    from dpt_engine.ssl import trainer as ssl_trainer
    from dpt_engine.stages import stage3

    cfg0 = resolve_config("digits", overrides=FAST)
    splits = build_splits(cfg0.data)
    labels = splits.train.labels.numpy()
    by_class = [np.flatnonzero(labels == c) for c in range(len(splits.classes))]

    def real_images(classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:  # stands in for stage 2
        pos = [int(by_class[c][i]) for c, i in zip(classes.tolist(), indices.tolist())]
        return splits.train.get_batch(pos)

    pseudo = tmp_path / "pseudo"
    run_generation(real_images, pseudo, ShardPlan(len(splits.classes), 6, 16), {"stand-in": "real digits"},
                   splits.classes, format="tar", batch_size=10, workers=2, progress=False)  # fmt: skip
    no_stage1 = [
        "stage3.init_from_stage1=false",
        "stage3.pseudo_weighting=uniform",
        f"stage3.pseudo_dir={pseudo}",
    ]
    cfg = resolve_config("digits", overrides=[*FAST, *no_stage1])
    seen = []
    real_load = stage3.load_pseudo_images

    def spy(*a, **kw):
        seen.append(real_load(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(stage3, "load_pseudo_images", spy)
    res_mem = run_stage3(setup_run(cfg, tmp_path / "in_memory", progress=False), splits, stage1_top1=50.0)
    # as if the set were too large for memory: stage 3 keeps the ShardDataset and the trainer reads
    # each batch from the shards (random access: a seek and a PNG decode per image)
    monkeypatch.setattr(stage3, "_IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(ssl_trainer, "_MAX_MATERIALISE_BYTES", 0)
    res_tar = run_stage3(setup_run(cfg, tmp_path / "from_tar", progress=False), splits, stage1_top1=50.0)
    assert not isinstance(seen[0], ShardDataset) and isinstance(seen[1], ShardDataset)
    assert res_tar.summary["num_pseudo"] == res_mem.summary["num_pseudo"] == 60
    assert res_tar.summary["top1"] == res_mem.summary["top1"]
    a = torch.load(tmp_path / "in_memory" / "stage3" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "from_tar" / "stage3" / "model.pt", weights_only=True)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
