"""The measurements of the GPU check, in order of value, each row written the moment it is measured.

``benchmarks/gpu_check.sh`` runs this driver after setting the machine up; it can also run alone.
Phases, in this order (the most important results come first, so a run cut short still has them):

====  ===============  =======================================================================
      phase            what (rows' ``benchmark``)
====  ===============  =======================================================================
(a)   ``correctness``  every kernel backend against its plain PyTorch reference, fp32 and bf16
                       (``correctness``): attention forward + gradients (both entry points)
                       against ``attention_reference`` in fp64 (fp32: ``TOLERANCES``; bf16: at
                       most 2x PyTorch's own bf16 error, ``dpt_engine.kernels.tolerances``); the
                       EMA against ``torch._foreach_lerp_`` and whole guided / plain DPM-Solver++
                       solves against ``DPMSolverPP.sample`` (both bit-exact), for fp32 and bf16
                       parameters / model outputs. Backends: every registered one (``triton``,
                       ``cuda`` on the GPU, ``cpp`` on CPU tensors, the ``reference``/SDPA one
                       where it is not its own oracle); one that cannot run is a ``skipped`` row
                       with the reason.
(b)   ``attention``    forward and forward + backward TFLOP/s at (B, 16, 258, 64) and
                       (B, 16, 258, 72), bf16: our Triton kernels vs SDPA's flash / cuDNN /
                       efficient / math backends (``bench_attention``)
(c)   ``ema``          EMA GB/s over U-ViT-H/2's 501M parameters (its real tensor sizes): Triton
                       and CUDA extension vs ``torch._foreach_lerp_`` (``run_all.bench_ema_cuda``)
(d)   ``solver``       the fused solver step at the sampling shape and a bandwidth-bound one
                       (``run_all.bench_solver_step_cuda``), then the no-host-sync sampling loop
                       (``BatchSampler``) per solver-step backend, with and without a CUDA graph,
                       around a stand-in network (the loop alone) and U-ViT-L/2 (``sampling_loop``)
(e)   ``train``        training img/s, TFLOP/s, MFU and peak memory of U-ViT-L/2 and U-ViT-H/2 at
                       4x32x32 latents, batch 64 and 128, bf16 (and at batch 64 the original's
                       own step: fp32 against ours in fp32 for L/2, its documented fp16 mixed
                       precision against our bf16 for both), then the same with
                       ``torch.compile`` (``bench_train``)
(f)   ``sampling``     sampling img/s of U-ViT-H/2 with classifier-free guidance at 20 and 50
                       steps, bf16: the fused sampler vs the original two-forward loop and the
                       bare network (``bench_sampler``)
====  ===============  =======================================================================

Every phase runs in its own process (``--child``) under a time cap, ``min(cap, what is left of
--budget)``: a hang, a CUDA error or an out-of-memory in one phase cannot take the others down,
and a phase past its cap is killed (its finished items are kept). Inside a phase the items run in
order of value and an item is skipped, with a row saying so, when its phase's time is nearly up.

Output (``--out``, default ``<results>/gpu_check_<device>/``): ``rows.jsonl`` (one JSON row per
line, appended and flushed as measured: ``phase`` plus the ``harness.Row`` fields; one
``gpu_check``/``phase`` row per phase with its status and seconds), ``gpu_check.json`` (all rows,
rewritten after every phase), ``gpu_check.md`` (the phase table, the correctness table and the
headline figures) and the benchmarks' own JSON/PNG files. Exit status 0 when every phase passed.

``--dry-run`` runs every phase on the CPU with tiny shapes and models, the Triton kernels under
the interpreter (``TRITON_INTERPRET=1`` is set for the phase processes) and ``--device cpu``, in
about a minute on 2 cores, so that the code paths cannot rot unseen (``tests/test_gpu_check.py``).
What a CPU cannot do is a ``skipped`` row with the reason: CUDA graphs, SDPA's CUDA backends, the
interpreter's bf16 ``tl.dot`` (wrong there, see /work/shared/ENVIRONMENT.md). The dry run's
``torch.compile`` uses the ``aot_eager`` backend (Dynamo and AOTAutograd without Inductor's
C++ code generation, which alone takes over a minute on 2 cores).

Nothing here needs more than the GPU image's packages (torch, triton, numpy, timm, matplotlib):
diffusers and xformers are used when installed and skipped otherwise.

Run: ``python -m benchmarks.gpu_check [--dry-run] [--device cuda] [--budget 420] [--phases a b]``
(``python -m benchmarks.gpu_check --check-imports`` only imports what the check needs).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dpt_engine.utils.io import atomic_write_json, atomic_write_text

from .harness import Row, commit_hash, device_name, measure_alternating, paired_ratio, summarize

__all__ = [
    "OPTIONAL_MODULES",
    "PHASES",
    "REQUIRED_MODULES",
    "Settings",
    "build_parser",
    "check_imports",
    "main",
    "phase_cap",
    "settings_for",
]

#: modules the GPU check imports (all must import on the GPU image)
REQUIRED_MODULES = (
    "numpy",
    "torch",
    "torch.nn.attention",
    "triton",
    "triton.language",
    "triton.compiler",
    "triton.backends.compiler",
    "timm",
    "matplotlib",
    "scipy",
    "tqdm",
    "yaml",
    "PIL",
    "sklearn",
    "pytest",
    "dpt_engine",
    "dpt_engine.cli",
    "dpt_engine.kernels",
    "dpt_engine.kernels.aot",
    "dpt_engine.kernels.tolerances",
    "dpt_engine.diffusion",
    "dpt_engine.models.uvit",
    "dpt_engine.sampling.sampler",
    "dpt_engine.train.engine",
    "dpt_engine.train.guards",
    "benchmarks.harness",
    "benchmarks.telemetry",
    "benchmarks.bench_attention",
    "benchmarks.bench_ema",
    "benchmarks.bench_solver_step",
    "benchmarks.bench_train",
    "benchmarks.bench_sampler",
    "benchmarks.run_all",
    "benchmarks.gpu_check",
)
#: used when present, skipped with the reason otherwise (not on the GPU image)
OPTIONAL_MODULES = ("diffusers", "xformers", "pynvml", "xdist")
#: attributes the check relies on (module, attribute path)
REQUIRED_APIS = (
    ("torch", "_foreach_lerp_"),
    ("torch", "library.custom_op"),
    ("torch", "cuda.CUDAGraph"),
    ("torch.nn.attention", "SDPBackend.CUDNN_ATTENTION"),
    ("torch.nn.attention", "SDPBackend.FLASH_ATTENTION"),
    ("torch.nn.attention", "SDPBackend.EFFICIENT_ATTENTION"),
    ("torch.nn.attention", "sdpa_kernel"),
    ("triton.compiler", "ASTSource"),
    ("triton.backends.compiler", "GPUTarget"),
)


def check_imports() -> dict[str, Any]:
    """Import every module the check needs and look up the APIs it uses, in this process:
    ``{"required": {name: "ok" | error}, "optional": {...}, "apis": {...}, "ok": bool}``."""

    def attempt(name: str) -> str:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # any failure to import is the finding
            return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        version = getattr(mod, "__version__", None)
        return f"ok {version}" if isinstance(version, str) and "." not in name else "ok"

    required = {name: attempt(name) for name in REQUIRED_MODULES}
    optional = {name: attempt(name) for name in OPTIONAL_MODULES}
    apis: dict[str, str] = {}
    for mod_name, path in REQUIRED_APIS:
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in path.split("."):
                obj = getattr(obj, part)
            apis[f"{mod_name}.{path}"] = "ok"
        except Exception as exc:
            apis[f"{mod_name}.{path}"] = f"{type(exc).__name__}: {exc}"
    ok = all(v.startswith("ok") for v in (*required.values(), *apis.values()))
    return {"ok": ok, "required": required, "optional": optional, "apis": apis}


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TrainRun:
    model: str
    batch: int
    variants: tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    """Shapes, models and repeats of every phase: ``settings_for(dry_run)``."""

    dry_run: bool
    # (a) correctness
    attn_shapes: tuple[tuple[int, int, int, int], ...]
    ema_sizes: tuple[int, ...]
    solver_shape: tuple[int, ...]
    solver_steps: int
    # (b) attention
    attn_batch: int
    attn_heads: int
    attn_seq: int
    attn_head_dims: tuple[int, ...]
    attn_dtype: str
    attn_repeats: int
    attn_min_time_ms: float
    # (c) EMA over a model's parameter sizes
    ema_model: str
    ema_overrides: dict[str, Any]
    ema_repeats: int
    # (d) solver step and sampling loop
    step_shapes: tuple[tuple[int, ...], ...]
    step_repeats: int
    loop_nets: tuple[tuple[str, int], ...]  # (model preset or "stand-in", batch)
    loop_steps: int
    loop_repeats: int
    # (e) training
    train_runs: tuple[TrainRun, ...]
    train_steps: int
    train_warmup: int
    # (f) sampling
    sample_model: str
    sample_batch: int
    sample_steps: tuple[int, ...]
    sample_repeats: int
    # time kept back per item: an item starts only when its phase has this much time left
    item_reserve_s: float
    # seconds per phase at most, and the floor each later phase keeps when the budget is short
    # (an earlier phase's cap shrinks so that every later one still gets its floor)
    phase_caps: dict[str, float] = field(default_factory=dict)
    phase_floors: dict[str, float] = field(default_factory=dict)


def settings_for(dry_run: bool) -> Settings:
    """The GPU settings (8 minutes on an H200 in all), or the dry run's tiny CPU ones."""
    if dry_run:
        return Settings(
            dry_run=True,
            attn_shapes=((1, 2, 40, 64), (1, 2, 40, 72)),
            ema_sizes=(1000, 7, 300, 1, 257),
            solver_shape=(2, 4, 8, 8),
            solver_steps=6,
            attn_batch=1,
            attn_heads=2,
            attn_seq=66,
            attn_head_dims=(64, 72),
            attn_dtype="fp32",
            attn_repeats=2,
            attn_min_time_ms=0.0,
            ema_model="uvit-tiny8",
            ema_overrides={"embed_dim": 32, "depth": 2, "num_heads": 2},
            ema_repeats=3,
            step_shapes=((2, 4, 8, 8),),
            step_repeats=3,
            loop_nets=(("stand-in", 2), ("uvit-tiny8", 2)),
            loop_steps=4,
            loop_repeats=2,
            train_runs=(
                TrainRun("uvit-tiny8", 4, ("original", "dpt_engine-fp32", "dpt_engine-bf16")),
                TrainRun("uvit-tiny8", 8, ("dpt_engine-bf16",)),
                TrainRun("uvit-tiny8", 4, ("dpt_engine-bf16-compile",)),
            ),
            train_steps=1,
            train_warmup=0,
            sample_model="uvit-tiny8",
            sample_batch=2,
            sample_steps=(3, 5),
            sample_repeats=1,
            item_reserve_s=1.0,
            phase_caps={
                "correctness": 60,
                "attention": 40,
                "ema": 30,
                "solver": 40,
                "train": 90,
                "sampling": 40,
            },
            phase_floors={
                "correctness": 15,
                "attention": 10,
                "ema": 10,
                "solver": 10,
                "train": 15,
                "sampling": 10,
            },
        )
    return Settings(
        dry_run=False,
        attn_shapes=((2, 16, 258, 64), (2, 16, 258, 72)),
        ema_sizes=(1152 * 3456 + 1, 1152, 7, 1, 4608 * 1152, 3 * 65536 + 5),
        solver_shape=(4, 4, 32, 32),
        solver_steps=10,
        attn_batch=32,
        attn_heads=16,
        attn_seq=258,
        attn_head_dims=(64, 72),
        attn_dtype="bf16",
        attn_repeats=7,
        attn_min_time_ms=10.0,
        ema_model="uvit-h2",
        ema_overrides={},
        ema_repeats=10,
        step_shapes=((64, 4, 32, 32), (64, 4, 128, 128)),
        step_repeats=10,
        loop_nets=(("stand-in", 64), ("uvit-l2", 8)),
        loop_steps=20,
        loop_repeats=5,
        train_runs=(
            # equal settings (fp32 both) and defaults (the original's documented fp16 mixed
            # precision vs our bf16 autocast), against the original's own step
            TrainRun("uvit-l2", 64, ("original", "dpt_engine-fp32", "original-amp", "dpt_engine-bf16")),
            TrainRun("uvit-h2", 64, ("original-amp", "dpt_engine-bf16")),
            TrainRun("uvit-l2", 128, ("dpt_engine-bf16",)),
            TrainRun("uvit-h2", 128, ("dpt_engine-bf16",)),
            TrainRun("uvit-h2", 128, ("dpt_engine-bf16-compile",)),
            TrainRun("uvit-l2", 128, ("dpt_engine-bf16-compile",)),
            TrainRun("uvit-h2", 64, ("dpt_engine-bf16-compile",)),
            TrainRun("uvit-l2", 64, ("dpt_engine-bf16-compile",)),
        ),
        train_steps=5,
        train_warmup=1,
        sample_model="uvit-h2",
        sample_batch=64,
        sample_steps=(20, 50),
        sample_repeats=2,
        item_reserve_s=8.0,
        phase_caps={
            "correctness": 60,
            "attention": 40,
            "ema": 30,
            "solver": 50,
            "train": 170,
            "sampling": 110,
        },
        phase_floors={  # enough for each phase's first (most valuable) item on an H200
            "correctness": 30,
            "attention": 15,
            "ema": 15,
            "solver": 15,
            "train": 60,
            "sampling": 60,
        },
    )


