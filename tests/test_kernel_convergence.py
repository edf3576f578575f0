"""Convergence tests (Liger-Kernel style): train a tiny U-ViT and run a full guided solve with
every op on its ``reference`` backend, then again with the fused kernels, and compare.

What is compared and the tolerance of each comparison (see ``tests/tolerances.py`` for the
policy):

==============================  =========================  ========================================
variant (vs all-reference run)  where                      expected agreement
==============================  =========================  ========================================
EMA ``cpp`` (C++ multi-tensor)  this process, CPU          bit-exact: per-step losses, final model
                                                           weights and final EMA weights. The EMA
                                                           never feeds back into training, and the
                                                           C++ EMA is ``torch._foreach_lerp_`` to
                                                           the bit (one fma per element, as torch's
                                                           AVX2/AVX-512 lerp; the baseline loops
                                                           of a non-AVX2 CPU round the product
                                                           separately, as torch does there, so
                                                           those get ``_EMA_DEFAULT_ISA_RTOL``)
EMA ``triton``                  interpreter subprocess     bit-exact at every one of the 20 steps
                                                           (a shadow ``foreach_lerp`` EMA is
                                                           updated beside it; the kernel emulates
                                                           the fma in fp64 under the interpreter)
attention ``triton``            interpreter subprocess     ``TRAIN_TOL`` (rtol 1e-4, atol 1e-6) on
                                                           per-step losses, final weights and EMA:
                                                           one attention call is ~5e-7 relative
                                                           from SDPA (online softmax sums in
                                                           another order); after 20 AdamW steps
                                                           the measured gaps are ~1e-7 (losses)
                                                           and ~5e-7 (weights). Planted bugs fail:
                                                           a 1% softmax-scale error moves weights
                                                           by ~3e-3, a dropped last key moves the
                                                           losses by ~5e-4
guided DPM-Solver++ solve,      this process (``cpp``),    bit-exact: the fused step performs the
``sample_multistep_fused``      interpreter (``triton``)   eager fp32 operations in the same order
vs ``DPMSolverPP.sample``                                  with no fma contraction, and the network
                                                           sees bit-identical inputs every step
==============================  =========================  ========================================

All runs are fp32 on CPU (the interpreter's bf16 ``tl.dot`` is unusable). The interpreter runs
in a subprocess because ``triton.jit`` picks interpreted or compiled kernels when
``dpt_engine.kernels`` is first imported (see ``tests/test_kernels_triton.py``): the outer
``test_interpreted_convergence`` starts ``python -m pytest`` on this file with
``TRITON_INTERPRET=1`` and ``-o python_functions=interp_*``. The ``gpu`` tests repeat the
comparisons with the compiled Triton kernels and the CUDA extension.

Model: ``uvit-tiny8`` shrunk to 8x8x1 images, 3 classes, width 24, depth 2, 2 heads (head dim
12, padded to 16 in the kernel; 18 tokens, not a block multiple), trained 20 steps of batch 4 on
sklearn's 8x8 digits 0-2. Runtime on one core: ~4 s in process, ~25-35 s for the interpreter
subprocess (nearly all of it the interpreted attention: ~12 launches per step).
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tolerances import assert_bit_exact

from dpt_engine.config.schema import DiffusionConfig
from dpt_engine.diffusion import DPMSolverPP, cfg_eps_fn, make_schedule
from dpt_engine.diffusion.trainer import DiffusionData, fit_diffusion
from dpt_engine.kernels import _native as native
from dpt_engine.kernels import (
    ema_update_reference_,
    register_backend,
    registered_backends,
    sample_multistep_fused,
    use_backend,
)
from dpt_engine.kernels.dispatch import unregister_backend
from dpt_engine.models.uvit import UViT, create_uvit

INNER = os.environ.get("DPT_TRITON_INTERPRET_INNER") == "1"
if INNER and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("the inner interpreter run needs TRITON_INTERPRET=1 in its environment")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
NUM_CLASSES = 3
GUIDANCE = 0.4
#: relative / absolute tolerance of losses and weights when the attention kernel differs
TRAIN_TOL = {"rtol": 1e-4, "atol": 1e-6}
#: a CPU without AVX2 (baseline C++ loops): one extra rounding per lerp, accumulated over 20 steps
_EMA_DEFAULT_ISA_RTOL = 1e-5

requires_native = pytest.mark.skipif(
    not native.is_available(), reason=f"native ops not built: {native.load_error()}"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ============================================================================ shared setup
def _tiny_uvit(seed: int = 0) -> UViT:
    torch.manual_seed(seed)
    return create_uvit(
        "uvit-tiny8", img_size=8, in_chans=1, num_classes=NUM_CLASSES, embed_dim=24, depth=2, num_heads=2
    )


def _digits(n: int = 96) -> DiffusionData:
    """sklearn's 8x8 digits of classes 0..2 (real images shipped with the package) in [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = torch.from_numpy(d.target < NUM_CLASSES)
    x = torch.from_numpy(d.images).float()[keep][:n]  # (n, 8, 8), values 0..16
    y = torch.from_numpy(d.target)[keep][:n].long()  # (n,)
    return DiffusionData(x=(x / 8.0 - 1.0)[:, None], y=y, weight=None, num_classes=NUM_CLASSES)


