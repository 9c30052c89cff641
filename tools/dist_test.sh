#!/usr/bin/env bash
# Test a checkpoint on GPUS processes with torchrun.
#   bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args]
# Honours NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (29500)
# and PYTHON. On a machine without a GPU the processes use gloo on the CPU.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT GPUS [tools/test.py arguments]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
exec bash "$(dirname "$0")/_torchrun.sh" "$GPUS" test.py "$CONFIG" "$CHECKPOINT" "$@"
