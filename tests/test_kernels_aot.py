"""Every Triton kernel compiles ahead of time for Ampere (sm_80) and Hopper (sm_90), no GPU
needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` with the launch
configurations the host code uses (``dpt_engine.kernels.aot.kernel_specs``). Checks: a cubin
(ELF) and PTX for the right target are produced, the shared memory fits the architecture, the
fp16/bf16 attention matmuls use the tensor cores (``mma.sync`` on sm_80, ``wgmma`` on sm_90
where the tile allows), and no ``@triton.jit`` kernel is missing from the spec list.

The default list covers attention for (fp16, d64), (bf16, d72) and (fp32, d72); the ``slow``
test compiles the full dtype x head-dim matrix. Compiles are cached by triton
(``~/.triton/cache``); a cold run of this file takes about a minute on 2 cores.
"""

from __future__ import annotations

import importlib
import os
import re

import pytest
import torch

from dpt_engine.kernels.dispatch import HAS_TRITON

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1",
        reason="TRITON_INTERPRET=1 makes the kernels interpreted; AOT compilation needs compiled ones",
    ),
]

aot = importlib.import_module("dpt_engine.kernels.aot")
ARCHS = (80, 90)
SPECS = aot.kernel_specs() if HAS_TRITON else []
_OP_MODULES = ("attention", "ema_triton", "solver_step")


def _check(spec, arch: int) -> None:
    compiled = aot.compile_spec(spec, arch)
    cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
    assert cubin[:4] == b"\x7fELF", f"{spec.name}: no cubin"
    target = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
    assert target.startswith(f"sm_{arch}"), f"{spec.name}: PTX targets {target}"
    shared = compiled.metadata.shared
    assert shared <= aot.SHARED_MEMORY_LIMIT[arch], f"{spec.name}: {shared} B shared memory on sm_{arch}"
    low_precision_dot = (
        spec.name.startswith(("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")) and "fp32" not in spec.name
    )
    if low_precision_dot:
        tensor_core = "wgmma" in ptx or "mma.sync" in ptx
        assert tensor_core, f"{spec.name}: no tensor-core instructions on sm_{arch}"
        if arch == 80:
            assert "wgmma" not in ptx


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_kernel_compiles(spec, arch: int) -> None:
    _check(spec, arch)


def test_hopper_uses_wgmma_for_attention_forward() -> None:
    spec = next(s for s in SPECS if s.name == "attn_fwd[bf16,d72]")
    assert "wgmma" in aot.compile_spec(spec, 90).asm["ptx"]


def test_every_kernel_has_a_spec() -> None:
    specced = {id(s.kernel) for s in SPECS}
    for name in _OP_MODULES:
        mod = importlib.import_module(f"dpt_engine.kernels.{name}")
        for attr, obj in vars(mod).items():
            if type(obj).__name__ == "JITFunction":
                assert id(obj) in specced, f"{name}.{attr} has no AOT spec in dpt_engine.kernels.aot"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_full_attention_matrix_compiles(arch: int) -> None:
    names = {s.name for s in SPECS}
    for spec in aot.kernel_specs(aot.ATTENTION_CASES_FULL):
        if spec.name not in names and spec.name.startswith("attn"):
            _check(spec, arch)


def test_specs_use_the_launch_configs() -> None:
    """The AOT specs carry the host launchers' block sizes (what a GPU run would compile)."""
    attn = importlib.import_module("dpt_engine.kernels.attention")
    spec = next(s for s in SPECS if s.name == "attn_bwd_dq[bf16,d72]")
    cfg = attn.bwd_config(128, torch.bfloat16)
    assert (spec.constexprs["BLOCK_M"], spec.constexprs["BLOCK_N"]) == (cfg["DQ_BLOCK_M"], cfg["DQ_BLOCK_N"])
    assert spec.options["num_warps"] == cfg["num_warps"]
