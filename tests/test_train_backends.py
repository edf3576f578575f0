"""Distributed training backends on CPU (2 processes over gloo) against single-process training.

Every backend trains the same tiny U-ViT on the same global batches (one generator draws them;
each rank takes its slice), so its per-step losses and final EMA must match the single-process
run. Tolerance: the backends differ from the reference only in floating-point summation order
(gradients reduced across ranks / summed over micro-batches instead of one batched sum). Measured:
losses agree to ~1.2e-7 relative after 4 steps (fp32 rounding; AdamW's normalised update keeps
relative errors relative). ``RTOL = 1e-5`` leaves ~100x margin, except at the odd EMA element
whose AdamW update is ill-conditioned (see ``_assert_ema_matches``). Because AdamW is nearly
scale-invariant, a wrong gradient scale barely moves the losses (a 2x error: ~3e-4), so the
pre-clipping gradient norm is compared too: it is off by the same factor as the error.

The cases also cover gradient accumulation (DDP, ZeRO-2), per-image loss weights (FSDP2, ZeRO-2),
activation checkpointing (FSDP2, ZeRO-3) and optimizer offload (ZeRO-2); rank 1 starts from
different weights, which the backend must replace by rank 0's.

Each backend also resumes: in the same launch a run is interrupted after step 2 (checkpoint
written) and restarted; the resumed run's losses and EMA must equal the uninterrupted one's
exactly (same ranks, same operations, same order).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dpt_engine.config.schema import DiffusionConfig
from dpt_engine.diffusion.trainer import DiffusionData, fit_diffusion
from dpt_engine.models.uvit import create_uvit
from dpt_engine.utils.dist import free_port

pytestmark = pytest.mark.dist

RTOL = 1e-5
STEPS = 4
INTERRUPT = 2

CASES = {
    # name: (backend, zero_stage, grad_accum, weighted, other DiffusionConfig options)
    "ddp": ("ddp", 0, 2, False, {}),
    "fsdp2": ("fsdp2", 0, 1, True, {"grad_checkpointing": True}),
    "zero1": ("deepspeed", 1, 1, False, {}),
    "zero2": ("deepspeed", 2, 2, True, {"offload_optimizer": True}),
    "zero3": ("deepspeed", 3, 1, False, {"grad_checkpointing": True}),
}


def _assert_ema_matches(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """EMA weights equal up to summation order: all but a few elements within ``RTOL`` (atol 1e-6),
    and those few within a twentieth of one AdamW step (lr 2e-3).

    AdamW moves each weight by about ``lr * m / sqrt(v)``, which is ill-conditioned where a
    gradient element is a near-cancelling sum of the order of AdamW's eps: there a reordered sum can
    move the update by a visible fraction of lr (measured on an AMX Xeon: 1 of 4,096 elements 4.2e-6
    apart, the rest within 1e-7). A real fault (a dropped micro-batch, a wrong slice, rank 1 keeping
    its own weights) moves most elements by a whole step and fails both bounds.
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs()
    off = diff > 1e-6 + RTOL * want.double().abs()
    assert int(off.sum()) <= max(1, want.numel() // 1000), (
        f"{what}: {int(off.sum())} of {want.numel()} elements differ beyond rtol {RTOL} (max {float(diff.max()):.2e})"
    )
    assert float(diff.max()) <= 1e-4, f"{what}: an element differs by {float(diff.max()):.2e} (> lr / 20)"


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_uvit(
        "uvit-tiny8", img_size=8, in_chans=1, num_classes=3, embed_dim=32, depth=2, num_heads=2
    )


def _data(weighted: bool) -> DiffusionData:
    g = torch.Generator().manual_seed(0)
    return DiffusionData(
        x=torch.rand(48, 1, 8, 8, generator=g) * 2 - 1,
        y=torch.randint(0, 3, (48,), generator=g),
        weight=torch.rand(48, generator=g) + 0.5 if weighted else None,
        num_classes=3,
    )


