#!/usr/bin/env bash
# Pipeline-parallel training on this machine: one U-Net stage per process (torch.distributed.pipelining),
# PP processes started by torchrun on localhost. Resumable: re-running the same command continues from
# RUN_DIR/checkpoints/latest.pt. Usage (from the repository root):
#   PP=4 RUN_DIR=runs/brats_pp4 launch/pipeline_local.sh +exp=brats data.root=/data/Task01_BrainTumour parallel.memory_gb=16
# On a CPU each process gets OMP_THREADS threads (default: cores / PP, at least 1).
set -euo pipefail
PP="${PP:-2}"
RUN_DIR="${RUN_DIR:-runs/pipeline}"
CORES="$(nproc 2>/dev/null || echo 1)"
export OMP_NUM_THREADS="${OMP_THREADS:-$(( CORES / PP > 0 ? CORES / PP : 1 ))}"
exec "${PYTHON:-python}" -m lampseg.launch --standalone --nproc_per_node "$PP" \
    -m lampseg train parallel=pipeline parallel.pp="$PP" run_dir="$RUN_DIR" "$@"
