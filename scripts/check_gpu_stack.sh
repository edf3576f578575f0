#!/usr/bin/env bash
# Proves on this CPU machine that the kernels build and pass on the GPU image's own stack.
#
#   bash scripts/check_gpu_stack.sh        # ~10 min (first run: + ~3 min to build the environment)
#
# The lent GPU machines run python 3.12.3 with torch 2.11.0 (cu130), torchvision 0.26.0, triton
# 3.6.0 and numpy 2.5, not our pins (torch 2.14.1 / triton 3.8.0). This script builds a separate
# virtual environment with that stack from PyPI (.venv-gpu-stack/, git-ignored; python 3.12 when
# one is found, else python3: say which in the result), installs dpt_engine into it with
# `pip install --no-deps -e .` (so nothing of the pinned stack leaks in), and there:
#
#   (a) imports every module the GPU check needs (python -m benchmarks.gpu_check --check-imports);
#   (b) compiles every Triton kernel ahead of time for sm_80 and sm_90 (dpt_engine.kernels.aot, the
#       full attention dtype x head-dim matrix): PTX target, cubin, shared memory within the
#       architecture's limit, tensor-core instructions in the fp16/bf16 attention matmuls;
#   (c) builds the native ops against that torch (CPU ops, and the CUDA kernels for sm_80/sm_90
#       when nvcc is on the PATH) into build/gpu-stack/, leaving kernels/lib/ alone;
#   (d) runs the kernel tests there: the interpreter tests under TRITON_INTERPRET=1 (each test file
#       starts its own interpreter subprocess), the AOT, dispatch, convergence and native-op tests
#       against the library of (c), and the nvcc compile test (GPU tests skip without a GPU);
#   (e) runs the GPU check's dry run (python -m benchmarks.gpu_check --dry-run) on that stack,
#       without diffusers, as on the GPU image.
#
# Result: benchmarks/results/gpu_stack_compat.json (GPU_STACK_JSON) with torch, triton, python,
# status (pass | fail), tests {passed, failed, errors, skipped}, aot [{kernel, arch, ok, ...}],
# imports, native, dry_run, date; logs and JUnit reports under build/gpu-stack/. Exit status 0
# when the status is pass. Not part of `make test` (it downloads ~5 GB once and takes minutes).
#
# Environment: GPU_STACK_VENV (.venv-gpu-stack), GPU_STACK_PYTHON (python3.12 if found, else
# python3), GPU_STACK_TORCH (2.11.0), GPU_STACK_TORCHVISION (0.26.0), GPU_STACK_TRITON (3.6.0),
# GPU_STACK_NUMPY (a pip requirement, "numpy>=2.5,<2.6"), GPU_STACK_JSON, GPU_STACK_SKIP
# (space-separated steps to skip: install native tests dry_run).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
VENV=${GPU_STACK_VENV:-.venv-gpu-stack}
TORCH=${GPU_STACK_TORCH:-2.11.0}
TORCHVISION=${GPU_STACK_TORCHVISION:-0.26.0}
TRITON=${GPU_STACK_TRITON:-3.6.0}
NUMPY=${GPU_STACK_NUMPY:-numpy>=2.5,<2.6}
RESULT=${GPU_STACK_JSON:-benchmarks/results/gpu_stack_compat.json}
SKIP=" ${GPU_STACK_SKIP:-} "
WORK=build/gpu-stack
START=$SECONDS
if [ -z "${GPU_STACK_PYTHON:-}" ]; then
  GPU_STACK_PYTHON=python3
  for cand in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python3.12"; do
    if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      GPU_STACK_PYTHON=$cand
      break
    fi
  done
