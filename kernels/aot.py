"""Ahead-of-time compilation of every Triton kernel for Ampere (sm_80) and Hopper (sm_90).

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs
the whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via ptxas). The specs below use
the same block sizes / warps / stages as the host launchers (``fwd_config``, ``bwd_config``,
``ema_config``, ``step_config``) and the specialisations a real launch gets (16-byte aligned
pointers, unit last-dim strides as constants, other strides divisible by 16), so a successful
compile, plus a shared-memory footprint under the architecture's limit, shows the kernels the
GPU would run do build.

CLI: ``python -m dpt_engine.kernels.aot --arch 80 90 --out build/cubins [--full]`` writes one
``.cubin`` and ``.ptx`` per kernel and arch and prints a table (arch, kernel, shared memory
bytes, registers and spill stack bytes from ``cuobjdump -res-usage``, cubin size, compile s).
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .dispatch import HAS_TRITON, interpreted

# by module path: the package attributes `attention` / `solver_step` are the public functions
_attn = importlib.import_module(f"{__package__}.attention")
_ema = importlib.import_module(f"{__package__}.ema_triton")
_step = importlib.import_module(f"{__package__}.solver_step")

__all__ = [
    "ATTENTION_CASES",
    "ATTENTION_CASES_FULL",
    "SHARED_MEMORY_LIMIT",
    "AotSpec",
    "compile_spec",
    "kernel_specs",
    "resource_usage",
]

#: max dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
#: (dtype, head dim) cases compiled by default: U-ViT-L (64), U-ViT-H (72 -> padded 128), fp32
ATTENTION_CASES: tuple[tuple[torch.dtype, int], ...] = (
    (torch.float16, 64),
    (torch.bfloat16, 72),
    (torch.float32, 72),
)
ATTENTION_CASES_FULL: tuple[tuple[torch.dtype, int], ...] = tuple(
    (dt, d) for dt in (torch.float16, torch.bfloat16, torch.float32) for d in (32, 64, 72, 128)
)

_FLOAT_ARGS = {"qk_scale", "sm_scale", "weight", "guidance_scale"}
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class AotSpec:
    """One kernel specialisation: pointer element types by argument name, the constexprs, the
    launch options (``num_warps``, ``num_stages``, ``enable_fp_fusion``) and the int arguments a
    typical launch passes as multiples of 16 (triton's JIT specialises those)."""

    name: str
    kernel: Any
    pointers: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    multiple_of_16: tuple[str, ...] = ()

    def source(self) -> Any:
        """The ``ASTSource``: signature and divisibility attributes built from the arg names."""
        from triton.compiler import ASTSource

        signature: dict[str, str] = {}
        constexprs = dict(self.constexprs)
        attrs: dict[tuple[int, ...], list] = {}
        for i, arg in enumerate(self.kernel.arg_names):
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in self.pointers:
                signature[arg] = "*" + self.pointers[arg]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif arg in _FLOAT_ARGS:
                signature[arg] = "fp32"
            elif arg.startswith("stride_") and arg.endswith("d"):  # unit stride of the head dim
                signature[arg] = "constexpr"
                constexprs[arg] = 1
            else:
                signature[arg] = "i32"
                if arg.startswith("stride_") or arg in self.multiple_of_16:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(fn=self.kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _attention_specs(cases: Iterable[tuple[torch.dtype, int]]) -> list[AotSpec]:
    specs = []
    for dtype, head_dim in cases:
        ty, d_pad = _TY[dtype], _attn.head_dim_padded(head_dim)
        tag = f"{ty},d{head_dim}"
        f, b = _attn.fwd_config(d_pad, dtype), _attn.bwd_config(d_pad, dtype)
        shape = {"HEAD_DIM": head_dim, "D_PAD": d_pad}
        prec = {"DOT_PRECISION": "ieee"}
        specs += [
            AotSpec(
                f"attn_fwd[{tag}]",
                _attn._attn_fwd_kernel,
                {"Q": ty, "K": ty, "V": ty, "Out": ty, "LSE": "fp32"},
                {**shape, **prec, "BLOCK_M": f["BLOCK_M"], "BLOCK_N": f["BLOCK_N"]},
                {"num_warps": f["num_warps"], "num_stages": f["num_stages"]},
            ),
            AotSpec(
                f"attn_bwd_preprocess[{tag}]",
                _attn._attn_bwd_preprocess_kernel,
                {"Out": ty, "DO": ty, "DELTA": "fp32"},
                {**shape, "BLOCK_M": b["BLOCK_M"]},
                {"num_warps": 4, "num_stages": 1},
            ),
        ]
        for name, kernel, grads, blocks in (
            ("attn_bwd_dkdv", _attn._attn_bwd_dkdv_kernel, ("DK", "DV"), (b["BLOCK_M"], b["BLOCK_N"])),
            ("attn_bwd_dq", _attn._attn_bwd_dq_kernel, ("DQ",), (b["DQ_BLOCK_M"], b["DQ_BLOCK_N"])),
        ):
            ptrs = {p: ty for p in ("Q", "K", "V", "DO", *grads)}
            specs.append(
                AotSpec(
                    f"{name}[{tag}]",
                    kernel,
                    {**ptrs, "LSE": "fp32", "DELTA": "fp32"},
                    {**shape, **prec, "BLOCK_M": blocks[0], "BLOCK_N": blocks[1]},
                    {"num_warps": b["num_warps"], "num_stages": b["num_stages"]},
                )
            )
    return specs


def kernel_specs(attention_cases: Iterable[tuple[torch.dtype, int]] = ATTENTION_CASES) -> list[AotSpec]:
    """Every Triton kernel of ``dpt_engine.kernels`` with its GPU launch configuration."""
    import triton.language as tl

    specs = _attention_specs(attention_cases)
    e = _ema.ema_config()
    for dtype, tl_dtype in ((torch.float32, tl.float32), (torch.bfloat16, tl.bfloat16)):
        specs.append(
            AotSpec(
                f"ema[{_TY[dtype]} params]",
                _ema._ema_multi_tensor_kernel,
                {"TABLE": "i64"},
                {"PARAM_DTYPE": tl_dtype, "BLOCK": e["BLOCK"], "EMULATE_FMA": False},
                {"num_warps": e["num_warps"], "num_stages": 1},
            )
        )
    s = _step.step_config()
    for guided in (False, True):
        for eps_dtype in (torch.float32, torch.bfloat16):
            specs.append(
                AotSpec(
                    f"dpm_multistep[{'guided' if guided else 'plain'},{_TY[eps_dtype]} eps]",
                    _step._dpm_multistep_kernel,
                    {
                        "X": "fp32",
                        "MODEL_OUT": _TY[eps_dtype],
                        "HIST": "fp32",
                        "OUT": "fp32",
                        "TABLE": "fp32",
                        "STEP": "i32",
                    },
                    {"GUIDED": guided, "BLOCK": s["BLOCK"]},
                    {"num_warps": s["num_warps"], "num_stages": 1, "enable_fp_fusion": False},
                    multiple_of_16=("numel",),
                )
            )
    return specs


def compile_spec(spec: AotSpec, arch: int) -> Any:
    """Compile ``spec`` for ``sm_<arch>``; returns triton's ``CompiledKernel`` (``.asm`` holds
    ``ptx`` and ``cubin``, ``.metadata.shared`` the shared memory bytes)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if interpreted(spec.kernel):
        raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1; AOT needs compiled kernels")
    import triton
    from triton.backends.compiler import GPUTarget

    return triton.compile(spec.source(), target=GPUTarget("cuda", arch, 32), options=dict(spec.options))


def resource_usage(compiled: Any) -> dict[str, int] | None:
    """Registers / spill stack / local bytes of a compiled kernel from ``cuobjdump -res-usage``
    (triton ships the tool; None when it cannot be found or run)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    exe = str(tool) if tool.is_file() else shutil.which("cuobjdump")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(compiled.asm["cubin"])
        try:
            res = subprocess.run([exe, "-res-usage", str(path)], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    if m is None:
        return None
    return dict(zip(("registers", "stack", "static_shared", "local"), map(int, m.groups())))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--out", type=Path, default=None, help="write <kernel>.sm<arch>.{cubin,ptx} here")
    parser.add_argument("--full", action="store_true", help="all attention dtypes x head dims 32/64/72/128")
    args = parser.parse_args(argv)
    specs = kernel_specs(ATTENTION_CASES_FULL if args.full else ATTENTION_CASES)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'arch':>5} {'kernel':<40} {'shared':>8} {'regs':>5} {'spill':>6} {'cubin':>7} {'s':>6}")
    for arch in args.arch:
        for spec in specs:
            t0 = time.perf_counter()
            c = compile_spec(spec, arch)
            dt = time.perf_counter() - t0
            use = resource_usage(c) or {}
            regs, spill = use.get("registers", "-"), use.get("stack", "-")
            print(
                f"sm_{arch:<2} {spec.name:<40} {c.metadata.shared:>8} {regs:>5} {spill:>6} "
                f"{len(c.asm['cubin']):>7} {dt:6.2f}"
            )
            if c.metadata.shared > SHARED_MEMORY_LIMIT[arch]:
                print(f"  !! {spec.name} needs {c.metadata.shared} B shared memory > sm_{arch} limit")
            if args.out:
                stem = spec.name.replace("[", ".").replace("]", "").replace(",", ".").replace(" ", "_")
                (args.out / f"{stem}.sm{arch}.cubin").write_bytes(c.asm["cubin"])
                (args.out / f"{stem}.sm{arch}.ptx").write_text(c.asm["ptx"])


if __name__ == "__main__":
    main()
