"""The C++ operators of ``libdpt_engine_ops.so`` (``csrc/``, loaded by ``kernels/_native.py``)
against their PyTorch references.

* ``ema_update_`` vs ``ema_update_reference_`` (``torch._foreach_lerp_``): bit-identical with the
  AVX2 loops (torch's vectorised lerp uses the same fused multiply-add), within 1 ulp
  with the baseline (no-FMA) loop; fp32 and bf16 params, many tensors of odd sizes, ZeRO-like
  views of a flat buffer, both lerp branches, several threads.
* ``dpm_solver_step_`` vs ``solver_step_reference`` and ``DPMSolverPP.sample``: bit-identical (fp32
  in the eager operation order, no FMA) for orders 1-3, with and without fused guidance, fp32 /
  bf16 / fp16 model outputs, in place, int and tensor step indices.
* fake impls (``torch.library.opcheck``, ``torch.compile`` with ``aot_eager``), input validation,
  and the ``cpp`` backends in ``kernels/dispatch.py``.

Skipped with the loader's reason when the library is not built (``bash scripts/build_native.sh``);
with ``DPT_REQUIRE_NATIVE=1`` a missing library fails instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpt_engine.diffusion import DiscreteVPSchedule, DPMSolverPP
from dpt_engine.diffusion.guidance import cfg_combine
from dpt_engine.kernels import BackendUnavailableError, ema_update_, ema_update_reference_
from dpt_engine.kernels import _native as native
from dpt_engine.kernels.solver_step import (
    sample_multistep_fused,
    solver_step,
    solver_step_reference,
    solver_step_table,
)

if not native.is_available():
    if os.environ.get("DPT_REQUIRE_NATIVE") == "1":
        raise RuntimeError(
            f"DPT_REQUIRE_NATIVE=1 but the native ops are not available: {native.load_error()}"
        )
    pytest.skip(f"native ops not built: {native.load_error()}", allow_module_level=True)

OPS = torch.ops.dpt_engine
ISAS = ("default", "avx2")


def _isa_supported(isa: str) -> bool:
    try:
        native.cpu_isa(isa)
        return True
    except RuntimeError:
        return False
    finally:
        native.cpu_isa("auto")


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with each build of the CPU loops this machine and build support."""
    if not _isa_supported(request.param):
        pytest.skip(f"CPU loops '{request.param}' not in this build or not supported by this CPU")
    native.cpu_isa(request.param)
    yield request.param
    native.cpu_isa("auto")


