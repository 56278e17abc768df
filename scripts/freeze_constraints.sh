#!/usr/bin/env bash
# Rewrite constraints.txt from .venv (after `HF_GNS_SPAM_CONSTRAINTS=none bash scripts/test.sh` passed): its comment
# header is kept, the pins are `pip freeze` without the package itself, torch without its local label (+cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
header="$(grep '^#' constraints.txt)"
pins="$(.venv/bin/python -m pip freeze --exclude-editable | grep -v '^#' | sed 's/^torch==\([^+]*\)+.*$/torch==\1/')"
printf '%s\n%s\n' "$header" "$pins" > constraints.txt
git --no-pager diff --stat constraints.txt
