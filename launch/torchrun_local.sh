#!/usr/bin/env bash
# Data-parallel (DDP) training on one machine: NPROC processes (default: one per GPU, or 2 on a CPU-only
# machine) started by torchrun on localhost. Resumable: re-running the same command continues from
# RUN_DIR/checkpoints/latest.pt. Usage (from the repository root):
#   NPROC=4 RUN_DIR=runs/brats_ddp4 launch/torchrun_local.sh +exp=brats data.root=/data/Task01_BrainTumour
#   PARALLEL=pipeline NPROC=4 launch/torchrun_local.sh parallel.dp=2 parallel.pp=2   # DP x PP
# Environment: NPROC, RUN_DIR, PARALLEL (ddp|pipeline), OMP_THREADS (CPU threads per process, default
# cores / NPROC), PYTHON (the interpreter with lampseg installed).
set -euo pipefail
PYTHON="${PYTHON:-python}"
GPUS="$(nvidia-smi -L 2>/dev/null | wc -l || true)"
NPROC="${NPROC:-$(( GPUS > 0 ? GPUS : 2 ))}"
RUN_DIR="${RUN_DIR:-runs/ddp}"
PARALLEL="${PARALLEL:-ddp}"
CORES="$(nproc 2>/dev/null || echo 1)"
export OMP_NUM_THREADS="${OMP_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
exec "$PYTHON" -m lampseg.launch --standalone --nproc_per_node "$NPROC" \
    -m lampseg train parallel="$PARALLEL" run_dir="$RUN_DIR" "$@"