def _cfg(backend: str, zero_stage: int, grad_accum: int) -> DiffusionConfig:
    return DiffusionConfig(
        steps=STEPS,
        batch_size=8,
        lr=2e-3,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=INTERRUPT,
        strategy=backend,
        zero_stage=zero_stage,
        grad_accum=grad_accum,
        keep_checkpoints=1,
    )


def _worker(rank: int, world: int, port: int, case: str, out: str) -> None:
    """One rank: an uninterrupted run, then an interrupted + resumed run; rank 0 saves the results."""
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    backend, zero, accum, weighted, extra = CASES[case]
    cfg = replace(_cfg(backend, zero, accum), **extra)
    data, cpu, root = _data(weighted), torch.device("cpu"), Path(out)
    # rank 1 starts from other weights: the backend must give every rank rank 0's (as torchrun
    # processes of an unseeded init would differ)
    full = fit_diffusion(_net(seed=rank), cfg, data, root / "full", cpu, seed=3, progress=False)
    os.environ["DPT_TEST_INTERRUPT_AT_STEP"] = str(INTERRUPT)
    try:
        fit_diffusion(_net(), cfg, data, root / "resumed", cpu, seed=3, progress=False)
        raise AssertionError("the interrupt hook did not fire")
    except KeyboardInterrupt:
        pass
    del os.environ["DPT_TEST_INTERRUPT_AT_STEP"]
    resumed = fit_diffusion(_net(), cfg, data, root / "resumed", cpu, seed=3, progress=False)
    if rank == 0:
        torch.save(
            {
                "full_loss": [h["loss"] for h in full.history],
                "full_grad_norm": [h["grad_norm"] for h in full.history],
                "full_ema": full.ema.state_dict(),
                "resumed_loss": [h["loss"] for h in resumed.history],
                "resumed_ema": resumed.ema.state_dict(),
                "resumed_from": resumed.resumed_from,
                "model_pt": torch.load(root / "full" / "model.pt", weights_only=True),
            },
            root / "result.pt",
        )
    dist.barrier()
    dist.destroy_process_group()


def _launch(case: str, out: Path) -> dict:
    import torch.multiprocessing as mp

    mp.start_processes(
        _worker, args=(2, free_port(), case, str(out)), nprocs=2, join=True, start_method="spawn"
    )
    return torch.load(out / "result.pt", weights_only=True)


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_env():
    """DeepSpeed on the CPU; its shared-memory comm op is JIT-built once into a cache."""
    saved = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")}
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dpt_engine" / "torch_extensions")
    )
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_single_process_and_resumes(case, tmp_path):
    weighted = CASES[case][3]
    ref = fit_diffusion(
        _net(),
        _cfg("single", 0, 1),
        _data(weighted),
        tmp_path / "ref",
        torch.device("cpu"),
        seed=3,
        progress=False,
    )
    ref_loss = [h["loss"] for h in ref.history]
    ref_norm = [h["grad_norm"] for h in ref.history]
    res = _launch(case, tmp_path / "dist")
    assert len(res["full_loss"]) == STEPS
    torch.testing.assert_close(torch.tensor(res["full_loss"]), torch.tensor(ref_loss), rtol=RTOL, atol=0)
    # the pre-clipping gradient norm: catches a wrong loss normalisation, which AdamW's
    # scale-invariant update would hide from the losses
    torch.testing.assert_close(torch.tensor(res["full_grad_norm"]), torch.tensor(ref_norm), rtol=RTOL, atol=0)
    for k, v in ref.ema.state_dict().items():
        _assert_ema_matches(res["full_ema"][k], v, f"{case}: EMA {k}")
    # the exported plain state dict (stage 2's model.pt) holds the full model and EMA
    assert set(res["model_pt"]["ema"]) == set(ref.ema.state_dict())
    assert set(res["model_pt"]["model"]) == set(ref.ema.state_dict())
    # resume from the step-2 checkpoint: the same losses and EMA as the uninterrupted run
    assert res["resumed_from"] == INTERRUPT
    assert res["resumed_loss"] == res["full_loss"]
    for k, v in res["full_ema"].items():
        assert torch.equal(res["resumed_ema"][k], v), f"{case}: resumed EMA {k} differs"


