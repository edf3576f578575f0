"""``dpt stage2`` under ``torchrun`` (2 processes, DDP over gloo) against the single-process command.

Checks the rank-aware stage runner: one set of artifacts (rank 0 writes done.json, model.pt,
history), the same model as single-process training (within the fp tolerance of
test_train_backends), and a fingerprint that ignores the backend, so a finished DDP stage counts
as done for a single-process rerun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpt_engine.cli import main as cli_main
from dpt_engine.utils.dist import free_port

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "--no-progress",
    "stage2.label_source=true",
    "stage2.steps=3",
    "stage2.batch_size=8",
    "stage2.log_every=1",
    "stage2.checkpoint_every=2",
    "data.max_train=64",
    "run.threads=1",
]


def test_torchrun_stage2_ddp_matches_single_process(tmp_path):
    dist_out, single_out = tmp_path / "ddp", tmp_path / "single"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "dpt_engine.cli",
        "stage2",
        "--out",
        str(dist_out),
        *ARGS,
        "stage2.strategy=ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli_main(["stage2", "--out", str(single_out), *ARGS]) == 0

    # rank 0 logs to log.txt, rank 1 to its own file; lines carry the rank
    assert "[rank 0]" in (dist_out / "log.txt").read_text()
    assert "[rank 1]" in (dist_out / "log.rank1.txt").read_text()
    d_done = json.loads((dist_out / "stage2" / "done.json").read_text())
    s_done = json.loads((single_out / "stage2" / "done.json").read_text())
    assert d_done["summary"]["world_size"] == 2 and d_done["summary"]["strategy"] == "ddp"
    assert d_done["fingerprint"] == s_done["fingerprint"]  # the backend is not fingerprinted
    d_hist = json.loads((dist_out / "stage2" / "history.json").read_text())
    s_hist = json.loads((single_out / "stage2" / "history.json").read_text())
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in d_hist]),
        torch.tensor([r["loss"] for r in s_hist]),
        rtol=1e-5,
        atol=0,
    )
    d_model = torch.load(dist_out / "stage2" / "model.pt", weights_only=True)
    s_model = torch.load(single_out / "stage2" / "model.pt", weights_only=True)
    for k, v in s_model["ema"].items():
        torch.testing.assert_close(d_model["ema"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert sorted(p.name for p in (dist_out / "stage2" / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000003",
    ]
    # the finished DDP stage is up to date for a single-process rerun (skipped, artifacts untouched)
    before = (dist_out / "stage2" / "model.pt").stat().st_mtime_ns
    assert cli_main(["stage2", "--out", str(dist_out), *ARGS]) == 0
    assert (dist_out / "stage2" / "model.pt").stat().st_mtime_ns == before

    # `dpt sample` of that model under torchrun, with background writer threads: both ranks exit 0
    # (each leaves the process group before exit) and the job prints one summary, not one per rank
    sample_args = [
        "sample.images_per_class=6",
        "sample.steps=2",
        "sample.batch_size=4",
        "sample.shard_size=4",
        "sample.writer_workers=2",
        "sample.format=tar",
        "sample.fid=false",
    ]
    cmd = [*cmd[: cmd.index("dpt_engine.cli") + 1], "sample", "--out", str(dist_out), *ARGS, *sample_args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    assert proc.stdout.count("sample:") == 1, proc.stdout
    manifest = json.loads((dist_out / "sample" / "samples" / "manifest.json").read_text())
    assert manifest["num_images"] == 60 and manifest["throughput"]["world_size"] == 2
