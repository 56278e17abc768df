#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job: pretrain a small LLaMA on the Python standard library's
# source with patch_model + optim="stable_spam" + GNSCallback(schedule="gns"), then the same model with a fixed
# batch, and compare them. Extra arguments go to the script (any TrainingArguments flag, e.g. --num_train_epochs 2;
# --baseline none skips the fixed batch). Output: runs/pretrain_clm/ (model, metrics.json, gns_plot.png; the fixed
# batch's run in baseline_fixed_batch/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
.venv/bin/python examples/pretrain_clm.py "$@"
