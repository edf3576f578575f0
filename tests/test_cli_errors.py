"""Bad input on the command line: one clear ``dpt: error:`` line and a non-zero exit, never a
traceback; a genuine bug prints its traceback and a line saying it is one."""

from __future__ import annotations

import errno

import pytest

from dpt_engine import cli


def _run(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("dpt:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (["stage1.backbone=nosuch"], "stage1.backbone='nosuch' is not a registered classifier"),
        (["stage3.lr=-1"], "stage3.lr must be > 0"),
        (["stage2.lr=-1"], "stage2.lr must be > 0"),
        (["stage2.model=nosuch"], "stage2.model='nosuch' is not a registered model"),
        (["stage2.ema_decay=1.5"], "stage2.ema_decay must be in"),
        (["run.threads=-2"], "run.threads must be >= 1"),
        (["run.device=tpu"], "run.device='tpu' is not a device"),
        (["stage2.autoencoder=/no/such/ae"], "stage2.autoencoder='/no/such/ae' does not exist"),
        (["sample.checkpoint=/no/such.pth"], "sample.checkpoint='/no/such.pth' does not exist"),
        (["sample.fid_weights=/no/such.pt"], "sample.fid_weights='/no/such.pt' does not exist"),
        (["stage3.pseudo_dir=/no/such/dir"], "stage3.pseudo_dir='/no/such/dir' does not exist"),
    ],
)
def test_settings_are_checked_before_any_stage(overrides, expect, tmp_path, capsys):
    out = tmp_path / "never"
    rc, err = _run(["run", "--preset", "digits", "--out", str(out), *overrides], capsys)
    assert not out.exists()
    assert rc == 2
    assert expect in _one_error_line(err)


def test_out_naming_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    rc, err = _run(["run", "--preset", "digits", "--out", str(f)], capsys)
    assert rc == 2 and "is a file where a directory is needed" in _one_error_line(err)
    assert f.read_text() == "x"


