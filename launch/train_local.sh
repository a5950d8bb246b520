#!/usr/bin/env bash
# One training run on this machine, resumable: re-running the same command continues from
# RUN_DIR/checkpoints/latest.pt. Usage (from the repository root):
#   RUN_DIR=runs/brats launch/train_local.sh +exp=brats data.root=/data/Task01_BrainTumour
set -euo pipefail
RUN_DIR="${RUN_DIR:-runs/local}"
exec "${PYTHON:-python}" -m lampseg train run_dir="$RUN_DIR" "$@"
