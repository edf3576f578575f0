"""The CUDA kernels in ``csrc/cuda/*.cu`` compile for Ampere (sm_80) and Hopper (sm_90).

No GPU is needed: each file is compiled with ``nvcc -c`` to an object file (host code against
torch's headers plus SASS for both architectures), with ``ptxas -v`` so the test can check that
every ``__global__`` kernel was assembled for both targets and that none spills registers. The
flags mirror ``CMakeLists.txt`` (C++20: torch 2.14's headers need it in .cu files too).

About 15 s of CPU per file (~30-60 s wall on 2 shared cores), hence ``slow``; skipped when nvcc or
torch's headers are missing. Running the kernels needs a GPU: see the ``gpu`` tests in
``test_native_ops.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
ARCHS = ("sm_80", "sm_90")
#: kernel name fragment -> number of instantiations per architecture
KERNELS = {
    "ema.cu": {"ema_multi_tensor_kernel": 1},
    "solver_step.cu": {"dpm_solver_step_kernel": 6},  # model_out fp32/bf16/fp16 x guided or not
}


def _nvcc() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
TORCH_DIR = Path(torch.__file__).resolve().parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)"),
    pytest.mark.skipif(
        not (TORCH_DIR / "include" / "ATen" / "core" / "Tensor.h").is_file(),
        reason="torch C++ headers missing",
    ),
]


def _command(source: Path, obj: Path) -> list[str]:
    cmd = [NVCC, "-c", str(source), "-o", str(obj), "-std=c++20", "-O3", "--expt-relaxed-constexpr"]
    cmd += ["-Xcompiler", "-fPIC", "-DDPT_WITH_CUDA", "-DNDEBUG", "-Xptxas", "-v"]
    for arch in ARCHS:
        num = arch.removeprefix("sm_")
        cmd += ["-gencode", f"arch=compute_{num},code={arch}"]
    cmd += ["-I", str(CSRC), "-isystem", str(TORCH_DIR / "include")]
    cmd += ["-isystem", str(TORCH_DIR / "include" / "torch" / "csrc" / "api" / "include")]
    for inc in sorted((TORCH_DIR.parent / "nvidia").glob("cu*/include")):  # cuBLAS etc. from the wheel
        cmd += ["-isystem", str(inc)]
    return cmd


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_cu_file_compiles_for_sm80_and_sm90(name, tmp_path):
    source = CSRC / "cuda" / name
    obj = tmp_path / (source.stem + ".o")
    start = time.perf_counter()
    proc = subprocess.run(_command(source, obj), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {name}:\n{log[-6000:]}"
    assert obj.is_file() and obj.stat().st_size > 0
    print(f"{name}: compiled for {', '.join(ARCHS)} in {seconds:.1f} s")

    # ptxas -v: "Compiling entry function '<mangled>' for 'sm_90'", then register/spill lines.
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", log)
    for arch in ARCHS:
        names = [fn for fn, a in entries if a == arch]
        for fragment, count in KERNELS[name].items():
            found = [fn for fn in names if fragment in fn]
            assert len(found) == count, (
                f"{name}: {len(found)} '{fragment}' kernels for {arch}, expected {count}"
            )
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) == 0, f"{name}: register spills {spills}"
