"""Killed generation resumes exactly; a changed config in the same directory is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpt_engine.data import DataError
from dpt_engine.sampling import SamplingConfigError, ShardDataset, shard_records

sys.path.insert(0, str(Path(__file__).parent))
from test_sampling_dist import generate, read_images

_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from pathlib import Path
from test_sampling_dist import generate
generate(Path({out!r}), 5)
"""


def _tar_keys(out: Path) -> list[str]:
    keys = []
    for p in sorted(out.glob("shard-*.tar")):
        with tarfile.open(p) as tf:  # reads every member: a truncated tar raises
            keys += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".png")]
    return keys


def test_kill_during_shard_write_then_resume(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "gen"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DPT_TEST_SHARD_WRITE_SLEEP": "3:120"}
    code = _CHILD.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in out.glob(".shard-000003.tar.*.tmp") if p.stat().st_size > 0]
            if partial:
                break
            time.sleep(0.05)
        assert partial, (
            f"shard 3 was never mid-write (exit {proc.poll()}): {proc.stderr.read().decode()[-2000:]}"
        )
        proc.send_signal(signal.SIGKILL)  # kill -9 while shard 3 is half written
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # after the kill: shard 3 is invisible (only its hidden temporary file exists), every visible
    # shard is complete and recorded, and readers see exactly the complete shards
    visible = sorted(p.name for p in out.glob("shard-*.tar"))
    assert visible == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert partial[0].exists()
    assert len(_tar_keys(out)) == 30
    with pytest.raises(DataError, match="not finished"):
        ShardDataset(out)
    assert len(ShardDataset(out, allow_incomplete=True)) == 30

    # the same command again finishes the run
    manifest = generate(out, 5)
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*/.*.tmp"))
    keys = _tar_keys(out)
    everything = {f"{c:04d}_{i:06d}" for c in range(3) for i in range(20)}
    assert sorted(keys) == sorted(everything)  # every (class, index) exactly once
    assert manifest["num_images"] == 60 and manifest["class_counts"] == [20, 20, 20]
    assert manifest["throughput"]["generated"] == 30 and manifest["throughput"]["skipped_existing"] == 30
    assert [s["shard"] for s in manifest["shards"]] == list(range(6))
    records = shard_records(out, manifest["fingerprint"], ShardDataset(out).plan)
    assert sorted(records) == list(range(6))
    for s in manifest["shards"]:
        f = out / s["files"][0]
        assert f.stat().st_size == records[s["shard"]]["files"][0]["bytes"]
    # batches of 5 never straddle a 10-image shard, so the resumed run equals a one-shot run bit for bit
    fresh = tmp_path / "fresh"
    generate(fresh, 5)
    a, b = read_images(out), read_images(fresh)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_changed_config_is_refused(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "gen"
    generate(out, 20)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SamplingConfigError, match=r"image_format: 'png' -> 'jpg'"):
        generate(out, 20, image_format="jpg")
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched
    m = generate(out, 13)  # batch size is not part of the identity: resumes (nothing left to do)
    assert m["throughput"]["generated"] == 0 and m["num_images"] == 60