fi
mkdir -p "$WORK"
rm -rf "$WORK/dry-run" "$WORK"/junit_*.xml "$WORK"/*.status
PY=$ROOT/$VENV/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
log() { echo "[check_gpu_stack] $*"; }
skipped() { [[ "$SKIP" == *" $1 "* ]]; }

# ---------------------------------------------------------------------------- the environment
have_stack() {
  "$PY" - "$TORCH" "$TRITON" <<'EOF' 2>/dev/null
import sys, importlib.metadata as md
want_torch, want_triton = sys.argv[1:]
assert md.version("torch").split("+")[0] == want_torch and md.version("triton") == want_triton
import torch, triton, timm, numpy, scipy, matplotlib, sklearn, pytest, yaml, tqdm, safetensors  # noqa
EOF
}
if ! skipped install; then
  if [ ! -x "$PY" ]; then
    log "creating $VENV with $("$GPU_STACK_PYTHON" --version 2>&1)"
    "$GPU_STACK_PYTHON" -m venv "$VENV" || exit 1
  fi
  if ! have_stack; then
    log "installing torch $TORCH, torchvision $TORCHVISION, triton $TRITON and the image's packages from PyPI"
    "$PY" -m pip install -q "torch==$TORCH" "torchvision==$TORCHVISION" "triton==$TRITON" "$NUMPY" \
      pytest timm safetensors scipy matplotlib tqdm pyyaml scikit-learn pillow setuptools wheel || exit 1
  fi
  # the package itself, without touching the stack's pins (kernels/ becomes dpt_engine.kernels)
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
have_stack || { log "$VENV does not hold torch $TORCH / triton $TRITON"; exit 1; }
log "$("$PY" -c 'import sys, torch, triton, numpy; print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| numpy", numpy.__version__)')"

# ---------------------------------------------------------------------------- (a) imports
log "(a) imports"
(cd / && DPT_NATIVE=0 "$PY" -c 'import dpt_engine.kernels, sys; assert "site-packages" not in dpt_engine.kernels.__file__') \
  || log "warning: dpt_engine.kernels does not import from the source tree"
DPT_NATIVE=0 "$PY" -m benchmarks.gpu_check --check-imports --json "$WORK/imports.json" >"$WORK/imports.log" 2>&1
echo $? >"$WORK/imports.status"

# ---------------------------------------------------------------------------- (b) AOT compiles
log "(b) ahead-of-time compiles for sm_80 and sm_90"
env -u TRITON_INTERPRET DPT_NATIVE=0 "$PY" - "$WORK/aot.json" <<'EOF' 2>&1 | tee "$WORK/aot.log" | grep -E "FAIL|compiled"
import importlib, json, re, sys, time

aot = importlib.import_module("dpt_engine.kernels.aot")
entries = []
for arch in (80, 90):
    for spec in aot.kernel_specs(aot.ATTENTION_CASES_FULL):
        t0 = time.perf_counter()
        entry = {"kernel": spec.name, "arch": f"sm_{arch}", "ok": False}
        try:
            c = aot.compile_spec(spec, arch)
            ptx = c.asm["ptx"]
            target = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
            shared, limit = c.metadata.shared, aot.SHARED_MEMORY_LIMIT[arch]
            entry.update(target=target, shared_bytes=shared, shared_limit=limit, cubin_bytes=len(c.asm["cubin"]))
            problems = []
            if c.asm["cubin"][:4] != b"\x7fELF":
                problems.append("no cubin")
            if not target.startswith(f"sm_{arch}"):
                problems.append(f"PTX targets {target}")
            if shared > limit:
                problems.append(f"{shared} B shared memory > {limit}")
            low_precision_dot = spec.name.startswith(("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")) and "fp32" not in spec.name
            if low_precision_dot:
                entry["tensor_cores"] = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else None)
                if entry["tensor_cores"] is None:
                    problems.append("no tensor-core instructions")
            entry["ok"] = not problems
            if problems:
                entry["error"] = "; ".join(problems)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        entries.append(entry)
        if not entry["ok"]:
            print(f"FAIL {entry['arch']} {entry['kernel']}: {entry.get('error')}")
json.dump(entries, open(sys.argv[1], "w"), indent=1)
print(f"compiled {sum(e['ok'] for e in entries)} of {len(entries)} kernel specialisations")
EOF

# ---------------------------------------------------------------------------- (c) native build
NATIVE_LIB=""
if ! skipped native; then
  log "(c) native ops against torch $TORCH"
  CUDA_ARGS=()
  NVCC=$(command -v nvcc || true)
  if [ -n "$NVCC" ]; then
    # the toolkit root: $CUDA_HOME, else /usr/local/cuda, else nvcc's grandparent (nvcc may be a
    # wrapper script elsewhere; CMake's auto-detection picks the wrong root then)
    cuda_home=${CUDA_HOME:-}
    for cand in "$cuda_home" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$NVCC")")")"; do
      if [ -n "$cand" ] && [ -x "$cand/bin/nvcc" ] && [ -f "$cand/include/cuda_runtime.h" ]; then
        cuda_home=$cand
        break
      fi
    done
    nvrtc=$(ls "$VENV"/lib/python*/site-packages/nvidia/cu*/lib/libnvrtc.so* 2>/dev/null | head -n 1)
    CUDA_ARGS=(env CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST="8.0;9.0" DPT_BUILD_CUDA=ON DPT_CUDA_ARCHITECTURES="80;90"
      CMAKE_ARGS="-DCUDA_TOOLKIT_ROOT_DIR=$cuda_home${nvrtc:+ -DCUDA_nvrtc_LIBRARY=$ROOT/$nvrtc}")
    if "${CUDA_ARGS[@]}" BUILD_DIR="$WORK/native-cuda" LIB_DIR="$WORK/lib" PYTHON="$PY" JOBS=2 \
      bash scripts/build_native.sh >"$WORK/native-cuda.log" 2>&1; then
      echo ok >"$WORK/native_cuda.status"
      NATIVE_LIB=$ROOT/$WORK/lib/libdpt_engine_ops.so
    else
      tail -n 5 "$WORK/native-cuda.log" | tr '\n' ' ' >"$WORK/native_cuda.status"
    fi
  else
    echo "skipped: nvcc not found" >"$WORK/native_cuda.status"
  fi
  if DPT_BUILD_CUDA=OFF BUILD_DIR="$WORK/native-cpu" LIB_DIR="$WORK/lib-cpu" PYTHON="$PY" JOBS=2 \
    bash scripts/build_native.sh >"$WORK/native-cpu.log" 2>&1; then
    echo ok >"$WORK/native_cpu.status"
    [ -n "$NATIVE_LIB" ] || NATIVE_LIB=$ROOT/$WORK/lib-cpu/libdpt_engine_ops.so
  else
    tail -n 5 "$WORK/native-cpu.log" | tr '\n' ' ' >"$WORK/native_cpu.status"
  fi
  log "native: CPU $(cat "$WORK/native_cpu.status"); CUDA $(cat "$WORK/native_cuda.status" | head -c 300)"
