#!/usr/bin/env bash
# Shared by dist_train.sh and dist_test.sh: start GPUS processes of the
# python tool SCRIPT (tools/train.py or tools/test.py) with torchrun.
#   bash tools/_torchrun.sh GPUS SCRIPT [script arguments]
# Honours NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (29500)
# and PYTHON (python).
set -euo pipefail
GPUS=$1
SCRIPT=$2
shift 2
case "$GPUS" in
    ''|*[!0-9]*|0) echo "GPUS must be a positive integer, got '$GPUS'" >&2; exit 2 ;;
esac
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$GPUS" --master_port="${PORT:-29500}" \
    "$HERE/$SCRIPT" "$@" --launcher pytorch
