#!/usr/bin/env bash
# The prepared GPU check (docs/BENCHMARKS.md, "GPU check"): doctor with every check, the default train at
# trainer.precision=auto, short bench pipeline / inference / spatial runs and a DDP train over as many
# processes as GPUs (two sharing one GPU on a one-GPU machine), each with its own timeout, under 8 minutes
# in all; writes one JSON (default gpu_check.json) and keeps every step's run directory and logs beside it
# (OUT_runs/). Exit status 0 when every step passed. Usage (anywhere lampseg is installed):
#   launch/gpu_check.sh gpu_check.json                # on a machine with 1+ GPUs
#   launch/gpu_check.sh --dry-run gpu_check_dry.json  # the same steps on the CPU at tiny sizes
#   launch/gpu_check.sh --steps train,bench_inference out.json   # a subset (python -m lampseg.doctor.gpu_check -h)
# Environment: PYTHON (the interpreter with lampseg installed, default python).
set -euo pipefail
exec "${PYTHON:-python}" -m lampseg.doctor.gpu_check "$@"
