#!/usr/bin/env bash
# Evaluation on a Slurm cluster, like MMDetection's script:
#   GPUS=8 bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options...]
# GPUS (total), GPUS_PER_NODE (default 8), CPUS_PER_TASK (default 5), SRUN_ARGS, PYTHON.
set -euo pipefail
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/_python.sh"  # PYTHON: set, else the repo's .venv, else python on PATH; must import torch
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" \
srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
    $SRUN_ARGS "$PYTHON" -u "$HERE/test.py" "$CONFIG" "$CHECKPOINT" --launcher slurm "${@:5}"
