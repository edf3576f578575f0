"""The kernel dispatch: explicit ``backend=`` > ``use_backend`` > ``DPT_KERNELS`` > auto; named
backends that cannot run raise with the reason; auto falls back and logs its choice once; the
package imports and falls back without triton; U-ViT's attention goes through the dispatch."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from dpt_engine import kernels
from dpt_engine.kernels import dispatch
from dpt_engine.kernels.dispatch import (
    BackendUnavailableError,
    register_backend,
    resolve_backend,
    use_backend,
)

_IDS = itertools.count()


@pytest.fixture
def op(monkeypatch):
    """A fresh fake op with reference / triton / cpp backends returning their own names; the
    availability of each is controlled through the returned ``state`` dict."""
    name = f"_test_op_{next(_IDS)}"
    state = {"triton": None, "cpp": None, "cuda": None}
    register_backend(name, "reference", lambda: "reference")
    for backend in ("triton", "cpp", "cuda"):
        register_backend(name, backend, lambda b=backend: b, lambda _ts, b=backend: state[b])
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.reload_env()
    yield name, state
    for backend in ("reference", "triton", "cpp", "cuda"):
        dispatch.unregister_backend(name, backend)
    dispatch.reload_env()


CPU = (torch.zeros(1),)


def _run(op_name, tensors=CPU, backend=None):
    return resolve_backend(op_name, tensors, backend)()


def test_precedence_explicit_context_env_auto(op, monkeypatch) -> None:
    name, _ = op
    assert _run(name) == "cpp"  # auto on CPU: cpp first
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    dispatch.reload_env()
    assert _run(name) == "reference"  # env
    with use_backend("triton"):
        assert _run(name) == "triton"  # context > env
        with use_backend("cpp", op=name):
            assert _run(name) == "cpp"  # innermost context
        with use_backend("reference", op="some_other_op"):
            assert _run(name) == "triton"  # scoped to another op: ignored
        assert _run(name, backend="reference") == "reference"  # explicit > context
        assert _run(name, backend="auto") == "cpp"  # explicit auto
    assert _run(name) == "reference"


def test_env_per_op_and_read_once(op, monkeypatch) -> None:
    name, _ = op
    monkeypatch.setenv(dispatch.ENV_VAR, f"reference,{name}=triton")
    dispatch.reload_env()
    assert _run(name) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    assert _run(name) == "triton"  # read once: the change is not seen ...
    dispatch.reload_env()
    assert _run(name) == "cpp"  # ... until reload_env()
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    dispatch.reload_env()
    assert _run(name) == "cpp"


def test_named_backend_that_cannot_run_raises_with_reason(op, monkeypatch) -> None:
    name, state = op
    state["triton"] = "triton backend needs CUDA tensors or TRITON_INTERPRET=1"
    with pytest.raises(
        BackendUnavailableError, match=r"'triton' \(from backend= argument\).*needs CUDA tensors"
    ):
        _run(name, backend="triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.reload_env()
    with pytest.raises(BackendUnavailableError, match="DPT_KERNELS=triton"):
        _run(name)
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match=r"use_backend\('triton'\)"):
        _run(name)
    dispatch.unregister_backend(name, "cuda")
    with pytest.raises(BackendUnavailableError, match=r"not registered.*extension"):
        _run(name, backend="cuda")
    with pytest.raises(BackendUnavailableError, match=r"'nope'.*registered: cpp, reference, triton"):
        _run(name, backend="nope")
    with pytest.raises(KeyError, match="no backend registered"):
        resolve_backend("_never_registered_op", CPU)


def test_auto_falls_back_and_logs_once(op, caplog, monkeypatch) -> None:
    name, state = op
    state["cpp"] = "cpp kernels were built without this op"
    with caplog.at_level(logging.INFO, logger="dpt_engine.kernels"):
        assert _run(name) == "reference"
        assert _run(name) == "reference"
    records = [r for r in caplog.records if name in r.getMessage()]
    assert len(records) == 1
    assert "-> reference" in records[0].getMessage()
    assert "cpp: cpp kernels were built without this op" in records[0].getMessage()
    # the CUDA order, exercised on meta tensors: PyTorch's own (reference) first ...
    monkeypatch.setitem(dispatch.AUTO_ORDER, "meta", dispatch.AUTO_ORDER["cuda"])
    meta = (torch.empty(1, device="meta"),)
    assert dispatch.CUDA_MEASURED_WINNERS == []  # no GPU measurement committed yet
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpt_engine.kernels"):
        assert _run(name, meta) == "reference"
    assert "no committed GPU measurement" in caplog.records[-1].getMessage()
    # ... unless a committed measurement says a fused kernel wins on this device
    monkeypatch.setattr(
        dispatch,
        "CUDA_MEASURED_WINNERS",
        [
            {
                "op": name,
                "backend": "triton",
                "device": "meta",
                "ratio": 1.3,
                "source": "gpu_check_x/rows.json",
            }
        ],
    )
    assert _run(name, meta) == "triton"
    state["triton"] = "no triton here"
    assert _run(name, meta) == "reference"
    dispatch.unregister_backend(name, "reference")
    assert _run(name, meta) == "cuda"
    state["cuda"] = "no cuda kernels"
    with pytest.raises(BackendUnavailableError, match="no backend can run on meta tensors"):
        _run(name, meta)


def test_register_backend_validates_and_auto_flag(op) -> None:
    name, _ = op
    with pytest.raises(ValueError):
        register_backend(name, "auto", lambda: None)
    register_backend(name, "cpp", lambda: "cpp-manual", auto=False)
    assert _run(name) == "reference"  # auto skips it ...
    assert _run(name, backend="cpp") == "cpp-manual"  # ... naming it still works
    assert set(dispatch.registered_backends(name)) == {"reference", "triton", "cpp", "cuda"}
    assert dispatch.available_backends(name, CPU)["reference"] is None


# ---------------------------------------------------------------------------- the real ops on CPU
needs_compiled_triton = pytest.mark.skipif(
    not dispatch.HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1",
    reason="checks the compiled (non-interpreted) triton kernels' CPU refusal",
)


def test_ops_default_to_the_references_on_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 72, generator=g) for _ in range(3))
    torch.testing.assert_close(
        kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=0, rtol=0
    )
    ema, ref = [torch.randn(10, generator=g)], None
    ref = [ema[0].clone()]
    params = [torch.randn(10, generator=g)]
    kernels.ema_update_(ema, params, 0.9, backend="reference")
    torch._foreach_lerp_(ref, params, 1 - 0.9)
    assert torch.equal(ema[0], ref[0])
    kernels.ema_update_(ema, params, 0.9)  # auto: cpp when the extension is loaded, else reference


@needs_compiled_triton
def test_triton_on_cpu_tensors_raises_with_reason() -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(BackendUnavailableError, match=r"needs CUDA tensors.*TRITON_INTERPRET=1"):
        kernels.attention(q, q, q, backend="triton")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        kernels.ema_update_([torch.zeros(3)], [torch.zeros(3)], 0.5, backend="triton")
    with use_backend("triton", op="attention"), pytest.raises(BackendUnavailableError):
        kernels.attention(q, q, q)


def test_uvit_attention_goes_through_the_dispatch(monkeypatch) -> None:
    from dpt_engine.models.uvit import create_uvit

    calls = []

    def spy(q, k, v, scale=None):
        calls.append(tuple(q.shape))
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    register_backend("attention", "spy", spy, auto=False)
    try:
        model = create_uvit("uvit-tiny8", depth=2).eval()
        cfg = model.cfg
        x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
        t = torch.rand(2) * 1000
        y = torch.zeros(2, dtype=torch.long) if cfg.num_classes else None
        with torch.no_grad():
            base = model(x, t, y)
            with use_backend("spy", op="attention"):
                routed = model(x, t, y)
    finally:
        dispatch.unregister_backend("attention", "spy")
    assert len(calls) == cfg.depth + 1  # in-blocks, mid block, out-blocks
    assert torch.equal(base, routed)


def test_kernels_import_and_fall_back_without_triton() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from dpt_engine import kernels
        from dpt_engine.kernels import dispatch
        assert not dispatch.HAS_TRITON
        q = torch.randn(1, 2, 5, 8)
        out = kernels.attention(q, q, q)
        assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))
        e, p = [torch.zeros(4)], [torch.ones(4)]
        kernels.ema_update_(e, p, 0.5)
        assert torch.allclose(e[0], torch.full((4,), 0.5))
        try:
            kernels.attention(q, q, q, backend="triton")
        except dispatch.BackendUnavailableError as exc:
            assert "triton is not installed" in str(exc), exc
        else:
            raise AssertionError("expected BackendUnavailableError")
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DPT_KERNELS", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_interpreter_scalar_index_fix_for_numpy_2_5(monkeypatch) -> None:
    """triton 3.6's interpreter turns scalars into ints with ``int(array)`` on 1-element 1-D
    arrays, which numpy 2.5 refuses; the dispatch module wraps that patch once (interpreter only)."""
    interp = pytest.importorskip("triton.runtime.interpreter")
    import numpy as np

    def old_patch(tensor, scope):  # triton 3.6's form
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(interp, "_patch_lang_tensor", old_patch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch._fix_interpreter_scalar_index() is False  # compiled kernels: nothing to patch
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch._fix_interpreter_scalar_index() is True
    assert dispatch._fix_interpreter_scalar_index() is False  # already wrapped

    class Scalar:  # a stand-in for triton.language.tensor holding a 1-element 1-D array
        def __init__(self, value: int) -> None:
            self.handle = type("Handle", (), {"data": np.array([value], dtype=np.int32)})()

    scope = interp._LangPatchScope()
    interp._patch_lang_tensor(Scalar, scope)
    with warnings.catch_warnings():  # numpy < 2.5 only warns where 2.5 raises: make it raise too
        warnings.simplefilter("error", DeprecationWarning)
        assert list(range(0, Scalar(7), 3)) == [0, 3, 6]  # what a loop bound does
    scope.restore()
    assert not hasattr(Scalar, "__index__")


def test_cpu_ema_auto_is_pytorchs_own_unless_cpp_is_asked_for() -> None:
    """The fused C++ EMA measured 1.02-1.05x torch._foreach_lerp_ on this CPU (< the 1.2x a kernel
    must earn): auto picks the reference; backend='cpp' still runs the fused kernel, same result."""
    from dpt_engine.kernels import ema as ema_mod

    params = [torch.randn(1000), torch.randn(37, 5)]
    ema_a = [torch.randn_like(p) for p in params]
    ema_b = [e.clone() for e in ema_a]
    assert resolve_backend("ema", [*ema_a, *params]) is ema_mod.ema_update_reference_
    ema_mod.ema_update_(ema_a, params, 0.99)
    if dispatch.available_backends("ema", [*ema_b, *params]).get("cpp", "absent") is None:
        ema_mod.ema_update_(ema_b, params, 0.99, backend="cpp")
        for a, b in zip(ema_a, ema_b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