def _config() -> DiffusionConfig:
    # ema_decay 0.99 with the warm-up min(decay, (1+s)/(10+s)): lerp weights from 0.9 down to
    # 0.01, so both branches of lerp (weight >= 0.5 and < 0.5) are exercised
    return DiffusionConfig(
        steps=STEPS,
        batch_size=4,
        lr=2e-3,
        warmup_steps=5,
        ema_decay=0.99,
        label_dropout=0.2,
        log_every=1,
        checkpoint_every=10_000,
    )


@dataclass
class Run:
    losses: list[float]  # one per step
    weights: dict[str, torch.Tensor]  # the trained network
    ema: dict[str, torch.Tensor]  # its EMA
    ema_net: UViT
    seconds: float


def _train(work_dir: Path, backends: dict[str | None, str], device: str = "cpu") -> Run:
    """``fit_diffusion`` for ``STEPS`` steps with ``use_backend(name, op)`` for each
    ``{op: name}`` (op None = every op)."""
    net = _tiny_uvit()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for op, name in backends.items():
            stack.enter_context(use_backend(name, op))
        fit = fit_diffusion(net, _config(), _digits(), work_dir, torch.device(device), seed=1, progress=False)
    seconds = time.perf_counter() - t0
    assert len(fit.history) == STEPS
    return Run(
        losses=[h["loss"] for h in fit.history],
        weights={k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        ema={k: v.detach().cpu().clone() for k, v in fit.ema.state_dict().items()},
        ema_net=fit.ema,
        seconds=seconds,
    )


def _assert_runs_identical(got: Run, ref: Run, what: str, ema_rtol: float = 0.0) -> None:
    assert got.losses == ref.losses, f"{what}: losses differ: {got.losses} vs {ref.losses}"
    for k in ref.weights:
        assert_bit_exact(got.weights[k], ref.weights[k], msg=f"{what}: weight {k}")
    for k in ref.ema:
        if ema_rtol == 0.0:
            assert_bit_exact(got.ema[k], ref.ema[k], msg=f"{what}: EMA {k}")
        else:
            torch.testing.assert_close(
                got.ema[k], ref.ema[k], rtol=ema_rtol, atol=1e-7, msg=f"{what}: EMA {k}"
            )


def _assert_runs_close(got: Run, ref: Run, what: str) -> dict[str, float]:
    """Losses, weights and EMA within ``TRAIN_TOL``; returns the largest relative differences."""
    lg, lr = torch.tensor(got.losses, dtype=torch.float64), torch.tensor(ref.losses, dtype=torch.float64)
    torch.testing.assert_close(lg, lr, **TRAIN_TOL, msg=lambda m: f"{what}: losses: {m}")
    worst = {"loss": ((lg - lr).abs() / lr.abs()).max().item(), "weight": 0.0, "ema": 0.0}
    for key, a_dict, b_dict in (("weight", got.weights, ref.weights), ("ema", got.ema, ref.ema)):
        for k, b in b_dict.items():
            a = a_dict[k]
            if not a.is_floating_point():
                assert torch.equal(a, b), f"{what}: {key} {k}"
                continue
            torch.testing.assert_close(
                a, b, **TRAIN_TOL, msg=lambda m, k=k, key=key: f"{what}: {key} {k}: {m}"
            )
            rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
            worst[key] = max(worst[key], rel)
    # and training did something (the loss moved)
    assert ref.losses[0] != ref.losses[-1]
    return worst


def _guided_solves(net: UViT, backend: str, device: str = "cpu", steps: int = 10, order: int = 3):
    """A full guided DPM-Solver++ solve, eager (``DPMSolverPP.sample`` + ``cfg_eps_fn``) and fused
    (``sample_multistep_fused`` with ``backend``); returns ``(fused, eager, x_T, x_T_after)``."""
    net = net.to(device).eval()
    schedule = make_schedule("discrete-linear")
    solver = DPMSolverPP(schedule, steps=steps, order=order)
    batch = 4
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(batch, 1, 8, 8, generator=g).to(device)  # (B, C, H, W)
    y = (torch.arange(batch) % NUM_CLASSES).to(device)  # (B,)
    null = net.cfg.null_class_id
    y2 = torch.cat([y, torch.full_like(y, null)])  # (2B,)

    def doubled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What ``cfg_eps_fn`` runs before combining: the (2B, ...) [cond; uncond] prediction."""
        t_net = schedule.network_time(t)
        return net(torch.cat([x, x]), torch.cat([t_net, t_net]), y2)

    x_T0 = x_T.clone()
    with torch.no_grad():
        eager = solver.sample(cfg_eps_fn(net, y, GUIDANCE, null, schedule), x_T)
        fused = sample_multistep_fused(solver, doubled, x_T, guidance_scale=GUIDANCE, backend=backend)
    return fused, eager, x_T0, x_T


# ============================================================================ outer (CPU, in process)
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Run:
    return _train(tmp_path_factory.mktemp("reference"), {None: "reference"})


def test_reference_training_is_deterministic(reference_run: Run, tmp_path: Path) -> None:
    """The premise of every bit-exact comparison below: two all-reference runs are identical."""
    _assert_runs_identical(_train(tmp_path, {None: "reference"}), reference_run, "reference rerun")


@requires_native
def test_training_cpp_ema_matches_reference(reference_run: Run, tmp_path: Path) -> None:
    """EMA through the C++ multi-tensor op (attention stays SDPA: no CPU attention kernel)."""
    run = _train(tmp_path, {None: "reference", "ema": "cpp"})
    rtol = _EMA_DEFAULT_ISA_RTOL if native.cpu_isa() == "default" else 0.0
    _assert_runs_identical(run, reference_run, "cpp EMA", ema_rtol=rtol)


@requires_native
def test_guided_sampling_cpp_fused_matches_eager(reference_run: Run) -> None:
    """The trained EMA network, 10-step order-3 guided solve: fused C++ steps == eager, bit for bit."""
    fused, eager, x_T0, x_T = _guided_solves(copy.deepcopy(reference_run.ema_net), "cpp")
    assert_bit_exact(fused, eager, msg="cpp fused solve vs DPMSolverPP.sample")
    assert_bit_exact(x_T, x_T0, msg="x_T must not change")
    assert fused.abs().max() > 0 and not torch.equal(fused, x_T0)


def test_interpreted_convergence() -> None:
    """Run this file's ``interp_*`` tests under ``TRITON_INTERPRET=1`` in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "DPT_KERNELS"}
    env.update(
        TRITON_INTERPRET="1", DPT_TRITON_INTERPRET_INNER="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1")
    )
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-o", "python_functions=interp_*",
        "--durations=5", str(Path(__file__).resolve()),
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = f"inner run ({time.perf_counter() - t0:.1f} s):\n{res.stdout[-12000:]}\n{res.stderr[-4000:]}"
    assert res.returncode == 0, report
    assert " passed" in res.stdout, report
    print(report)


