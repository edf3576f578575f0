#!/usr/bin/env bash
# The one script to run on a GPU machine, in a single call, from the repository root:
#
#   bash benchmarks/gpu_check.sh              # 8 minutes at most (GPU_CHECK_BUDGET=480 s)
#   bash benchmarks/gpu_check.sh --dry-run    # every phase on this CPU, tiny shapes, ~2-4 minutes
#
# It assumes a fresh machine holding a copy of the working tree (no .venv, no built library) and:
#   1. setup   - reuses .venv when it imports torch and dpt_engine; else, when the machine's own
#                python3 has torch + triton (an offline GPU image), makes .venv see that
#                interpreter's packages and installs dpt_engine into it editable, without
#                dependencies or network; else the pinned install
#                (pip install -c constraints.txt -e '.[diffusion,dev]', needs PyPI). Wheels in
#                ./.whl (e.g. diffusers, xformers carried to an offline machine) are installed too.
#   2. build   - the native ops with CUDA kernels for this GPU's architecture (CPU ops only on the
#                dry run; when the CUDA build fails, the CPU ops are still built);
#   3. bench   - python -m benchmarks.gpu_check: the measurements in order of value, every row
#                appended to rows.jsonl as it is measured: (a) correctness of every kernel backend
#                against its PyTorch reference (fp32, bf16), (b) attention TFLOP/s vs SDPA's
#                backends, (c) EMA GB/s at 501M parameters vs torch._foreach_lerp_, (d) the fused
#                solver step and the sampling loop with / without CUDA graphs, (e) U-ViT-L/2 and
#                H/2 training img/s, MFU, memory (+ torch.compile), (f) U-ViT-H/2 guided sampling
#                vs the original two-forward loop. Each phase has its own time cap (see the
#                driver's docstring); the driver gets what is left of the budget;
#   4. tests   - every `gpu`-marked test serially (timing assertions must not share the GPU),
#                then the kernel test files on the CPU (interpreter, C++ ops), each with a JUnit
#                XML report, as far as the budget goes (the CPU side is proven beforehand by
#                scripts/check_gpu_stack.sh on the GPU image's own torch/triton versions);
#   5. collect - always, also after a failed or timed-out phase (EXIT trap; the summary is also
#                rewritten after every phase in case the whole call is killed).
#
# --dry-run: runs every phase on this machine's CPU with --device cpu, the Triton interpreter
# (TRITON_INTERPRET=1 for the driver's phases), tiny shapes and models, and only the kernel test
# files; it writes the same files under benchmarks/results/gpu_check_cpu-dry-run/ (git-ignored)
# and exits 0 when everything passed. tests/test_gpu_check.py runs it (GPU_CHECK_SKIP="build tests").
#
# Every phase runs under `timeout`, capped by what is left of GPU_CHECK_BUDGET (seconds, default
# 480, 300 for --dry-run) minus a reserve for collecting. The script exits 0 when every phase
# passed, else 1; it never exits before writing the summary.
#
# Output: benchmarks/results/gpu_check_<device>/ (or GPU_CHECK_OUT_DIR): summary.md, gpu_check.log,
# nvidia-smi.txt, phases.tsv, junit_*.xml, and the driver's rows.jsonl, gpu_check.json,
# gpu_check.md and per-benchmark JSON/PNG files; when $OUT is set (the device tool collects it; at
# most 8 flat files come back), $OUT/{summary.md, gpu_check.log, rows.jsonl, gpu_check.json,
# junit_gpu.xml, junit_kernels_cpu.xml, gpu_check_<device>.tar.gz}. <device> is the GPU's name as
# benchmarks/bench_attention.device_slug spells it (e.g. h100-80gb-hbm3), cpu, or cpu-dry-run.
#
# Environment: GPU_CHECK_BUDGET (480 / 300), GPU_CHECK_PYTHON (host interpreter, python3),
# GPU_CHECK_SKIP (space-separated phases to skip: setup build bench tests), GPU_CHECK_OUT_DIR,
# JOBS (nproc).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
START=$SECONDS
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help)
      sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "gpu_check.sh: unknown argument '$arg' (use --dry-run or --help)" >&2
      exit 2
      ;;
  esac
done
if ((DRY)); then BUDGET=${GPU_CHECK_BUDGET:-300}; else BUDGET=${GPU_CHECK_BUDGET:-480}; fi
RESERVE=20
HOST_PY=${GPU_CHECK_PYTHON:-python3}
SKIP=" ${GPU_CHECK_SKIP:-} "
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 4)}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 JOBS

