#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job: pretrain a small LLaMA on the Python standard library's
# source with patch_model + optim="stable_spam" + GNSCallback(schedule="gns"), then the same model with a fixed
# batch, and compare them. Extra arguments go to the script (any TrainingArguments flag, e.g. --num_train_epochs 2;
# --baseline none skips the fixed batch). Each run is announced as it starts ("run 1/2: ...", "run 2/2: ...") and
# its result as it ends. Output: runs/pretrain_clm/ (model, metrics.json, gns_plot.png; the fixed batch's run in
# baseline_fixed_batch/), each run's folder written as it goes: a checkpoint and metrics.json ("complete": false)
# at each evaluation point. An interrupted job continues with: bash scripts/main_job.sh --resume_from_checkpoint true
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
.venv/bin/python examples/pretrain_clm.py "$@"
