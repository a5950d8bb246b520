#!/usr/bin/env bash
# Multi-node training: run this same command on every node (NODE_RANK 0 .. NNODES-1); the nodes meet at a
# c10d rendezvous on MASTER_ADDR:MASTER_PORT (a node's address that the others can reach; the first
# node hosts the rendezvous store). Resumable from RUN_DIR/checkpoints/latest.pt (RUN_DIR on a shared file
# system). Usage (from the repository root), on node 0 and node 1:
#   NNODES=2 NODE_RANK=0 NPROC=4 MASTER_ADDR=node0 RUN_DIR=runs/brats_2x4 launch/torchrun_multinode.sh +exp=brats
#   NNODES=2 NODE_RANK=1 NPROC=4 MASTER_ADDR=node0 RUN_DIR=runs/brats_2x4 launch/torchrun_multinode.sh +exp=brats
# Environment: NNODES, NODE_RANK, NPROC (per node), MASTER_ADDR (default 127.0.0.1), MASTER_PORT (29500),
# RDZV_ID (a job id shared by the nodes), LOCAL_ADDR (this node's address for the workers' own traffic;
# default: the host name), RUN_DIR, PARALLEL (ddp|pipeline), OMP_THREADS, PYTHON.
set -euo pipefail
PYTHON="${PYTHON:-python}"
NNODES="${NNODES:?set NNODES, the number of nodes}"
NODE_RANK="${NODE_RANK:?set NODE_RANK, this node (0 .. NNODES-1)}"
GPUS="$(nvidia-smi -L 2>/dev/null | wc -l || true)"
NPROC="${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-lampseg}"
RUN_DIR="${RUN_DIR:-runs/multinode}"
PARALLEL="${PARALLEL:-ddp}"
CORES="$(nproc 2>/dev/null || echo 1)"
export OMP_NUM_THREADS="${OMP_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
LOCAL=()
if [[ -n "${LOCAL_ADDR:-}" ]]; then
    LOCAL=(--local_addr "$LOCAL_ADDR")
fi
exec "$PYTHON" -m lampseg.launch --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" ${LOCAL[@]+"${LOCAL[@]}"} \
    -m lampseg train parallel="$PARALLEL" run_dir="$RUN_DIR" "$@"