GPU_NAME=""
if ((!DRY)); then
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
fi
SLUG=$(printf '%s' "${GPU_NAME:-cpu}" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia//' -e 's/[^a-z0-9][^a-z0-9]*/-/g' -e 's/^-//' -e 's/-$//')
SLUG=${SLUG:-cpu}
DEVICE=cuda
[ -n "$GPU_NAME" ] || DEVICE=cpu
if ((DRY)); then SLUG=cpu-dry-run; fi
WORK=${GPU_CHECK_OUT_DIR:-$ROOT/benchmarks/results/gpu_check_$SLUG}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
rm -f "$WORK"/phases.tsv "$WORK"/current_phase "$WORK"/junit_*.xml "$WORK"/summary.md
LOG=$WORK/gpu_check.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
PY=$ROOT/.venv/bin/python

MODE="GPU check"
((DRY)) && MODE="GPU check DRY RUN (CPU, interpreter, tiny shapes)"
echo "[gpu_check] $MODE $(date -u +%FT%TZ) on $(hostname): GPU '${GPU_NAME:-none}' (slug $SLUG), budget ${BUDGET}s, $JOBS jobs"
{ nvidia-smi 2>&1 || echo "nvidia-smi failed or is missing"; echo; nvidia-smi -q 2>&1 | head -n 120; } >"$WORK/nvidia-smi.txt"

remaining() { echo $((BUDGET - (SECONDS - START))); }

# phase NAME CAP_SECONDS COMMAND... : run COMMAND under `timeout`, record "name rc seconds note"
phase() {
  local name=$1 cap=$2
  shift 2
  if [[ "$SKIP" == *" $name "* || ("$name" == tests_* && "$SKIP" == *" tests "*) ]]; then
    printf '%s\tskipped\t0\tGPU_CHECK_SKIP\n' "$name" >>"$WORK/phases.tsv"
    return 0
  fi
  local left=$(($(remaining) - RESERVE))
  if ((left < 15)); then
    printf '%s\tbudget\t0\tnot run: budget exhausted\n' "$name" >>"$WORK/phases.tsv"
    echo "[gpu_check] $name: skipped, budget exhausted"
    return 1
  fi
  local t=$((cap < left ? cap : left))
  echo
  echo "==== [$name] timeout ${t}s: $*"
  local t0=$SECONDS rc note=""
  printf '%s\t%s\n' "$name" "$t0" >"$WORK/current_phase"
  timeout --kill-after=10 "$t" "$@"
  rc=$?
  rm -f "$WORK/current_phase"
  if ((rc == 124 || rc == 137)); then note="timed out after ${t}s"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$note" >>"$WORK/phases.tsv"
  echo "[gpu_check] $name: rc=$rc in $((SECONDS - t0))s ${note}"
  write_summary
  return "$rc"
}

# ---------------------------------------------------------------------------- 1. setup
setup_env() {
  set -e
  local vpy=$PWD/.venv/bin/python
  # from / so that the source tree's dpt_engine/ folder cannot stand in for the installed package
  if [ -x "$vpy" ] && (cd / && "$vpy" -c "import torch, dpt_engine.kernels") 2>/dev/null; then
    echo "[setup] reusing .venv"
  elif { [ -x "$vpy" ] && "$vpy" -c "import torch" 2>/dev/null; } || "$HOST_PY" -c "import torch, triton" 2>/dev/null; then
    # offline: a .venv that sees the host interpreter's packages (the GPU image's torch, triton,
    # pytest, ...) through a .pth file, and dpt_engine installed into it editable, no deps, no index
    # --without-pip: pip, setuptools and wheel then come from the host too (a venv's own bundled
    # setuptools may be too old to build an editable wheel offline)
    [ -x "$vpy" ] || "$HOST_PY" -m venv --without-pip .venv
    if ! "$vpy" -c "import torch" 2>/dev/null; then
      echo "[setup] .venv on top of $("$HOST_PY" -c 'import sys, torch; print(sys.executable, "with torch", torch.__version__)')"
      local site_dir
      site_dir=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      # site.addsitedir (not bare paths), so that the host's own .pth files apply as well
      "$HOST_PY" -c '
import os, site, sysconfig, torch
dirs = [os.path.dirname(os.path.dirname(torch.__file__)), *site.getsitepackages()]
dirs += [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
dirs = [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]
print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs))' >"$site_dir/_gpu_check_host_site.pth"
    fi
    "$vpy" -m pip install -q --no-deps --no-build-isolation --no-index -e .
  else
    echo "[setup] $HOST_PY has no torch: the pinned install from PyPI (needs network)"
    [ -x "$vpy" ] || "$HOST_PY" -m venv .venv
    "$vpy" -m pip install -q -c constraints.txt -e '.[diffusion,dev]'
  fi
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "[setup] installing carried wheels: $(ls .whl)"
    "$vpy" -m pip install -q --no-index --no-deps .whl/*.whl
  fi
  # everything the driver imports must import (a missing module here costs minutes later)
  (cd "$ROOT" && "$vpy" -m benchmarks.gpu_check --check-imports --json "$WORK/imports.json" >/dev/null) || {
    "$vpy" -c 'import json, sys; d = json.load(open(sys.argv[1])); [print("[setup] import failed:", k, v) for g in ("required", "apis") for k, v in d[g].items() if not v.startswith("ok")]' "$WORK/imports.json" || true
    return 1
  }
  "$vpy" - <<'EOF'
import importlib, sys, torch, dpt_engine
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"[setup] python {sys.version.split()[0]} | torch {torch.__version__} | CUDA {torch.version.cuda} | GPU {gpu}")
for mod in ("triton", "numpy", "xformers", "diffusers", "xdist", "sklearn", "timm", "matplotlib"):
    try:
        m = importlib.import_module(mod)
        print(f"[setup]   {mod} {getattr(m, '__version__', '')}")
    except Exception as exc:
        print(f"[setup]   {mod}: not available ({type(exc).__name__}: {exc})")
EOF
}
export -f setup_env
export HOST_PY WORK ROOT

# ---------------------------------------------------------------------------- 2. build
# CUDA kernels for this GPU's architecture; when that fails (no nvcc, ...), the CPU ops alone so
# that the cpp backends are still checked. The phase fails whenever the requested build failed.
build_native_ops() {
  if [ "$1" = cuda ]; then
    DPT_BUILD_CUDA=ON DPT_CUDA_ARCHITECTURES="$2" PYTHON="$PY" bash scripts/build_native.sh && return 0
    echo "[build] the CUDA build failed; building the CPU ops only"
    DPT_BUILD_CUDA=OFF BUILD_DIR=build/native-cpu PYTHON="$PY" bash scripts/build_native.sh
    return 1
  fi
  DPT_BUILD_CUDA=OFF PYTHON="$PY" bash scripts/build_native.sh
}
export -f build_native_ops
export PY

# ---------------------------------------------------------------------------- 5. collect
write_summary() {
  local s=$WORK/summary.md
  {
    if ((DRY)); then
      echo "# gpu_check --dry-run on the CPU ($SLUG)"
    else
      echo "# gpu_check on ${GPU_NAME:-no GPU} ($SLUG)"
    fi
    echo
    local commit="unknown (no git repository)"
    if git rev-parse --short HEAD >/dev/null 2>&1; then
      commit=$(git rev-parse --short HEAD)
      git diff --quiet HEAD 2>/dev/null || commit="$commit + uncommitted changes"
    fi
    echo "- $(date -u +%FT%TZ), host $(hostname), commit $commit"
    echo "- elapsed $((SECONDS - START)) s of a ${BUDGET} s budget"
    echo "- $("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)' 2>/dev/null || echo 'python env not ready')"
    echo
    echo "| phase | rc | seconds | note |"
    echo "| --- | --- | --- | --- |"
    if [ -f "$WORK/phases.tsv" ]; then
      local p_name p_rc p_sec p_note  # local: phase() has its own rc
      while IFS=$'\t' read -r p_name p_rc p_sec p_note; do
        echo "| $p_name | $p_rc | $p_sec | $p_note |"
      done <"$WORK/phases.tsv"
    fi
    echo
    echo "## Measurements (benchmarks/gpu_check.py)"
    echo
    if [ -f "$WORK/gpu_check.md" ]; then
      sed -e 's/^## /### /' -e 's/^# /### /' "$WORK/gpu_check.md"
    else
      echo "(no gpu_check.md yet)"
    fi
    echo
    echo "## Tests"
    echo
    local py=$PY
    [ -x "$py" ] || py=$HOST_PY
    "$py" - "$WORK"/junit_*.xml <<'EOF' 2>&1 || echo "(could not read the JUnit reports)"
import sys
import xml.etree.ElementTree as ET
paths = sys.argv[1:]
if not paths or paths == [p for p in paths if "*" in p]:
    print("(no JUnit report yet)")
for path in paths:
    if "*" in path:
        continue
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        print(f"- {path.rsplit('/', 1)[-1]}: unreadable ({exc})")
        continue
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    secs = sum(float(s.get("time", 0)) for s in suites)
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    print(f"- **{path.rsplit('/', 1)[-1]}**: {passed} passed, {tot['failures']} failed, {tot['errors']} errors, "
          f"{tot['skipped']} skipped in {secs:.0f} s")
    skips = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                print(f"  - {tag.upper()} `{name}`: {(msg[0] if msg else '')[:300]}")
        sk = case.find("skipped")
        if sk is not None:
            skips.setdefault((sk.get("message") or "").strip()[:200], []).append(name)
    for why, names in skips.items():  # grouped by reason
        print(f"  - {len(names)} skipped: {why} (e.g. `{names[0]}`)")
EOF
    echo
    echo "## nvidia-smi"
    echo
    echo '```'
    head -n 30 "$WORK/nvidia-smi.txt" 2>/dev/null
    echo '```'
  } >"$s.tmp" 2>&1
  mv -f "$s.tmp" "$s"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && cp -f "$s" "$OUT/summary.md" 2>/dev/null || true
  fi
}

finish() {
  local rc_all=0
  trap - EXIT
  if [ -f "$WORK/current_phase" ]; then  # killed in the middle of a phase
    local c_name c_t0
    IFS=$'\t' read -r c_name c_t0 <"$WORK/current_phase"
    printf '%s\tinterrupted\t%s\tthe script was stopped during this phase\n' "$c_name" "$((SECONDS - c_t0))" >>"$WORK/phases.tsv"
    rm -f "$WORK/current_phase"
  fi
  [ -f "$WORK/phases.tsv" ] && awk -F'\t' '$2 != "0" && $2 != "skipped" {bad=1} END {exit bad}' "$WORK/phases.tsv" || rc_all=1
  write_summary
  echo "[gpu_check] done in $((SECONDS - START)) s (exit $rc_all); summary: $WORK/summary.md"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    tar -czf "$OUT/gpu_check_$SLUG.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null || true
    for f in summary.md gpu_check.log rows.jsonl gpu_check.json junit_gpu.xml junit_kernels_cpu.xml; do
      [ -f "$WORK/$f" ] && cp -f "$WORK/$f" "$OUT/"
    done
    chmod -R a+rX "$OUT" 2>/dev/null || true  # atomic writes leave 0600 files
  fi
  exit "$rc_all"
}
trap finish EXIT
trap 'echo "[gpu_check] interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------------------- the phases
phase setup 150 bash -c setup_env

# 2. native ops for this GPU's architecture (compute capability 9.0 -> 90)
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
BUILD_OK=0
if [ "$DEVICE" = cuda ]; then
  phase build 150 bash -c "build_native_ops cuda '${ARCH:-90}'" && BUILD_OK=1
else
  phase build 120 bash -c "build_native_ops cpu" && BUILD_OK=1
fi
REQUIRE=()  # a library built in this call must load in the tests (a skipped build proves nothing)
if ((BUILD_OK)) && [[ "$SKIP" != *" build "* ]]; then REQUIRE=(env DPT_REQUIRE_NATIVE=1); fi

# 3. the measurements, in order of value; the driver keeps its phases inside the budget it gets
BENCH_ARGS=(--out "$WORK" --budget "$(($(remaining) - RESERVE - 10))")
if ((DRY)); then BENCH_ARGS+=(--dry-run); else BENCH_ARGS+=(--device "$DEVICE"); fi
phase bench "$BUDGET" "$PY" -m benchmarks.gpu_check "${BENCH_ARGS[@]}"

# 4. tests: every gpu test serially, then the CPU side of the kernel files (in parallel when xdist
#    is there); the dry run keeps to the kernel files and the fast CPU ones
KERNEL_TESTS=(tests/test_native_ops.py tests/test_kernels_triton.py tests/test_kernel_convergence.py)
GPU_TESTS=(tests)
if ((DRY)); then
  KERNEL_TESTS=(tests/test_dispatch.py tests/test_native_ops.py)
  GPU_TESTS=(tests/test_kernels_triton.py tests/test_kernel_convergence.py tests/test_native_ops.py)
fi
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null && ((!DRY)); then XDIST=(-n 4); fi
phase tests_gpu 150 "${REQUIRE[@]}" "$PY" -m pytest -q -p no:cacheprovider -rfEs -s -m gpu \
  --continue-on-collection-errors --durations=15 --junitxml="$WORK/junit_gpu.xml" "${GPU_TESTS[@]}"
phase tests_kernels_cpu 200 "${REQUIRE[@]}" "$PY" -m pytest -q -p no:cacheprovider -rfEs "${XDIST[@]}" \
  -m "not gpu" --durations=10 --junitxml="$WORK/junit_kernels_cpu.xml" "${KERNEL_TESTS[@]}"

exit 0  # the EXIT trap (finish) writes the summary and sets the real exit status
