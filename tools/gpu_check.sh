#!/usr/bin/env bash
# Everything CUDA-specific of bpt_mm, checked in one go on one GPU within 8
# minutes (each step has its own time limit; never run yet, no GPU so far):
#   1. the CUDA tests (tests/test_cuda.py) and the --amp/NCCL choices
#      (tests/test_gpu_choices.py);
#   2. a 50-iteration tiny Mask R-CNN with --amp (bf16 where the GPU has it),
#      evaluated with CocoMetric;
#   3. tools/benchmark.py --arch base --size 512 with the variants of the
#      Performance table of docs/performance.md (CUDA time and peak memory).
# Then writes OUT/summary.md: the GPU, each step's command, status, time
# and result (pytest's summary, the last training losses and AP, the
# benchmark table). Full logs are beside it.
#
#   bash tools/gpu_check.sh [--dry-run] [--out DIR]
#
#   --dry-run   print the commands it would run and where the summary would
#               go; runs nothing, needs no GPU
#   --out DIR   where logs and summary.md go (default: work_dirs/gpu_check)
# Honours PYTHON (default: .venv/bin/python if present, else python).
# Exits non-zero if any step fails (the others still run) or without CUDA.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Paths the user gives (--out, PYTHON) are relative to where they ran the
# script, not to the clone it changes into.
CALLER_DIR="$PWD"
cd "$ROOT"
DRY_RUN=0
OUT="work_dirs/gpu_check"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --out)
            [[ $# -ge 2 && -n "$2" ]] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }
            OUT="$2"; [[ "$OUT" == /* ]] || OUT="$CALLER_DIR/$OUT"; shift 2 ;;
        *) echo "usage: bash tools/gpu_check.sh [--dry-run] [--out DIR] (unknown argument '$1')" >&2; exit 2 ;;
    esac
done
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
elif [[ "$PYTHON" == */* && "$PYTHON" != /* ]]; then
    PYTHON="$CALLER_DIR/$PYTHON"  # a relative path; a bare name stays on PATH
fi

TINY_CONFIG=configs/tiny/mask_rcnn_bpt_tiny.py
# The variants of the Performance table (docs/performance.md), in its order.
BENCH_VARIANTS=(full_finetune frozen vpt_shallow vpt_deep bpt_fwhiten_shallow
    bpt_twhiten_shallow bpt_bilinear_shallow bpt_fwhiten_deep_top4
    bpt_twhiten_deep_top4 bpt_bilinear_deep_top4 bpt_bilinear_deep)

# The CPU tests with a CUDA case (parametrized over helpers.DEVICES).
DEVICE_TESTS=(tests/test_attention.py::test_block_with_frozen_patches_equals_plain_block
    tests/test_vit.py::test_inference_caches_deep_prompt_keys_values_until_weights_change)

# name, time limit (s), command
STEP_NAMES=(cuda_tests tiny_data mask_rcnn_amp benchmark)
STEP_LIMITS=(120 30 120 210)
STEP_COMMANDS=(
    "$(printf '%q ' "$PYTHON" -m pytest tests/test_cuda.py tests/test_gpu_choices.py \
        "${DEVICE_TESTS[@]}" -v -rs --durations=10)"
    "$(printf '%q ' "$PYTHON" tools/make_tiny_data.py)"
    "$(printf '%q ' "$PYTHON" tools/train.py "$TINY_CONFIG" --amp --work-dir "$OUT/mask_rcnn_amp" \
        --cfg-options train_cfg.max_iters=50 train_cfg.val_interval=50 default_hooks.checkpoint.interval=50)"
    "$(printf '%q ' "$PYTHON" tools/benchmark.py --arch base --size 512 --whitening-images 100 \
        --out "$OUT/benchmark.json" --variants "${BENCH_VARIANTS[@]}")"
)

if [[ $DRY_RUN == 1 ]]; then
    echo "[gpu_check] dry run: would run, from $ROOT, each step with its time limit:"
    for i in "${!STEP_NAMES[@]}"; do
        echo "[gpu_check] ${STEP_NAMES[$i]} (limit ${STEP_LIMITS[$i]} s): ${STEP_COMMANDS[$i]% }"
        echo "[gpu_check]     log: $OUT/${STEP_NAMES[$i]}.log"
    done
    echo "[gpu_check] summary: $OUT/summary.md"
    exit 0
fi

if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "[gpu_check] ERROR: $PYTHON sees no CUDA GPU (torch.cuda.is_available() is false); nothing was run. 'bash tools/gpu_check.sh --dry-run' shows what would run." >&2
    exit 2
fi

mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
FAILED=0
{
    echo "# bpt_mm GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$PYTHON" -c 'import torch, mmcv, mmcv.ops
print(f"- GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}, {torch.cuda.device_count()} visible)")
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 native: {torch.cuda.get_device_capability()[0] >= 8}")
print(f"- mmcv {mmcv.__version__}, ops compiled with CUDA {mmcv.ops.get_compiling_cuda_version()}")' 2>&1
    echo
} > "$SUMMARY"

for i in "${!STEP_NAMES[@]}"; do
    name="${STEP_NAMES[$i]}"
    log="$OUT/$name.log"
    echo "[gpu_check] $name: ${STEP_COMMANDS[$i]% }"
    start=$SECONDS
    timeout "${STEP_LIMITS[$i]}" bash -c "${STEP_COMMANDS[$i]}" > "$log" 2>&1
    status=$?
    took=$((SECONDS - start))
    if [[ $status == 0 ]]; then verdict=passed; else verdict="FAILED (exit $status)"; FAILED=1; fi
    [[ $status == 124 ]] && verdict="FAILED (over its ${STEP_LIMITS[$i]} s limit)"
    echo "[gpu_check] $name: $verdict in ${took} s (log: $log)"
    {
        echo "## $name: $verdict in ${took} s"
        echo
        echo '```'
        echo "${STEP_COMMANDS[$i]% }"
        echo '```'
        echo
        case "$name" in
            cuda_tests)
                echo '```'
                grep -E '(SKIPPED|FAILED|ERROR)|^=+ .*(passed|failed|skipped|error).* =+$' "$log" | tail -n 30
                echo '```' ;;
            mask_rcnn_amp)
                echo '```'
                grep -E 'Iter\(train\)' "$log" | tail -n 2
                grep -E 'coco/(bbox|segm)_mAP' "$log" | tail -n 2
                grep -E 'AmpOptimWrapper|dtype' "$log" | head -n 2
                echo '```' ;;
            benchmark)
                sed -n '/^ViT-/,$p' "$log" ;;
        esac
        if [[ $status != 0 ]]; then
            echo
            echo "Last lines of the log:"
            echo
            echo '```'
            tail -n 25 "$log"
            echo '```'
        fi
        echo
    } >> "$SUMMARY"
done
echo "[gpu_check] summary: $SUMMARY"
exit $FAILED
