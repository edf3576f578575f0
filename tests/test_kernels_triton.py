"""Every Triton kernel against its reference: on CPU through the Triton interpreter, on a GPU
compiled (``gpu`` marker).

How the interpreter tests run: ``triton.jit`` decides between a compiled and an interpreted
kernel when it *decorates* the function, i.e. when ``dpt_engine.kernels`` is first imported,
and any earlier test module in the same pytest process (U-ViT, the trainers) imports it with
``TRITON_INTERPRET`` unset. Setting the variable at the top of this module is therefore not
enough. Instead each ``test_interpreted[group]`` starts a fresh ``python -m pytest`` on this
same file with ``TRITON_INTERPRET=1`` set before anything is imported, and that inner run
collects only the ``interp_*`` functions (``-o python_functions=interp_*``), which the outer
run never collects. One subprocess per op group keeps failures readable and costs ~4 s of
start-up each. A failing inner test fails the outer one with the inner report attached.

Interpreter limits (see /work/shared/ENVIRONMENT.md): bf16 ``tl.dot`` is wrong there, so bf16
attention is tested only on a GPU; fp32 and fp16 run here.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tolerances import (
    TOLERANCES,
    assert_bit_exact,
    assert_close,
    assert_within_factor_of_pytorch,
)

from dpt_engine.diffusion import DiscreteVPSchedule, DPMSolverPP
from dpt_engine.diffusion.guidance import cfg_combine
from dpt_engine.kernels import (
    attention,
    attention_qkvpacked,
    attention_reference,
    ema_update_,
    ema_update_reference_,
    sample_multistep_fused,
    solver_step_table,
)

step_mod = importlib.import_module("dpt_engine.kernels.solver_step")

INNER = os.environ.get("DPT_TRITON_INTERPRET_INNER") == "1"
if INNER and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("the inner interpreter run needs TRITON_INTERPRET=1 in its environment")

ROOT = Path(__file__).resolve().parents[1]
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)"
)


# ============================================================================ outer (CPU CI)
@pytest.mark.parametrize("group", ["attention", "ema", "solver"])
def test_interpreted(group: str) -> None:
    """Run this file's ``interp_<group>_*`` tests under ``TRITON_INTERPRET=1`` in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "DPT_KERNELS"}
    env.update(
        TRITON_INTERPRET="1", DPT_TRITON_INTERPRET_INNER="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1")
    )
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_functions=interp_*",
        "--durations=3", str(Path(__file__).resolve()), "-k", group,
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = f"inner run ({time.perf_counter() - t0:.1f} s):\n{res.stdout[-12000:]}\n{res.stderr[-4000:]}"
    assert res.returncode == 0, report
    assert " passed" in res.stdout, report
    print(report)


# ============================================================================ helpers
def _attn_case(b, h, n, d, dtype, seed=0, n_kv=None):
    g = torch.Generator().manual_seed(seed)
    n_kv = n if n_kv is None else n_kv
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, n_kv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, n_kv, d, generator=g, dtype=torch.float64)
    do = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    return q, k, v, do


def _grads(fn, tensors, do, dtype, device="cpu"):
    """Run ``fn`` on copies of ``tensors`` in ``dtype``; returns (out, [grads])."""
    xs = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    out = fn(*xs)
    out.backward(do.to(device=device, dtype=dtype))
    return out.detach(), [x.grad for x in xs]


