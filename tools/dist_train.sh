#!/usr/bin/env bash
# Train on GPUS processes of this node (or of NNODES nodes) with torchrun.
#   bash tools/dist_train.sh CONFIG GPUS [train.py args]
# Honours NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (29500)
# and PYTHON. With CUDA: one process per GPU (LOCAL_RANK i on GPU i; more
# processes than GPUs are refused), NCCL. On a machine without a GPU the
# processes use gloo on the CPU.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG GPUS [tools/train.py arguments]" >&2
    exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
exec bash "$(dirname "$0")/_torchrun.sh" "$GPUS" train.py "$CONFIG" "$@"