# ============================================================================ inner (TRITON_INTERPRET=1)
@pytest.fixture(scope="module")
def interp_reference_run(tmp_path_factory) -> Run:
    return _train(tmp_path_factory.mktemp("reference"), {None: "reference"})


@contextlib.contextmanager
def _checked_ema(backend: str):
    """Register ``<backend>_checked`` for the ``ema`` op: it runs ``backend`` and, on shadow
    copies of the EMA tensors, ``torch._foreach_lerp_`` (the reference), and asserts after every
    training step that both are bit-identical. One training run then checks the fused EMA at
    each step on the real weight trajectory, whatever the attention backend does to it."""
    shadows: dict[int, list[torch.Tensor]] = {}
    calls = []
    fused = registered_backends("ema")[backend]

    def checked(ema, params, decay):
        shadow = shadows.setdefault(id(ema[0]), [e.detach().clone() for e in ema])
        fused.fn(ema, params, decay)
        ema_update_reference_(shadow, params, decay)
        for i, (e, r) in enumerate(zip(ema, shadow)):
            assert_bit_exact(e, r, msg=f"{backend} EMA, step {len(calls)}, tensor {i}")
        calls.append(decay)

    register_backend("ema", f"{backend}_checked", checked, fused.available, auto=False)
    try:
        yield calls
    finally:
        unregister_backend("ema", f"{backend}_checked")


