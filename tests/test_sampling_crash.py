"""Generation under fire: SIGKILL at five moments, then the same command again, and the set is
exactly the one an uninterrupted run writes; the same with one rank of a 2-process torchrun killed.

Moments (issue: inside a shard write, between a shard and its record, during the manifest
rebuild, and at random): two random instants of the generation loop (seeded), the middle of a
shard's tar write, the gap after a shard's data is in place and before its record, and the
manifest rebuild (after every record is read, before ``manifest.json`` is written). After each
kill the command is rerun; the last rerun finishes. The result must hold every (class, index)
exactly once and be byte-identical, shard file by shard file, to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dpt_engine.sampling import ShardDataset, ShardPlan, run_generation
from dpt_engine.sampling.formats import RECORD_DIR, record_path
from dpt_engine.utils.dist import free_port

sys.path.insert(0, str(Path(__file__).parent))
from test_sampling_dist import tiny_sampler

CLASSES = ["a", "b", "c"]
PER_CLASS = 100  # 300 images in 30 shards of 10
SHARD = 10
BATCH = 5  # divides the shard size: batches never straddle shards, so resumed runs are bit-identical

_CHILD = """
import os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from pathlib import Path
from test_sampling_crash import generate
if os.environ.get("WORLD_SIZE"):
    from dpt_engine.utils.dist import init_distributed, shutdown_distributed
    Path({out!r}).parent.joinpath("pid-rank" + os.environ["RANK"]).write_text(str(os.getpid()))
    init_distributed(backend="gloo", timeout_s=120)
print("ready", flush=True)
try:
    generate(Path({out!r}))
finally:
    if os.environ.get("WORLD_SIZE"):
        shutdown_distributed()
"""


def generate(out: Path) -> dict:
    return run_generation(
        tiny_sampler(),
        out,
        ShardPlan(len(CLASSES), PER_CLASS, SHARD),
        {"latent_space": "pixel", "steps": 4, "guidance_scale": 0.4},
        CLASSES,
        format="tar",
        batch_size=BATCH,
        workers=2,
        progress=False,
    )


def _shard_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def _records(out: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in (out / RECORD_DIR).glob("shard-*.json")}


def _first_pending(out: Path) -> int:
    done = _records(out) if (out / RECORD_DIR).is_dir() else set()
    return min(s for s in range(len(CLASSES) * PER_CLASS // SHARD) if s not in done)


def _wait(cond: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _start(out: Path, env: dict[str, str], torchrun: bool = False) -> subprocess.Popen:
    code = _CHILD.format(tests=str(Path(__file__).parent), out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if torchrun:
        script = out.parent / "child.py"
        script.write_text(code)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               f"--master_port={free_port()}", str(script)]  # fmt: skip
    else:
        cmd = [sys.executable, "-c", code]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill(proc: subprocess.Popen, pid: int | None = None) -> None:
    os.kill(pid or proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _random_kill(out: Path, rng: random.Random) -> str:
    """Kill at a random point of the generation loop: once a random number of further shards
    is recorded, after a random extra 0-20 ms (a run here takes well under a second)."""
    before = len(_records(out))
    k = rng.randint(1, len(CLASSES) * PER_CLASS // SHARD - before - 1)
    proc = _start(out, {})
    _wait(lambda: len(_records(out)) >= before + k, proc, f"{k} more shards recorded")
    time.sleep(rng.uniform(0.0, 0.02))
    _kill(proc)
    return f"random: after {before + k}+ shards"


def _mid_write_kill(out: Path) -> str:
    s = _first_pending(out)
    proc = _start(out, {"DPT_TEST_SHARD_WRITE_SLEEP": f"{s}:120"})
    _wait(lambda: any(p.stat().st_size > 0 for p in out.glob(f".shard-{s:06d}.tar.*.tmp")), proc,
          f"shard {s} half written")  # fmt: skip
    _kill(proc)
    assert not (out / f"shard-{s:06d}.tar").exists()
    return f"inside shard {s}'s write"


def _before_record_kill(out: Path) -> str:
    s = _first_pending(out)
    proc = _start(out, {"DPT_TEST_RECORD_SLEEP": f"{s}:120"})
    _wait(lambda: (out / f"shard-{s:06d}.tar").is_file(), proc, f"shard {s}'s data in place")
    _kill(proc)
    assert not record_path(out, s).exists()  # data without a record: the shard is redone
    return f"between shard {s} and its record"


def _manifest_kill(out: Path) -> str:
    n = len(CLASSES) * PER_CLASS // SHARD
    proc = _start(out, {"DPT_TEST_MANIFEST_SLEEP": "120"})
    _wait(lambda: len(_records(out)) == n, proc, "every shard recorded")
    time.sleep(0.3)
    _kill(proc)
    assert not (out / "manifest.json").exists()
    return "during the manifest rebuild"


def _check_same_as_uninterrupted(out: Path, fresh: Path) -> None:
    ds = ShardDataset(out)
    keys = list(zip(ds.labels.tolist(), ds.indices.tolist()))
    assert sorted(keys) == [(c, i) for c in range(len(CLASSES)) for i in range(PER_CLASS)]  # exactly once
    assert _shard_bytes(out) == _shard_bytes(fresh)
    a, b = ds.get_batch(range(len(ds))).numpy(), ShardDataset(fresh).get_batch(range(len(ds))).numpy()
    assert np.array_equal(a, b)
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*/.*.tmp"))


@pytest.fixture
def fresh_and_out(tmp_path: Path) -> tuple[Path, Path]:
    """An uninterrupted run's output (the reference) and the folder the killed runs write to."""
    torch.set_num_threads(1)
    generate(tmp_path / "fresh")
    return tmp_path / "fresh", tmp_path / "gen"


@pytest.mark.slow
def test_five_kills_then_rerun_is_byte_identical(fresh_and_out: tuple[Path, Path]) -> None:
    fresh, out = fresh_and_out
    rng = random.Random(0)
    moments = [
        _random_kill(out, rng),
        _mid_write_kill(out),
        _before_record_kill(out),
        _random_kill(out, rng),
        _manifest_kill(out),
    ]
    manifest = generate(out)
    assert manifest["num_images"] == len(CLASSES) * PER_CLASS, moments
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    _check_same_as_uninterrupted(out, fresh)


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_rank_killed_then_rerun_is_byte_identical(fresh_and_out: tuple[Path, Path]) -> None:
    fresh, out = fresh_and_out
    # rank 1 owns the odd shards; kill it half-way through writing shard 5
    proc = _start(out, {"DPT_TEST_SHARD_WRITE_SLEEP": "5:120"}, torchrun=True)
    _wait(lambda: any(p.stat().st_size > 0 for p in out.glob(".shard-000005.tar.*.tmp")), proc,
          "rank 1 half-way through shard 5")  # fmt: skip
    pid = int((out.parent / "pid-rank1").read_text())
    os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=120)  # torchrun stops rank 0 and fails
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not (out / "shard-000005.tar").exists() and not (out / "manifest.json").exists()
    rerun = _start(out, {}, torchrun=True)
    _stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    _check_same_as_uninterrupted(out, fresh)
