#!/usr/bin/env bash
# Distributed training with torchrun, like MMDetection's script:
#   bash tools/dist_train.sh CONFIG GPUS [train.py options...]
# Several nodes: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 PORT=29500 bash tools/dist_train.sh ...
# (run once per node with its NODE_RANK). PYTHON=/path/to/python picks the interpreter (default:
# the repo's .venv, else python on PATH); the script says which one it uses.
# Without CUDA the processes use the gloo backend on CPU.
set -euo pipefail
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/_python.sh"  # PYTHON: set, else the repo's .venv, else python on PATH; must import torch
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$HERE/train.py" "$CONFIG" --launcher pytorch "${@:3}"