def interp_training_triton_attention_and_ema(interp_reference_run: Run, tmp_path: Path) -> None:
    """Attention and EMA on the interpreted Triton kernels: losses and weights within
    ``TRAIN_TOL`` of the all-reference run; every EMA update bit-exact (shadow check)."""
    with _checked_ema("triton") as calls:
        run = _train(tmp_path, {None: "reference", "attention": "triton", "ema": "triton_checked"})
    lerp_weights = [1.0 - d for d in calls]
    assert len(calls) == STEPS and min(lerp_weights) < 0.5 <= max(lerp_weights)  # both lerp branches
    worst = _assert_runs_close(run, interp_reference_run, "triton attention + EMA")
    print(
        f"\ntriton attention + EMA ({run.seconds:.1f} s; reference {interp_reference_run.seconds:.1f} s): "
        f"EMA bit-exact at all {STEPS} steps; max rel diff loss {worst['loss']:.2e}, "
        f"weights {worst['weight']:.2e}, EMA {worst['ema']:.2e} (tolerance rtol {TRAIN_TOL['rtol']:g})"
    )


def interp_guided_sampling_triton_fused_matches_eager(interp_reference_run: Run) -> None:
    fused, eager, x_T0, x_T = _guided_solves(copy.deepcopy(interp_reference_run.ema_net), "triton")
    assert_bit_exact(fused, eager, msg="triton fused solve vs DPMSolverPP.sample")
    assert_bit_exact(x_T, x_T0, msg="x_T must not change")


# ============================================================================ GPU (compiled kernels)
@contextlib.contextmanager
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.gpu
@requires_cuda
def test_gpu_training_triton_matches_reference(tmp_path: Path) -> None:
    """fp32 (no TF32) on CUDA: compiled Triton attention + EMA vs SDPA + foreach_lerp (the EMA
    checked bit-exact at every step)."""
    with _no_tf32():
        ref = _train(tmp_path / "ref", {None: "reference"}, "cuda")
        with _checked_ema("triton") as calls:
            run = _train(
                tmp_path / "triton",
                {None: "reference", "attention": "triton", "ema": "triton_checked"},
                "cuda",
            )
    assert len(calls) == STEPS
    worst = _assert_runs_close(run, ref, "cuda triton attention + EMA")
    print(
        f"\ncuda triton: max rel diff loss {worst['loss']:.2e}, weights {worst['weight']:.2e}, EMA {worst['ema']:.2e}"
    )


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_guided_sampling_fused_matches_eager(backend: str) -> None:
    if backend == "cuda" and not (native.is_available() and native.has_cuda_kernels()):
        pytest.skip("libdpt_engine_ops.so not built with CUDA kernels (DPT_BUILD_CUDA=ON)")
    with _no_tf32():
        fused, eager, x_T0, x_T = _guided_solves(_tiny_uvit(), backend, "cuda")
    assert_bit_exact(fused, eager, msg=f"{backend} fused solve vs DPMSolverPP.sample")
    assert_bit_exact(x_T, x_T0, msg="x_T must not change")
