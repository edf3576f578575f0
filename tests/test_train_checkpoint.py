"""Training checkpoints: atomic step directories, keep-last-N, kill -9 mid-save, RNG states, mismatches."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpt_engine.config.schema import DiffusionConfig
from dpt_engine.diffusion.trainer import fit_diffusion
from dpt_engine.train import capture_rng_state, restore_rng_state

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]

# shared by this process and the child that gets killed (kept in one string so both build the same run)
SETUP = """
import torch
from dpt_engine.config.schema import DiffusionConfig
from dpt_engine.diffusion.trainer import DiffusionData
from dpt_engine.models.uvit import create_uvit

def make():
    torch.manual_seed(0)
    net = create_uvit("uvit-tiny8", img_size=8, in_chans=1, num_classes=3, embed_dim=32, depth=2, num_heads=2)
    g = torch.Generator().manual_seed(0)
    data = DiffusionData(x=torch.rand(40, 1, 8, 8, generator=g) * 2 - 1,
                         y=torch.randint(0, 3, (40,), generator=g), weight=None, num_classes=3)
    cfg = DiffusionConfig(steps=6, batch_size=8, log_every=1, checkpoint_every=2, warmup_steps=1,
                          keep_checkpoints=3)
    return net, data, cfg
"""


def _make():
    scope: dict = {}
    exec(SETUP, scope)
    return scope["make"]()


def test_keep_last_n_and_meta(tmp_path):
    net, data, cfg = _make()
    cfg = DiffusionConfig(**{**cfg.__dict__, "checkpoint_every": 1, "keep_checkpoints": 2})
    fit_diffusion(net, cfg, data, tmp_path, CPU, seed=0, progress=False)
    dirs = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert dirs == ["step-00000005", "step-00000006"]
    meta = json.loads((tmp_path / "checkpoints" / "step-00000006" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["strategy"] == "single" and meta["world_size"] == 1
    assert {"trainer.pt", "model_optim.pt", "rng-rank0.pt"} <= set(meta["files"])
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(exported) == {"model", "ema", "step"} and exported["step"] == 6


def test_kill_9_mid_save_leaves_previous_checkpoint_usable(tmp_path):
    """A process killed (SIGKILL) while saving step 4 leaves step 2 complete; the restart resumes
    from it, discards the partial save and ends bit-identical to an uninterrupted run."""
    work = tmp_path / "killed"
    script = SETUP + textwrap.dedent(
        f"""
        from pathlib import Path
        from dpt_engine.diffusion.trainer import fit_diffusion
        net, data, cfg = make()
        fit_diffusion(net, cfg, data, Path({str(work)!r}), torch.device("cpu"), seed=0, progress=False)
        """
    )
    # the child computes steps 1-2 of the compared run: it must use this process's thread count, since
    # CPU reductions (and so the weights' last bits) depend on it
    threads = str(torch.get_num_threads())
    env = {**os.environ, "DPT_TEST_SAVE_DELAY": "4:60", "OMP_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [
                p
                for p in (work / "checkpoints").glob(".tmp-step-00000004-*")
                if (p / "rng-rank0.pt").is_file()
            ]
            if partial:
                break
            time.sleep(0.1)
        assert partial, f"the save of step 4 never started (exit code {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = work / "checkpoints"
    assert (ckpts / "step-00000002" / "meta.json").is_file()
    assert not (ckpts / "step-00000004").exists()
    net, data, cfg = _make()
    resumed = fit_diffusion(net, cfg, data, work, CPU, seed=0, progress=False)
    assert resumed.resumed_from == 2
    assert not list(ckpts.glob(".tmp-*")), "the partial save was not cleaned up"
    net, data, cfg = _make()
    ref = fit_diffusion(net, cfg, data, tmp_path / "ref", CPU, seed=0, progress=False)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in ref.history]
    for k, v in ref.ema.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[k], v), k


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)  # noqa: NPY002 (the legacy global state is what the checkpoint saves)
    random.seed(5)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@pytest.mark.parametrize("key", ["strategy", "backend"])  # "backend": checkpoints before the rename
def test_resuming_with_an_incompatible_strategy_fails_clearly(tmp_path, key):
    net, data, cfg = _make()
    fit_diffusion(net, cfg, data, tmp_path, CPU, seed=0, progress=False)
    meta_path = tmp_path / "checkpoints" / "step-00000006" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("strategy")
    meta.update({key: "fsdp2", "full_state": False})
    meta_path.write_text(json.dumps(meta))
    net, data, cfg = _make()
    with pytest.raises(ValueError, match=r"written by stage2\.strategy=fsdp2 .* cannot be resumed with"):
        fit_diffusion(net, cfg, data, tmp_path, CPU, seed=0, progress=False)


def test_legacy_single_file_checkpoint_resumes(tmp_path):
    """A ``checkpoint.pt`` written by the trainer before step directories existed is resumed."""
    net, data, cfg = _make()
    ref = fit_diffusion(net, cfg, data, tmp_path / "ref", CPU, seed=0, progress=False)
    # a 2-step run's state in the old single-file layout
    net, data, _ = _make()
    short = DiffusionConfig(**{**cfg.__dict__, "steps": 2})
    fit_diffusion(net, short, data, tmp_path / "short", CPU, seed=0, progress=False)
    ck = tmp_path / "short" / "checkpoints" / "step-00000002"
    mo = torch.load(ck / "model_optim.pt", weights_only=True)
    tr = torch.load(ck / "trainer.pt", weights_only=True)
    rng = torch.load(ck / "rng-rank0.pt", weights_only=True)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(
        {**mo, "generator": tr["generator"], "torch_rng": rng["torch"], "step": 2, "history": tr["history"]},
        legacy / "checkpoint.pt",
    )
    net, data, cfg = _make()
    res = fit_diffusion(net, cfg, data, legacy, CPU, seed=0, progress=False)
    assert res.resumed_from == 2
    for k, v in ref.ema.state_dict().items():
        assert torch.equal(res.ema.state_dict()[k], v), k


def test_tampered_or_foreign_checkpoint_is_refused_before_loading(tmp_path):
    """meta.json records every file's sha256; a changed, added or undigested checkpoint is not loaded
    (DeepSpeed's loader and DCP unpickle their files, so only what dpt wrote may reach them)."""
    from dpt_engine.train.checkpoint import CheckpointIntegrityError, CheckpointManager

    net, data, cfg = _make()
    short = DiffusionConfig(**{**cfg.__dict__, "steps": 4})
    fit_diffusion(net, short, data, tmp_path, CPU, seed=0, progress=False)
    ckpt = tmp_path / "checkpoints" / "step-00000004"
    CheckpointManager.check(ckpt, require_digests=True)  # untouched: passes
    before = (ckpt / "trainer.pt").read_bytes()
    (ckpt / "trainer.pt").write_bytes(before[:-1] + bytes([before[-1] ^ 1]))
    net, data, cfg = _make()
    with pytest.raises(CheckpointIntegrityError, match=r"trainer\.pt changed since it was written"):
        fit_diffusion(net, cfg, data, tmp_path, CPU, seed=0, progress=False)
    (ckpt / "trainer.pt").write_bytes(before)
    (ckpt / "extra.pkl").write_bytes(b"not ours")
    with pytest.raises(CheckpointIntegrityError, match=r"unlisted: \['extra\.pkl'\]"):
        CheckpointManager.check(ckpt, require_digests=False)
    (ckpt / "extra.pkl").unlink()
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["sha256"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    CheckpointManager.check(ckpt, require_digests=False)  # weights_only backends: allowed
    with pytest.raises(CheckpointIntegrityError, match="lists no file digests"):
        CheckpointManager.check(ckpt, require_digests=True)


def test_a_checkpoint_crafted_elsewhere_is_refused_even_with_matching_digests(tmp_path, monkeypatch):
    """Digests can be forged by whoever writes the directory; the HMAC signature with this account's
    key cannot. A checkpoint signed with another key (another machine, or a crafted run directory
    with self-consistent digests) is refused for the unpickling backends; the same key accepts it."""
    from dpt_engine.train.checkpoint import CheckpointIntegrityError, CheckpointManager

    monkeypatch.setenv("DPT_CHECKPOINT_KEY_FILE", str(tmp_path / "mine.key"))
    net, data, cfg = _make()
    short = DiffusionConfig(**{**cfg.__dict__, "steps": 4})
    fit_diffusion(net, short, data, tmp_path / "run", CPU, seed=0, progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    assert (tmp_path / "mine.key").stat().st_mode & 0o777 == 0o600
    CheckpointManager.check(ckpt, require_digests=True)
    monkeypatch.setenv("DPT_CHECKPOINT_KEY_FILE", str(tmp_path / "theirs.key"))  # another account
    with pytest.raises(CheckpointIntegrityError, match="not signed with this account's checkpoint key"):
        CheckpointManager.check(ckpt, require_digests=True)
    CheckpointManager.check(ckpt, require_digests=False)  # weights_only backends need no trust
    monkeypatch.setenv("DPT_CHECKPOINT_KEY", "shared secret of a multi-node job")
    with pytest.raises(CheckpointIntegrityError, match="DPT_CHECKPOINT_KEY environment variable"):
        CheckpointManager.check(ckpt, require_digests=True)
    monkeypatch.delenv("DPT_CHECKPOINT_KEY")
    monkeypatch.setenv("DPT_CHECKPOINT_KEY_FILE", str(tmp_path / "mine.key"))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["signature"] = "0" * 64  # a forged signature
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointIntegrityError, match="not signed"):
        CheckpointManager.check(ckpt, require_digests=True)