def _naive_lowp(q, k, v, scale=None):
    """Plain PyTorch attention in the inputs' (low) precision: the 2x rule's peer."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1) @ v


def _triton_attention(q, k, v, scale=None):
    return attention(q, k, v, scale, backend="triton")


# ============================================================================ attention (interpreter)
ATTN_SHAPES = [  # (B, H, N, D): block remainders, head dims 32/64/72 (72 pads to 128)
    (2, 2, 1, 32),
    (2, 2, 17, 72),
    (1, 2, 64, 64),
    (2, 1, 130, 32),
    (1, 2, 130, 72),
    (1, 2, 258, 64),
    (1, 1, 258, 72),
]


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def interp_attention_fp32_forward_backward(shape) -> None:
    q, k, v, do = _attn_case(*shape, dtype=torch.float64)
    out, grads = _grads(_triton_attention, (q, k, v), do, torch.float32)
    ref, ref_grads = _grads(attention_reference, (q, k, v), do, torch.float64)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_close(out, ref, msg="forward")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.shape == rg.shape
        assert_close(g, rg, torch.float32, msg=f"d{name}")


def interp_attention_fp16_within_2x_of_pytorch() -> None:
    q, k, v, do = _attn_case(1, 2, 130, 72, dtype=torch.float64, seed=1)
    out, grads = _grads(_triton_attention, (q, k, v), do, torch.float16)
    peer, peer_grads = _grads(_naive_lowp, (q, k, v), do, torch.float16)
    ref, ref_grads = _grads(attention_reference, (q, k, v), do, torch.float64)
    assert out.dtype == torch.float16
    assert_within_factor_of_pytorch(out, peer, ref, msg="fp16 forward")
    for name, g, pg, rg in zip("qkv", grads, peer_grads, ref_grads):
        assert_within_factor_of_pytorch(g, pg, rg, msg=f"fp16 d{name}")


def interp_attention_strided_views_and_packed_qkv() -> None:
    """q/k/v read in place from the packed (B, N, 3, H, D) projection; both entry points."""
    b, n, h, d = 2, 40, 3, 72
    g = torch.Generator().manual_seed(2)
    qkv64 = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64)
    do64 = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)  # (B, N, H, D)

    ref_in = qkv64.clone().requires_grad_()
    ref = attention_reference(*ref_in.permute(2, 0, 3, 1, 4).unbind(0)).transpose(1, 2)  # (B, N, H, D)
    ref.backward(do64)

    # strided views through `attention`
    qkv = qkv64.float().requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D), non-contiguous
    assert not q.is_contiguous()
    out = attention(q, k, v, backend="triton")  # (B, H, N, D), stored (B, N, H, D)
    assert out.transpose(1, 2).is_contiguous()
    out.transpose(1, 2).backward(do64.float())
    assert_close(out.transpose(1, 2), ref, torch.float32, msg="views forward")
    assert_close(qkv.grad, ref_in.grad, torch.float32, msg="views dqkv")

    # packed entry point: output (B, N, H, D) and gradient (B, N, 3, H, D) with no copies
    qkv2 = qkv64.float().requires_grad_()
    out2 = attention_qkvpacked(qkv2, backend="triton")
    assert out2.shape == (b, n, h, d) and out2.is_contiguous()
    out2.backward(do64.float())
    assert_close(out2, ref, torch.float32, msg="packed forward")
    assert_close(qkv2.grad, ref_in.grad, torch.float32, msg="packed dqkv")
    # the reference backend gives the same through the packed entry point
    assert_close(
        attention_qkvpacked(qkv64.float(), backend="reference"), ref, torch.float32, msg="packed ref"
    )


def interp_attention_cross_lengths_and_scale() -> None:
    q, k, v, do = _attn_case(1, 2, 17, 64, dtype=torch.float64, seed=3, n_kv=130)
    out, grads = _grads(lambda a, b, c: _triton_attention(a, b, c, 0.3), (q, k, v), do, torch.float32)
    ref, ref_grads = _grads(lambda a, b, c: attention_reference(a, b, c, 0.3), (q, k, v), do, torch.float64)
    assert_close(out, ref, msg="forward")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, torch.float32, msg=f"d{name}")


def interp_attention_matches_sdpa_backend() -> None:
    """The triton and reference (SDPA) backends agree; auto on CPU keeps SDPA."""
    q, k, v, _ = _attn_case(2, 2, 33, 72, dtype=torch.float64, seed=4)
    q, k, v = q.float(), k.float(), v.float()
    sdpa = attention(q, k, v, backend="reference")
    torch.testing.assert_close(attention(q, k, v), sdpa, atol=0, rtol=0)  # auto -> reference on CPU
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(attention(q, k, v, backend="triton"), sdpa, atol=tol.atol, rtol=tol.rtol)


def interp_attention_custom_ops_opcheck_and_compile() -> None:
    """The torch.library ops: schema, fake (meta) impls, autograd registration; torch.compile
    keeps them as single graph nodes."""
    attn_mod = importlib.import_module("dpt_engine.kernels.attention")
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 17, 72, generator=g, requires_grad=True) for _ in range(3))
    qkv = torch.randn(1, 17, 3, 2, 72, generator=g, requires_grad=True)
    for op, args in (
        (attn_mod._flash_attn_fwd, (q, k, v, 0.1)),
        (attn_mod._flash_attn_packed_fwd, (qkv, 0.1)),
    ):
        result = torch.library.opcheck(op, args)
        assert all(r == "SUCCESS" for r in result.values()), result
    compiled = torch.compile(
        lambda a, b, c: attention(a, b, c, backend="triton").square().sum(), backend="aot_eager"
    )
    compiled(q, k, v).backward()
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention_reference(*ref_in).square().sum().backward()
    for name, t, r in zip("qkv", (q, k, v), ref_in):
        assert_close(t.grad, r.grad, torch.float32, msg=f"compiled d{name}")


# ============================================================================ EMA (interpreter)
def _ema_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(1000,), (7,), (3, 100), (1,), (0,), (257,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.bfloat16]
    ema = [torch.randn(s, generator=g) for s in sizes]
    params = [torch.randn(s, generator=g).to(dt) for s, dt in zip(sizes, dtypes)]
    return ema, params


@pytest.mark.parametrize("decay", [0.9999, 0.999, 0.9, 0.6, 0.5, 0.3, 1 / 11, 0.0])
def interp_ema_bit_exact(decay: float) -> None:
    """Every lerp branch (w < 0.5 and w >= 0.5), chunks spanning tensors, bf16/fp16 params."""
    ema, params = _ema_case()
    ref = [e.clone() for e in ema]
    ema_tr = importlib.import_module("dpt_engine.kernels.ema_triton")
    for _ in range(3):  # repeated calls reuse the cached chunk table
        ema_tr.ema_update_triton_(ema, params, decay)
        ema_update_reference_(ref, params, decay)
    for i, (e, r) in enumerate(zip(ema, ref)):
        assert_bit_exact(e, r, msg=f"tensor {i} (decay {decay})")


def interp_ema_dispatch_and_params_untouched() -> None:
    ema, params = _ema_case(seed=1)
    before = [p.clone() for p in params]
    ref = [e.clone() for e in ema]
    ema_update_(ema, params, 0.99, backend="triton")
    ema_update_(ref, params, 0.99, backend="reference")
    for e, r, p, p0 in zip(ema, ref, params, before):
        assert_bit_exact(e, r, msg="ema")
        assert_bit_exact(p, p0, msg="params must not change")
    # auto on CPU never picks triton (cpp if registered, else the reference)
    ema_update_(ema, params, 0.99)


def interp_ema_chunk_table_layout() -> None:
    ema_tr = importlib.import_module("dpt_engine.kernels.ema_triton")
    ema, params = (
        [torch.zeros(600), torch.zeros(10)],
        [torch.zeros(600), torch.zeros(10, dtype=torch.bfloat16)],
    )
    table = ema_tr.ema_chunk_table(ema, params, 256)
    assert table.shape == (4, 3)
    assert table[:, 2].tolist() == [256, 256, 88, 10]
    assert table[1, 0].item() == ema[0].data_ptr() + 4 * 256
    assert table[3, 1].item() == params[1].data_ptr()
    assert ema_tr.ema_chunk_table(ema, params, 256) is table  # cached


def interp_ema_custom_op_opcheck() -> None:
    """``dpt_triton::ema_update_``: schema (it mutates the EMA tensors only), fake impl, AOT
    dispatch with dynamic shapes; the op's results are the reference's bit for bit."""
    ema_tr = importlib.import_module("dpt_engine.kernels.ema_triton")
    ema, params = _ema_case(seed=2)
    result = torch.library.opcheck(ema_tr._ema_update_op, ([e.clone() for e in ema], params, 0.99))
    assert all(r == "SUCCESS" for r in result.values()), result
    ref = [e.clone() for e in ema]
    torch.ops.dpt_triton.ema_update_(ema, params, 0.99)
    ema_update_reference_(ref, params, 0.99)
    for i, (e, r) in enumerate(zip(ema, ref)):
        assert_bit_exact(e, r, msg=f"tensor {i}")


# ============================================================================ solver step (interpreter)
def _toy_model(batch: int, seed: int = 0):
    """A deterministic stand-in for the denoiser: the doubled-batch eps (2B, C, H, W)."""
    w = torch.randn(2 * batch, 3, 1, 1, generator=torch.Generator().manual_seed(seed))

    def doubled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x2 = torch.cat([x, x])  # (2B, C, H, W)
        return torch.tanh(x2 * w + t.repeat(2)[:, None, None, None].float() / 1000.0)

    return doubled


SOLVER_CASES = [  # (order, steps, extra kwargs)
    (1, 6, {}),
    (2, 6, {}),
    (2, 12, {"solver_type": "taylor"}),
    (3, 7, {}),
    (3, 12, {"third_order": "exact", "skip_type": "logSNR"}),
]


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("case", SOLVER_CASES, ids=lambda c: f"order{c[0]}-steps{c[1]}")
def interp_solver_full_solve_bit_exact(case, guided: bool) -> None:
    """The fused step reproduces DPMSolverPP.sample over a whole solve, bit for bit."""
    order, steps, kwargs = case
    batch, scale = 2, 0.4
    solver = DPMSolverPP(DiscreteVPSchedule(), steps=steps, order=order, **kwargs)
    doubled = _toy_model(batch)
    x_T = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    if guided:
        expected = solver.sample(lambda x, t: cfg_combine(*doubled(x, t).chunk(2), scale), x_T)
        fn, gs = doubled, scale
    else:
        expected = solver.sample(lambda x, t: doubled(x, t)[:batch], x_T)
        fn, gs = (lambda x, t: doubled(x, t)[:batch].contiguous()), None
    x_T0 = x_T.clone()
    for backend in ("triton", "reference"):
        got = sample_multistep_fused(solver, fn, x_T, guidance_scale=gs, backend=backend)
        assert_bit_exact(got, expected, msg=f"{backend} backend")
    assert_bit_exact(x_T, x_T0, msg="x_T must not change")


def interp_solver_device_step_index_and_ring_slots() -> None:
    """A device step tensor (CUDA-graph style) and a history with more slots than the order."""
    batch = 2
    solver = DPMSolverPP(DiscreteVPSchedule(), steps=8, order=3)
    table = solver_step_table(solver, "cpu")
    doubled = _toy_model(batch, seed=1)
    x0 = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    hist_a = torch.zeros(3, *x0.shape)
    hist_b = torch.zeros(5, *x0.shape)
    xa, xb = x0.clone(), x0.clone()
    step = torch.zeros(1, dtype=torch.int32)
    for i in range(table.steps):
        t = torch.full((batch,), table.times[i])
        xa = step_mod.solver_step(
            xa, doubled(xa, t), hist_a, table, i, guidance_scale=1.5, backend="reference"
        )
        step_mod.solver_step(
            xb, doubled(xb, t), hist_b, table, step, guidance_scale=1.5, out=xb, backend="triton"
        )
        step.add_(1)  # the replay-side increment
        assert_bit_exact(xb, xa, msg=f"step {i}")


def interp_solver_low_precision_model_output() -> None:
    """fp16/bf16 model outputs are upcast on load, as the reference does."""
    batch = 2
    solver = DPMSolverPP(DiscreteVPSchedule(), steps=5, order=2)
    table = solver_step_table(solver, "cpu")
    x = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    for dtype in (torch.float16, torch.bfloat16):
        eps = torch.randn(2 * batch, 3, 4, 4, generator=torch.Generator().manual_seed(8)).to(dtype)
        ha, hb = torch.zeros(2, *x.shape), torch.zeros(2, *x.shape)
        for i in range(2):
            a = step_mod.solver_step(x, eps, ha, table, i, guidance_scale=0.4, backend="reference")
            b = step_mod.solver_step(x, eps, hb, table, i, guidance_scale=0.4, backend="triton")
            assert_bit_exact(b, a, msg=f"{dtype} step {i}")
            assert_bit_exact(hb, ha, msg=f"{dtype} history {i}")


def interp_solver_validation() -> None:
    solver = DPMSolverPP(DiscreteVPSchedule(), steps=12, order=3)
    table = solver_step_table(solver, "cpu")
    assert table.max_order == 3
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="doubled batch"):
        step_mod.solver_step(x, torch.zeros(2, 3), torch.zeros(3, 2, 3), table, 0, guidance_scale=1.0)
    with pytest.raises(ValueError, match="slots"):
        step_mod.solver_step(x, torch.zeros(2, 3), torch.zeros(2, 2, 3), table, 0, backend="triton")
    with pytest.raises(IndexError, match="outside"):
        step_mod.solver_step(x, torch.zeros(2, 3), torch.zeros(3, 2, 3), table, 12, backend="triton")
    with pytest.raises(IndexError, match="outside"):
        step_mod.solver_step(x, torch.zeros(2, 3), torch.zeros(3, 2, 3), table, -1, backend="reference")
    with pytest.raises(ValueError, match="multistep"):
        solver_step_table(DPMSolverPP(DiscreteVPSchedule(), steps=4, order=2, method="singlestep"), "cpu")


@pytest.mark.parametrize("guidance_scale", [None, 0.4], ids=["plain", "guided"])
def interp_solver_custom_op_opcheck(guidance_scale) -> None:
    """``dpt_triton::dpm_solver_step_``: schema (it mutates history and out only), fake impl,
    AOT dispatch with dynamic shapes."""
    table = solver_step_table(DPMSolverPP(DiscreteVPSchedule(), steps=6, order=3), "cpu")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 4, generator=g)
    eps = torch.randn(2 if guidance_scale is None else 4, 3, 4, 4, generator=g)  # (B | 2B, C, H, W)
    hist = torch.randn(3, *x.shape, generator=g)  # (S, B, C, H, W)
    args = (x, eps, hist, table.coef, table.step_index[2:], guidance_scale, torch.empty_like(x))
    result = torch.library.opcheck(step_mod._solver_step_op, args)
    assert all(r == "SUCCESS" for r in result.values()), result


def interp_solver_compile_fullgraph_traces_both_triton_ops() -> None:
    """A step that calls the EMA and solver-step dispatch points with ``backend="triton"``
    compiles with ``fullgraph=True`` (no graph break at the Triton launches), the two custom ops
    are nodes of the one graph, and the compiled step reproduces the eager reference bit for bit
    (outputs and the mutated EMA and history) over several steps without recompiling."""
    from torch._dynamo.testing import CompileCounterWithBackend

    table = solver_step_table(DPMSolverPP(DiscreteVPSchedule(), steps=5, order=2), "cpu")

    def step_fn(ema, params, x, eps, hist, step):
        ema_update_(ema, params, 0.99, backend="triton")
        return step_mod.solver_step(x, eps, hist, table, step, guidance_scale=0.4, backend="triton") * 2.0

    def reference_step(ema, params, x, eps, hist, i):
        ema_update_reference_(ema, params, 0.99)
        return step_mod.solver_step_reference(x, eps, hist, table, i, guidance_scale=0.4) * 2.0

    ema, params = _ema_case(seed=3)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 4, 4, generator=g)
    hist = torch.zeros(2, *x.shape)  # (S, B, C, H, W)
    ref_ema, ref_x, ref_hist = [e.clone() for e in ema], x.clone(), hist.clone()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step_fn, backend=counter, fullgraph=True)
    step = torch.zeros(1, dtype=torch.int64)
    for i in range(3):
        eps = torch.randn(4, *x.shape[1:], generator=g)  # (2B, C, H, W) = [cond; uncond]
        x = compiled(ema, params, x, eps, hist, step)
        ref_x = reference_step(ref_ema, params, ref_x, eps, ref_hist, i)
        step.add_(1)
        assert_bit_exact(x, ref_x, msg=f"x after step {i}")
        assert_bit_exact(hist, ref_hist, msg=f"history after step {i}")
        for j, (e, r) in enumerate(zip(ema, ref_ema)):
            assert_bit_exact(e, r, msg=f"EMA tensor {j} after step {i}")
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    targets = {str(n.target) for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"}
    for op in ("dpt_triton.ema_update_.default", "dpt_triton.dpm_solver_step_.default"):
        assert op in targets, f"{op} is not a node of the compiled graph: {sorted(targets)}"


# ============================================================================ GPU (compiled kernels)
def _cuda_time(fn, iters: int = 20) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` CUDA-event-timed runs (after warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 72])
def test_gpu_attention_low_precision_2x_rule(dtype: torch.dtype, head_dim: int) -> None:
    q, k, v, do = _attn_case(4, 16, 258, head_dim, dtype=torch.float64, seed=9)
    out, grads = _grads(_triton_attention, (q, k, v), do, dtype, "cuda")
    peer, peer_grads = _grads(_naive_lowp, (q, k, v), do, dtype, "cuda")
    ref, ref_grads = _grads(attention_reference, (q, k, v), do, torch.float64, "cuda")
    assert_within_factor_of_pytorch(out, peer, ref, msg=f"{dtype} forward")
    for name, g, pg, rg in zip("qkv", grads, peer_grads, ref_grads):
        assert_within_factor_of_pytorch(g, pg, rg, msg=f"{dtype} d{name}")


@pytest.mark.gpu
@requires_cuda
def test_gpu_attention_fp32_and_packed() -> None:
    q, k, v, do = _attn_case(2, 16, 258, 72, dtype=torch.float64, seed=10)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out, grads = _grads(_triton_attention, (q, k, v), do, torch.float32, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    ref, ref_grads = _grads(attention_reference, (q, k, v), do, torch.float64, "cuda")
    assert_close(out, ref, msg="forward")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, torch.float32, msg=f"d{name}")
    qkv = torch.randn(2, 258, 3, 16, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    o = attention_qkvpacked(qkv, backend="triton")
    o.float().sum().backward()
    assert o.shape == (2, 258, 16, 72) and qkv.grad.shape == qkv.shape


@pytest.mark.gpu
@requires_cuda
def test_gpu_attention_speed_vs_sdpa() -> None:
    """U-ViT-H shape, bf16 forward + backward; printed, with a loose sanity bound."""
    q, k, v = (
        torch.randn(32, 16, 258, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    do = torch.randn_like(q)

    def run(backend):
        return lambda: torch.autograd.grad(attention(q, k, v, backend=backend), (q, k, v), do)

    t_tr, t_ref = _cuda_time(run("triton")), _cuda_time(run("reference"))
    flops = 4 * 32 * 16 * 258 * 258 * 72 * 3.5  # fwd (2 matmuls) + bwd (5 matmuls)
    print(f"attention fwd+bwd: triton {t_tr:.3f} ms ({flops / t_tr / 1e9:.0f} TFLOP/s), SDPA {t_ref:.3f} ms")
    assert t_tr < 4 * t_ref


@pytest.mark.gpu
@requires_cuda
def test_gpu_ema_bit_exact_and_speed() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [1152 * 3456, 1152, 1152 * 1152, 4608 * 1152, 7, 1] * 20
    ema = [torch.randn(s, device="cuda", generator=g) for s in sizes]
    params = [torch.randn(s, device="cuda", generator=g).to(torch.bfloat16 if i % 3 else torch.float32)
              for i, s in enumerate(sizes)]  # fmt: skip
    ref = [e.clone() for e in ema]
    ema_update_(ema, params, 0.9999, backend="triton")
    ema_update_reference_(ref, params, 0.9999)
    for e, r in zip(ema, ref):
        assert_bit_exact(e, r, msg="cuda ema")
    t_tr = _cuda_time(lambda: ema_update_(ema, params, 0.9999, backend="triton"))
    t_ref = _cuda_time(lambda: ema_update_reference_(ref, params, 0.9999))
    n_bytes = sum(e.numel() * (4 + 4 + p.element_size()) for e, p in zip(ema, params))
    print(f"EMA: triton {t_tr:.3f} ms ({n_bytes / t_tr / 1e6:.0f} GB/s), foreach_lerp {t_ref:.3f} ms")
    assert t_tr < 1.5 * t_ref


@pytest.mark.gpu
@requires_cuda
def test_gpu_solver_bit_exact_and_cuda_graph() -> None:
    batch = 4
    solver = DPMSolverPP(DiscreteVPSchedule(), steps=10, order=3)
    doubled = _toy_model(batch)

    def model(x, t):
        return doubled(x.cpu(), t.cpu()).cuda()

    x_T = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = solver.sample(lambda x, t: cfg_combine(*model(x, t).chunk(2), 0.4), x_T.cuda())
    got = sample_multistep_fused(solver, model, x_T.cuda(), guidance_scale=0.4, backend="triton")
    assert_bit_exact(got, expected, msg="cuda solve")

    # one captured step, replayed for every step with a device step counter
    table = solver_step_table(solver, "cuda")
    x = x_T.cuda().clone()
    eps = torch.zeros(2 * batch, 3, 8, 8, device="cuda")
    hist = torch.zeros(3, *x.shape, device="cuda")
    step = torch.zeros(1, dtype=torch.int32, device="cuda")
    step_mod.solver_step(
        x.clone(), eps, hist.clone(), table, step.clone(), guidance_scale=0.4, backend="triton"
    )
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_mod.solver_step(x, eps, hist, table, step, guidance_scale=0.4, out=x, backend="triton")
        step.add_(1)
    for i in range(solver.steps):
        eps.copy_(model(x, torch.full((batch,), table.times[i], device="cuda")))
        graph.replay()
    assert_bit_exact(x, expected, msg="cuda graph solve")
