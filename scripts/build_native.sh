#!/usr/bin/env bash
# Builds libdpt_engine_ops.so (the C++/CUDA ops of dpt_engine.kernels) with CMake into
# build/native/ and copies it to kernels/lib/, where kernels/_native.py loads it from.
#
#   bash scripts/build_native.sh                    # CPU ops; CUDA too when a GPU is visible
#   DPT_BUILD_CUDA=ON bash scripts/build_native.sh  # also compile + link the CUDA kernels
#
# Environment: PYTHON (default .venv/bin/python, else python3), DPT_BUILD_CUDA (AUTO|ON|OFF;
# default AUTO when nvidia-smi lists a GPU, else OFF), DPT_CUDA_ARCHITECTURES (default "80;90"),
# BUILD_DIR (build/native), JOBS (2), CMAKE_ARGS (extra arguments for the configure step),
# LIB_DIR (where the library is installed, default kernels/lib; another folder leaves the
# package's own library alone: load that build with DPT_NATIVE_LIB=<LIB_DIR>/libdpt_engine_ops.so).
# Exits non-zero when the build fails; the package still imports and uses its PyTorch fallbacks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
case "$PYTHON" in
  */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;;  # absolute, for CMake's cache
  *) PYTHON="$(command -v "$PYTHON" || echo "$PYTHON")" ;;
esac
BUILD_DIR=${BUILD_DIR:-build/native}
JOBS=${JOBS:-2}
if [ -z "${DPT_BUILD_CUDA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    DPT_BUILD_CUDA=AUTO
  else
    DPT_BUILD_CUDA=OFF
  fi
fi

command -v cmake >/dev/null 2>&1 || { echo "[build_native] cmake not found" >&2; exit 1; }
GENERATOR=()
if command -v ninja >/dev/null 2>&1 && [ ! -f "$BUILD_DIR/Makefile" ]; then GENERATOR=(-G Ninja); fi

start=$(date +%s)
mkdir -p "$BUILD_DIR"
LOG="$BUILD_DIR/configure.log"
echo "[build_native] configuring ($BUILD_DIR, DPT_BUILD_CUDA=$DPT_BUILD_CUDA, python $PYTHON)"
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of words
cmake -S "$ROOT" -B "$BUILD_DIR" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DDPT_PYTHON="$PYTHON" \
  -DDPT_BUILD_CUDA="$DPT_BUILD_CUDA" \
  -DDPT_CUDA_ARCHITECTURES="${DPT_CUDA_ARCHITECTURES:-80;90}" \
  ${CMAKE_ARGS:-} >"$LOG" 2>&1 \
  || { cat "$LOG" >&2; echo "[build_native] configure failed" >&2; exit 1; }
grep -E "dpt_engine:|Warning|WARNING" "$LOG" || true
echo "[build_native] building with $JOBS jobs"
cmake --build "$BUILD_DIR" --parallel "$JOBS"

lib=$(find "$BUILD_DIR" -maxdepth 2 -name 'libdpt_engine_ops.so' -print -quit)
[ -n "$lib" ] || { echo "[build_native] libdpt_engine_ops.so not produced" >&2; exit 1; }
# Smoke test before installing: the library loads into this torch and registers its ops.
"$PYTHON" -c "
import sys, torch
torch.ops.load_library(sys.argv[1])
print('[build_native] ops load; CPU loops:', torch.ops.dpt_engine.cpu_isa(),
      '| CUDA kernels:', torch.ops.dpt_engine.built_with_cuda())
" "$lib" || { echo "[build_native] the built library does not load; not installing it" >&2; exit 1; }
LIB_DIR=${LIB_DIR:-kernels/lib}
mkdir -p "$LIB_DIR"
# Copy then rename, so a running process never maps a half-written file.
cp "$lib" "$LIB_DIR/.libdpt_engine_ops.so.tmp"
mv -f "$LIB_DIR/.libdpt_engine_ops.so.tmp" "$LIB_DIR/libdpt_engine_ops.so"
echo "[build_native] installed $LIB_DIR/libdpt_engine_ops.so ($(( $(date +%s) - start )) s)"