# ---------------------------------------------------------------------------- row sink
class Sink:
    """Appends rows to the JSONL file as they come (flushed and synced: a killed run keeps them)
    and tracks the phase's deadline."""

    def __init__(self, path: Path, phase: str, deadline: float, reserve_s: float) -> None:
        self.path = path
        self.phase = phase
        self.deadline = deadline
        self.reserve_s = reserve_s
        self.failures = 0

    def add(self, rows: Sequence[Row | dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                d = r.to_dict() if isinstance(r, Row) else dict(r)
                f.write(json.dumps({"phase": self.phase, **d}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def time_left(self) -> float:
        return self.deadline - time.time()

    def skip(self, benchmark: str, variant: str, reason: str, **config: Any) -> None:
        print(f"[gpu_check] {self.phase}: {variant} skipped: {reason}", flush=True)
        self.add([Row(benchmark, variant, "skipped", 0.0, "-", config={**config, "reason": reason})])

    def item(self, benchmark: str, name: str, fn: Callable[[], Any]) -> None:
        """Run one item unless the phase is nearly out of time; an exception becomes an ``error``
        row (and fails the phase) instead of ending it."""
        if self.time_left() < self.reserve_s:
            self.skip(benchmark, name, f"not run: the {self.phase} phase's time cap was reached")
            return
        t0 = time.perf_counter()
        print(f"[gpu_check] {self.phase}: {name} ...", flush=True)
        try:
            fn()
        except Exception as exc:
            self.failures += 1
            traceback.print_exc()
            msg = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
            self.add([Row(benchmark, name, "error", 0.0, "-", config={"error": msg})])
        finally:  # the next item starts with the memory this one held returned
            gc.collect()
            if torch.cuda.is_available():
                with contextlib.suppress(RuntimeError):
                    torch.cuda.empty_cache()
        print(f"[gpu_check] {self.phase}: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)


# ---------------------------------------------------------------------------- (a) correctness
@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """fp32 means fp32: no TF32 in matmuls (the Triton kernels follow the same switch)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _device_for(backend: str, device: torch.device) -> torch.device:
    return torch.device("cpu") if backend == "cpp" else device


def _interpreter_bf16_reason(backend: str, dtype: torch.dtype) -> str | None:
    from dpt_engine.kernels.dispatch import interpreted

    attn = importlib.import_module("dpt_engine.kernels.attention")
    if backend == "triton" and dtype != torch.float32 and interpreted(attn._attn_fwd_kernel):
        return "TRITON_INTERPRET=1: the interpreter's bf16 tl.dot gives wrong results (checked on a GPU only)"
    return None


def _correctness_row(op: str, backend: str, checks: dict[str, Any], config: dict[str, Any]) -> Row:
    """One row per case: value = the worst check's error, ``config.passed`` = all passed."""
    worst = max(
        checks.values(), key=lambda c: c.error / c.bound if c.bound > 0 else (math.inf if c.error else 0)
    )
    passed = all(c.passed for c in checks.values())
    detail = {k: {"error": c.error, "bound": c.bound, "passed": c.passed} for k, c in checks.items()}
    mark = "ok  " if passed else "FAIL"
    print(f"  {mark} {op}:{backend} {config.get('dtype')} {config.get('case', '')}: worst error "
          f"{worst.error:.3g} (bound {worst.bound:.3g}, {worst.rule})", flush=True)  # fmt: skip
    cfg = {**config, "passed": passed, "rule": worst.rule, "bound": worst.bound, "checks": detail}
    return Row("correctness", f"{op}:{backend}", "max_abs_error", float(worst.error), "abs", config=cfg)


def _attention_checks(
    backend: str, packed: bool, dtype: torch.dtype, shape: tuple[int, int, int, int], device: torch.device
) -> dict[str, Any]:
    """Forward and dq/dk/dv of one backend against ``attention_reference`` in fp64."""
    from dpt_engine.kernels import attention, attention_qkvpacked, attention_reference
    from dpt_engine.kernels import tolerances as tol

    b, h, n, d = shape
    g = torch.Generator().manual_seed(b * 1000 + n + d)
    qkv64 = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64)  # (B, N, 3, H, D)
    do64 = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)  # (B, N, H, D)

    def run(fn: Callable[[torch.Tensor], torch.Tensor], dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = qkv64.to(device=device, dtype=dt, copy=True).requires_grad_()
        out = fn(x)  # (B, N, H, D)
        out.backward(do64.to(device=device, dtype=dt))
        assert x.grad is not None
        return out.detach(), x.grad

    def unpack(fn: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: fn(*x.permute(2, 0, 3, 1, 4).unbind(0)).transpose(1, 2)

    def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Plain PyTorch in the inputs' precision: the low-precision rule's peer."""
        return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * d**-0.5, dim=-1) @ v

    if packed:
        kernel = lambda x: attention_qkvpacked(x, backend=backend)  # noqa: E731
    else:
        kernel = unpack(lambda q, k, v: attention(q, k, v, backend=backend))
    ref_out, ref_grad = run(unpack(attention_reference), torch.float64)
    out, grad = run(kernel, dtype)
    pairs = {
        "out": (out, ref_out),
        **{f"d{c}": (grad[:, :, i], ref_grad[:, :, i]) for i, c in enumerate("qkv")},
    }
    if dtype == torch.float32:
        return {k: tol.check_close(a, e, torch.float32) for k, (a, e) in pairs.items()}
    peer_out, peer_grad = run(unpack(naive), dtype)
    peers = {"out": peer_out, **{f"d{c}": peer_grad[:, :, i] for i, c in enumerate("qkv")}}
    return {k: tol.check_within_factor_of_pytorch(a, peers[k], e) for k, (a, e) in pairs.items()}


def _ema_checks(
    backend: str, dtype: torch.dtype, sizes: Sequence[int], device: torch.device
) -> dict[str, Any]:
    """Three EMA updates (both lerp branches) against ``torch._foreach_lerp_``, bit for bit."""
    from dpt_engine.kernels import ema_update_, ema_update_reference_
    from dpt_engine.kernels import tolerances as tol

    g = torch.Generator().manual_seed(len(sizes))
    ema = [torch.randn(n, generator=g).to(device) for n in sizes]
    params = [
        (e.cpu() + 0.01 * torch.randn(n, generator=g)).to(device=device, dtype=dtype)
        for e, n in zip(ema, sizes)
    ]
    got, ref = [e.clone() for e in ema], [e.clone() for e in ema]
    for decay in (0.9999, 0.999, 0.3):
        ema_update_(got, params, decay, backend=backend)
        ema_update_reference_(ref, params, decay)
    return {"ema": tol.check_bit_exact(torch.cat(got), torch.cat(ref))}


def _solver_checks(
    backend: str,
    dtype: torch.dtype,
    guided: bool,
    order: int,
    shape: Sequence[int],
    steps: int,
    device: torch.device,
) -> dict[str, Any]:
    """A whole fused solve against ``DPMSolverPP.sample`` on the same model outputs, bit for bit."""
    from dpt_engine.diffusion import DiscreteVPSchedule, DPMSolverPP
    from dpt_engine.diffusion.guidance import cfg_combine
    from dpt_engine.kernels import sample_multistep_fused
    from dpt_engine.kernels import tolerances as tol

    batch, scale = shape[0], 0.4
    solver = DPMSolverPP(DiscreteVPSchedule(), steps=steps, order=order)
    gen = torch.Generator().manual_seed(order)
    w = torch.randn(2 * batch, shape[1], *([1] * (len(shape) - 2)), generator=gen).to(device)
    x_T = torch.randn(*shape, generator=gen).to(device)

    def doubled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a deterministic stand-in denoiser
        x2 = torch.cat([x, x])  # (2B, ...)
        return torch.tanh(x2 * w + t.repeat(2).reshape(-1, *([1] * (x.dim() - 1))).float() / 1000.0).to(dtype)

    if guided:
        expected = solver.sample(lambda x, t: cfg_combine(*doubled(x, t).float().chunk(2), scale), x_T)
        got = sample_multistep_fused(solver, doubled, x_T, guidance_scale=scale, backend=backend)
    else:
        expected = solver.sample(lambda x, t: doubled(x, t)[:batch].float(), x_T)
        fn = lambda x, t: doubled(x, t)[:batch].contiguous()  # noqa: E731
        got = sample_multistep_fused(solver, fn, x_T, backend=backend)
    return {"x_0": tol.check_bit_exact(got, expected)}


@dataclass
class _Case:
    op: str  # the dispatch op
    entry: str  # the entry point checked (the row's name)
    backend: str
    dtype: torch.dtype
    label: str
    device: torch.device
    probe: Sequence[torch.Tensor]  # tensors for the backend's availability check
    run: Callable[[], dict[str, Any]]


def _correctness_cases(s: Settings, device: torch.device) -> list[_Case]:
    """Every (entry point, backend, dtype, case) of the three ops, in that order."""
    from dpt_engine.kernels import registered_backends

    cases: list[_Case] = []
    # attention: every backend (the reference one is SDPA: it is held to the fp64 oracle too)
    for shape in s.attn_shapes:
        b, h, n, d = shape
        for dt_name in ("fp32", "bf16"):
            dtype = _DTYPES[dt_name]
            for backend in registered_backends("attention"):
                dev = _device_for(backend, device)
                probe = torch.empty(b, n, 3, h, d, device=dev, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
                for packed in (False, True) if backend == "triton" else (False,):
                    run = functools.partial(_attention_checks, backend, packed, dtype, shape, dev)
                    entry = "attention_qkvpacked" if packed else "attention"
                    label = f"{'x'.join(map(str, shape))} fwd+bwd"
                    cases.append(_Case("attention", entry, backend, dtype, label, dev, probe, run))
    # EMA: every fused backend against foreach_lerp (the reference backend is that oracle itself)
    for dt_name in ("fp32", "bf16"):
        dtype = _DTYPES[dt_name]
        for backend in (b for b in registered_backends("ema") if b != "reference"):
            dev = _device_for(backend, device)
            probe = [torch.empty(3, device=dev), torch.empty(3, device=dev, dtype=dtype)]
            label = f"{len(s.ema_sizes)} tensors, {sum(s.ema_sizes)} params"
            run = functools.partial(_ema_checks, backend, dtype, s.ema_sizes, dev)
            cases.append(_Case("ema", "ema_update_", backend, dtype, label, dev, probe, run))
    # solver step: every backend (the reference one included) against DPMSolverPP.sample
    shape, steps = s.solver_shape, s.solver_steps
    for dt_name in ("fp32", "bf16"):
        dtype = _DTYPES[dt_name]
        for backend in registered_backends("solver_step"):
            dev = _device_for(backend, device)
            for guided in (True, False):
                lead = (2 if guided else 1) * shape[0]
                probe = [
                    torch.empty(*shape, device=dev),
                    torch.empty(lead, *shape[1:], device=dev, dtype=dtype),
                    torch.empty(3, *shape, device=dev),
                    torch.empty(steps, 7, device=dev),
                ]
                for order in (1, 2, 3):
                    label = (
                        f"{'guided' if guided else 'plain'} order {order}, {steps} steps, x {tuple(shape)}"
                    )
                    run = functools.partial(_solver_checks, backend, dtype, guided, order, shape, steps, dev)
                    cases.append(
                        _Case("solver_step", "sample_multistep_fused", backend, dtype, label, dev, probe, run)
                    )
    return cases


def phase_correctness(sink: Sink, s: Settings, device: torch.device, out: Path) -> None:
    from dpt_engine.kernels import available_backends

    def check(c: _Case) -> None:
        config = {"dtype": str(c.dtype).removeprefix("torch."), "case": c.label, "device": str(c.device)}
        reason = available_backends(c.op, c.probe).get(c.backend, f"backend {c.backend!r} not registered")
        if reason is None and c.op == "attention":
            reason = _interpreter_bf16_reason(c.backend, c.dtype)
        if reason is not None:
            sink.skip("correctness", f"{c.entry}:{c.backend}", reason, **config)
            return
        with _no_tf32():
            row = _correctness_row(c.entry, c.backend, c.run(), config)
        sink.add([row])
        if not row.config["passed"]:
            sink.failures += 1

    for c in _correctness_cases(s, device):
        name = f"{c.entry}:{c.backend}:{str(c.dtype).removeprefix('torch.')}:{c.label}"
        sink.item("correctness", name, functools.partial(check, c))


# ---------------------------------------------------------------------------- (b) attention
def phase_attention(sink: Sink, s: Settings, device: torch.device, out: Path) -> None:
    from . import bench_attention

    for d in s.attn_head_dims:
        shape = f"{s.attn_batch},{s.attn_heads},{s.attn_seq},{d}"
        argv = ["--device", str(device), "--dtype", s.attn_dtype, "--shapes", shape,
                "--repeats", str(s.attn_repeats), "--warmup", "1", "--min-time-ms", str(s.attn_min_time_ms),
                "--json", str(out / f"attention_d{d}.json"), "--png", str(out / f"attention_d{d}.png")]  # fmt: skip
        sink.item("attention", shape, functools.partial(lambda a: sink.add(bench_attention.main(a)), argv))


# ---------------------------------------------------------------------------- (c) EMA
def phase_ema(sink: Sink, s: Settings, device: torch.device, out: Path) -> None:
    from dpt_engine.models.uvit import create_uvit

    from .harness import write_rows
    from .run_all import bench_ema_cuda

    with torch.device("meta"):  # only the parameter sizes are needed
        net = create_uvit(s.ema_model, **s.ema_overrides)
    sizes = [p.numel() for p in net.parameters()]
    layout = f"{s.ema_model}{' ' + str(s.ema_overrides) if s.ema_overrides else ''} parameters"

    def run() -> None:
        rows = bench_ema_cuda(False, device, sizes=sizes, layout=layout, repeats=s.ema_repeats)
        write_rows(out / "ema.json", rows)
        sink.add(rows)

    sink.item("ema_cuda", f"{s.ema_model} ({sum(sizes) / 1e6:.0f}M params in {len(sizes)} tensors)", run)


# ---------------------------------------------------------------------------- (d) solver step + loop
class _StandIn(torch.nn.Module):
    """The cheapest network with a denoiser's signature: one elementwise kernel, so a timed
    sampling call is the solver loop itself (noise, copies, guidance, the steps)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return x * 0.5


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _sampling_loop(sink: Sink, s: Settings, device: torch.device, net_name: str, batch: int) -> None:
    """``BatchSampler`` (stage 2's sampler: per-sample noise, doubled-batch guidance, the fused
    table-driven step, no host sync) for each solver-step backend, eager and as a CUDA graph."""
    from dpt_engine.diffusion import DiscreteVPSchedule, DPMSolverPP
    from dpt_engine.kernels import available_backends
    from dpt_engine.kernels.solver_step import solver_step_table
    from dpt_engine.models.uvit import create_uvit
    from dpt_engine.sampling.sampler import BatchSampler

    schedule = DiscreteVPSchedule("linear")
    solver = DPMSolverPP(schedule, steps=s.loop_steps, order=2)
    if net_name == "stand-in":
        net: torch.nn.Module = _StandIn()
        shape, num_classes = tuple(s.step_shapes[0][1:]), 10
    else:
        torch.manual_seed(0)
        net = create_uvit(net_name).to(device).eval()
        shape, num_classes = (net.cfg.in_chans, net.cfg.img_size, net.cfg.img_size), net.cfg.num_classes
    params = sum(p.numel() for p in net.parameters())
    table = solver_step_table(solver, device)
    x = torch.zeros(batch, *shape, device=device)
    probe = (x, torch.cat([x, x]), torch.zeros(2, *x.shape, device=device), table.coef, x)
    avail = available_backends("solver_step", probe)
    backends = ["reference"] + [b for b in ("triton", "cuda", "cpp") if avail.get(b, "") is None]
    config = {"net": net_name, "params": params, "batch": batch, "latent": list(shape), "steps": s.loop_steps,
              "order": 2, "guidance_scale": 0.4, "precision": "bf16" if device.type == "cuda" else "fp32"}  # fmt: skip
    for b in ("triton", "cuda", "cpp"):
        if b in avail and avail[b] is not None:
            sink.skip("sampling_loop", f"{net_name}:{b}", str(avail[b]), **config)
    graphs = [False, True] if device.type == "cuda" else [False]
    if device.type != "cuda":
        sink.skip("sampling_loop", f"{net_name}:*+graph", "CUDA graphs need a CUDA device", **config)
    samplers = {
        f"{net_name}:{b}{'+graph' if g else ''}": BatchSampler(
            net, solver, schedule, shape, num_classes, guidance_scale=0.4, output="latents", device=device,
            precision="auto", cuda_graph=g, backend=b,
        )
        for b in backends
        for g in graphs
    }  # fmt: skip
    classes, indices = torch.arange(batch) % min(num_classes, 10), torch.arange(batch)
    calls = {name: functools.partial(sp, classes, indices) for name, sp in samplers.items()}
    base = f"{net_name}:reference"
    with torch.no_grad():
        # two untimed calls each: a graph sampler runs its first batch eagerly, then captures
        outputs = {name: (fn(), fn())[1] for name, fn in calls.items()}
        rel = {name: _rel_l2(o, outputs[base]) for name, o in outputs.items() if name != base}
        del outputs
        times = measure_alternating(calls, repeats=s.loop_repeats, warmup=1)
    rows = []
    for name, ts in times.items():
        st = summarize(ts)
        cfg = {**config, "backend": samplers[name].backend, "cuda_graph": samplers[name].cuda_graph}
        rows.append(Row("sampling_loop", name, "ms_per_step", 1e3 * st["p50"] / s.loop_steps, "ms",
                        p20=1e3 * st["p20"] / s.loop_steps, p80=1e3 * st["p80"] / s.loop_steps, config=cfg))  # fmt: skip
        rows.append(Row("sampling_loop", name, "throughput", batch / st["p50"], "img/s",
                        p20=batch / st["p80"], p80=batch / st["p20"], config=cfg))  # fmt: skip
        if name != base:
            r = paired_ratio(times[base], ts)
            rows.append(Row("sampling_loop", name, "speedup", r, "x", baseline=base, ratio=r, config=cfg))
            rows.append(
                Row("sampling_loop", name, "rel_diff", rel[name], "rel_l2", baseline=base, config=cfg)
            )
    sink.add(rows)


def phase_solver(sink: Sink, s: Settings, device: torch.device, out: Path) -> None:
    from .harness import write_rows
    from .run_all import bench_solver_step_cuda

    for shape in s.step_shapes:
        tag = "x".join(map(str, shape))

        def step(shape: tuple[int, ...] = shape, tag: str = tag) -> None:
            rows = bench_solver_step_cuda(False, device, shape=shape, repeats=s.step_repeats)
            write_rows(out / f"solver_step_{tag}.json", rows)
            sink.add(rows)

        sink.item("solver_step_cuda", f"step {tag}", step)
    for net_name, batch in s.loop_nets:
        sink.item("sampling_loop", f"loop {net_name} batch {batch}",
                  functools.partial(_sampling_loop, sink, s, device, net_name, batch))  # fmt: skip


# ---------------------------------------------------------------------------- (e) training
@contextlib.contextmanager
def _compile_backend(backend: str | None) -> Iterator[None]:
    """Within the block, ``torch.compile`` defaults to ``backend`` (None: unchanged). The dry run
    uses ``aot_eager``: Dynamo and AOTAutograd trace the step as on a GPU, without Inductor."""
    if backend is None:
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = original  # type: ignore[assignment]


def phase_train(sink: Sink, s: Settings, device: torch.device, out: Path) -> None:
    from . import bench_train

    for run in s.train_runs:
        compiled = any(v.endswith("compile") for v in run.variants)
        tag = f"{run.model}_b{run.batch}{'_compile' if compiled else ''}"
        argv = ["--model", run.model, "--batch", str(run.batch), "--steps", str(s.train_steps),
                "--warmup", str(s.train_warmup), "--device", str(device), "--variants", *run.variants,
                "--json", str(out / f"train_{tag}.json"), "--png", str(out / f"train_{tag}.png")]  # fmt: skip

        def go(argv: list[str] = argv, compiled: bool = compiled) -> None:
            if compiled:
                torch._dynamo.reset()  # a fresh compile per shape (no automatic-dynamic recompile)
            with _compile_backend("aot_eager" if compiled and s.dry_run else None):
                sink.add(bench_train.main(argv))

        sink.item("train", tag, go)


# ---------------------------------------------------------------------------- (f) sampling
def phase_sampling(sink: Sink, s: Settings, device: torch.device, out: Path) -> None:
    from . import bench_sampler

    for steps in s.sample_steps:
        argv = ["--model", s.sample_model, "--batch", str(s.sample_batch), "--steps", str(steps),
                "--repeats", str(s.sample_repeats), "--precision", "bf16", "--device", str(device),
                "--variants", "dpt_engine-fused", "naive-original", "network-forward",
                "--json", str(out / f"sampler_{steps}steps.json"), "--png", str(out / f"sampler_{steps}steps.png")]  # fmt: skip
        sink.item("sampler", f"{s.sample_model} {steps} steps",
                  functools.partial(lambda a: sink.add(bench_sampler.main(a)), argv))  # fmt: skip


# ---------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class Phase:
    letter: str
    name: str
    title: str
    run: Callable[..., None]


PHASES = (
    Phase("a", "correctness", "every kernel against its PyTorch reference (fp32, bf16)", phase_correctness),
    Phase("b", "attention", "attention fwd / fwd+bwd TFLOP/s vs SDPA backends", phase_attention),
    Phase("c", "ema", "EMA GB/s at U-ViT-H/2's parameters vs foreach_lerp", phase_ema),
    Phase("d", "solver", "fused solver step; sampling loop with / without CUDA graphs", phase_solver),
    Phase("e", "train", "training img/s, MFU, memory: U-ViT-L/2, H/2, batch 64/128, +compile", phase_train),
    Phase("f", "sampling", "U-ViT-H/2 guided sampling, 20 / 50 steps, vs two forwards", phase_sampling),
)
_BY_NAME = {p.name: p for p in PHASES}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every phase on the CPU, tiny shapes, interpreter")
    p.add_argument("--device", default=None, help="cuda (default when a GPU is visible) or cpu")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default <results>/gpu_check_<device>)"
    )
    p.add_argument(
        "--budget", type=float, default=None, help="seconds for all phases (default: sum of the caps)"
    )
    p.add_argument(
        "--phases",
        nargs="+",
        default=None,
        choices=[x for p in PHASES for x in (p.letter, p.name)],
        help="run only these (letters or names), still in the order of value",
    )
    p.add_argument("--check-imports", action="store_true", help="import what the check needs, then exit")
    p.add_argument("--json", type=Path, default=None, help="with --check-imports: write the result here")
    p.add_argument("--child", choices=[p.name for p in PHASES], default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def _versions(device: torch.device) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "numpy": version("numpy"),
        "timm": version("timm"),
        "diffusers": version("diffusers"),
        "xformers": version("xformers"),
        "device": device_name(device),
        "commit": commit_hash(),
    }


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                rows.append(json.loads(line))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


_HEADLINE = ("tflops", "bandwidth", "throughput", "mfu", "peak_memory", "ms_per_step", "speedup", "rel_diff",
             "solver_loop_ms_per_step", "step_time")  # fmt: skip
_SETTING_KEYS = ("shape", "mode", "params", "layout", "net", "model", "batch", "steps", "order")


def summary_markdown(meta: dict[str, Any], statuses: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """The report: header, phase table, correctness table, headline figures, skips and errors."""
    v = meta["versions"]
    title = f"# GPU check on {v['device']}" + (" (dry run on the CPU)" if meta["dry_run"] else "")
    lines = [
        title,
        "",
        f"- {meta['date']}, commit `{v['commit']}`, python {v['python']}, torch {v['torch']} (CUDA "
        f"{v['cuda']}), triton {v['triton']}, numpy {v['numpy']}, diffusers {v['diffusers'] or 'absent'}, "
        f"xformers {v['xformers'] or 'absent'}",
        f"- {meta['elapsed']:.0f} s of a {meta['budget']:.0f} s budget; rows in `rows.jsonl` (written as "
        "measured), all of them in `gpu_check.json`",
        "- timings are medians of interleaved repeats in one process (`benchmarks/harness.py`); compare "
        "only figures from the same run",
        "",
        "| | phase | what | status | seconds | cap | rows | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    counts = {p.name: sum(1 for r in rows if r.get("phase") == p.name) for p in PHASES}
    done = {st["name"]: st for st in statuses}
    for p in PHASES:
        st = done.get(p.name)
        if st is None:
            if p.name in meta["selected"]:
                lines.append(
                    f"| {p.letter} | {p.name} | {p.title} | not run yet |  |  |  | the run stopped before it |"
                )
            continue
        lines.append(f"| {p.letter} | {p.name} | {p.title} | {st['status']} | {st['seconds']:.0f} | "
                     f"{st['cap']:.0f} | {counts[p.name]} | {_fmt(st['note'])} |")  # fmt: skip
    corr = [r for r in rows if r.get("benchmark") == "correctness"]
    if corr:
        checked = [r for r in corr if r["metric"] == "max_abs_error"]
        n_pass = sum(1 for r in checked if r["config"]["passed"])
        n_skip = sum(1 for r in corr if r["metric"] == "skipped")
        lines += ["", f"## (a) Correctness: {n_pass} passed, {len(checked) - n_pass} failed, {n_skip} skipped", "",
                  "| entry:backend | dtype | case | result | worst error | bound | rule |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in corr:
            c = r["config"]
            if r["metric"] == "max_abs_error":
                result = "pass" if c["passed"] else "**FAIL**"
                lines.append(f"| {r['variant']} | {c.get('dtype')} | {c.get('case')} | {result} | "
                             f"{_fmt(r['value'])} | {_fmt(c.get('bound'))} | {_fmt(c.get('rule'))} |")  # fmt: skip
            elif r["metric"] == "skipped":
                lines.append(f"| {r['variant']} | {c.get('dtype')} | {c.get('case')} | skipped |  |  | "
                             f"{_fmt(c.get('reason'))} |")  # fmt: skip
    head = [r for r in rows if r.get("metric") in _HEADLINE and r.get("benchmark") != "correctness"]
    if head:
        lines += ["", "## Results (headline metrics; every row is in gpu_check.json)", "",
                  "| phase | benchmark | variant | metric | value | unit | baseline | setting |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in head:
            c = r.get("config") or {}
            setting = ", ".join(f"{k}={_fmt(c[k])}" for k in _SETTING_KEYS if k in c)
            lines.append(f"| {r['phase']} | {r['benchmark']} | {r['variant']} | {r['metric']} | {_fmt(r['value'])} | "
                         f"{r['unit']} | {_fmt(r.get('baseline'))} | {setting} |")  # fmt: skip
    other = [
        r for r in rows if r.get("metric") in ("skipped", "error") and r.get("benchmark") != "correctness"
    ]
    if other:
        lines += ["", "## Not measured", ""]
        seen: set[tuple[str, str]] = set()
        for r in other:
            c = r.get("config") or {}
            why = c.get("reason") or c.get("error")
            key = (r["variant"], str(why))
            if key not in seen:
                seen.add(key)
                lines.append(
                    f"- {r['phase']} / {r['benchmark']} / `{r['variant']}` {r['metric']}: {_fmt(why)}"
                )
    return "\n".join(lines) + "\n"


def phase_cap(s: Settings, names: Sequence[str], i: int, left: float) -> float:
    """Seconds for phase ``names[i]`` with ``left`` seconds of the budget left: its cap, shrunk so
    that every later phase keeps its floor, but never below its own floor (nor above ``left``)."""
    later = sum(s.phase_floors[n] for n in names[i + 1 :])
    own = s.phase_floors[names[i]]
    return min(s.phase_caps[names[i]], left, max(left - later, own))


def _child(args: argparse.Namespace, s: Settings, device: torch.device, out: Path) -> int:
    if s.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("the dry run's phases need TRITON_INTERPRET=1 set before dpt_engine is imported")
    phase = _BY_NAME[args.child]
    deadline = args.deadline if args.deadline is not None else time.time() + s.phase_caps[phase.name]
    sink = Sink(out / "rows.jsonl", phase.name, deadline, s.item_reserve_s)
    phase.run(sink, s, device, out)
    return 1 if sink.failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    from .bench_attention import device_slug
    from .bench_cli import results_root

    args = build_parser().parse_args(argv)
    if args.check_imports:
        result = check_imports()
        print(json.dumps(result, indent=2))
        if args.json:
            atomic_write_json(args.json, result)
        return 0 if result["ok"] else 1
    s = settings_for(args.dry_run)
    device = torch.device(
        "cpu" if args.dry_run else args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA GPU")
    slug = "cpu-dry-run" if args.dry_run else device_slug(device)
    out = args.out or results_root() / f"gpu_check_{slug}"
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return _child(args, s, device, out)

    wanted = set(args.phases or [p.name for p in PHASES])
    selected = [p for p in PHASES if p.name in wanted or p.letter in wanted]
    budget = args.budget if args.budget is not None else sum(s.phase_caps[p.name] for p in selected)
    rows_path = out / "rows.jsonl"
    rows_path.write_text("", encoding="utf-8")  # a fresh run
    t_start = time.time()
    meta = {"versions": _versions(device), "dry_run": args.dry_run, "budget": budget, "slug": slug,
            "selected": [p.name for p in selected], "elapsed": 0.0,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    env_row = Row(
        "gpu_check",
        "environment",
        "info",
        0.0,
        "-",
        config=dict(meta["versions"]),
        device=device_name(device),
    )
    with open(rows_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"phase": "env", **env_row.to_dict()}) + "\n")
    statuses: list[dict[str, Any]] = []
    current: dict[str, subprocess.Popen] = {}

    def save() -> None:
        meta["elapsed"] = time.time() - t_start
        rows = _read_rows(rows_path)
        atomic_write_json(out / "gpu_check.json", {"meta": meta, "phases": statuses, "rows": rows})
        atomic_write_text(out / "gpu_check.md", summary_markdown(meta, statuses, rows))

    def on_term(signum: int, _frame: Any) -> None:  # the shell's timeout: stop the phase, keep the report
        for proc in current.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        save()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    env = dict(os.environ)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    save()
    for i, phase in enumerate(selected):
        left = budget - (time.time() - t_start)
        cap = phase_cap(s, [p.name for p in selected], i, left)
        note = ""
        if cap < max(5.0, 2 * s.item_reserve_s):
            status, rc, seconds, note = "skipped", None, 0.0, f"budget exhausted ({left:.0f} s left)"
        else:
            print(
                f"\n==== gpu_check ({phase.letter}) {phase.name}: {phase.title} (cap {cap:.0f} s)", flush=True
            )
            cmd = [sys.executable, "-m", f"{__package__}.gpu_check", "--child", phase.name, "--out", str(out),
                   "--device", str(device), "--deadline", f"{time.time() + cap - 3:.3f}"]  # fmt: skip
            if args.dry_run:
                cmd.append("--dry-run")
            t0 = time.time()
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            current[phase.name] = proc
            try:
                rc = proc.wait(timeout=cap)
                status = "ok" if rc == 0 else "failed"
                if rc == 1:
                    note = "a check failed or an item raised (see its rows)"
                elif rc != 0:
                    note = f"exit status {rc}"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc, status, note = None, "timed out", f"killed at its {cap:.0f} s cap; finished items kept"
            finally:
                current.pop(phase.name, None)
            seconds = time.time() - t0
        st = {"letter": phase.letter, "name": phase.name, "status": status, "rc": rc, "seconds": seconds,
              "cap": cap, "note": note}  # fmt: skip
        statuses.append(st)
        row = Row("gpu_check", phase.name, "phase_seconds", float(seconds), "s", config=dict(st))
        with open(rows_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"phase": phase.name, **row.to_dict()}) + "\n")
        save()
        print(f"[gpu_check] ({phase.letter}) {phase.name}: {status} in {seconds:.0f} s {note}", flush=True)
    print(f"\n[gpu_check] wrote {out / 'gpu_check.md'}, {out / 'gpu_check.json'} and {rows_path}")
    return 0 if all(st["status"] == "ok" for st in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