def _ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two fp32 tensors of equal signs."""
    assert a.dtype == b.dtype == torch.float32
    if a.numel() == 0:
        return 0
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


def _assert_lerp_equal(got, ref, old, isa: str) -> None:
    """Bit-identical for the AVX2 build (torch's lerp is vectorised with a fused multiply-add on
    AVX2/AVX-512 machines). The baseline build rounds ``w * (p - e)`` before adding it, as torch's
    own DEFAULT capability does: one extra rounding of that product, at most one fp32 ulp of
    ``|e| + |result|`` (many ulps of the result itself where the two cancel)."""
    for i, (a, b, e) in enumerate(zip(got, ref, old)):
        if isa != "default":
            assert torch.equal(a, b), f"tensor {i}: {_ulp_diff(a, b)} ulp from torch._foreach_lerp_"
        else:
            bound = 2.0**-23 * (e.abs() + b.abs()) + 1e-30
            assert bool(((a - b).abs() <= bound).all()), f"tensor {i}: beyond one rounding of the product"


def _odd_tensors(seed: int, param_dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [
        (1,),
        (3,),
        (17, 5),
        (1000,),
        (65537,),
        (3, 65536 + 7),
        (0,),
        (129, 31),
        (200_003,),
        (2, 3, 5, 7),
    ]
    ema = [torch.randn(s, generator=g) for s in shapes]
    params = [(e + 0.1 * torch.randn(s, generator=g)).to(param_dtype) for e, s in zip(ema, shapes)]
    return ema, params


# ============================================================================ EMA
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.9999, 0.999, 0.5, 0.3, 0.0, 1.0])
def test_ema_matches_reference(isa, param_dtype, decay):
    ema, params = _odd_tensors(0, param_dtype)
    old = [e.clone() for e in ema]
    ref = [e.clone() for e in ema]
    ema_update_reference_(ref, params, decay)
    OPS.ema_update_(ema, params, decay)
    _assert_lerp_equal(ema, ref, old, isa)
    if decay == 0.0:  # w = 1 -> exactly the params
        assert all(torch.equal(e, p.float()) for e, p in zip(ema, params))


def test_ema_zero_like_views_of_flat_buffers():
    """ZeRO keeps a rank's shard as views into one flat buffer: offsets that are not multiples of
    the vector width, and elements outside the shard that must stay untouched."""
    g = torch.Generator().manual_seed(1)
    flat_ema = torch.randn(300_001, generator=g)
    flat_param = torch.randn(300_001, generator=g).bfloat16()
    cuts = [(7, 1000), (1007, 65_539), (66_546, 123_457), (190_003, 100_001)]  # (offset, numel)
    ema = [flat_ema[o : o + n] for o, n in cuts]
    params = [flat_param[o : o + n] for o, n in cuts]
    ema[1] = ema[1].view(-1)[:65_536].view(256, 256)  # a 2-D view, prefix of a slice
    params[1] = params[1][:65_536].view(256, 256)
    before = flat_ema.clone()
    ref = [e.clone() for e in ema]
    ema_update_reference_(ref, params, 0.99)
    OPS.ema_update_(ema, params, 0.99)
    for a, b in zip(ema, ref):
        assert torch.equal(a, b)
    touched = torch.zeros_like(flat_ema, dtype=torch.bool)
    for e in ema:
        off = e.storage_offset()
        touched[off : off + e.numel()] = True
    assert torch.equal(flat_ema[~touched], before[~touched]), "elements outside the views changed"


def test_ema_many_tensors_several_threads():
    """Hundreds of tensors in one call, split over two intra-op threads."""
    g = torch.Generator().manual_seed(2)
    sizes = torch.randint(1, 20_000, (300,), generator=g).tolist()
    ema = [torch.randn(n, generator=g) for n in sizes]
    params = [torch.randn(n, generator=g) for n in sizes]
    old = [e.clone() for e in ema]
    ref = [e.clone() for e in ema]
    ema_update_reference_(ref, params, 0.995)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        OPS.ema_update_(ema, params, 0.995)
    finally:
        torch.set_num_threads(threads)
    _assert_lerp_equal(ema, ref, old, native.cpu_isa())


def test_ema_empty_inputs():
    native.ema_update_([], [], 0.9)  # the op itself needs a tensor to dispatch on
    OPS.ema_update_([torch.empty(0)], [torch.empty(0)], 0.9)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ([torch.zeros(3)], [], 0.9), ValueError, "ema has 1 tensors but params has 0"),
        (lambda: ([torch.zeros(3).half()], [torch.zeros(3)], 0.9), TypeError, r"ema\[0\] must be float32"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3).half()], 0.9), TypeError, r"params\[0\] must be float32 or"),
        (lambda: ([torch.zeros(3), torch.zeros(4)], [torch.zeros(3), torch.zeros(5)], 0.9), ValueError,
         r"params\[1\] has shape \[5\] but ema\[1\] has shape \[4\]"),
        (lambda: ([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.9), ValueError, r"ema\[0\] must be contiguous"),
        (lambda: ([torch.zeros(4)], [torch.zeros(8)[::2]], 0.9), ValueError, r"params\[0\] must be contiguous"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], 1.5), ValueError, r"decay must be in \[0, 1\]"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], float("nan")), ValueError, r"decay must be in \[0, 1\]"),
    ],
)  # fmt: skip
def test_ema_validation(make, error, match):
    ema, params, decay = make()
    with pytest.raises(error, match=match):
        OPS.ema_update_(ema, params, decay)


def test_ema_shared_memory_rejected():
    t = torch.zeros(5)
    with pytest.raises(ValueError, match="share memory"):
        OPS.ema_update_([t], [t], 0.9)


# ============================================================================ solver step
def _solver(steps: int, order: int) -> DPMSolverPP:
    return DPMSolverPP(DiscreteVPSchedule("linear"), steps=steps, order=order, skip_type="time_uniform")


def _model_out(x: torch.Tensor, t: float, guided: bool, dtype: torch.dtype) -> torch.Tensor:
    """A deterministic stand-in for a network: (B, ...) or the doubled batch (2B, ...)."""
    cond = torch.tanh(x * (1.0 + t)) * 0.7 + 0.1 * torch.cos(x)
    if not guided:
        return cond.to(dtype)
    uncond = torch.sin(x * (0.5 + t)) * 0.8
    return torch.cat([cond, uncond]).to(dtype)  # (2B, ...)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_solver_step_matches_reference(isa, order, guided, eps_dtype):
    """A whole multistep trajectory (warm-up and lower_order_final steps included): every step,
    history slot and output equal to the eager reference bit for bit."""
    solver = _solver(steps=7, order=order)
    table = solver_step_table(solver, "cpu")
    g = torch.Generator().manual_seed(order)
    x_ref = torch.randn(3, 5, 33, 7, generator=g)  # odd sizes: vector tails everywhere
    x_nat = x_ref.clone()
    hist_ref = torch.zeros(table.max_order, *x_ref.shape)
    hist_nat = hist_ref.clone()
    scale = 0.4 if guided else None
    for i in range(table.steps):
        eps = _model_out(x_ref, table.times[i], guided, eps_dtype)
        x_ref = solver_step_reference(x_ref, eps, hist_ref, table, i, scale)
        x_nat = native.solver_step_native(x_nat, eps, hist_nat, table, i, scale)
        assert torch.equal(x_nat, x_ref), f"step {i} (order {table.orders[i]}): x_next differs"
        assert torch.equal(hist_nat, hist_ref), f"step {i}: history differs"


@pytest.mark.parametrize("order", [2, 3])
def test_solver_step_equals_dpm_solver_sample(order):
    """The fused loop through the dispatch (backend='cpp') reproduces DPMSolverPP.sample with
    cfg_combine guidance exactly."""
    solver = _solver(steps=12, order=order)
    x_T = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def guided_fn(x, t):  # the doubled batch, as cfg_eps_fn's network returns it
        return _model_out(x, float(t[0]), True, torch.float32)

    def eps_fn(x, t):
        cond, uncond = guided_fn(x, t).chunk(2)
        return cfg_combine(cond, uncond, 0.4)

    expected = solver.sample(eps_fn, x_T)
    got = sample_multistep_fused(solver, guided_fn, x_T, guidance_scale=0.4, backend="cpp")
    assert torch.equal(got, expected)


def test_solver_step_in_place_and_tensor_step():
    solver = _solver(steps=5, order=2)
    table = solver_step_table(solver, "cpu")
    x = torch.randn(2, 4, 9, 9)
    hist = torch.randn(2, *x.shape)
    eps = _model_out(x, 0.5, False, torch.float32)
    h_ref = hist.clone()
    expected = solver_step_reference(x, eps, h_ref, table, 1)
    for step in (torch.tensor([1], dtype=torch.int32), torch.tensor([1], dtype=torch.int64), 1):
        xx, hh = x.clone(), hist.clone()
        out = native.solver_step_native(xx, eps, hh, table, step, None, out=xx)  # in place
        assert out.data_ptr() == xx.data_ptr()
        assert torch.equal(xx, expected) and torch.equal(hh, h_ref)


def test_solver_step_float64_table_and_threads():
    """A float64 table gives the same result (rows are rounded to fp32 either way); two threads."""
    solver = _solver(steps=6, order=3)
    table = solver_step_table(solver, "cpu")
    x = torch.randn(2, 300_001)
    hist = torch.randn(3, *x.shape)
    eps = torch.randn(4, 300_001)
    h32, h64 = hist.clone(), hist.clone()
    out32, out64 = torch.empty_like(x), torch.empty_like(x)
    step = torch.tensor([3])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        OPS.dpm_solver_step_(x, eps, h32, table.coef, step, 0.3, out32)
        OPS.dpm_solver_step_(x, eps, h64, table.coef.double(), step, 0.3, out64)
    finally:
        torch.set_num_threads(threads)
    h_ref = hist.clone()
    expected = solver_step_reference(x, eps, h_ref, table, 3, 0.3)
    assert torch.equal(out32, expected) and torch.equal(h32, h_ref)
    assert torch.equal(out64, expected) and torch.equal(h64, h_ref)


def _solver_args(**over):
    solver = _solver(steps=6, order=3)  # orders [1, 2, 3, 3, 2, 1]
    table = solver_step_table(solver, "cpu")
    x = torch.randn(2, 8)
    args = {
        "x": x,
        "model_out": torch.randn(2, 8),
        "history": torch.zeros(3, 2, 8),
        "table": table.coef,
        "step": torch.tensor([2], dtype=torch.int32),
        "guidance_scale": None,
        "out": torch.empty_like(x),
    }
    args.update(over)
    return args


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        ({"x": torch.randn(2, 8).double()}, TypeError, "x must be float32"),
        ({"model_out": torch.randn(2, 8).double()}, TypeError, "model_out must be float32, bfloat16 or float16"),
        ({"model_out": torch.randn(2, 9)}, ValueError, "model_out has 18 elements but x has 16"),
        ({"guidance_scale": 0.5}, ValueError, "doubled batch"),
        ({"guidance_scale": float("inf"), "model_out": torch.randn(4, 8)}, ValueError, "guidance_scale must be finite"),
        ({"history": torch.zeros(3, 2, 9)}, ValueError, r"history must be \(S, \*x.shape\)"),
        ({"history": torch.zeros(2, 2, 8)}, ValueError, "has order 3 but history has 2 slots"),
        ({"table": torch.zeros(6, 6)}, ValueError, r"table must be \(steps, 7\)"),
        ({"table": torch.zeros(6, 7, dtype=torch.int32)}, TypeError, "table must be float32 or float64"),
        ({"step": torch.tensor([6])}, ValueError, "step 6 is out of range for a table of 6 steps"),
        ({"step": torch.tensor([1, 2])}, ValueError, "step must hold one element"),
        ({"step": torch.tensor([1.0])}, TypeError, "step must be an int32 or int64 tensor"),
        ({"out": torch.empty(2, 9)}, ValueError, "out has shape"),
        ({"x": torch.randn(8, 2).t()}, ValueError, "x must be contiguous"),
    ],
)  # fmt: skip
def test_solver_step_validation(over, error, match):
    with pytest.raises(error, match=match):
        OPS.dpm_solver_step_(**_solver_args(**over))


def test_solver_step_bad_order_column():
    table = _solver_args()["table"].clone()
    table[2, 6] = 4.0
    with pytest.raises(ValueError, match="the order"):
        OPS.dpm_solver_step_(**_solver_args(table=table))


def test_solver_step_out_aliasing_history_rejected():
    args = _solver_args()
    args["out"] = args["history"][0]
    with pytest.raises(ValueError, match="out must not share memory with history"):
        OPS.dpm_solver_step_(**args)


# ============================================================================ torch.library / compile
def test_opcheck_ema():
    ema = [torch.randn(5, 3), torch.randn(7)]
    params = [torch.randn(5, 3), torch.randn(7).bfloat16()]
    torch.library.opcheck(OPS.ema_update_.default, (ema, params, 0.9))


@pytest.mark.parametrize("guidance_scale", [None, 0.4])
def test_opcheck_solver_step(guidance_scale):
    args = _solver_args(guidance_scale=guidance_scale)
    if guidance_scale is not None:
        args["model_out"] = torch.randn(4, 8)
    torch.library.opcheck(OPS.dpm_solver_step_.default, tuple(args.values()))


def test_torch_compile_traces_both_ops():
    """fullgraph compile (aot_eager: FakeTensor tracing + functionalization of the mutations)."""
    solver = _solver(steps=4, order=2)
    table = solver_step_table(solver, "cpu")

    def fn(ema, params, x, eps, hist, step):
        torch.ops.dpt_engine.ema_update_(ema, params, 0.9)
        out = torch.empty_like(x)
        torch.ops.dpt_engine.dpm_solver_step_(x, eps, hist, table.coef, step, 0.4, out)
        return out * 1.0

    args = ([torch.randn(6)], [torch.randn(6)], torch.randn(2, 5), torch.randn(4, 5), torch.zeros(2, 2, 5))
    step = torch.tensor([1])
    ref_args = [[a.clone() for a in t] if isinstance(t, list) else t.clone() for t in args]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = compiled(*args, step)
    expected = fn(*ref_args, step)
    assert torch.equal(got, expected)
    assert torch.equal(args[0][0], ref_args[0][0]), "the compiled graph must keep the EMA mutation"
    assert torch.equal(args[4], ref_args[4]), "the compiled graph must keep the history mutation"


# ============================================================================ dispatch backends
def test_dispatch_cpp_backends():
    ema, params = _odd_tensors(3, torch.bfloat16)
    ref = [e.clone() for e in ema]
    ema_update_reference_(ref, params, 0.9)
    ema_update_(ema, params, 0.9, backend="cpp")
    if native.cpu_isa() != "default":
        assert all(torch.equal(a, b) for a, b in zip(ema, ref))

    # float16 params: the native EMA declines; "auto" falls back, "cpp" explains.
    half = [p.half() for p in params]
    with pytest.raises(BackendUnavailableError, match="float16"):
        ema_update_(ema, half, 0.9, backend="cpp")
    ema_update_(ema, half, 0.9, backend="auto")

    solver = _solver(steps=3, order=2)
    table = solver_step_table(solver, "cpu")
    x = torch.randn(2, 11)
    eps = torch.randn(2, 11)
    h1, h2 = torch.zeros(2, 2, 11), torch.zeros(2, 2, 11)
    a = solver_step(x, eps, h1, table, 0, backend="cpp")
    b = solver_step(x, eps, h2, table, 0, backend="reference")
    assert torch.equal(a, b) and torch.equal(h1, h2)
    with pytest.raises(BackendUnavailableError, match="float32"):
        solver_step(x.double(), eps.double(), h1.double(), table, 0, backend="cpp")


def test_package_imports_without_the_library(tmp_path):
    """With the library missing, dpt_engine.kernels imports, the cpp backend is absent and the
    reason is reported."""
    code = (
        "import dpt_engine.kernels as K\n"
        "from dpt_engine.kernels import _native as N\n"
        "assert not N.is_available(), N.load_error()\n"
        "assert 'not found' in N.load_error(), N.load_error()\n"
        "assert 'cpp' not in K.registered_backends('ema')\n"
        "import torch\n"
        "e = [torch.zeros(3)]; K.ema_update_(e, [torch.ones(3)], 0.5)\n"
        "assert float(e[0][0]) == 0.5\n"
    )
    env = {**os.environ, "DPT_NATIVE_LIB": str(tmp_path / "missing.so"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ============================================================================ CUDA (needs a GPU)
needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and native.has_cuda_kernels()),
    reason="needs a CUDA GPU and a library built with DPT_BUILD_CUDA=ON",
)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.999, 0.3])
def test_cuda_ema_matches_reference(param_dtype, decay):
    ema, params = _odd_tensors(0, param_dtype)
    ema = [e.cuda() for e in ema]
    params = [p.cuda() for p in params]
    flat_e = torch.randn(70_001, device="cuda")  # plus misaligned views (the kernel's scalar path)
    flat_p = torch.randn(70_001, device="cuda").to(param_dtype)
    ema += [flat_e[1:65_538], flat_e[65_539:70_000]]
    params += [flat_p[1:65_538], flat_p[65_539:70_000]]
    old = [e.clone() for e in ema]
    ref = [e.clone() for e in ema]
    ema_update_reference_(ref, params, decay)
    ema_update_(ema, params, decay, backend="cuda")
    torch.cuda.synchronize()
    _assert_lerp_equal([e.cpu() for e in ema], [r.cpu() for r in ref], [o.cpu() for o in old], "default")


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 33, 7), (4, 4, 32, 32)])  # scalar and vector paths
def test_cuda_solver_step_matches_reference(order, guided, eps_dtype, shape):
    solver = _solver(steps=7, order=order)
    table = solver_step_table(solver, "cuda")
    x_ref = torch.randn(*shape, generator=torch.Generator().manual_seed(order)).cuda()
    x_nat = x_ref.clone()
    hist_ref = torch.zeros(table.max_order, *shape, device="cuda")
    hist_nat = hist_ref.clone()
    scale = 0.4 if guided else None
    for i in range(table.steps):
        eps = _model_out(x_ref, table.times[i], guided, eps_dtype)
        x_ref = solver_step_reference(x_ref, eps, hist_ref, table, i, scale)
        step = table.step_index[i : i + 1]  # a device step index: no host sync
        x_nat = native.solver_step_native(x_nat, eps, hist_nat, table, step, scale)
        torch.testing.assert_close(x_nat, x_ref, rtol=0, atol=0, msg=f"step {i}")
        torch.testing.assert_close(hist_nat, hist_ref, rtol=0, atol=0, msg=f"step {i} history")


# ============================================================================ benchmark smoke
@pytest.mark.parametrize("module", ["bench_ema", "bench_solver_step"])
def test_native_benchmarks_run(module, tmp_path):
    """The two native-op benchmarks run at toy sizes and write well-formed rows (no timing
    assertions: benchmarks are not tests)."""
    import importlib
    import json

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    bench = importlib.import_module(f"benchmarks.{module}")
    size = (
        ["--params", "3e5", "--tensors", "7"] if module == "bench_ema" else ["--shape", "2", "3", "17", "19"]
    )
    argv = [*size, "--repeats", "2", "--warmup", "0", "--threads", "1"]
    argv += ["--json", str(tmp_path / "rows.json"), "--png", str(tmp_path / "rows.png")]
    returned = bench.main(argv)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows == returned and (tmp_path / "rows.png").stat().st_size > 1000
    assert {r["variant"] for r in rows} == set(bench.VARIANTS)
    speedups = [r for r in rows if r["metric"] == "speedup"]
    assert speedups and all(r["baseline"] and r["value"] > 0 for r in speedups)
    if module == "bench_solver_step":
        assert all(r["config"]["bit_exact_vs_eager"] for r in rows)
