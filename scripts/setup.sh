#!/usr/bin/env bash
# Create .venv and install hf-gns-spam with its test dependencies.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so that the plain `torch`
# requirement does not pull the multi-gigabyte CUDA build. A torch that is already in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_CPU_VERSION="${TORCH_CPU_VERSION:-2.13.0}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        .venv/bin/python -m pip install --quiet torch
    else
        .venv/bin/python -m pip install --quiet "torch==${TORCH_CPU_VERSION}"
    fi
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