BF16_BACKENDS = (("ddp", 0), ("fsdp2", 0), ("deepspeed", 3))
NAN_BACKENDS = (("fsdp2", 0), ("deepspeed", 2))


def _nan_data() -> DiffusionData:
    """Poison the image that step 2 of a seed-1 run draws first (steps that draw it are skipped)."""
    from dpt_engine.diffusion.schedules import make_schedule
    from dpt_engine.train import draw_global_batch

    data, cfg = _data(False), _cfg("single", 0, 1)
    gen, schedule = torch.Generator().manual_seed(1), make_schedule(cfg.schedule)
    draws = [draw_global_batch(data, 8, schedule, gen, cfg.hflip, cfg.label_dropout).idx for _ in range(3)]
    data.x[int(draws[2][0])] = float("nan")
    return data


def _extra_worker(rank: int, world: int, port: int, out: str) -> None:
    """In one launch (one process group): bf16 on every backend, then non-finite steps on the
    sharding backends. Rank 0 saves the losses."""
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    cpu, losses = torch.device("cpu"), {}
    for backend, zero in BF16_BACKENDS:
        cfg = replace(_cfg(backend, zero, 1), precision="bf16")
        fit = fit_diffusion(
            _net(), cfg, _data(False), Path(out) / f"bf16-{backend}", cpu, seed=3, progress=False
        )
        losses[f"bf16-{backend}"] = [h["loss"] for h in fit.history]
    for backend, zero in NAN_BACKENDS:
        cfg = replace(_cfg(backend, zero, 1), steps=6, max_bad_steps=6)
        fit = fit_diffusion(
            _net(), cfg, _nan_data(), Path(out) / f"nan-{backend}", cpu, seed=1, progress=False
        )
        losses[f"nan-{backend}"] = [h["loss"] for h in fit.history]
    if rank == 0:
        torch.save(losses, Path(out) / "extra.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_bf16_and_skipped_steps_on_every_backend(tmp_path):
    """bf16 compute (autocast for single/DDP, bf16 parameters for FSDP2 and DeepSpeed) with fp32
    master weights. bf16 keeps 8 mantissa bits (relative rounding ~4e-3 per op) and the backends
    round at different places, so the losses agree only to bf16 accuracy. Measured over 4 steps:
    DDP 8e-5, FSDP2 2e-4, ZeRO-3 6e-4 relative; the bound is 5e-3. This checks that every bf16
    path trains the same model; it does not prove the compute ran in bf16.

    Non-finite losses: FSDP2 and ZeRO-2 skip exactly the steps single-process training skips
    (DeepSpeed's own overflow check drops the update), and the later losses still match."""
    import torch.multiprocessing as mp

    cpu = torch.device("cpu")
    ref_bf16 = fit_diffusion(
        _net(),
        replace(_cfg("single", 0, 1), precision="bf16"),
        _data(False),
        tmp_path / "r1",
        cpu,
        seed=3,
        progress=False,
    )
    ref_nan = fit_diffusion(
        _net(),
        replace(_cfg("single", 0, 1), steps=6, max_bad_steps=6),
        _nan_data(),
        tmp_path / "r2",
        cpu,
        seed=1,
        progress=False,
    )
    mp.start_processes(
        _extra_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    losses = torch.load(tmp_path / "extra.pt", weights_only=True)
    ref_loss = torch.tensor([h["loss"] for h in ref_bf16.history])
    for backend, _zero in BF16_BACKENDS:
        got = torch.tensor(losses[f"bf16-{backend}"])
        torch.testing.assert_close(got, ref_loss, rtol=5e-3, atol=0, msg=f"bf16 {backend}")
    ref_nan_loss = torch.tensor([h["loss"] for h in ref_nan.history])
    assert ref_nan.history[-1]["skipped_steps"] > 0 and not ref_nan_loss.isnan().all()
    for backend, _zero in NAN_BACKENDS:
        got = torch.tensor(losses[f"nan-{backend}"])
        torch.testing.assert_close(
            got, ref_nan_loss, rtol=RTOL, atol=0, equal_nan=True, msg=f"skipped steps {backend}"
        )