def test_config_file_that_is_not_text(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_bytes(b"\xff\xfe\x00bad")
    rc, err = _run(["config", "--config", str(f)], capsys)
    assert rc == 2 and "is not UTF-8 text" in _one_error_line(err)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(tmp_path, capsys):
    rc, err = _run(["run", "--preset", "digits", "run.device=cuda", "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and "no CUDA GPU is available" in _one_error_line(err)


@pytest.mark.parametrize(
    "command, expect", [("sample", "no stage-2 model"), ("stage2", "run dpt stage1 first")]
)
def test_missing_upstream_stage(command, expect, tmp_path, capsys):
    rc, err = _run([command, "--preset", "digits", "--out", str(tmp_path / "fresh"), "--no-progress"], capsys)
    assert rc == 2, err
    assert expect in _one_error_line(err)
    assert not (tmp_path / "fresh").exists()  # the run directory it created held only the log: removed
    # and the folders it created on the way go with it; folders that were there stay
    (tmp_path / "had").mkdir()
    nested = tmp_path / "had" / "new" / "deeper" / "fresh"
    rc, err = _run([command, "--preset", "digits", "--out", str(nested), "--no-progress"], capsys)
    assert rc == 2 and expect in _one_error_line(err)
    assert (tmp_path / "had").is_dir() and not (tmp_path / "had" / "new").exists()
    # a directory that was there before keeps what it had, and the log of this attempt
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    rc, err = _run([command, "--preset", "digits", "--out", str(kept), "--no-progress"], capsys)
    assert rc == 2 and expect in _one_error_line(err)
    assert (kept / "notes.txt").read_text() == "mine" and (kept / "log.txt").is_file()


def test_a_stage_precheck_failing_in_a_new_directory_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "new"
    rc, err = _run(
        [
            "run",
            "--preset",
            "digits",
            "--out",
            str(out),
            "--no-progress",
            "stage1.backbone=msn:vit_small_patch16",
        ],
        capsys,
    )
    assert rc == 2 and "stage1.backbone='msn:vit_small_patch16' cannot be built" in _one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize(
    "exc, expect",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/x/stage2/model.pt"),
            "no space left on the device",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/ro/run"),
            "cannot write /ro/run: permission denied",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/ro"), "read-only file system"),
    ],
)
def test_disk_errors_are_one_line(exc, expect, monkeypatch, tmp_path, capsys):
    import dpt_engine.pipeline as pipeline

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(pipeline, "run_pipeline", boom)
    rc, err = _run(["run", "--preset", "digits", "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and expect in _one_error_line(err)


def test_a_genuine_bug_says_so(monkeypatch, tmp_path, capsys):
    import dpt_engine.pipeline as pipeline

    def boom(*a, **k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(pipeline, "run_pipeline", boom)
    rc, err = _run(["run", "--preset", "digits", "--out", str(tmp_path / "r")], capsys)
    assert rc == 1
    assert "Traceback" in err and "ZeroDivisionError: oops" in err
    assert "dpt: internal error" in err.splitlines()[-1]


FAST = [
    "stage1.steps=8",
    "stage1.batch_size=8",
    "stage1.uratio=2",
    "stage1.eval_every=8",
    "stage1.checkpoint_every=8",
    "stage2.steps=4",
    "stage2.batch_size=16",
    "stage2.log_every=2",
    "stage2.checkpoint_every=4",
    "sample.images_per_class=3",
    "sample.steps=3",
    "sample.fid=false",
    "stage3.steps=4",
    "stage3.batch_size=8",
    "stage3.uratio=2",
    "stage3.eval_every=4",
    "stage3.checkpoint_every=4",
    "run.threads=1",
]


def test_a_typo_never_sets_finished_work_aside(tmp_path, capsys):
    """Bad external inputs fail before the run directory is touched; going back to the original
    config reuses what a real config change set aside instead of recomputing it."""
    out = tmp_path / "run"
    base = ["--preset", "digits", "--out", str(out), "--no-progress", *FAST]
    assert cli.main(["run", *base]) == 0
    capsys.readouterr()
    done_before = {p: p.read_bytes() for p in out.glob("*/done.json")}
    assert set(p.parent.name for p in done_before) == {"stage1", "stage2", "sample", "stage3"}

    truncated = tmp_path / "nnet_ema.pth"
    truncated.write_bytes((out / "stage2" / "model.pt").read_bytes()[:100])
    rc, err = _run(["sample", *base, "--checkpoint", str(truncated)], capsys)
    assert rc == 2 and "dpt: error:" in _one_error_line(err)
    empty = tmp_path / "empty_pseudo"
    empty.mkdir()
    rc, err = _run(["stage3", *base, f"stage3.pseudo_dir={empty}"], capsys)
    assert rc == 2 and "no images" in _one_error_line(err)
    assert not list(out.glob("*.stale-*"))
    assert {p: p.read_bytes() for p in out.glob("*/done.json")} == done_before

    # a real change sets stage 3 aside; the original command then restores it, not recomputes it
    assert cli.main(["stage3", *base, "stage3.steps=5"]) == 0
    assert len(list(out.glob("stage3.stale-*"))) == 1
    assert cli.main(["stage3", *base]) == 0
    assert (out / "stage3" / "done.json").read_bytes() == done_before[out / "stage3" / "done.json"]


def test_overrides_on_both_sides_of_an_option(capsys):
    rc = cli.main(["config", "stage1.steps=7", "--preset", "digits", "stage2.steps=9"])
    out = capsys.readouterr().out
    assert rc == 0 and "steps: 7" in out and "steps: 9" in out


def test_bench_into_an_unwritable_place_fails_before_measuring(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "train", "--json", str(f / "out.json")])
    assert "cannot write results to" in str(info.value) and f.read_text() == "x"


def _image_tree(root, per_class=40):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 4)):
        for c in ("a", "b", "c"):
            d = root / split / c
            d.mkdir(parents=True)
            for j in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{j}.png")


def test_one_corrupt_image_does_not_stop_a_run_but_many_do(tmp_path, capsys):
    import json

    root = tmp_path / "data"
    _image_tree(root)
    (root / "train" / "b" / "3.png").write_bytes(b"")  # 1 of 120 files
    out = tmp_path / "run"
    argv = [
        "stage1", "--preset", "digits", "--out", str(out), "--no-progress",
        "data.name=imagefolder", f"data.root={root}", "data.labels_per_class=1",
        "stage1.steps=4", "stage1.eval_every=4", "stage1.checkpoint_every=4", "stage1.batch_size=4",
        "stage1.uratio=1", "run.threads=1",
    ]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "stage1" / "summary.json").read_text())
    listed = summary["dataset"]["unreadable_files"]
    assert listed["count"] == 1 and listed["files"][0]["path"].endswith("b/3.png")
    assert summary["num_train"] == 119
    done = (out / "stage1" / "done.json").read_bytes()
    for j in range(4, 7):  # now 4 of 120: a damaged dataset
        (root / "train" / "c" / f"{j}.png").write_bytes(b"\x89PNG")
    capsys.readouterr()
    rc, err = _run([*argv, "stage1.steps=8"], capsys)
    assert rc == 2 and "4 of 120 train image files cannot be read" in _one_error_line(err)
    assert (out / "stage1" / "done.json").read_bytes() == done


def test_disk_full_during_a_checkpoint_save_then_resume(tmp_path, monkeypatch, capsys):
    """ENOSPC mid-save: one line, no partial .tmp-step-* left, finished stages kept; once space is
    back the same command resumes stage 2 from its last complete checkpoint."""
    import dpt_engine.train.checkpoint as ckpt_mod

    out = tmp_path / "run"
    argv = ["run", "--preset", "digits", "--out", str(out), "--no-progress", *FAST,
            "stage2.steps=6", "stage2.checkpoint_every=2"]  # fmt: skip
    real = ckpt_mod.CheckpointManager.save

    def full_disk(self, step, write, meta):
        if self.root.parent.name == "stage2" and step == 4:  # stage 2's second save runs out of space

            def write_then_fail(tmp):
                write(tmp)
                raise OSError(errno.ENOSPC, "No space left on device", str(self.root))

            return real(self, step, write_then_fail, meta)
        return real(self, step, write, meta)

    monkeypatch.setattr(ckpt_mod.CheckpointManager, "save", full_disk)
    rc, err = _run(argv, capsys)
    assert rc == 2 and "no space left on the device" in _one_error_line(err)
    assert not list((out / "stage2").rglob(".tmp-step-*"))
    assert (out / "stage1" / "done.json").is_file() and (out / "config.yaml").is_file()
    s1 = (out / "stage1" / "done.json").read_bytes()
    monkeypatch.setattr(ckpt_mod.CheckpointManager, "save", real)
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    assert (out / "stage1" / "done.json").read_bytes() == s1
    import json

    assert json.loads((out / "stage2" / "summary.json").read_text())["resumed_from_step"] == 2