fi

# the library of (c) for the tests and the dry run (none: the native backends stay unregistered)
NATIVE_ENV=(DPT_NATIVE=0)
if [ -n "$NATIVE_LIB" ]; then NATIVE_ENV=(DPT_NATIVE_LIB="$NATIVE_LIB" DPT_REQUIRE_NATIVE=1); fi

# ---------------------------------------------------------------------------- (d) kernel tests
KERNEL_TESTS=(tests/test_dispatch.py tests/test_kernels_aot.py tests/test_kernels_triton.py
  tests/test_kernel_convergence.py tests/test_native_ops.py tests/test_nvcc_compile.py)
if ! skipped tests; then
  log "(d) kernel tests: ${KERNEL_TESTS[*]}"
  env -u TRITON_INTERPRET -u DPT_KERNELS "${NATIVE_ENV[@]}" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    --junitxml="$WORK/junit_kernels.xml" "${KERNEL_TESTS[@]}" >"$WORK/tests.log" 2>&1
  echo $? >"$WORK/tests.status"
  tail -n 3 "$WORK/tests.log"
fi

# ---------------------------------------------------------------------------- (e) dry run
if ! skipped dry_run; then
  log "(e) the GPU check's dry run on this stack"
  env -u DPT_KERNELS "${NATIVE_ENV[@]}" "$PY" -m benchmarks.gpu_check --dry-run --out "$WORK/dry-run" \
    >"$WORK/dry-run.log" 2>&1
  echo $? >"$WORK/dry_run.status"
  tail -n 1 "$WORK/dry-run.log"
fi

# ---------------------------------------------------------------------------- the result
"$PY" - "$WORK" "$RESULT" "$((SECONDS - START))" "$GPU_STACK_PYTHON" <<'EOF'
import json, platform, subprocess, sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
import importlib.metadata as md

work, result, seconds, host_python = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def read(name, default=None):
    p = work / name
    return p.read_text().strip() if p.is_file() else default

def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None

tests = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "files": [], "failures": [], "skip_reasons": {}}
junit = work / "junit_kernels.xml"
if junit.is_file():
    root = ET.parse(junit).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        f = case.get("classname", "").split(".")[1] if "." in case.get("classname", "") else ""
        if f and f not in tests["files"]:
            tests["files"].append(f)
        if case.find("failure") is not None or case.find("error") is not None:
            tests["failed" if case.find("failure") is not None else "errors"] += 1
            el = case.find("failure") if case.find("failure") is not None else case.find("error")
            tests["failures"].append(f"{name}: {(el.get('message') or '')[:300]}")
        elif case.find("skipped") is not None:
            tests["skipped"] += 1
            why = (case.find("skipped").get("message") or "").strip()[:160]
            tests["skip_reasons"][why] = tests["skip_reasons"].get(why, 0) + 1
        else:
            tests["passed"] += 1
