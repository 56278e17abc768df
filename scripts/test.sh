#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite on CPU, plus ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/python -m pytest -v --durations=25 "$@"  # a line per test: a slow run is visibly alive
