#!/usr/bin/env bash
# Create .venv and install hf-gns-spam with its test dependencies, at the versions of constraints.txt (the ones the
# suite, the main job and BENCHMARKS.md were run with), so that every fresh machine gets the same.
#   HF_GNS_SPAM_CONSTRAINTS=none    the newest releases pyproject.toml's ranges allow instead (upgrades .venv)
#   HF_GNS_SPAM_CONSTRAINTS=FILE    another constraints file
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so that the plain `torch`
# requirement does not pull the multi-gigabyte CUDA build. A torch that is already in .venv is kept when it
# satisfies the constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="${HF_GNS_SPAM_CONSTRAINTS:-constraints.txt}"
if [ "$CONSTRAINTS" = none ]; then
    PIN=(--upgrade --upgrade-strategy eager)
    TORCH_PIN="$(sed -n 's/^torch==//p' constraints.txt)"
else
    if [ ! -f "$CONSTRAINTS" ]; then
        echo "scripts/setup.sh: HF_GNS_SPAM_CONSTRAINTS=$CONSTRAINTS is not a file (give a constraints file, or none)" >&2
        exit 2
    fi
    PIN=(--constraint "$CONSTRAINTS")
    TORCH_PIN="$(sed -n 's/^torch==//p' "$CONSTRAINTS")"
fi
TORCH_CPU_VERSION="${TORCH_CPU_VERSION:-${TORCH_PIN:-2.13.0}}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_REQUIREMENT=torch
else
    TORCH_REQUIREMENT="torch==${TORCH_CPU_VERSION}"
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "${PIN[@]}" "$TORCH_REQUIREMENT"
fi
.venv/bin/python -m pip install --quiet "${PIN[@]}" -e ".[test]"