aot = json.loads(read("aot.json", "[]"))
imports = json.loads(read("imports.json", "{}") or "{}")
dry = {"status": "not run"}
if (work / "dry-run" / "gpu_check.json").is_file():
    doc = json.loads((work / "dry-run" / "gpu_check.json").read_text())
    rows = doc["rows"]
    checked = [r for r in rows if r["benchmark"] == "correctness" and r["metric"] == "max_abs_error"]
    dry = {
        "status": "pass" if read("dry_run.status") == "0" else "fail",
        "phases": {p["name"]: p["status"] for p in doc["phases"]},
        "correctness": {"passed": sum(r["config"]["passed"] for r in checked),
                        "failed": sum(not r["config"]["passed"] for r in checked),
                        "skipped": sum(r["benchmark"] == "correctness" and r["metric"] == "skipped" for r in rows)},
        "rows": len(rows),
        "errors": [r["config"].get("error") for r in rows if r["metric"] == "error"],
    }
native = {"cpu": read("native_cpu.status", "not run"), "cuda": read("native_cuda.status", "not run")}
ok = (
    bool(aot) and all(e["ok"] for e in aot)
    and imports.get("ok") is True
    and read("tests.status") == "0" and tests["failed"] == 0 and tests["errors"] == 0 and tests["passed"] > 0
    and dry["status"] == "pass"
    and native["cpu"] == "ok" and native["cuda"] in ("ok", "skipped: nvcc not found")
)
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "diff", "--quiet", "HEAD"]).returncode:
        commit += " + uncommitted changes"
except OSError:
    commit = "unknown"
import torch, triton, numpy
# whether dpt_engine.kernels.dispatch had to patch this triton's interpreter for numpy >= 2.5
probe = subprocess.run(
    [sys.executable, "-c", "from dpt_engine.kernels.dispatch import INTERPRETER_PATCHED as p; print(p)"],
    capture_output=True, text=True, env={**__import__("os").environ, "TRITON_INTERPRET": "1", "DPT_NATIVE": "0"},
)
interpreter_fix = {"patched": probe.stdout.strip() == "True", "why": (
    "triton 3.6's interpreter converts 1-element arrays with int(), which numpy >= 2.5 refuses; "
    "dpt_engine.kernels.dispatch wraps it to squeeze first (interpreter only, TRITON_INTERPRET=1)")}
doc = {
    "torch": torch.__version__,
    "triton": triton.__version__,
    "python": platform.python_version(),
    "numpy": numpy.__version__,
    "torchvision": version("torchvision"),
    "timm": version("timm"),
    "cuda": torch.version.cuda,
    "status": "pass" if ok else "fail",
    "tests": {k: tests[k] for k in ("passed", "failed", "errors", "skipped", "files", "failures", "skip_reasons")},
    "aot": aot,
    "aot_summary": {"compiled": sum(e["ok"] for e in aot), "total": len(aot),
                    "archs": sorted({e["arch"] for e in aot})},
    "imports": imports,
    "native": native,
    "dry_run": dry,
    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    "commit": commit,
    "seconds": seconds,
    "machine": f"{platform.machine()} CPU, no GPU (Triton kernels interpreted or compiled ahead of time)",
    "gpu_image": "the lent GPU machines run python 3.12.3, torch 2.11.0+cu130, torchvision 0.26.0, triton 3.6.0, "
                 f"numpy 2.5; this check ran python {platform.python_version()} ({Path(host_python).name})",
    "interpreter_numpy_fix": interpreter_fix,
}
result.parent.mkdir(parents=True, exist_ok=True)
result.write_text(json.dumps(doc, indent=1) + "\n")
t = doc["tests"]
print(f"[check_gpu_stack] {doc['status'].upper()}: torch {doc['torch']}, triton {doc['triton']}, python "
      f"{doc['python']}: tests {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
      f"{t['skipped']} skipped; AOT {doc['aot_summary']['compiled']}/{doc['aot_summary']['total']}; "
      f"imports {'ok' if imports.get('ok') else 'FAILED'}; native CPU {native['cpu']}, CUDA {native['cuda'][:80]}; "
      f"dry run {dry['status']} -> {result}")
sys.exit(0 if ok else 1)
EOF
